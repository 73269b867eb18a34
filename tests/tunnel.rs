//! The exchange data path on loopback: callers → agent's exposed port →
//! WebSocket tunnel → CLI → local server, with agent and CLI in this process.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ktb::report::Event;
use ktb::tunnel::{attach, AttachError, AttachOptions, Direct};
use ktb_proto::handshake::{
    client_handshake, close_code, websocket_config, HandshakeError, Hello, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use ktb_proto::session::Side;
use ktb_proto::tcp::Target;
use ktb_proto::udp::Datagram;
use ktb_proto::{ClientKey, Frame, Incoming, Session, SessionConfig};
use ktb_tests::harness::init_test_logging;
use ktb_tests::harness::{Bridge, Events, RunningAgent};
use ktb_tests::{servers, within, ByteSource};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1024 * 1024;

/// Sends `total` pseudo-random bytes and reads the echo concurrently;
/// returns the SHA-256 of what was sent and of what came back.
async fn echo_round_trip(
    addr: std::net::SocketAddr,
    total: usize,
    seed: u64,
) -> ([u8; 32], [u8; 32], usize) {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the exposed port");
    echo_round_trip_on(tcp, total, seed).await
}

async fn echo_round_trip_on(
    tcp: TcpStream,
    total: usize,
    seed: u64,
) -> ([u8; 32], [u8; 32], usize) {
    tcp.set_nodelay(true).unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let send = tokio::spawn(async move {
        let mut source = ByteSource::new(seed);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min(total - sent);
            source.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            writer
                .write_all(&buf[..n])
                .await
                .expect("write to the tunnel");
            sent += n;
        }
        writer.shutdown().await.expect("half-close");
        <[u8; 32]>::from(hash.finalize())
    });
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    loop {
        let n = reader.read(&mut buf).await.expect("read from the tunnel");
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n;
    }
    (send.await.unwrap(), hash.finalize().into(), received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_both_ways() {
    let local = servers::echo().await;
    let bridge = Bridge::start(local.addr).await;
    let total = 256 * MIB;
    let (sent, received, len) = within(
        "256 MiB each way",
        echo_round_trip(bridge.caller_addr(), total, 42),
    )
    .await;
    assert_eq!(len, total, "every byte came back");
    assert_eq!(
        sent, received,
        "SHA-256 of what came back equals what was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_honoured() {
    let local = servers::count_then_reply().await;
    let bridge = Bridge::start(local.addr).await;
    let mut tcp = TcpStream::connect(bridge.caller_addr()).await.unwrap();
    tcp.write_all(&vec![7u8; 3 * MIB + 5]).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut reply = String::new();
    within("reply after our FIN", tcp.read_to_string(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, format!("received {} bytes", 3 * MIB + 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_all_complete() {
    let local = servers::echo().await;
    let bridge = Bridge::start(local.addr).await;
    // All 1,000 connections are opened first, so 1,000 streams are open in
    // the tunnel at once; connecting is paced as a real client pool would.
    let connecting = Arc::new(Semaphore::new(64));
    let all_open = Arc::new(Barrier::new(1001));
    let callers: Vec<_> = (0..1000u64)
        .map(|i| {
            let (connecting, all_open, addr) = (
                Arc::clone(&connecting),
                Arc::clone(&all_open),
                bridge.caller_addr(),
            );
            tokio::spawn(async move {
                let permit = connecting.acquire().await.unwrap();
                let tcp = TcpStream::connect(addr).await.expect("connect");
                drop(permit);
                all_open.wait().await;
                echo_round_trip_on(tcp, 16 * 1024, i).await
            })
        })
        .collect();
    within("all connections open", all_open.wait()).await;
    let mut completed = 0;
    for caller in callers {
        let (sent, received, len) = within("concurrent stream", caller)
            .await
            .expect("caller task");
        assert_eq!((sent, len), (received, 16 * 1024));
        completed += 1;
    }
    assert_eq!(completed, 1000);
}

/// A local server that writes to whoever connects, as fast as it can,
/// counting what the kernel accepted.
async fn firehose() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&written);
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let chunk = vec![5u8; 64 * 1024];
        while tcp.write_all(&chunk).await.is_ok() {
            counter.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });
    (addr, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_buffers_at_most_its_window_and_others_still_flow() {
    let agent = RunningAgent::start_with(true, |config| config.allow_loopback = true).await;
    let config = SessionConfig::default();
    let window = config.window as usize;
    let (session, _incoming) = connect_role_session(&agent, config).await;
    let (source, written) = firehose().await;

    // A stream nobody reads: the firehose's bytes pile up on this side
    // until the window is used up, and then the firehose must wait.
    let mut stalled = session.open(Target::Addr(source)).unwrap();
    within("dial", stalled.opened()).await.unwrap();
    let mut peak = 0;
    let mut last_written = 0;
    let mut quiet_samples = 0;
    within("the firehose is held back", async {
        while quiet_samples < 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stats = session.stats();
            peak = peak.max(stats.buffered);
            assert!(
                stats.buffered <= stats.granted,
                "buffered beyond the windows granted: {stats:?}"
            );
            let now = written.load(Ordering::Relaxed);
            quiet_samples = if now == last_written {
                quiet_samples + 1
            } else {
                0
            };
            last_written = now;
        }
    })
    .await;
    println!(
        "stalled stream: {} KiB buffered at most (window {} KiB); firehose stopped after {} KiB",
        peak / 1024,
        window / 1024,
        last_written / 1024
    );
    assert!(peak > 0, "the stalled stream received something");
    assert!(
        peak <= window,
        "{peak} bytes buffered for one stream, window {window}"
    );
    // What the firehose got rid of: the window, a chunk in the agent and
    // the kernel's socket buffers on both hops; nowhere near unbounded.
    assert!(
        last_written < 64 * MIB,
        "the firehose wrote {last_written} bytes into a stream nobody reads"
    );

    // Another stream on the same tunnel is not held up by the stalled one.
    let echo = servers::echo().await;
    let mut beside = session.open(Target::Addr(echo.addr)).unwrap();
    within("dial beside", beside.opened()).await.unwrap();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (r, w) = tokio::io::split(theirs);
    tokio::spawn(beside.bridge(r, w));
    let (mut ours_r, mut ours_w) = tokio::io::split(ours);
    let payload = vec![9u8; 4 * MIB];
    let send = tokio::spawn(async move {
        ours_w.write_all(&payload).await.unwrap();
        ours_w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    within(
        "echo beside the stalled stream",
        ours_r.read_to_end(&mut back),
    )
    .await
    .unwrap();
    send.await.unwrap();
    assert_eq!(back.len(), 4 * MIB);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_another_key_is_refused_with_its_reason() {
    let agent = RunningAgent::start(false).await;
    let options = AttachOptions {
        key: Arc::new(ClientKey::generate().unwrap()),
        exposes: vec!["8080".parse().unwrap()],
        session: SessionConfig::default(),
    };
    let transport = Direct {
        addr: agent.tunnel.to_string(),
    };
    let result = within(
        "refusal",
        attach(
            transport,
            options,
            Events::default().reporter(),
            std::future::pending(),
        ),
    )
    .await;
    match result {
        Err(AttachError::Refused(reason)) => {
            assert!(
                reason.contains("wrong client key")
                    && reason.contains("belongs to another ktb session"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A raw WebSocket to the agent, for speaking the protocol wrongly on purpose.
async fn raw_websocket(agent: &RunningAgent) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(agent.tunnel).await.unwrap();
    let url = format!("ws://{}/tunnel", agent.tunnel);
    tokio_tungstenite::client_async_with_config(url, tcp, Some(websocket_config()))
        .await
        .expect("websocket upgrade")
        .0
}

/// The close frame the agent answers with, as (code, reason).
async fn close_reason(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
) -> Option<(u16, String)> {
    within("close frame", async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(Some(frame))) => {
                    return Some((frame.code.into(), frame.reason.to_string()))
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_mismatch_names_both_versions() {
    let agent = RunningAgent::start(false).await;
    let mut ws = raw_websocket(&agent).await;
    let hello = Hello {
        min_version: 90,
        max_version: 99,
        ..Hello::new().unwrap()
    };
    ws.send(Message::Binary(Frame::Hello(hello).encode()))
        .await
        .unwrap();
    let (code, reason) = close_reason(&mut ws)
        .await
        .expect("a close frame with a reason");
    assert_eq!(code, close_code::VERSION_MISMATCH);
    assert!(
        reason.contains("client speaks 90..=99")
            && reason.contains(&format!(
                "agent speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
            )),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversize_frames_close_only_their_connection() {
    let local = servers::echo().await;
    let bridge = Bridge::start(local.addr).await;
    let tunnel = bridge.agent.tunnel;

    // Not HTTP at all.
    let mut tcp = TcpStream::connect(tunnel).await.unwrap();
    tcp.write_all(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = within("garbage connection closed", tcp.read_to_end(&mut sink)).await;
    assert!(
        !String::from_utf8_lossy(&sink).contains("101"),
        "garbage must not be upgraded"
    );

    // A WebSocket whose first frame is not a Hello.
    let mut ws = raw_websocket(&bridge.agent).await;
    ws.send(Message::Binary(vec![0xff, 0, 1, 2, 3].into()))
        .await
        .unwrap();
    let (code, reason) = close_reason(&mut ws).await.expect("close frame");
    assert_eq!(code, close_code::MALFORMED);
    assert!(reason.contains("invalid Hello"), "{reason}");

    // A frame over the size limit: the connection is dropped before buffering it.
    let mut ws = raw_websocket(&bridge.agent).await;
    let oversize = vec![0u8; ktb_proto::codec::MAX_FRAME_LEN + 1];
    let _ = ws.send(Message::Binary(oversize.into())).await;
    let closed = close_reason(&mut ws).await;
    if let Some((code, reason)) = closed {
        assert_eq!(code, close_code::MALFORMED, "{reason}");
    }

    // The attached developer was not disturbed.
    let (sent, received, _) = within(
        "echo after abuse",
        echo_round_trip(bridge.caller_addr(), MIB, 3),
    )
    .await;
    assert_eq!(sent, received);
    assert_eq!(
        bridge
            .events
            .count(|e| matches!(e, Event::TunnelDown { .. })),
        0,
        "the real tunnel stayed up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_local_port_resets_callers_and_is_reported_once() {
    let local = servers::closed_port().await;
    let bridge = Bridge::start(local).await;
    for _ in 0..3 {
        assert_eq!(
            within("reset", call_once(bridge.caller_addr())).await,
            Err(ErrorKind::ConnectionReset)
        );
    }
    let unreachable =
        |e: &Event| matches!(e, Event::LocalUnreachable { addr, .. } if *addr == local);
    assert_eq!(
        bridge.events.count(unreachable),
        1,
        "reported once: {:?}",
        bridge.events.all()
    );
    let message = bridge
        .events
        .all()
        .iter()
        .find(|e| unreachable(e))
        .unwrap()
        .to_string();
    assert!(
        message.starts_with(&format!("nothing listens on {local}")),
        "{message}"
    );

    // The developer starts the process: the next caller gets through, and the CLI says so.
    let listener = tokio::net::TcpListener::bind(local).await.unwrap();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"hello from the laptop").await.unwrap();
    });
    let mut tcp = TcpStream::connect(bridge.caller_addr()).await.unwrap();
    let mut reply = String::new();
    within(
        "reply from the restarted process",
        tcp.read_to_string(&mut reply),
    )
    .await
    .unwrap();
    assert_eq!(reply, "hello from the laptop");
    server.await.unwrap();
    assert_eq!(
        bridge
            .events
            .count(|e| matches!(e, Event::LocalBack { .. })),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tunnel_fails_streams_in_flight_and_recovers() {
    let local = servers::echo().await;
    let bridge = Bridge::start(local.addr).await;

    let in_flight = TcpStream::connect(bridge.caller_addr()).await.unwrap();
    let (mut reader, mut writer) = in_flight.into_split();
    writer.write_all(b"before the cut").await.unwrap();
    let mut buf = [0u8; 14];
    reader.read_exact(&mut buf).await.unwrap();

    bridge.proxy.cut();
    let outcome = within("in-flight stream fails", async {
        let mut buf = [0u8; 64];
        loop {
            // The reset may surface on the write: the error is reported
            // once, and the read after it would only see the end.
            if let Err(e) = writer.write_all(b"after the cut").await {
                return Err(e.kind());
            }
            match reader.read(&mut buf).await {
                Ok(0) => return Err(ErrorKind::UnexpectedEof),
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(e.kind()),
            }
        }
    })
    .await;
    assert_eq!(
        outcome,
        Err::<(), _>(ErrorKind::ConnectionReset),
        "in-flight caller sees a reset, not a clean end"
    );

    bridge
        .events
        .wait_for(1, "tunnel down", |e| matches!(e, Event::TunnelDown { .. }))
        .await;
    bridge
        .events
        .wait_for(2, "tunnel back up", |e| matches!(e, Event::TunnelUp { .. }))
        .await;
    let (sent, received, _) = within(
        "new stream after reconnect",
        echo_round_trip(bridge.caller_addr(), MIB, 9),
    )
    .await;
    assert_eq!(sent, received);
    assert!(bridge.client_is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_client_attached_callers_are_refused_at_once() {
    let agent = RunningAgent::start(false).await;
    let result = tokio::time::timeout(Duration::from_secs(5), call_once(agent.exposed)).await;
    assert_eq!(
        result.expect("refused promptly, not left hanging"),
        Err(ErrorKind::ConnectionReset)
    );
}

/// One request as a cluster caller makes it: connect, send, read the answer.
/// The reset of a refused caller may surface at any of the three steps.
async fn call_once(addr: std::net::SocketAddr) -> Result<Vec<u8>, ErrorKind> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.kind())?;
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| e.kind())?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.map_err(|e| e.kind())?;
    Ok(answer)
}

/// The client side of a tunnel, spoken directly with ktb-proto.
async fn connect_role_session(
    agent: &RunningAgent,
    config: SessionConfig,
) -> (Session, tokio::sync::mpsc::Receiver<Incoming>) {
    let mut ws = raw_websocket(agent).await;
    client_handshake(&mut ws, &agent.key)
        .await
        .expect("handshake");
    Session::start(ws, Side::Client, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_role_dials_tcp_and_relays_udp() {
    // The echo servers listen on loopback, which a real agent refuses.
    let agent = RunningAgent::start_with(true, |config| config.allow_loopback = true).await;
    let tcp_echo = servers::echo().await;
    let udp_echo = servers::udp_echo().await;
    let (session, mut incoming) = connect_role_session(&agent, SessionConfig::default()).await;

    let mut stream = session.open(Target::Addr(tcp_echo.addr)).unwrap();
    within("dial", stream.opened())
        .await
        .expect("agent reached the echo server");
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (r, w) = tokio::io::split(theirs);
    let bridge = tokio::spawn(stream.bridge(r, w));
    let (mut ours_r, mut ours_w) = tokio::io::split(ours);
    ours_w.write_all(b"ping through the cluster").await.unwrap();
    ours_w.shutdown().await.unwrap();
    let mut reply = Vec::new();
    within("echo", ours_r.read_to_end(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, b"ping through the cluster");
    within("bridge ends", bridge)
        .await
        .unwrap()
        .expect("clean end of stream");

    let mut refused = session
        .open(Target::Addr(servers::closed_port().await))
        .unwrap();
    let reason = within("refusal", refused.opened()).await.unwrap_err();
    assert!(reason.contains("cannot reach"), "{reason}");

    let datagram = Datagram {
        flow: 1,
        peer: udp_echo.addr,
        payload: bytes::Bytes::from_static(b"dns-ish question"),
    };
    session.send_datagram(datagram).await.unwrap();
    match within("datagram reply", incoming.recv()).await {
        Some(Incoming::Datagram(reply)) => {
            assert_eq!((reply.flow, reply.peer), (1, udp_echo.addr));
            assert_eq!(&reply.payload[..], b"dns-ish question");
        }
        other => panic!("expected a datagram, got {other:?}"),
    }
}

/// What a port-forward carries: records instead of a WebSocket, on the
/// same port that still answers HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_port_takes_a_records_link_beside_http() {
    let agent = RunningAgent::start_with(true, |config| config.allow_loopback = true).await;
    let tcp_echo = servers::echo().await;
    let tcp = TcpStream::connect(agent.tunnel).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut records = ktb_proto::link::client(tcp).await.unwrap();
    within("handshake", client_handshake(&mut records, &agent.key))
        .await
        .expect("the agent accepts the key over records");
    let (session, _incoming) = Session::start(records, Side::Client, SessionConfig::default());
    let mut stream = session.open(Target::Addr(tcp_echo.addr)).unwrap();
    within("dial", stream.opened())
        .await
        .expect("agent reached the echo server");
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (r, w) = tokio::io::split(theirs);
    tokio::spawn(stream.bridge(r, w));
    let (mut ours_r, mut ours_w) = tokio::io::split(ours);
    let sent: Vec<u8> = (0..8 * MIB).map(|i| (i % 251) as u8).collect();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            ours_w.write_all(&sent).await.unwrap();
            ours_w.shutdown().await.unwrap();
        })
    };
    let mut echoed = Vec::new();
    within("8 MiB echo", ours_r.read_to_end(&mut echoed))
        .await
        .unwrap();
    writer.await.unwrap();
    assert!(echoed == sent, "every byte came back in order");

    let mut http = TcpStream::connect(agent.tunnel).await.unwrap();
    http.write_all(b"GET /readyz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    within("HTTP answer", http.read_to_string(&mut answer))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_agent_refuses_loopback_and_link_local_by_default() {
    let agent = RunningAgent::start(true).await;
    let echo = servers::echo().await;
    let (session, _incoming) = connect_role_session(&agent, SessionConfig::default()).await;
    for (target, flag) in [
        (Target::Addr(echo.addr), "--allow-loopback"),
        (
            Target::Host {
                host: "localhost".into(),
                port: echo.addr.port(),
            },
            "--allow-loopback",
        ),
        (
            Target::Addr("169.254.169.254:80".parse().unwrap()),
            "--allow-link-local",
        ),
    ] {
        let mut stream = session.open(target.clone()).unwrap();
        let reason = within("refusal", stream.opened()).await.unwrap_err();
        assert!(
            reason.contains("the agent refuses to dial") && reason.contains(flag),
            "{target}: {reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_agent_refuses_to_dial() {
    let agent = RunningAgent::start(false).await;
    let (session, _incoming) = connect_role_session(&agent, SessionConfig::default()).await;
    let mut stream = session
        .open(Target::Host {
            host: "localhost".into(),
            port: 1,
        })
        .unwrap();
    let reason = within("refusal", stream.opened()).await.unwrap_err();
    assert!(reason.contains("exchange role"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_refusal_is_an_error_not_a_session() {
    let agent = RunningAgent::start(false).await;
    let mut ws = raw_websocket(&agent).await;
    let stranger = ClientKey::generate().unwrap();
    match client_handshake(&mut ws, &stranger).await {
        Err(HandshakeError::Refused { code, reason }) => {
            assert_eq!(code, close_code::UNAUTHORIZED);
            assert!(reason.contains("another ktb session"), "{reason}");
        }
        other => panic!("expected refusal, got {other:?}"),
    }
}

/// The next binary frame from the agent.
async fn next_frame(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Frame {
    match within("a frame from the agent", ws.next()).await {
        Some(Ok(Message::Binary(bytes))) => Frame::decode(bytes).expect("a valid frame"),
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_proof_does_not_replay() {
    let agent = RunningAgent::start(false).await;
    // A genuine handshake, recorded as someone on the path could.
    let hello = Hello::new().unwrap();
    let mut ws = raw_websocket(&agent).await;
    ws.send(Message::Binary(Frame::Hello(hello.clone()).encode()))
        .await
        .unwrap();
    let Frame::Challenge(challenge) = next_frame(&mut ws).await else {
        panic!("expected a challenge");
    };
    let proof = Frame::Proof(agent.key.prove(&challenge, &hello.nonce)).encode();
    ws.send(Message::Binary(proof.clone())).await.unwrap();
    assert!(matches!(next_frame(&mut ws).await, Frame::Welcome(_)));

    // The same Hello and proof again: a fresh challenge, which the old
    // proof does not answer.
    let mut replay = raw_websocket(&agent).await;
    replay
        .send(Message::Binary(Frame::Hello(hello).encode()))
        .await
        .unwrap();
    let Frame::Challenge(fresh) = next_frame(&mut replay).await else {
        panic!("expected a challenge");
    };
    assert_ne!(fresh, challenge);
    replay.send(Message::Binary(proof)).await.unwrap();
    let (code, reason) = close_reason(&mut replay).await.expect("a refusal");
    assert_eq!(code, close_code::UNAUTHORIZED, "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_do_not_keep_the_developer_out() {
    init_test_logging();
    let agent = RunningAgent::start_with(false, |config| {
        config.handshake_timeout = Duration::from_secs(2)
    })
    .await;
    let tunnel = agent.tunnel;
    // Many upgrades that start a Hello and never finish it: a frame header
    // announcing 100 bytes, and the first 6 of them.
    let mut held = Vec::new();
    let mut turned_away = 0;
    for _ in 0..3 * ktb_agent::preauth::MAX_HANDSHAKES {
        // A connection turned away may be reset before connect() returns.
        let Ok(tcp) = TcpStream::connect(tunnel).await else {
            turned_away += 1;
            continue;
        };
        let url = format!("ws://{tunnel}/tunnel");
        match tokio_tungstenite::client_async(url, tcp).await {
            Ok((mut ws, _)) => {
                let half_sent = [
                    0x82,
                    0x80 | 100,
                    1,
                    2,
                    3,
                    4,
                    0x01,
                    b'k',
                    b't',
                    b'b',
                    b'!',
                    0,
                ];
                ws.get_mut().write_all(&half_sent).await.unwrap();
                held.push(ws);
            }
            Err(_) => turned_away += 1,
        }
    }
    println!(
        "{} handshakes held open, {turned_away} turned away at once",
        held.len()
    );
    assert!(held.len() <= ktb_agent::preauth::MAX_HANDSHAKES);
    assert!(turned_away > 0, "connections beyond the limit are closed");

    // The developer attaches anyway (the CLI retries while the agent turns
    // it away), and callers get through.
    let local = servers::echo().await;
    let bridge = Bridge::attach(agent, local.addr).await;
    let (sent, received, _) = within(
        "echo with abusers around",
        echo_round_trip(bridge.caller_addr(), MIB, 5),
    )
    .await;
    assert_eq!(sent, received);

    // The abusers were dropped at their deadline.
    for mut ws in held {
        let mut buf = [0u8; 16];
        let outcome = within("a held handshake is dropped", ws.get_mut().read(&mut buf)).await;
        assert!(matches!(outcome, Ok(0) | Err(_)), "{outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_endpoint_answers_readyz_and_nothing_else() {
    let agent = RunningAgent::start_with(false, |config| {
        config.ready_listen = Some(([127, 0, 0, 1], 0).into())
    })
    .await;
    let ready = agent.ready.expect("a readiness endpoint");
    let get = |path: &'static str| async move {
        let mut tcp = TcpStream::connect(ready).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        within("HTTP answer", tcp.read_to_string(&mut answer))
            .await
            .unwrap();
        answer
    };
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/tunnel").await.starts_with("HTTP/1.1 404"));
}

/// Two clients holding one session's key (which ktb never lets happen: the
/// key lives in one process's memory) must not evict each other for ever:
/// the replaced one stops, the newer one keeps the callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_client_stops_instead_of_evicting_the_new_one() {
    let local = servers::echo().await;
    let bridge = Bridge::start(local.addr).await;
    let second_events = Events::default();
    let second = tokio::spawn(attach(
        Direct {
            addr: bridge.agent.tunnel.to_string(),
        },
        AttachOptions {
            key: Arc::clone(&bridge.agent.key),
            exposes: vec![
                format!("{}:{}", local.addr.port(), bridge.agent.exposed.port())
                    .parse()
                    .unwrap(),
            ],
            session: SessionConfig::default(),
        },
        second_events.reporter(),
        std::future::pending(),
    ));
    second_events
        .wait_for(1, "the second tunnel up", |e| {
            matches!(e, Event::TunnelUp { .. })
        })
        .await;
    within("the replaced client to stop", async {
        while bridge.client_is_running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The second client is not evicted in turn: it stays up and serves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "the second client ended too");
    assert_eq!(
        second_events.count(|e| matches!(e, Event::TunnelDown { .. })),
        0,
        "the second client's tunnel went down: {:?}",
        second_events.all()
    );
    let (sent, received, len) = within(
        "an echo through the second client",
        echo_round_trip(bridge.caller_addr(), 64 * 1024, 7),
    )
    .await;
    assert_eq!((len, sent), (64 * 1024, received));
    second.abort();
}

/// `--transport direct`: the fingerprint the agent answers on its tunnel
/// port (through a port-forward, in a cluster) pins TLS to that agent.
/// Another agent's certificate is refused before a byte of the tunnel
/// moves, and with the right pin the tunnel carries a stream intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_agent_takes_only_its_own_certificate() {
    use ktb::pinned_tls::{fetch_fingerprint, PinnedTls};
    use ktb::tunnel::Transport;

    init_test_logging();
    let local = servers::echo().await;
    let agent = RunningAgent::start(false).await;
    let other = RunningAgent::start(false).await;
    let fingerprint = |agent: &RunningAgent| {
        let plain = Direct {
            addr: agent.tunnel.to_string(),
        };
        async move { fetch_fingerprint(&plain).await.expect("the fingerprint") }
    };
    let (pin, other_pin) = (fingerprint(&agent).await, fingerprint(&other).await);
    assert_ne!(pin, other_pin, "every agent makes its own certificate");

    let impostor = PinnedTls::new(agent.tunnel.to_string(), other_pin);
    let refused = within("a TLS handshake", impostor.connect())
        .await
        .expect_err("another agent's pin must be refused");
    assert!(refused.to_string().contains("not the agent's"), "{refused}");

    let events = Events::default();
    let options = AttachOptions {
        key: Arc::clone(&agent.key),
        exposes: vec![ktb::expose::Expose {
            local: local.addr.port(),
            remote: Some(agent.exposed.port()),
        }],
        session: SessionConfig::default(),
    };
    let client = tokio::spawn(attach(
        PinnedTls::new(agent.tunnel.to_string(), pin),
        options,
        events.reporter(),
        std::future::pending(),
    ));
    events
        .wait_for(1, "tunnel up over TLS", |e| {
            matches!(e, Event::TunnelUp { .. })
        })
        .await;
    let total = 8 * MIB;
    let (sent, received, len) =
        within("8 MiB over TLS", echo_round_trip(agent.exposed, total, 7)).await;
    assert_eq!(
        (len, sent),
        (total, received),
        "every byte came back intact"
    );
    client.abort();
}
