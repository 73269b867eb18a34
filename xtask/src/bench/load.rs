//! The load: a local server with two modes and the three measurements.
//!
//! The first byte of a connection picks the mode: `S` (sink: count bytes
//! until FIN, answer the count) for throughput towards the server, `D`
//! (source: read a count, send that many bytes, FIN) for throughput from
//! it, `E` (echo) for latency and concurrency. The same server stands
//! behind every path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// A step that takes longer than this is a failure, not a slow result.
const STEP_LIMIT: Duration = Duration::from_secs(300);
/// How long round trips beside a bulk stream are taken for at most.
const BESIDE_BULK_FOR: Duration = Duration::from_secs(20);
/// One round trip that takes longer than this is a failure: behind the
/// port-forward's queue at 20 ms the slowest came back in about 2 s, and
/// one that never did held its run for the whole [`STEP_LIMIT`].
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub throughput_gbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub concurrent_ms: f64,
    pub concurrent_errors: usize,
}

impl Figures {
    pub fn median(rounds: &[Figures]) -> Figures {
        let med = |f: fn(&Figures) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Figures {
            throughput_gbps: med(|f| f.throughput_gbps),
            p50_us: med(|f| f.p50_us),
            p99_us: med(|f| f.p99_us),
            concurrent_ms: med(|f| f.concurrent_ms),
            concurrent_errors: rounds
                .iter()
                .map(|f| f.concurrent_errors)
                .max()
                .unwrap_or(0),
        }
    }
}

pub struct LocalServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalServer {
    pub async fn start() -> anyhow::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(([127, 0, 0, 1], 0).into())?;
        let listener: TcpListener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp));
            }
        });
        Ok(LocalServer { addr, task })
    }
}

async fn serve(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mode = tcp.read_u8().await?;
    let mut buf = vec![0u8; 256 * 1024];
    match mode {
        b'S' => {
            let mut total = 0u64;
            loop {
                match tcp.read(&mut buf).await? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            tcp.write_u64(total).await?;
        }
        b'D' => {
            let mut left = tcp.read_u64().await?;
            buf.fill(0xa5);
            while left > 0 {
                let n = buf.len().min(left as usize);
                tcp.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
        }
        _ => {
            let (mut r, mut w) = tcp.split();
            tokio::io::copy(&mut r, &mut w).await?;
        }
    }
    tcp.shutdown().await
}

/// Where a measurement's connections go.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The echo server (or this module's server) measured.
    pub addr: SocketAddr,
    /// `None`: `addr` is dialled straight. `Some(proxy)`: every connection
    /// is a SOCKS5 CONNECT to `addr` through the proxy listening there.
    pub socks5: Option<SocketAddr>,
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target { addr, socks5: None }
    }
}

/// Connects and, for servers of this module, sends the mode byte; plain
/// echo servers (in-cluster workloads) get `None`.
async fn connect(to: Target, mode: Option<u8>) -> anyhow::Result<TcpStream> {
    let mut tcp = match to.socks5 {
        None => TcpStream::connect(to.addr).await?,
        Some(proxy) => socks5_connect(proxy, to.addr).await?,
    };
    tcp.set_nodelay(true)?;
    if let Some(mode) = mode {
        tcp.write_u8(mode).await?;
    }
    Ok(tcp)
}

