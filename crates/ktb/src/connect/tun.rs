//! TUN mode: a network device whose packets userspace stacks turn back
//! into connections and datagrams, each carried through the tunnel.
//!
//! tun-rs creates the device (it is the maintained cross-platform TUN
//! crate, with async I/O on tokio). One task reads the device and sorts its
//! packets: IPv4 TCP goes to [`super::netstack`] (smoltcp under a socket
//! layer of ours), everything else to ipstack, which hands out each UDP
//! flow as an async stream. Both write their packets back through one
//! queue. Every TCP connection becomes a tunnel stream to the same address,
//! dialed by the agent; every UDP flow becomes a tunnel flow. Anything else
//! (ICMP) is dropped, so `ping` times out rather than hanging anything.
//! On Linux each packet crosses the device behind a virtio-net header
//! ([`super::vnet`]) that leaves TCP checksums partial both ways, so
//! neither ktb nor the kernel makes a pass over every packet for them.

use std::io;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use ipstack::{IpStack, IpStackConfig, IpStackStream, IpStackUdpStream};
use ktb_proto::tcp::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder};

use super::netstack::{self, TcpConn};
use super::outbound::Outbound;
#[cfg(target_os = "linux")]
use super::vnet;

/// The device's own address: from the range reserved for benchmarking
/// (RFC 2544), which no real network uses, so it collides with nothing.
pub const DEVICE_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The device's MTU: the largest IPv4 packet. No packet on this device
/// ever crosses a wire (the stacks behind it end every connection in this
/// process), so a smaller one only multiplies the per-packet work of the
/// laptop's kernel, the device and smoltcp. Measured with `cargo xtask
/// bench connect` (2026-12-03, against Ethernet's 1,500): ktb's own CPU
/// per GiB echoed 2.4 s instead of 3.4, the laptop-side sender's 0.3 s
/// instead of 0.6, the machine's 12.7 s instead of 14.3; bulk echo 74 MiB/s
/// instead of 69. A one-way 256 MiB upload takes 3.2 s with either: the
/// tunnel bounds it, not the device.
const MTU: u16 = 65535;
/// Creates the device, up, with its address. Needs CAP_NET_ADMIN. Never
/// made persistent: the device goes with the last handle to it, so one
/// that ktb dies before journaling cannot outlive it (see
/// [`super::system::create_device`]).
pub fn create(name: &str) -> io::Result<AsyncDevice> {
    let builder = DeviceBuilder::new()
        .name(name)
        .ipv4(DEVICE_ADDRESS, 32, None)
        .mtu(MTU);
    #[cfg(target_os = "linux")]
    {
        let device = builder.offload(true).build_async()?;
        vnet::offload_checksums_only(&device)?;
        Ok(device)
    }
    #[cfg(not(target_os = "linux"))]
    builder.build_async()
}

/// Bytes in front of each packet on the device.
#[cfg(target_os = "linux")]
const FRAME_HEADER: usize = vnet::HEADER_LEN;
#[cfg(not(target_os = "linux"))]
const FRAME_HEADER: usize = 0;

/// Whether smoltcp computes TCP checksums: not where the device completes
/// them (see `super::vnet`).
const STACK_TCP_CHECKSUMS: bool = cfg!(not(target_os = "linux"));

/// Writes one packet to the device.
async fn send(device: &AsyncDevice, packet: &mut [u8]) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    return vnet::send(device, packet).await;
    #[cfg(not(target_os = "linux"))]
    device.send(packet).await
}

/// The packet in a frame read from the device.
fn unframe(frame: &mut [u8]) -> Option<&[u8]> {
    #[cfg(target_os = "linux")]
    return vnet::packet(frame);
    #[cfg(not(target_os = "linux"))]
    Some(frame)
}

