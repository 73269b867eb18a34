//! The virtio-net header in front of each packet on connect's TUN device
//! (Linux's `IFF_VNET_HDR`), so that the kernel and ktb do not checksum
//! the same bytes twice.
//!
//! Without it, smoltcp computes the TCP checksum of every packet ktb
//! writes and the kernel verifies it, two passes over up to 64 KiB: 13 %
//! of the CLI's CPU time under `cargo xtask bench connect` (smoltcp's
//! `Repr::emit` and the kernel's `csum_partial`, perf, 2026-12-04). With
//! it, both directions leave the checksum partial, as between a virtual
//! machine and its host:
//! - smoltcp leaves TCP checksums out; ktb seeds the field with the
//!   pseudo-header's sum and writes the packet behind a header asking for
//!   the rest ([`NEEDS_CSUM`]). The kernel takes such a packet as verified
//!   when it is for the laptop, and completes the checksum itself should
//!   the laptop forward it on (to a container or VM behind it). UDP from
//!   ipstack goes out checksummed, behind an empty header.
//! - The device offers checksum offload only (`TUN_F_CSUM`, no
//!   segmentation offloads, so every packet still fits the MTU), so the
//!   laptop's kernel hands its packets over with the same partial
//!   checksums instead of computing them. smoltcp checks no TCP
//!   checksums; the other packets (UDP, for ipstack) are completed here,
//!   as a network card would.
//!
//! Header layout (`struct virtio_net_hdr`, little-endian on the machines
//! ktb runs on): flags u8, gso_type u8, hdr_len u16, gso_size u16,
//! csum_start u16, csum_offset u16.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use tun_rs::AsyncDevice;

use super::netstack::is_ipv4_tcp;

/// Bytes of header in front of each packet.
pub const HEADER_LEN: usize = 10;
/// The packet's transport checksum holds only the pseudo-header's sum:
/// sum from `csum_start` on and store the result at `csum_offset` past it.
const NEEDS_CSUM: u8 = 1;
/// Where the checksum sits in a TCP header.
const TCP_CHECKSUM_AT: usize = 16;
/// TCP's protocol number, in the pseudo-header.
const TCP: u8 = 6;
/// `TUN_F_CSUM`: the device takes packets with partial checksums.
const TUN_F_CSUM: u32 = 0x01;

// TUNSETOFFLOAD: _IOW('T', 208, unsigned int).
nix::ioctl_write_int!(tun_set_offload, b'T', 208);

/// Narrows the device's offloads to checksums. tun-rs, asked for headers,
/// also turns on TCP and UDP segmentation offloads, which would hand ktb
/// packets larger than the MTU to cut up itself.
pub fn offload_checksums_only(device: &AsyncDevice) -> io::Result<()> {
    // SAFETY: the descriptor is the device's own, open while `device`
    // lives, and TUNSETOFFLOAD takes its flags by value.
    unsafe { tun_set_offload(device.as_raw_fd(), TUN_F_CSUM.into()) }?;
    Ok(())
}

/// Writes `packet` to the device. An IPv4 TCP packet's checksum, which
/// smoltcp left out, is left to the kernel.
pub async fn send(device: &AsyncDevice, packet: &mut [u8]) -> io::Result<usize> {
    let header = header_for(packet);
    let frame = [IoSlice::new(&header), IoSlice::new(packet)];
    device.send_vectored(&frame).await
}

/// The header to write `packet` behind: for IPv4 TCP, "complete the
/// checksum" with the pseudo-header's sum put in its field; for anything
/// else, which carries its checksums, nothing.
fn header_for(packet: &mut [u8]) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    let Some(start) = ipv4_tcp_header_len(packet) else {
        return header;
    };
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]])).min(packet.len());
    let Some(tcp_len) = total.checked_sub(start) else {
        return header;
    };
    let field = start + TCP_CHECKSUM_AT;
    if field + 2 > total {
        return header;
    }
    let addresses = &packet[12..20];
    let sum = u32::from(TCP) + tcp_len as u32 + sum_words(addresses);
    packet[field..field + 2].copy_from_slice(&fold(sum).to_be_bytes());
    header[0] = NEEDS_CSUM;
    header[2..4].copy_from_slice(&((field + 2) as u16).to_le_bytes()); // hdr_len
    header[6..8].copy_from_slice(&(start as u16).to_le_bytes());
    header[8..10].copy_from_slice(&(TCP_CHECKSUM_AT as u16).to_le_bytes());
    header
}

/// The IP header's length when `packet` is IPv4 carrying TCP, which is
/// smoltcp's to take or to have sent.
fn ipv4_tcp_header_len(packet: &[u8]) -> Option<usize> {
    is_ipv4_tcp(packet).then(|| usize::from(packet[0] & 0x0f) * 4)
}

