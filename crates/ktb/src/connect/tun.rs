//! TUN mode: a network device whose packets a userspace TCP/IP stack turns
//! back into connections and datagrams, each carried through the tunnel.
//!
//! tun-rs creates the device (it is the maintained cross-platform TUN
//! crate, with async I/O on tokio); ipstack is the TCP/IP stack: it speaks
//! TCP and UDP to the kernel on the device and hands out each flow as an
//! async stream, which is exactly the shape the tunnel carries, so no
//! socket layer of ours sits in between (smoltcp would need one). Every TCP
//! flow becomes a tunnel stream to the same address, dialed by the agent;
//! every UDP flow becomes a tunnel flow. Anything else (ICMP) is dropped,
//! so `ping` times out rather than hanging anything.

use std::io;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use ipstack::{
    IpStack, IpStackConfig, IpStackStream, IpStackTcpStream, IpStackUdpStream, TcpConfig,
    TcpOptions,
};
use ktb_proto::tcp::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tun_rs::{AsyncDevice, DeviceBuilder};

use super::outbound::Outbound;

/// The device's own address: from the range reserved for benchmarking
/// (RFC 2544), which no real network uses, so it collides with nothing.
pub const DEVICE_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Ethernet's MTU. Larger ones (9000, 65535) measured faster, but with
/// them ipstack's TCP stalled for good in some bulk transfers (`cargo
/// xtask bench connect` hung), so the stack keeps the size it is tested with.
const MTU: u16 = 1500;
/// ipstack resets a connection idle for its timeout (60 s by default); the
/// kernel never does, and pooled database or HTTP connections sit idle for
/// long, so only connections abandoned for hours are dropped.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2 * 60 * 60);
/// ipstack announces no MSS unless told, so the kernel falls back to 536
/// bytes per segment (RFC 9293): many more packets, and RR p99 of 45 ms
/// from delayed ACKs on the small segments, in `cargo xtask bench connect`.
const MSS: u16 = MTU - 40;

/// Creates the device, up, with its address. Needs CAP_NET_ADMIN. Never
/// made persistent: the device goes with the last handle to it, so one
/// that ktb dies before journaling cannot outlive it (see
/// [`super::system::create_device`]).
pub fn create(name: &str) -> io::Result<AsyncDevice> {
    DeviceBuilder::new()
        .name(name)
        .ipv4(DEVICE_ADDRESS, 32, None)
        .mtu(MTU)
        .build_async()
}

/// Carries every flow on the device through the tunnel, until dropped.
pub async fn serve(device: AsyncDevice, outbound: Outbound) {
    let mut config = IpStackConfig::default();
    config.mtu_unchecked(MTU);
    let mut tcp = TcpConfig::default();
    tcp.timeout = IDLE_TIMEOUT;
    tcp.options = Some(vec![TcpOptions::MaximumSegmentSize(MSS)]);
    config.with_tcp_config(tcp);
    let mut stack = IpStack::new(config, Device(device));
    while let Ok(flow) = stack.accept().await {
        match flow {
            IpStackStream::Tcp(tcp) => {
                tokio::spawn(carry_tcp(tcp, outbound.clone()));
            }
            IpStackStream::Udp(udp) => {
                tokio::spawn(carry_udp(udp, outbound.clone()));
            }
            IpStackStream::UnknownTransport(_) | IpStackStream::UnknownNetwork(_) => {}
        }
    }
}

async fn carry_tcp(tcp: IpStackTcpStream, outbound: Outbound) {
    let destination = tcp.peer_addr();
    let stream = match outbound.connect(Target::Addr(destination)).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(%destination, error = %e, "cannot connect through the tunnel");
            return;
        }
    };
    let (reader, writer) = tokio::io::split(tcp);
    let reader = Coalesce(reader);
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

/// Hands out every segment the stack has queued in one read. ipstack
/// returns one TCP segment per read, and the tunnel sends one frame per
/// read: without this, a sender whose window opens in small steps turns
/// into a stream of small frames, each paying the whole way through the
/// apiserver's port-forward.
struct Coalesce<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for Coalesce<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        loop {
            let before = buf.filled().len();
            match Pin::new(&mut self.0).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() > before && buf.remaining() > 0 => {}
                Poll::Ready(result) => return Poll::Ready(result),
                // Pending registered the waker; what was read so far goes now.
                Poll::Pending if buf.filled().len() > start => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The TUN device as the byte stream ipstack reads packets from: each read
/// is one packet, each write one packet.
struct Device(AsyncDevice);

impl AsyncRead for Device {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = std::task::ready!(self.0.poll_recv(cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Device {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_send(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