/// A connection to `addr` through the SOCKS5 proxy at `proxy` (RFC 1928:
/// no authentication, CONNECT), returned once the proxy says it is made.
async fn socks5_connect(proxy: SocketAddr, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(proxy).await?;
    tcp.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await?;
    anyhow::ensure!(
        choice == [5, 0],
        "the SOCKS5 proxy refused no-auth: {choice:?}"
    );
    let mut request = vec![5, 1, 0];
    match addr {
        SocketAddr::V4(v4) => {
            request.push(1);
            request.extend(v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            request.push(4);
            request.extend(v6.ip().octets());
        }
    }
    request.extend(addr.port().to_be_bytes());
    tcp.write_all(&request).await?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await?;
    anyhow::ensure!(
        head[..2] == [5, 0],
        "the SOCKS5 proxy could not reach {addr}: reply {}",
        head[1]
    );
    // The bound address, which a tunnel's proxy does not make meaningful.
    let bound = match head[3] {
        1 => 4,
        4 => 16,
        3 => usize::from(tcp.read_u8().await?),
        other => anyhow::bail!("the SOCKS5 proxy replied address type {other}"),
    };
    let mut rest = vec![0u8; bound + 2];
    tcp.read_exact(&mut rest).await?;
    Ok(tcp)
}

/// The value at quantile `q` of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

pub async fn measure(
    addr: SocketAddr,
    throughput_bytes: u64,
    round_trips: usize,
    connections: usize,
    bytes_each: usize,
) -> anyhow::Result<Figures> {
    let throughput_gbps = limited("throughput", throughput(addr, throughput_bytes)).await?;
    let (p50_us, p99_us) =
        limited("latency", latency(addr.into(), Some(b'E'), round_trips)).await?;
    let (concurrent_ms, concurrent_errors) =
        limited("concurrency", concurrency(addr, connections, bytes_each)).await?;
    Ok(Figures {
        throughput_gbps,
        p50_us,
        p99_us,
        concurrent_ms,
        concurrent_errors,
    })
}

/// `f`, failed if it takes longer than [`STEP_LIMIT`].
pub async fn limited<T>(
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_LIMIT, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what} took longer than {STEP_LIMIT:?}"))?
}

/// One stream: `bytes` to the sink, timed until the sink confirms the
/// count, in Gb/s.
async fn throughput(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mib_per_s = upload(addr, bytes).await?;
    Ok(mib_per_s * 1024.0 * 1024.0 * 8.0 / 1e9)
}

/// MiB/s of one stream carrying `bytes` to this module's server (its sink),
/// timed until the sink confirms the count.
pub async fn upload(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut tcp = connect(addr.into(), Some(b'S')).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        tcp.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    tcp.shutdown().await?;
    let counted = tcp.read_u64().await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(
        counted == bytes,
        "the sink counted {counted} of {bytes} bytes"
    );
    Ok(bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64())
}

/// MiB/s of one stream carrying `bytes` from this module's server (its
/// source), timed from the request to the stream's end.
pub async fn download(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut tcp = connect(addr.into(), Some(b'D')).await?;
    let start = Instant::now();
    tcp.write_u64(bytes).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        match tcp.read(&mut buf).await? {
            0 => break,
            n => received += n as u64,
        }
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(
        received == bytes,
        "the source sent {received} of {bytes} bytes"
    );
    Ok(bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64())
}

/// p50 and p99 in µs of 1 KiB request/response round trips, one at a
/// time on one connection.
pub async fn latency(
    to: Target,
    mode: Option<u8>,
    round_trips: usize,
) -> anyhow::Result<(f64, f64)> {
    let tcp = connect(to, mode).await?;
    let samples = time_round_trips(tcp, round_trips, STEP_LIMIT).await?;
    Ok(p50_p99(samples))
}

/// p50 and p99 of timings in µs (round trips, new connections).
fn p50_p99(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (quantile(&samples, 0.50), quantile(&samples, 0.99))
}

/// Up to `count` round trips on `tcp`, fewer if `within` runs out first
/// (at least one is always taken): each one's time in µs, in order.
async fn time_round_trips(
    mut tcp: TcpStream,
    count: usize,
    within: Duration,
) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + within;
    let request = vec![0x42u8; 1024];
    let mut response = vec![0u8; 1024];
    let mut samples = Vec::with_capacity(count);
    for taken in 0..count {
        let start = Instant::now();
        let round_trip = async {
            tcp.write_all(&request).await?;
            tcp.read_exact(&mut response).await
        };
        tokio::time::timeout(ROUND_TRIP_LIMIT, round_trip)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "round trip {} had no answer within {ROUND_TRIP_LIMIT:?}",
                    taken + 1
                )
            })??;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        if Instant::now() >= deadline {
            break;
        }
    }
    Ok(samples)
}

