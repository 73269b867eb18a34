//! End-to-end tests of `ktb forward` against the project's test cluster
//! (`cargo xtask cluster up`).
//!
//! As dev-a on laptop-a, ktb forwards a local port to a Service of two
//! http-echo pods (each answers its own pod name); requests are made to
//! that local port from inside laptop-a's network namespace. The main test
//! restarts the Deployment as the admin while requests keep coming and
//! requires every one of them to be answered, by the new pods in the end.
//!
//! ```text
//! cargo build -p ktb -p ktb-workloads
//! cargo test -p ktb-tests --test forward -- --ignored --test-threads=1
//! ```
//!
//! Every wait is bounded; ktb is stopped by its PID; the test's objects are
//! deleted when it ends, also when it fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ktb_tests::cluster::{
    apply, echo_deployment_manifest, free_port, get_json, in_laptop, kubectl, port_is_free,
    wait_rollout, wait_until, As, Spawned, TempObjects, NAMESPACE,
};
use ktb_tests::exchange::{
    expect_exit, expect_stderr, ktb_cmd, ktb_objects, run_ktb, start_ktb, strings, Workload,
    EXIT_TIMEOUT, READY_TIMEOUT,
};

/// The end of the line ktb writes once it listens and has picked a pod.
const READY: &str = "Ctrl-C stops";
/// How long one request through the forward may take: a connection whose
/// pod refuses is moved to the next one, which costs a port-forward or two.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// The rollout phase's bounds: requests made and time spent.
const ROLLOUT_MAX_REQUESTS: usize = 3000;
const ROLLOUT_MAX_TIME: Duration = Duration::from_secs(180);
/// Consecutive answers from new pods that end the rollout phase.
const SETTLED_ANSWERS: usize = 20;

fn forward_args(service: &str, namespace: &str, ports: &[String]) -> Vec<String> {
    let mut args = strings(&["forward", service]);
    args.extend(ports.iter().cloned());
    args.extend(strings(&["-n", namespace]));
    args
}

/// How a request through the forward went wrong.
#[derive(Debug, Clone)]
enum Failure {
    /// Nothing accepted the connection.
    Refused(String),
    /// Accepted, but no proper answer.
    Failed(String),
}

/// `GET /` on 127.0.0.1:`port` in laptop-a, one connection per request:
/// the answering pod's name.
fn get(port: u16) -> Result<String, Failure> {
    in_laptop("laptop-a", move || request(port))
}

/// [`get`] for a thread already inside laptop-a. The answer is read up
/// to its `content-length`, not to the connection's end: a port-forward
/// passes the pod's close on about a second late.
fn request(port: u16) -> Result<String, Failure> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Failure::Refused(e.to_string())
        } else {
            Failure::Failed(format!("connect: {e}"))
        }
    })?;
    let failed = |what: &str, e: std::io::Error| Failure::Failed(format!("{what}: {e}"));
    s.set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| failed("timeout", e))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: forward\r\nconnection: close\r\n\r\n")
        .map_err(|e| failed("write", e))?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&response);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())
                    .flatten()
            });
            match length {
                Some(length) if body.len() >= length && head.starts_with("HTTP/1.1 200") => {
                    return Ok(body.trim().to_owned());
                }
                Some(length) if body.len() < length => {}
                _ => return Err(Failure::Failed(format!("bad response {text:?}"))),
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(Failure::Failed(format!("closed after {text:?}"))),
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(failed("read", e)),
        }
    }
}

/// Waits for ktb's ready line and returns it.
fn wait_forwarding(ktb: &mut Spawned) -> String {
    ktb.wait_for_stderr(READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb forward never became ready: {e}"));
    ktb.stderr()
        .lines()
        .find(|l| l.contains(READY))
        .unwrap_or_default()
        .to_owned()
}

/// SIGINT; ktb must exit 0 within [`EXIT_TIMEOUT`] and free its port.
fn stop_forward(ktb: &mut Spawned, port: u16) {
    ktb.signal(libc::SIGINT);
    let status = ktb
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("ktb forward still running {EXIT_TIMEOUT:?} after SIGINT"));
    assert_eq!(
        status.code(),
        Some(0),
        "ktb forward exited {status} after SIGINT; stderr:\n{}",
        ktb.stderr()
    );
    assert!(
        port_is_free("laptop-a", port),
        "port {port} still taken in laptop-a after ktb exited"
    );
}

