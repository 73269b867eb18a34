//! The echo binaries as the cluster runs them, on loopback: `grpc-echo`
//! serving and calling, and http-echo relaying to a next hop. Each test
//! starts its servers on ports the kernel picked, waits for them at most
//! 10 s, and kills them by PID when done.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A server binary of this package running on loopback; killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts `binary ARGS` with `PORT`, `POD_NAME` and `env`, and waits
    /// until it accepts connections.
    fn start(binary: &str, args: &[&str], pod: &str, env: &[(&str, String)]) -> Server {
        let port = free_port();
        let child = Command::new(binary)
            .args(args)
            .env("PORT", port.to_string())
            .env("POD_NAME", pod)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(server.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "{binary} not listening on {} after 10 s",
                server.addr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// `grpc-echo ARGS`, bounded by its own call timeout (5 s) plus slack.
fn grpc_echo(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_grpc-echo"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn grpc-echo");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("grpc-echo {args:?} still running after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// One `GET /` with `connection: close`: the status line and the body.
fn http_get(addr: SocketAddr) -> (String, String) {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let status = head.lines().next().unwrap_or("").to_owned();
    (status, body.to_owned())
}

#[test]
fn grpc_echo_call_prints_the_serving_pod_and_fails_loudly_without_a_server() {
    let server = Server::start(env!("CARGO_BIN_EXE_grpc-echo"), &["serve"], "grpc-pod", &[]);
    let target = server.addr().to_string();
    let out = grpc_echo(&["call", &target, "--metadata", "x-user=dev-a"]);
    assert!(
        out.status.success(),
        "call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "grpc-pod\n");

    drop(server);
    let out = grpc_echo(&["call", &target]);
    assert_eq!(out.status.code(), Some(1), "a call to a closed port");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&target) && stderr.contains("refused"),
        "the failure does not say where and why: {stderr}"
    );
    assert!(out.stdout.is_empty(), "a failed call printed an answer");

    let out = grpc_echo(&["call", &target, "--metadata", "no-equals-sign"]);
    assert_eq!(out.status.code(), Some(1), "a malformed --metadata");
}

#[test]
fn http_echo_relays_to_its_next_hop_and_answers_both_lines_in_order() {
    let http_echo = env!("CARGO_BIN_EXE_http-echo");
    let callee = Server::start(http_echo, &[], "pod-b", &[]);
    let call_callee = [(
        "KTB_ECHO_CALL",
        format!("http://localhost:{}/", callee.port),
    )];
    let relay = Server::start(http_echo, &[], "pod-a", &call_callee);
    assert_eq!(
        http_get(relay.addr()),
        ("HTTP/1.1 200 OK".to_owned(), "pod-a\npod-b\n".to_owned())
    );

    // The next hop gone: this hop still answers, with its line and why.
    let callee_port = callee.port;
    drop(callee);
    let (status, body) = http_get(relay.addr());
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway");
    assert!(
        body.starts_with("pod-a\n") && body.contains(&format!("localhost:{callee_port}")),
        "a failed hop answered {body:?}"
    );
}
