//! In-pod client for end-to-end tests (shipped in every workload image as
//! `/probe`, run with `kubectl exec`): the images are `scratch`, so there is
//! no shell, `nslookup` or `curl` to exec. Every operation is bounded by a
//! short timeout and exits non-zero on failure.
//!
//! - `probe resolve NAME`: resolve through the pod's resolv.conf (search
//!   domains included), print one address per line.
//! - `probe http HOST:PORT [PATH]`: one GET, print the body.
//! - `probe requests HOST:PORT HEADER...`: one keep-alive connection, one
//!   GET per HEADER (`name: value`, or `-` for none), each answer's body on
//!   a line of its own: shows where each request on one connection went.
//! - `probe load HOST:PORT SECONDS PER_SECOND`: paced GETs, a new
//!   connection each, for SECONDS; prints `ok N failed M` (and the first
//!   failure) and fails if any request failed.
//! - `probe tcp HOST:PORT`: connect, print `connected`.
//! - `probe dns-latency SERVER:PORT NAME COUNT`: COUNT A queries one after
//!   the other, print the median and 99th percentile round trip in µs.
//! - `probe flood TUNNEL:PORT CALLERS:PORT SECONDS`: the hostile in-cluster
//!   neighbour of an agent. 1,000 connections to the tunnel endpoint, each a
//!   WebSocket upgrade to `/tunnel` followed by most of a 256 KiB first
//!   message and then silence, and 2,000 idle connections to an exposed
//!   port; all held for SECONDS, then a one-line count of what the agent
//!   let through (`tunnel: … callers: …`).
//! - `probe upload HOST:PORT BYTES`: to tcp-echo's digest port: send BYTES
//!   of the pattern, half-close, and check the answer (`LEN SHA256HEX`)
//!   against what was sent; print it.
//! - `probe hear-then-upload HOST:PORT BYTES`: to tcp-echo's speaks-first
//!   port: read its greeting until it half-closes and check it, then send
//!   BYTES of the pattern and half-close; print `heard LEN HEX sent LEN HEX`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use ktb_workloads::half_close;
use sha2::Digest;

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["resolve", name] => resolve(name),
        ["http", target] => http(target, "/"),
        ["http", target, path] => http(target, path),
        ["requests", target, headers @ ..] => requests(target, headers),
        ["load", target, seconds, rate] => load(target, seconds, rate),
        ["tcp", target] => connect(target).map(|_| println!("connected")),
        ["dns-latency", server, name, count] => dns_latency(server, name, count),
        ["flood", tunnel, callers, seconds] => flood(tunnel, callers, seconds),
        ["upload", target, bytes] => upload(target, bytes),
        ["hear-then-upload", target, bytes] => hear_then_upload(target, bytes),
        _ => Err(
            "usage: probe resolve NAME | http HOST:PORT [PATH] | requests HOST:PORT HEADER... \
                  | load HOST:PORT SECONDS PER_SECOND | tcp HOST:PORT \
                  | dns-latency SERVER:PORT NAME COUNT | flood TUNNEL:PORT CALLERS:PORT SECONDS \
                  | upload HOST:PORT BYTES | hear-then-upload HOST:PORT BYTES"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long one read or write of a half-close transfer may block: a
/// stalled transfer fails instead of hanging.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);

fn upload(target: &str, len: &str) -> Result<()> {
    let len: u64 = len.parse()?;
    let mut s = connect(target)?;
    s.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
    s.set_write_timeout(Some(TRANSFER_TIMEOUT))?;
    send_pattern(&mut s, len)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("waiting for the digest after sending {len} bytes: {e}"))?;
    let expected = half_close::expected(len);
    if answer.trim() != expected {
        return Err(format!("the server received {:?}, not {expected:?}", answer.trim()).into());
    }
    println!("{expected}");
    Ok(())
}

fn hear_then_upload(target: &str, len: &str) -> Result<()> {
    let len: u64 = len.parse()?;
    let mut s = connect(target)?;
    s.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
    s.set_write_timeout(Some(TRANSFER_TIMEOUT))?;
    let mut heard = Vec::new();
    s.read_to_end(&mut heard)
        .map_err(|e| format!("reading the greeting until the server half-closes: {e}"))?;
    let mut hasher = sha2::Sha256::new();
    hasher.update(&heard);
    let heard = half_close::summary(heard.len() as u64, hasher);
    let expected = half_close::expected(half_close::GREETING_LEN);
    if heard != expected {
        return Err(format!("heard {heard:?}, not {expected:?}").into());
    }
    send_pattern(&mut s, len)?;
    s.shutdown(std::net::Shutdown::Write)?;
    println!("heard {heard} sent {}", half_close::expected(len));
    Ok(())
}

fn send_pattern(s: &mut TcpStream, len: u64) -> Result<()> {
    let mut sent = 0u64;
    for chunk in half_close::chunks(len) {
        s.write_all(&chunk)
            .map_err(|e| format!("sending byte {sent} of {len}: {e}"))?;
        sent += chunk.len() as u64;
    }
    Ok(())
}

fn resolve(name: &str) -> Result<()> {
    let addrs = (name, 0).to_socket_addrs()?;
    let mut any = false;
    for a in addrs {
        println!("{}", a.ip());
        any = true;
    }
    if any {
        Ok(())
    } else {
        Err(format!("{name}: no addresses").into())
    }
}

fn dns_latency(server: &str, name: &str, count: &str) -> Result<()> {
    let mut times = ktb_workloads::dns::latencies(server.parse()?, name, count.parse()?)?;
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!("{:.0} {:.0}", at(0.5), at(0.99));
    Ok(())
}