/// Nothing of ktb in the namespace that mentions `name`.
fn assert_nothing_of_ktb(name: &str, what: &str) {
    let objects = ktb_objects(NAMESPACE, Some(name));
    assert!(objects.is_empty(), "{what}: ktb objects {objects:?}");
}

/// Pods of Deployment `name` that are not being deleted.
fn live_pods(name: &str) -> Vec<String> {
    let pods = get_json(NAMESPACE, &["pods", "-l", &format!("app={name}")]);
    pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| p["metadata"]["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn forward_follows_the_service_through_a_rollout() {
    let name = "fwd-rollout";
    // The Service names its target port (`http`, 8080 on the pods), so
    // ktb resolves it on each pod it picks.
    let service = format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{NAMESPACE}"}},
"spec":{{"selector":{{"app":"{name}"}},"ports":[{{"name":"http","port":80,"targetPort":"http"}}]}}}}"#
    );
    let w = Workload::deploy_from(
        NAMESPACE,
        name,
        &echo_deployment_manifest(name, NAMESPACE, 2),
        &service,
    );
    let port = free_port(&["laptop-a"]);
    // A debug line per port-forward names the protocol the apiserver chose.
    let mut command = ktb_cmd(
        As::DevA,
        &forward_args(name, NAMESPACE, &[format!("{port}:80")]),
    );
    command.env("KTB_LOG", "warn,ktb::portforward=debug");
    let mut ktb = Spawned::start("ktb dev-a", command);
    let ready = wait_forwarding(&mut ktb);
    let expected = format!("ktb: ✔ forwarding 127.0.0.1:{port} → svc/{name}:80 (pod {name}-");
    assert!(
        ready.starts_with(&expected),
        "ready line {ready:?}, expected {expected}…"
    );

    // Requests reach the Service's pods.
    for i in 0..10 {
        match get(port) {
            Ok(pod) => assert!(
                w.original_pods.contains(&pod),
                "request {i} answered by {pod:?}, not one of {:?}",
                w.original_pods
            ),
            Err(e) => panic!("request {i} through the forward: {e:?}"),
        }
    }
    assert_nothing_of_ktb(name, "while forwarding");
    // Each request was its own port-forward, and each spoke SPDY, as
    // kubectl's do: the runtime streams SPDY, where it reads each message
    // of the channel protocol whole.
    let stderr = ktb.stderr();
    let spoke = |protocol| {
        stderr
            .matches(&format!("port-forward open, speaking {protocol}"))
            .count()
    };
    assert!(
        spoke("SPDY/3.1") >= 10 && spoke("v4.channel") == 0,
        "{} port-forwards spoke SPDY and {} the channel protocol; stderr:\n{stderr}",
        spoke("SPDY/3.1"),
        spoke("v4.channel")
    );

    // Requests keep coming, one connection each, while the Deployment is
    // replaced pod by pod.
    let answers: Arc<Mutex<Vec<Result<String, Failure>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let requester = {
        let (answers, stop) = (answers.clone(), stop.clone());
        std::thread::spawn(move || {
            in_laptop("laptop-a", move || {
                let started = Instant::now();
                let mut slowest = Duration::ZERO;
                for _ in 0..ROLLOUT_MAX_REQUESTS {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > ROLLOUT_MAX_TIME {
                        break;
                    }
                    let sent = Instant::now();
                    let answer = request(port);
                    slowest = slowest.max(sent.elapsed());
                    answers.lock().unwrap().push(answer);
                    std::thread::sleep(Duration::from_millis(20));
                }
                slowest
            })
        })
    };
    kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "rollout",
            "restart",
            &format!("deployment/{name}"),
        ],
    );
    wait_rollout(NAMESPACE, name);
    let new_pods: Vec<String> = live_pods(name)
        .into_iter()
        .filter(|p| !w.original_pods.contains(p))
        .collect();
    assert!(!new_pods.is_empty(), "no new pod after the rollout");
    eprintln!("new pods: {new_pods:?}");
    let settled = wait_until(
        "the forward's answers to come from the new pods",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let answers = answers.lock().unwrap();
            let last: Vec<_> = answers.iter().rev().take(SETTLED_ANSWERS).collect();
            if requester.is_finished() {
                return Ok(false);
            }
            let all_new = last.len() == SETTLED_ANSWERS
                && last
                    .iter()
                    .all(|a| matches!(a, Ok(pod) if new_pods.contains(pod)));
            if all_new {
                Ok(true)
            } else {
                Err(format!("last answers {last:?}"))
            }
        },
    );
    stop.store(true, Ordering::Relaxed);
    let slowest = requester.join().expect("requester thread");
    assert!(
        settled,
        "the requests ended (bounds reached) before the forward settled"
    );

    let answers = answers.lock().unwrap();
    let refused: Vec<&String> = answers
        .iter()
        .filter_map(|a| match a {
            Err(Failure::Refused(e)) => Some(e),
            _ => None,
        })
        .collect();
    let failed: Vec<&String> = answers
        .iter()
        .filter_map(|a| match a {
            Err(Failure::Failed(e)) => Some(e),
            _ => None,
        })
        .collect();
    let by_new = answers
        .iter()
        .filter(|a| matches!(a, Ok(pod) if new_pods.contains(pod)))
        .count();
    eprintln!(
        "{} requests during the rollout: {} refused, {} failed, {by_new} answered by new pods; slowest {slowest:?}",
        answers.len(),
        refused.len(),
        failed.len()
    );
    assert!(
        refused.is_empty(),
        "connections refused during the rollout: {refused:?}"
    );
    assert!(
        failed.is_empty(),
        "requests failed during the rollout: {failed:?}"
    );
    let strangers: Vec<_> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .filter(|pod| !w.original_pods.contains(*pod) && !new_pods.contains(*pod))
        .collect();
    assert!(
        strangers.is_empty(),
        "answers from no pod of the Deployment: {strangers:?}"
    );
    drop(answers);

    stop_forward(&mut ktb, port);
    assert_nothing_of_ktb(name, "after ktb forward exited");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn forward_refuses_bad_input_and_waits_for_a_ready_pod() {
    let w = Workload::deploy(NAMESPACE, "fwd-input");
    let port = free_port(&["laptop-a"]);

    let what = "forward of a Service that does not exist";
    let out = run_ktb(
        As::DevA,
        &forward_args("fwd-nosuch", NAMESPACE, &[format!("{port}:80")]),
    );
    expect_exit(&out, 1, what);
    expect_stderr(
        &out,
        &format!("Service fwd-nosuch not found in namespace {NAMESPACE}"),
        what,
    );

    let what = "forward of a port the Service does not expose";
    let out = run_ktb(
        As::DevA,
        &forward_args(&w.name, NAMESPACE, &[format!("{port}:81")]),
    );
    expect_exit(&out, 1, what);
    expect_stderr(
        &out,
        "does not expose port 81: its ports are http 80→8080",
        what,
    );

    let what = "forward to a local port already in use";
    let taken = in_laptop("laptop-a", || {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port")
    });
    let taken_port = taken.local_addr().expect("local_addr").port();
    let out = run_ktb(
        As::DevA,
        &forward_args(&w.name, NAMESPACE, &[format!("{taken_port}:80")]),
    );
    drop(taken);
    expect_exit(&out, 1, what);
    expect_stderr(&out, "is already in use", what);

    // A Service whose selector matches no pod: ktb keeps listening, says
    // it is waiting, and stops cleanly.
    let empty = "fwd-input-empty";
    let _service = TempObjects {
        who: As::Admin,
        namespace: NAMESPACE.to_owned(),
        objects: vec![format!("service/{empty}")],
    };
    apply(
        As::Admin,
        &format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{empty}","namespace":"{NAMESPACE}"}},
"spec":{{"selector":{{"app":"{empty}"}},"ports":[{{"name":"http","port":80,"targetPort":8080}}]}}}}"#
        ),
    );
    let mut ktb = start_ktb(
        As::DevA,
        &forward_args(empty, NAMESPACE, &[format!("{port}:80")]),
    );
    ktb.wait_for_stderr("no ready pod", READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb forward did not say it waits: {e}"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ktb.try_status().is_none(),
        "ktb forward exited while waiting for a ready pod:\n{}",
        ktb.stderr()
    );
    assert!(
        !port_is_free("laptop-a", port),
        "ktb forward does not listen on {port} while waiting"
    );
    stop_forward(&mut ktb, port);

    w.assert_untouched("after the refused forwards");
    assert_nothing_of_ktb("fwd-", "after the forwards");
}