/// The sum of `bytes` as big-endian 16-bit words, an odd last byte padded
/// with zero: what a one's complement checksum folds. At most 64 KiB of
/// bytes, so it cannot overflow.
fn sum_words(bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    let mut sum: u32 = words
        .by_ref()
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// A 32-bit one's complement sum folded to 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The packet in `frame`, as read from the device, with its transport
/// checksum completed unless it is IPv4 TCP (smoltcp's, which checks
/// none). `None` for a frame too short to hold a header.
pub fn packet(frame: &mut [u8]) -> Option<&[u8]> {
    if frame.len() < HEADER_LEN {
        return None;
    }
    let (header, packet) = frame.split_at_mut(HEADER_LEN);
    let needs_checksum = header[0] & NEEDS_CSUM != 0;
    if needs_checksum && ipv4_tcp_header_len(packet).is_none() {
        let start = usize::from(u16::from_le_bytes([header[6], header[7]]));
        let offset = usize::from(u16::from_le_bytes([header[8], header[9]]));
        complete_checksum(packet, start, offset);
    }
    Some(packet)
}

/// Finishes a partial checksum as a network card would: the one's
/// complement sum of everything from `start` (the field at `start +
/// offset` already holds the pseudo-header's sum) goes into that field. A
/// header whose positions lie outside the packet is left alone.
fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) {
    let field = start + offset;
    if field + 2 > packet.len() {
        return;
    }
    let mut checksum = !fold(sum_words(&packet[start..]));
    // In UDP a zero checksum means "none": a computed zero is sent as
    // all ones (RFC 768); in TCP both stand for the same sum.
    if checksum == 0 {
        checksum = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP/IPv4 datagram 10.0.0.1:5353 → 10.0.0.2:53 with `payload`, its
    /// checksum field holding the pseudo-header sum (as the kernel leaves
    /// it), and the header the kernel puts in front of it.
    fn partial_udp(payload: &[u8]) -> Vec<u8> {
        let udp_len = 8 + payload.len();
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        packet.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        packet.extend_from_slice(&5353u16.to_be_bytes());
        packet.extend_from_slice(&53u16.to_be_bytes());
        packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
        let pseudo: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + udp_len as u32;
        let pseudo = ((pseudo & 0xffff) + (pseudo >> 16)) as u16;
        packet.extend_from_slice(&pseudo.to_be_bytes());
        packet.extend_from_slice(payload);
        let mut frame = vec![NEEDS_CSUM, 0, 0, 0, 0, 0];
        frame.extend_from_slice(&20u16.to_le_bytes()); // csum_start: the UDP header
        frame.extend_from_slice(&6u16.to_le_bytes()); // csum_offset: its checksum
        frame.extend_from_slice(&packet);
        frame
    }

    /// Whether the transport checksum of IPv4 `packet` is right: the one's
    /// complement sum of its pseudo-header and segment, checksum
    /// included, is all ones.
    fn verifies(packet: &[u8]) -> bool {
        let segment = &packet[20..];
        let mut sum = u32::from(packet[9]) + segment.len() as u32;
        for pair in packet[12..20].chunks(2).chain(segment.chunks(2)) {
            sum += u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
        }
        fold(sum) == 0xffff
    }

    /// An IPv4 TCP segment 10.96.0.10:80 → 198.18.0.1:40000 with
    /// `payload`, its checksum zero, as smoltcp leaves it.
    fn tcp(payload: &[u8]) -> Vec<u8> {
        let total = 40 + payload.len();
        let mut packet = vec![0x45, 0];
        packet.extend_from_slice(&(total as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 0, 64, TCP, 0, 0, 10, 96, 0, 10, 198, 18, 0, 1]);
        packet.extend_from_slice(&80u16.to_be_bytes());
        packet.extend_from_slice(&40000u16.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        packet.extend_from_slice(payload);
        packet
    }

    #[test]
    fn a_tcp_segment_goes_out_with_the_pseudo_header_sum_for_the_kernel_to_finish() {
        for payload in [&b""[..], b"x", b"GET / HTTP/1.1", b"an odd-length body"] {
            let mut packet = tcp(payload);
            let header = header_for(&mut packet);
            assert_eq!(header[0], NEEDS_CSUM);
            let start = usize::from(u16::from_le_bytes([header[6], header[7]]));
            let offset = usize::from(u16::from_le_bytes([header[8], header[9]]));
            assert_eq!((start, offset), (20, 16));
            assert!(usize::from(u16::from_le_bytes([header[2], header[3]])) >= 38);
            // What the kernel does with it, should the packet leave the laptop.
            complete_checksum(&mut packet, start, offset);
            assert!(verifies(&packet), "payload {payload:?}: {packet:02x?}");
        }
        let mut udp = partial_udp(b"dns?")[HEADER_LEN..].to_vec();
        let before = udp.clone();
        assert_eq!(header_for(&mut udp), [0; HEADER_LEN], "UDP carries its own");
        assert_eq!(udp, before);
    }

    #[test]
    fn a_partial_udp_checksum_is_completed() {
        for payload in [&b""[..], b"a", b"dns?", b"an odd-length payload"] {
            let mut frame = partial_udp(payload);
            let packet = packet(&mut frame).unwrap();
            assert!(verifies(packet), "payload {payload:?}: {packet:02x?}");
            assert_eq!(&packet[28..], payload);
        }
    }

    #[test]
    fn complete_checksums_and_tcp_are_left_alone() {
        let mut frame = partial_udp(b"dns?");
        frame[0] = 0; // no NEEDS_CSUM: the sum is what the sender wrote
        let before = frame[HEADER_LEN..].to_vec();
        assert_eq!(packet(&mut frame).unwrap(), before);

        let mut frame = partial_udp(b"data");
        frame[HEADER_LEN + 9] = 6; // IPv4 TCP: smoltcp checks no sums
        let before = frame[HEADER_LEN..].to_vec();
        assert_eq!(packet(&mut frame).unwrap(), before);
    }

    #[test]
    fn a_header_pointing_outside_the_packet_changes_nothing() {
        let mut frame = partial_udp(b"x");
        frame[6..8].copy_from_slice(&500u16.to_le_bytes());
        let before = frame[HEADER_LEN..].to_vec();
        assert_eq!(packet(&mut frame).unwrap(), before);
        assert_eq!(packet(&mut [0u8; 4]), None);
    }
}
