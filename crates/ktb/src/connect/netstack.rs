//! connect's TCP: smoltcp terminates every TCP connection the laptop opens
//! through the TUN device, and each one is handed out as a [`TcpConn`], an
//! async byte stream the tunnel carries like any local socket.
//!
//! Why smoltcp and not ipstack (which still carries UDP, see [`super::tun`]):
//! ipstack dropped a segment carrying data and FIN together, so a client
//! that half-closes after its last write (`nc -N`, uploads) never finished,
//! it closed its own side as soon as the laptop half-closed, and it has no
//! window scaling. smoltcp is a complete TCP (half-close, FIN with data,
//! window scaling, retransmission), but only a state machine: this module is
//! the socket layer it lacks.
//!
//! One task owns the interface and every socket. It learns of a new
//! connection from its SYN (a listening socket bound to exactly that
//! destination is made before the SYN is fed in, since smoltcp accepts
//! only on sockets that listen), polls smoltcp, and moves bytes between
//! each socket and the [`TcpConn`] its carrier holds. Those buffers are
//! bounded: a full one stops reading the socket, so smoltcp's window closes
//! and the laptop's sender waits, never memory. Every event (a packet, a
//! carrier reading or writing) wakes the task; smoltcp's own timers wake it
//! through `poll_delay`.
//!
//! The end of a connection follows TCP's: the laptop's FIN is an EOF on the
//! [`TcpConn`], a carrier's shutdown is a FIN after the bytes before it, a
//! carrier that fails or is dropped unfinished resets the laptop's
//! connection, and a reset from the laptop fails the carrier's next read.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};

/// The stack's own address: never seen by anyone, it only makes smoltcp's
/// AnyIP rule (accept what a route through an own address covers) apply to
/// every destination. Next to the TUN device's own, in RFC 2544's range.
const STACK_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// smoltcp's buffers per connection, each way. The laptop's end of a
/// connection is microseconds away, so this only has to cover the time the
/// stack task takes to come round; window scaling lets it be announced whole.
const SOCKET_BUFFER: usize = 256 * 1024;
/// Bytes queued between a socket and its carrier, each way, before the
/// other side has to wait.
const CONN_BUFFER: usize = 256 * 1024;
/// Packets from the device waiting for the stack task.
pub const PACKET_QUEUE: usize = 1024;

/// A TCP connection from the laptop, as its carrier sees it.
pub struct TcpConn {
    shared: Arc<Shared>,
    /// Where the laptop wanted to go.
    pub destination: SocketAddr,
}

/// What one connection's socket and its carrier share.
struct Shared {
    state: Mutex<ConnState>,
    /// Wakes the stack task.
    stack: Arc<Notify>,
}

#[derive(Default)]
struct ConnState {
    /// Received from the laptop, not yet read by the carrier.
    inbound: VecDeque<u8>,
    /// Written by the carrier, not yet taken by the socket.
    outbound: VecDeque<u8>,
    /// The laptop sent FIN and every byte before it is in `inbound`.
    laptop_finished: bool,
    /// The laptop reset the connection, or the stack lost it.
    broken: bool,
    /// The carrier shut its writing side: a FIN follows `outbound`.
    carrier_finished: bool,
    /// The carrier dropped its end. Without a shutdown before, it failed
    /// (the tunnel stream was refused or reset): the laptop gets a reset.
    carrier_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.shared.state.lock().expect("conn lock").carrier_gone = true;
        self.shared.stack.notify_one();
    }
}