fn connect(target: &str) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = target.to_socket_addrs()?.collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => format!("{target}: {e}").into(),
        None => format!("{target}: no addresses").into(),
    })
}

fn http(target: &str, path: &str) -> Result<()> {
    let mut s = connect(target)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {target}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("malformed response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned().into());
    }
    print!("{body}");
    Ok(())
}

/// Reads one HTTP/1.1 response whose body has a Content-Length; returns
/// the status line and the body.
fn read_response(reader: &mut impl std::io::BufRead) -> Result<(String, String)> {
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err("connection closed in a response head".into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((
        status.trim_end().to_owned(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

fn requests(target: &str, headers: &[&str]) -> Result<()> {
    let s = connect(target)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut writer = s.try_clone()?;
    let mut reader = std::io::BufReader::new(s);
    for header in headers {
        let header = match *header {
            "-" => String::new(),
            h => format!("{h}\r\n"),
        };
        write!(writer, "GET / HTTP/1.1\r\nhost: {target}\r\n{header}\r\n")?;
        let (status, body) = read_response(&mut reader)?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("{status}: {}", body.trim()).into());
        }
        println!("{}", body.trim());
    }
    Ok(())
}

fn load(target: &str, seconds: &str, rate: &str) -> Result<()> {
    let seconds: u64 = seconds.parse()?;
    let rate: u64 = rate.parse()?;
    let addr = target
        .to_socket_addrs()?
        .next()
        .ok_or("no address for the target")?;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = std::time::Instant::now();
    let (mut ok, mut failed, mut first_failure) = (0u64, 0u64, None);
    for n in 0..seconds * rate {
        let due = start + interval * n as u32;
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let once = || -> Result<()> {
            let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let mut writer = s.try_clone()?;
            write!(
                writer,
                "GET / HTTP/1.1\r\nhost: {target}\r\nconnection: close\r\n\r\n"
            )?;
            let (status, _) = read_response(&mut std::io::BufReader::new(s))?;
            if status.starts_with("HTTP/1.1 200") {
                Ok(())
            } else {
                Err(status.into())
            }
        };
        match once() {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert_with(|| format!("request {n}: {e}"));
            }
        }
    }
    println!("ok {ok} failed {failed}");
    match first_failure {
        Some(first) => Err(format!("{failed} of {} failed; first: {first}", ok + failed).into()),
        None => Ok(()),
    }
}

/// Connections to the tunnel endpoint, and to the exposed port.
const FLOOD_TUNNEL: usize = 1000;
const FLOOD_CALLERS: usize = 2000;
/// Threads opening them, so that stalled writes overlap.
const FLOOD_THREADS: usize = 20;
/// The first message announced, and how much of it is sent.
const FLOOD_MESSAGE: usize = 256 * 1024;
const FLOOD_SENT: usize = FLOOD_MESSAGE - 4096;

/// What one flooding connection got to.
#[derive(Default, Clone, Copy)]
struct Reached {
    connected: usize,
    upgraded: usize,
    /// Every byte meant for the first message was accepted by the socket.
    written: usize,
}

fn flood(tunnel: &str, callers: &str, seconds: &str) -> Result<()> {
    let seconds: u64 = seconds.parse()?;
    let tunnel: SocketAddr = tunnel.parse()?;
    let callers: SocketAddr = callers.parse()?;
    let per_thread = FLOOD_TUNNEL / FLOOD_THREADS;
    let workers: Vec<_> = (0..FLOOD_THREADS)
        .map(|_| std::thread::spawn(move || flood_tunnel(tunnel, per_thread)))
        .collect();
    let mut held = Vec::new();
    let mut reached = Reached::default();
    for worker in workers {
        let (sockets, r) = worker.join().map_err(|_| "a flooding thread panicked")?;
        held.extend(sockets);
        reached.connected += r.connected;
        reached.upgraded += r.upgraded;
        reached.written += r.written;
    }
    let mut idle = 0;
    for _ in 0..FLOOD_CALLERS {
        if let Ok(s) = TcpStream::connect_timeout(&callers, TIMEOUT) {
            held.push(s);
            idle += 1;
        }
    }
    std::thread::sleep(Duration::from_secs(seconds));
    println!(
        "tunnel: {} connected, {} upgraded, {} wrote {FLOOD_SENT} bytes; callers: {idle} connected",
        reached.connected, reached.upgraded, reached.written
    );
    Ok(())
}

/// `count` connections to the tunnel endpoint, each left hanging inside
/// its first WebSocket message.
fn flood_tunnel(addr: SocketAddr, count: usize) -> (Vec<TcpStream>, Reached) {
    let mut held = Vec::new();
    let mut reached = Reached::default();
    for i in 0..count {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, TIMEOUT) else {
            continue;
        };
        reached.connected += 1;
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
        let upgrade = format!(
            "GET /tunnel HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: a3RiLWZsb29kLXRlc3QtMDA=\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut answer = [0u8; 1024];
        let upgraded = s.write_all(upgrade.as_bytes()).is_ok()
            && matches!(s.read(&mut answer), Ok(n) if answer[..n].starts_with(b"HTTP/1.1 101"));
        if upgraded {
            reached.upgraded += 1;
            // A masked binary frame announcing FLOOD_MESSAGE bytes.
            let mut frame = vec![0x82, 0x80 | 127];
            frame.extend_from_slice(&(FLOOD_MESSAGE as u64).to_be_bytes());
            frame.extend_from_slice(&(i as u32).to_be_bytes());
            frame.resize(frame.len() + FLOOD_SENT, 0x5a);
            if s.write_all(&frame).is_ok() {
                reached.written += 1;
            }
        }
        held.push(s);
    }
    (held, reached)
}
