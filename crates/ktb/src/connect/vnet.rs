//! The virtio-net header in front of each packet on connect's TUN device
//! (Linux's `IFF_VNET_HDR`), so that the kernel and ktb do not checksum
//! the same bytes twice.
//!
//! Without it, the kernel verifies the TCP checksum of every packet ktb
//! writes, a pass over up to 64 KiB that smoltcp has just made to compute
//! it: 11 % of the CLI's CPU time under `cargo xtask bench connect`
//! (`csum_partial`, perf, 2026-12-04). With it:
//! - ktb writes each packet behind a header saying "checksum valid"
//!   ([`DATA_VALID`]), and the kernel takes it as verified. smoltcp still
//!   computes it: a packet the laptop forwards on (to a container or VM
//!   behind it) leaves with a correct one.
//! - The device offers checksum offload only (`TUN_F_CSUM`, no
//!   segmentation offloads, so every packet still fits the MTU), and the
//!   laptop's kernel hands its packets over with the transport checksum
//!   left partial ([`NEEDS_CSUM`]) instead of computing it. smoltcp never
//!   checks TCP checksums; the other packets (UDP, for ipstack) are
//!   completed here, as a network card would.
//!
//! Header layout (`struct virtio_net_hdr`, little-endian on the machines
//! ktb runs on): flags u8, gso_type u8, hdr_len u16, gso_size u16,
//! csum_start u16, csum_offset u16.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use tun_rs::AsyncDevice;

/// Bytes of header in front of each packet.
pub const HEADER_LEN: usize = 10;
/// The packet's transport checksum holds only the pseudo-header's sum:
/// sum from `csum_start` on and store the result at `csum_offset` past it.
const NEEDS_CSUM: u8 = 1;
/// The packet's checksums are correct; the kernel need not verify them.
const DATA_VALID: u8 = 2;
/// What ktb writes in front of every packet: checksums valid, no
/// segmentation.
const WRITTEN: [u8; HEADER_LEN] = [DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0];
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

/// Writes `packet` to the device behind the header that says its
/// checksums are valid.
pub async fn send(device: &AsyncDevice, packet: &[u8]) -> io::Result<usize> {
    let frame = [IoSlice::new(&WRITTEN), IoSlice::new(packet)];
    device.send_vectored(&frame).await
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
    let is_ipv4_tcp = packet.first().is_some_and(|b| b >> 4 == 4) && packet.get(9) == Some(&6);
    if needs_checksum && !is_ipv4_tcp {
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
    let mut sum: u32 = 0;
    let mut words = packet[start..].chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut checksum = !(sum as u16);
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

    /// The one's complement sum of the pseudo-header and the datagram,
    /// checksum included: all ones when the checksum is right.
    fn verifies(packet: &[u8]) -> bool {
        let udp = &packet[20..];
        let mut sum: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + udp.len() as u32;
        for pair in udp.chunks(2) {
            sum += u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
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