/// Carries every flow on the device through the tunnel, until dropped.
pub async fn serve(device: AsyncDevice, outbound: Outbound) {
    let device = std::sync::Arc::new(device);
    let (to_device, mut for_device) = mpsc::channel::<Vec<u8>>(netstack::PACKET_QUEUE);
    let (to_tcp, tcp_packets) = mpsc::channel(netstack::PACKET_QUEUE);
    let (to_udp, udp_packets) = mpsc::channel(netstack::PACKET_QUEUE);
    let writer = {
        let device = std::sync::Arc::clone(&device);
        async move {
            while let Some(mut packet) = for_device.recv().await {
                if let Err(e) = send(&device, &mut packet).await {
                    tracing::debug!(error = %e, "cannot write a packet to the TUN device");
                }
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; FRAME_HEADER + usize::from(MTU)];
        loop {
            let n = match device.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the TUN device");
                    return;
                }
            };
            let Some(packet) = unframe(&mut buf[..n]) else {
                continue;
            };
            let packet = packet.to_vec();
            let queue = if netstack::is_ipv4_tcp(&packet) {
                &to_tcp
            } else {
                &to_udp
            };
            if queue.send(packet).await.is_err() {
                return;
            }
        }
    };
    let tcp = {
        let outbound = outbound.clone();
        netstack::run(
            usize::from(MTU),
            STACK_TCP_CHECKSUMS,
            tcp_packets,
            to_device.clone(),
            move |conn| {
                tokio::spawn(carry_tcp(conn, outbound.clone()));
            },
        )
    };
    let udp = serve_udp(
        Packets {
            inbound: udp_packets,
            outbound: to_device,
        },
        outbound,
    );
    tokio::join!(writer, reader, tcp, udp);
}

/// ipstack over the packets that are not IPv4 TCP.
async fn serve_udp(packets: Packets, outbound: Outbound) {
    let mut config = IpStackConfig::default();
    config.mtu_unchecked(MTU);
    let mut stack = IpStack::new(config, packets);
    while let Ok(flow) = stack.accept().await {
        match flow {
            IpStackStream::Udp(udp) => {
                tokio::spawn(carry_udp(udp, outbound.clone()));
            }
            // IPv6 TCP has no route through ktb0; the rest is not carried.
            IpStackStream::Tcp(_)
            | IpStackStream::UnknownTransport(_)
            | IpStackStream::UnknownNetwork(_) => {}
        }
    }
}

/// The laptop's connection is already established (netstack answered its
/// SYN), so its first bytes go with the open; if the agent cannot dial,
/// the stream fails and the laptop's connection is reset, as a refused
/// connection would be after the fact.
async fn carry_tcp(conn: TcpConn, outbound: Outbound) {
    let destination = conn.destination;
    let stream = match outbound.open(Target::Addr(destination)).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(%destination, error = %e, "cannot connect through the tunnel");
            return; // dropping `conn` resets the laptop's connection
        }
    };
    let (reader, writer) = tokio::io::split(conn);
    if let Err(e) = stream.bridge(reader, writer).await {
        tracing::debug!(%destination, error = %e, "connection through the tunnel failed");
    }
}

async fn carry_udp(mut udp: IpStackUdpStream, outbound: Outbound) {
    let destination = udp.peer_addr();
    let Ok(mut flow) = outbound.flow().await else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = udp.read(&mut buf) => match read {
                // ipstack ends the stream after its UDP idle timeout.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if flow.send(destination, Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            },
            reply = flow.recv() => match reply {
                Some(reply) => {
                    if udp.write_all(&reply.payload).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

/// Packets as the byte stream ipstack reads and writes: each read is one
/// packet from the device, each write one packet for it.
struct Packets {
    inbound: mpsc::Receiver<Vec<u8>>,
    outbound: mpsc::Sender<Vec<u8>>,
}

impl AsyncRead for Packets {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(packet) = std::task::ready!(self.inbound.poll_recv(cx)) {
            let n = packet.len().min(buf.remaining());
            buf.put_slice(&packet[..n]);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Packets {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // A full device queue drops the packet, as a real link would.
        let _ = self.outbound.try_send(buf.to_vec());
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