/// p50 and p99 in µs of up to `round_trips` 1 KiB round trips (as many as
/// [`BESIDE_BULK_FOR`] allows: behind a bloated queue each takes seconds)
/// while a second connection through the same path carries bulk echo both
/// ways ([`echo_throughput`]): how long a request waits behind bulk data
/// queued on the path.
pub async fn latency_beside_bulk(
    to: Target,
    mode: Option<u8>,
    round_trips: usize,
) -> anyhow::Result<(f64, f64)> {
    /// Time for the bulk stream to fill every queue on the path first.
    const FILL: Duration = Duration::from_millis(500);
    /// A bound on the bulk stream: far more than it moves while the round
    /// trips run; it is stopped when they end.
    const BULK_BYTES: usize = 64 << 30;
    let bulk = tokio::spawn(echo_throughput(to, mode, BULK_BYTES));
    tokio::time::sleep(FILL).await;
    let result = async {
        anyhow::ensure!(
            !bulk.is_finished(),
            "the bulk stream ended before the round trips began"
        );
        let tcp = connect(to, mode).await?;
        time_round_trips(tcp, round_trips, BESIDE_BULK_FOR).await
    }
    .await;
    bulk.abort();
    let samples = result?;
    print_first_round_trips(&samples);
    Ok(p50_p99(samples))
}

/// The first round trips beside bulk, and the p99 of the rest: whether a
/// p99 comes from the queue the request stream met when it started, or
/// from the queue it keeps meeting.
fn print_first_round_trips(samples: &[f64]) {
    /// As many as a queue drained in the first second could delay.
    const FIRST: usize = 5;
    if samples.len() <= FIRST {
        return;
    }
    let first: Vec<String> = samples[..FIRST]
        .iter()
        .map(|us| format!("{:.1}", us / 1e3))
        .collect();
    let (_, rest_p99) = p50_p99(samples[FIRST..].to_vec());
    // On stderr: a load run in a laptop's namespace answers on stdout.
    eprintln!(
        "  beside bulk: the first {FIRST} round trips {} ms; p99 of the other {} {:.1} ms",
        first.join(", "),
        samples.len() - FIRST,
        rest_p99 / 1e3
    );
}

/// `connections` callers at once, each echoing `bytes_each`; connecting is
/// paced (64 at a time) like a client pool, so the kernel's SYN-flood
/// defence on loopback does not decide the result.
async fn concurrency(
    addr: SocketAddr,
    connections: usize,
    bytes_each: usize,
) -> anyhow::Result<(f64, usize)> {
    let pacing = Arc::new(Semaphore::new(64));
    let start = Instant::now();
    let callers: Vec<_> = (0..connections)
        .map(|_| {
            let pacing = Arc::clone(&pacing);
            tokio::spawn(async move {
                let permit = pacing.acquire_owned().await?;
                let tcp = connect(addr.into(), Some(b'E')).await?;
                drop(permit);
                echo_exactly(tcp, bytes_each).await
            })
        })
        .collect();
    let mut errors = 0;
    for caller in callers {
        if !matches!(caller.await, Ok(Ok(()))) {
            errors += 1;
        }
    }
    Ok((start.elapsed().as_secs_f64() * 1e3, errors))
}

async fn echo_exactly(tcp: TcpStream, bytes: usize) -> anyhow::Result<()> {
    let (mut r, mut w) = tcp.into_split();
    let payload = vec![0x17u8; bytes];
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(bytes);
    r.read_to_end(&mut back).await?;
    writer.await??;
    anyhow::ensure!(
        back.len() == bytes && back.iter().all(|b| *b == 0x17),
        "echo came back wrong"
    );
    Ok(())
}