impl AsyncRead for TcpConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.shared.state.lock().expect("conn lock");
        if !state.inbound.is_empty() {
            let n = state.inbound.len().min(buf.remaining());
            let (front, back) = state.inbound.as_slices();
            let first = front.len().min(n);
            buf.put_slice(&front[..first]);
            buf.put_slice(&back[..n - first]);
            state.inbound.drain(..n);
            drop(state);
            self.shared.stack.notify_one();
            return Poll::Ready(Ok(()));
        }
        if state.broken {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if state.laptop_finished {
            return Poll::Ready(Ok(()));
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for TcpConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.shared.state.lock().expect("conn lock");
        if state.broken {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let room = CONN_BUFFER.saturating_sub(state.outbound.len());
        if room == 0 {
            state.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        state.outbound.extend(&buf[..n]);
        drop(state);
        self.shared.stack.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared
            .state
            .lock()
            .expect("conn lock")
            .carrier_finished = true;
        self.shared.stack.notify_one();
        Poll::Ready(Ok(()))
    }
}

/// The stack task's side of the device: packets in from the TUN device,
/// packets out to it.
struct Queues {
    inbound: VecDeque<Vec<u8>>,
    outbound: mpsc::Sender<Vec<u8>>,
    mtu: usize,
    /// Whether smoltcp computes the TCP checksums of what it sends; see
    /// [`run`].
    tcp_checksums: bool,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mpsc::Sender<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let result = f(&mut packet);
        // A full device queue drops the packet, as a real link would;
        // TCP retransmits it.
        let _ = self.0.try_send(packet);
        result
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.inbound.pop_front()?;
        Some((RxToken(packet), TxToken(&self.outbound)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&self.outbound))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Received ones: the kernel computed them (or left them to the
        // device, see `super::vnet`); checking costs a pass per packet.
        let mut checksums = ChecksumCapabilities::default();
        checksums.ipv4 = phy::Checksum::Tx;
        checksums.tcp = if self.tcp_checksums {
            phy::Checksum::Tx
        } else {
            phy::Checksum::None
        };
        caps.checksum = checksums;
        caps
    }
}

/// A connection the stack task serves.
struct Conn {
    shared: Arc<Shared>,
    tuple: (SocketAddrV4, SocketAddrV4),
    /// `close()` was called on the socket (the FIN is queued).
    closing: bool,
}

/// Runs the stack: `packets` from the TUN device in, packets for it out on
/// `device`, and every new connection handed to `accept`. Returns when the
/// device's packets end. Without `tcp_checksums`, the TCP packets sent
/// carry a zero checksum for the device to fill in.
pub async fn run(
    mtu: usize,
    tcp_checksums: bool,
    mut packets: mpsc::Receiver<Vec<u8>>,
    device: mpsc::Sender<Vec<u8>>,
    accept: impl Fn(TcpConn),
) {
    let start = StdInstant::now();
    let now = || Instant::from_micros(start.elapsed().as_micros() as i64);
    let mut queues = Queues {
        inbound: VecDeque::new(),
        outbound: device,
        mtu,
        tcp_checksums,
    };
    let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut queues, now());
    iface.set_any_ip(true);
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(STACK_ADDRESS), 32));
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(STACK_ADDRESS)
        .expect("one route fits");
    let mut stack = Stack {
        sockets: SocketSet::new(Vec::new()),
        conns: HashMap::new(),
        wake: Arc::new(Notify::new()),
    };
    let mut arrived = None;
    loop {
        while let Some(packet) = arrived.take().or_else(|| packets.try_recv().ok()) {
            if let Some(conn) = stack.admit(&packet) {
                accept(conn);
            }
            queues.inbound.push_back(packet);
        }
        iface.poll(now(), &mut queues, &mut stack.sockets);
        if stack.carry() {
            // Bytes handed to sockets go out now, not at the next event.
            iface.poll(now(), &mut queues, &mut stack.sockets);
        }
        let delay = iface
            .poll_delay(now(), &stack.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
            .unwrap_or(IDLE_WAKE);
        tokio::select! {
            packet = packets.recv() => match packet {
                Some(packet) => arrived = Some(packet),
                None => return,
            },
            _ = stack.wake.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How long the task sleeps when smoltcp has no timer running.
const IDLE_WAKE: std::time::Duration = std::time::Duration::from_secs(60);

/// The sockets and the connections they serve.
struct Stack {
    sockets: SocketSet<'static>,
    conns: HashMap<SocketHandle, Conn>,
    /// Notified by every carrier that read or wrote.
    wake: Arc<Notify>,
}

impl Stack {
    /// Prepares a socket for `packet` when it opens a new connection, and
    /// returns the connection for its carrier.
    fn admit(&mut self, packet: &[u8]) -> Option<TcpConn> {
        let tuple = syn_tuple(packet)?;
        if self.conns.values().any(|c| c.tuple == tuple) {
            return None; // a retransmitted SYN
        }
        let (handle, conn) = listen(&mut self.sockets, tuple, &self.wake);
        let shared = Arc::clone(&conn.shared);
        self.conns.insert(handle, conn);
        Some(TcpConn {
            shared,
            destination: SocketAddr::V4(tuple.1),
        })
    }

    /// Moves bytes for every connection and forgets finished ones; true
    /// when bytes went into a socket.
    fn carry(&mut self) -> bool {
        let mut sent = false;
        for (handle, conn) in &mut self.conns {
            sent |= carry(self.sockets.get_mut::<tcp::Socket>(*handle), conn);
        }
        let sockets = &mut self.sockets;
        self.conns.retain(|handle, conn| {
            let done = is_done(sockets.get::<tcp::Socket>(*handle), conn);
            if done {
                sockets.remove(*handle);
            }
            !done
        });
        sent
    }
}

/// Whether `packet` is IPv4 carrying TCP: what this stack takes.
pub fn is_ipv4_tcp(packet: &[u8]) -> bool {
    const TCP: u8 = 6;
    packet.len() >= 20 && packet[0] >> 4 == 4 && packet[9] == TCP
}

/// The addresses of an IPv4 TCP segment with SYN and without ACK.
fn syn_tuple(packet: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4)> {
    if !is_ipv4_tcp(packet) {
        return None;
    }
    let header = usize::from(packet[0] & 0x0f) * 4;
    let tcp = packet.get(header..header + 20)?;
    let (syn, ack) = (tcp[13] & 0x02 != 0, tcp[13] & 0x10 != 0);
    if !syn || ack {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    Some((
        SocketAddrV4::new(ip(12), port(0)),
        SocketAddrV4::new(ip(16), port(2)),
    ))
}

/// A socket listening on exactly the SYN's destination, for that SYN.
fn listen(
    sockets: &mut SocketSet<'static>,
    tuple: (SocketAddrV4, SocketAddrV4),
    wake: &Arc<Notify>,
) -> (SocketHandle, Conn) {
    let buffer = || tcp::SocketBuffer::new(vec![0u8; SOCKET_BUFFER]);
    let mut socket = tcp::Socket::new(buffer(), buffer());
    // The tunnel batches already; Nagle would only add latency.
    socket.set_nagle_enabled(false);
    let endpoint = IpListenEndpoint {
        addr: Some(IpAddress::Ipv4(*tuple.1.ip())),
        port: tuple.1.port(),
    };
    socket
        .listen(endpoint)
        .expect("a fresh socket listens on a non-zero port");
    let handle = sockets.add(socket);
    let conn = Conn {
        shared: Arc::new(Shared {
            state: Mutex::new(ConnState::default()),
            stack: Arc::clone(wake),
        }),
        tuple,
        closing: false,
    };
    (handle, conn)
}

/// Moves what it can between `socket` and its carrier; true when bytes
/// went into the socket (they should go out before the task sleeps).
fn carry(socket: &mut tcp::Socket, conn: &mut Conn) -> bool {
    let mut state = conn.shared.state.lock().expect("conn lock");
    let mut woke_reader = false;
    while socket.can_recv() && state.inbound.len() < CONN_BUFFER {
        let room = CONN_BUFFER - state.inbound.len();
        let taken = socket.recv(|data| {
            let n = data.len().min(room);
            state.inbound.extend(&data[..n]);
            (n, n)
        });
        match taken {
            Ok(0) | Err(_) => break,
            Ok(_) => woke_reader = true,
        }
    }
    if !state.laptop_finished
        && !socket.may_recv()
        && socket.state() != tcp::State::Listen
        && socket.state() != tcp::State::SynReceived
    {
        state.laptop_finished = true;
        woke_reader = true;
    }
    if socket.state() == tcp::State::Closed && !conn.closing {
        // Reset by the laptop, or timed out.
        state.broken = true;
        woke_reader = true;
    }
    let mut sent = false;
    while socket.can_send() && !state.outbound.is_empty() {
        let (front, _) = state.outbound.as_slices();
        match socket.send_slice(front) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                state.outbound.drain(..n);
                sent = true;
            }
        }
    }
    if sent {
        if let Some(writer) = state.writer.take() {
            writer.wake();
        }
    }
    if state.outbound.is_empty() && state.carrier_finished && !conn.closing {
        socket.close();
        conn.closing = true;
    }
    if state.carrier_gone && !state.carrier_finished && socket.is_open() {
        socket.abort();
        conn.closing = true;
    }
    if woke_reader {
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }
    sent
}

/// Whether the connection is over for both its socket and its carrier.
fn is_done(socket: &tcp::Socket, conn: &Conn) -> bool {
    let state = conn.shared.state.lock().expect("conn lock");
    let socket_over = matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait);
    socket_over && state.carrier_gone
}

#[cfg(test)]
mod tests {
    use super::syn_tuple;

    fn segment(flags: u8) -> Vec<u8> {
        let mut packet = vec![0u8; 40];
        packet[0] = 0x45;
        packet[9] = 6;
        packet[12..16].copy_from_slice(&[198, 18, 0, 1]);
        packet[16..20].copy_from_slice(&[10, 96, 0, 10]);
        packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
        packet[22..24].copy_from_slice(&80u16.to_be_bytes());
        packet[33] = flags;
        packet
    }

    #[test]
    fn only_a_syn_without_ack_opens_a_connection() {
        let (laptop, destination) = syn_tuple(&segment(0x02)).unwrap();
        assert_eq!(laptop.to_string(), "198.18.0.1:40000");
        assert_eq!(destination.to_string(), "10.96.0.10:80");
        assert!(syn_tuple(&segment(0x12)).is_none(), "SYN+ACK");
        assert!(syn_tuple(&segment(0x10)).is_none(), "ACK");
        let mut udp = segment(0x02);
        udp[9] = 17;
        assert!(syn_tuple(&udp).is_none(), "UDP");
    }
}
