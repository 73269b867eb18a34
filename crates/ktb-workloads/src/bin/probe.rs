//! In-pod client for end-to-end tests (shipped in every workload image as
//! `/probe`, run with `kubectl exec`): the images are `scratch`, so there is
//! no shell, `nslookup` or `curl` to exec. Every operation is bounded by a
//! short timeout and exits non-zero on failure.
//!
//! - `probe resolve NAME`: resolve through the pod's resolv.conf (search
//!   domains included), print one address per line.
//! - `probe http HOST:PORT [PATH]`: one GET, print the body.
//! - `probe tcp HOST:PORT`: connect, print `connected`.
//! - `probe dns-latency SERVER:PORT NAME COUNT`: COUNT A queries one after
//!   the other, print the median and 99th percentile round trip in µs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["resolve", name] => resolve(name),
        ["http", target] => http(target, "/"),
        ["http", target, path] => http(target, path),
        ["tcp", target] => connect(target).map(|_| println!("connected")),
        ["dns-latency", server, name, count] => dns_latency(server, name, count),
        _ => Err(
            "usage: probe resolve NAME | http HOST:PORT [PATH] | tcp HOST:PORT \
                  | dns-latency SERVER:PORT NAME COUNT"
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