/// MiB/s of `bytes` echoed back (written and read at once on one
/// connection): the bulk figure for paths whose far end only echoes.
pub async fn echo_throughput(to: Target, mode: Option<u8>, bytes: usize) -> anyhow::Result<f64> {
    let tcp = connect(to, mode).await?;
    let start = Instant::now();
    let (mut r, mut w) = tcp.into_split();
    // Both halves in this task, not a spawned writer: a caller that drops
    // this future (`latency_beside_bulk` aborts its bulk stream) ends the
    // connection. A detached writer outlived it, kept the connection open
    // with its buffers full, and jammed every later stream through the
    // same kubectl port-forward.
    let writer = async {
        let chunk = vec![0x33u8; 256 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            w.write_all(&chunk[..n]).await?;
            sent += n;
        }
        anyhow::Ok(())
    };
    let reader = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0;
        while received < bytes {
            match r.read(&mut buf).await? {
                0 => anyhow::bail!("the echo ended after {received} of {bytes} bytes"),
                n => received += n,
            }
        }
        anyhow::Ok(start.elapsed())
    };
    let ((), elapsed) = tokio::try_join!(writer, reader)?;
    Ok(bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64())
}

/// p50 and p99 in µs of a new connection until its first echoed byte.
pub async fn new_connection(
    to: Target,
    mode: Option<u8>,
    connections: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut samples = Vec::with_capacity(connections);
    for _ in 0..connections {
        let start = Instant::now();
        let mut tcp = connect(to, mode).await?;
        tcp.write_u8(0x7e).await?;
        anyhow::ensure!(
            tcp.read_u8().await? == 0x7e,
            "the echo answered the wrong byte"
        );
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(p50_p99(samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On loopback, beside a bulk echo through the same server: every
    /// round trip comes back, and the bulk stream is still running when
    /// they start (an ended one is an error, not a fast result).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trips_beside_bulk_are_timed_on_loopback() {
        let server = LocalServer::start().await.unwrap();
        let (p50, p99) = latency_beside_bulk(server.addr.into(), Some(b'E'), 50)
            .await
            .unwrap();
        assert!(p50 > 0.0 && p99 >= p50, "p50 {p50} µs, p99 {p99} µs");
    }

    /// Through a SOCKS5 proxy that checks the request it gets and relays
    /// to the address asked for: round trips to this module's server come
    /// back through it (not around it), so [`socks5_connect`] speaks what
    /// a proxy expects.
    #[tokio::test]
    async fn round_trips_go_through_a_socks5_proxy() {
        let server = LocalServer::start().await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            client.read_exact(&mut greeting).await.unwrap();
            assert_eq!(greeting, [5, 1, 0], "greeting: SOCKS5, one method, no-auth");
            client.write_all(&[5, 0]).await.unwrap();
            let mut request = [0u8; 10];
            client.read_exact(&mut request).await.unwrap();
            assert_eq!(request[..4], [5, 1, 0, 1], "CONNECT to an IPv4 address");
            let ip = std::net::Ipv4Addr::new(request[4], request[5], request[6], request[7]);
            let port = u16::from_be_bytes([request[8], request[9]]);
            let mut upstream = TcpStream::connect((ip, port)).await.unwrap();
            client
                .write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        let to = Target {
            addr: server.addr,
            socks5: Some(proxy),
        };
        let (p50, p99) = tokio::time::timeout(Duration::from_secs(30), latency(to, Some(b'E'), 20))
            .await
            .expect("round trips through the proxy within 30 s")
            .unwrap();
        assert!(p50 > 0.0 && p99 >= p50, "p50 {p50} µs, p99 {p99} µs");
        tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the round trips went through the proxy, which then ended")
            .unwrap();
    }

    /// The bulk stream of [`latency_beside_bulk`] is stopped by dropping
    /// its future: nothing of it may keep writing afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_bulk_stream_closes_its_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bulk = tokio::spawn(echo_throughput(
            listener.local_addr().unwrap().into(),
            None,
            64 << 30,
        ));
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = conn.read(&mut buf).await.unwrap();
        conn.write_all(&buf[..n]).await.unwrap();
        bulk.abort();
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(1..) = conn.read(&mut buf).await {}
        })
        .await;
        assert!(
            drained.is_ok(),
            "the aborted bulk stream still writes into its connection"
        );
    }
}
