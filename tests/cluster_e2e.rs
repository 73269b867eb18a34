//! End-to-end checks of the project's test cluster (`cargo xtask cluster up`).
//!
//! They prove that the cluster every later end-to-end test relies on is a
//! real one (node Ready, CoreDNS, Services balancing across pods, the
//! `kubernetes` Service from pods) and that the simulated laptops see only
//! what a developer's laptop would: the apiserver, through their own
//! identity and its RBAC, and nothing else of the cluster network; and that
//! pods cannot reach the laptops.
//!
//! Every test is ignored by default and needs the cluster:
//! `cargo test -p ktb-tests --test cluster -- --include-ignored`. Without a
//! cluster they fail rather than skip. They talk only to the cluster's own
//! ranges, the node address and the laptops' addresses, and every wait is
//! bounded.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ktb_tests::cluster::{
    apply, echo_pod_manifest, free_port, in_laptop, kubectl, kubectl_cmd, kubectl_forbidden, probe,
    probe_ok, wait_ready, As, TempNamespace, TempObjects, TempPods, DNS_IP, HTTP_ECHO_IMAGE,
    NAMESPACE, NODE_IP,
};

fn tcp_reachable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok()
}

/// One A query; the reply's (RCODE, answer count), or None without reply.
fn dns_query(server: SocketAddr, name: &str) -> Option<(u8, u16)> {
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, server).ok()?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    (n >= 12 && buf[..2] == q[..2]).then(|| (buf[3] & 0x0f, u16::from_be_bytes([buf[6], buf[7]])))
}

/// Whether the DNS server at `server` replies at all.
fn dns_replies(server: SocketAddr) -> bool {
    dns_query(server, "kubernetes.default.svc.cluster.local").is_some()
}

/// [`http_get`], retried for up to `timeout` (kube-proxy and port-forward
/// need a moment after the pod is Ready).
fn http_get_retry(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(addr) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn node_is_ready() {
    let status = kubectl(
        As::Admin,
        &[
            "get",
            "node",
            "ktb-node",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
    );
    assert_eq!(status.trim(), "True");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn dns_and_service_load_balancing() {
    let ns = TempNamespace::new("e2e-svc");
    let ns = ns.0.as_str();
    for name in ["echo-1", "echo-2"] {
        apply(As::Admin, &echo_pod_manifest(name, ns, "echo"));
    }
    apply(
        As::Admin,
        &format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"echo","namespace":"{ns}"}},
"spec":{{"selector":{{"app":"echo"}},"ports":[{{"port":80,"targetPort":8080}}]}}}}"#
        ),
    );
    wait_ready(As::Admin, ns, "app=echo");
    let cluster_ip = kubectl(
        As::Admin,
        &[
            "-n",
            ns,
            "get",
            "service",
            "echo",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );

    // Full, namespace-qualified and short names, through the pod's resolv.conf.
    for name in [
        format!("echo.{ns}.svc.cluster.local"),
        format!("echo.{ns}"),
        "echo".to_owned(),
    ] {
        let addrs = probe_ok(ns, "echo-1", &["resolve", &name]);
        assert_eq!(
            addrs.trim(),
            cluster_ip.trim(),
            "{name} resolved to {addrs}"
        );
    }
    // CoreDNS answers the cluster's names and refuses (RCODE 5) all others:
    // it forwards nothing off this machine.
    let dns: SocketAddr = format!("{DNS_IP}:53").parse().expect("dns");
    let kubernetes = dns_query(dns, "kubernetes.default.svc.cluster.local");
    assert!(
        matches!(kubernetes, Some((0, n)) if n > 0),
        "kubernetes.default: {kubernetes:?}"
    );
    assert_eq!(
        dns_query(dns, "example.com"),
        Some((5, 0)),
        "example.com was not refused"
    );
    // And through a pod's resolver, such names fail.
    let out = probe(ns, "echo-1", &["resolve", "example.com"]);
    assert!(
        !out.status.success(),
        "example.com resolved: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The ClusterIP Service reaches both pods.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let body = probe_ok(ns, "echo-1", &["http", "echo:80"]);
        seen.insert(body.trim().to_owned());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["echo-1".to_owned(), "echo-2".to_owned()]),
        "the Service did not balance across both pods"
    );

    // Pods reach the apiserver through the `kubernetes` Service.
    probe_ok(
        ns,
        "echo-1",
        &["tcp", "kubernetes.default.svc.cluster.local:443"],
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn laptop_reaches_apiserver_and_port_forward_only() {
    let pod = format!("laptop-echo-{}", std::process::id());
    // dev-a creates the pod from its laptop: that is what ktb will do.
    apply(As::DevA, &echo_pod_manifest(&pod, NAMESPACE, &pod));
    let _pods = TempPods {
        who: As::DevA,
        namespace: NAMESPACE.into(),
        names: vec![pod.clone()],
    };
    apply(
        As::Admin,
        &format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{pod}","namespace":"{NAMESPACE}"}},
"spec":{{"selector":{{"app":"{pod}"}},"ports":[{{"port":80,"targetPort":8080}}]}}}}"#
        ),
    );
    let _service = TempObjects {
        who: As::Admin,
        namespace: NAMESPACE.into(),
        objects: vec![format!("service/{pod}")],
    };
    wait_ready(As::DevA, NAMESPACE, &format!("app={pod}"));
    let pod_ip = kubectl(
        As::DevA,
        &["get", "pod", &pod, "-o", "jsonpath={.status.podIP}"],
    );
    let svc_ip = kubectl(
        As::DevA,
        &["get", "service", &pod, "-o", "jsonpath={.spec.clusterIP}"],
    );
    let pod_addr: SocketAddr = format!("{}:8080", pod_ip.trim()).parse().expect("pod ip");
    let svc_addr: SocketAddr = format!("{}:80", svc_ip.trim()).parse().expect("service ip");
    let dns: SocketAddr = format!("{DNS_IP}:53").parse().expect("dns");
    let apiserver: SocketAddr = format!("{NODE_IP}:6443").parse().expect("apiserver");
    let kubelet: SocketAddr = format!("{NODE_IP}:10250").parse().expect("kubelet");

    // From this machine all of them answer: the negatives below are real.
    let timeout = Duration::from_secs(20);
    assert!(http_get_retry(pod_addr, timeout)
        .expect("pod from the host")
        .contains(&pod));
    assert!(http_get_retry(svc_addr, timeout)
        .expect("service from the host")
        .contains(&pod));
    assert!(dns_replies(dns), "CoreDNS does not answer the host");

    let reach = in_laptop("laptop-a", move || {
        [
            ("apiserver", tcp_reachable(apiserver)),
            ("kubelet", tcp_reachable(kubelet)),
            ("pod IP", tcp_reachable(pod_addr)),
            ("ClusterIP", tcp_reachable(svc_addr)),
            ("CoreDNS tcp", tcp_reachable(dns)),
            ("CoreDNS udp", dns_replies(dns)),
        ]
    });
    for (what, reachable) in reach {
        assert_eq!(
            reachable,
            what == "apiserver",
            "{what} reachable from laptop-a: {reachable}"
        );
    }

    // kubectl port-forward from the laptop, as dev-a, to the pod.
    let port = free_port(&["laptop-a"]);
    let mut pf: Child = kubectl_cmd(
        As::DevA,
        &[
            "port-forward",
            &format!("pod/{pod}"),
            &format!("{port}:8080"),
            "--address",
            "127.0.0.1",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("kubectl port-forward");
    let body = in_laptop("laptop-a", move || {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        http_get_retry(addr, Duration::from_secs(20))
    });
    let _ = pf.kill();
    let out = pf.wait_with_output().expect("port-forward output");
    let body = body.unwrap_or_else(|e| {
        panic!(
            "HTTP through kubectl port-forward on laptop-a: {e}; kubectl: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        body.contains(&pod),
        "port-forward reached something else: {body}"
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn developers_are_confined_to_their_namespaces() {
    // Allowed where the developer Role is bound.
    kubectl(As::DevA, &["-n", NAMESPACE, "get", "pods"]);
    kubectl(As::DevB, &["-n", NAMESPACE, "get", "pods"]);
    kubectl(As::DevB, &["-n", "team-b", "get", "pods"]);
    // Refused in other namespaces.
    kubectl_forbidden(As::DevA, &["-n", "team-b", "get", "pods"]);
    kubectl_forbidden(As::DevA, &["-n", "default", "get", "pods"]);
    kubectl_forbidden(As::DevA, &["-n", "kube-system", "get", "secrets"]);
    // Refused cluster-scoped reads and writes.
    kubectl_forbidden(As::DevA, &["get", "nodes"]);
    kubectl_forbidden(As::DevA, &["create", "namespace", "dev-a-was-here"]);
    kubectl_forbidden(
        As::DevA,
        &[
            "create",
            "clusterrolebinding",
            "dev-a-admin",
            "--clusterrole=cluster-admin",
            "--user=dev-a",
        ],
    );
    // Refused privilege escalation inside its own namespace.
    kubectl_forbidden(
        As::DevA,
        &[
            "-n",
            NAMESPACE,
            "create",
            "rolebinding",
            "dev-a-admin",
            "--clusterrole=admin",
            "--user=dev-a",
        ],
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn pods_cannot_reach_the_laptops() {
    // Something listening on laptop-b, reachable from the node itself...
    let listener = in_laptop("laptop-b", || {
        TcpListener::bind("10.77.0.12:18081").expect("bind on laptop-b")
    });
    let addr: SocketAddr = "10.77.0.12:18081".parse().expect("addr");
    assert!(tcp_reachable(addr), "laptop-b not reachable from the node");
    // ...but not from a pod, nor from the other laptop.
    let ns = TempNamespace::new("e2e-isolation");
    apply(As::Admin, &echo_pod_manifest("prober", &ns.0, "prober"));
    wait_ready(As::Admin, &ns.0, "app=prober");
    let out = probe(&ns.0, "prober", &["tcp", "10.77.0.12:18081"]);
    assert!(!out.status.success(), "a pod reached laptop-b");
    assert!(
        !in_laptop("laptop-a", move || tcp_reachable(addr)),
        "laptop-a reached laptop-b"
    );
    drop(listener);
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn images_are_imported() {
    let images = kubectl(
        As::Admin,
        &[
            "get",
            "node",
            "ktb-node",
            "-o",
            "jsonpath={.status.images[*].names[*]}",
        ],
    );
    for image in [
        "ktb.test/pause:dev",
        "ktb.test/coredns:dev",
        HTTP_ECHO_IMAGE,
        "ktb.test/tcp-echo:dev",
        "ktb.test/udp-echo:dev",
        "ktb.test/ktb-agent:dev",
    ] {
        assert!(
            images.split_whitespace().any(|i| i == image),
            "{image} is not on the node (images: {images})"
        );
    }
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn tcp_and_udp_echo_workloads() {
    let ns = TempNamespace::new("e2e-echo");
    for (name, image) in [
        ("tcp", "ktb.test/tcp-echo:dev"),
        ("udp", "ktb.test/udp-echo:dev"),
    ] {
        apply(
            As::Admin,
            &format!(
                r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"{ns}","labels":{{"app":"echo"}}}},
"spec":{{"terminationGracePeriodSeconds":2,"containers":[{{"name":"echo","image":"{image}","imagePullPolicy":"Never"}}]}}}}"#,
                ns = ns.0
            ),
        );
    }
    wait_ready(As::Admin, &ns.0, "app=echo");
    let ip = |pod: &str| {
        kubectl(
            As::Admin,
            &[
                "-n",
                &ns.0,
                "get",
                "pod",
                pod,
                "-o",
                "jsonpath={.status.podIP}",
            ],
        )
        .trim()
        .to_owned()
    };
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();

    let tcp: SocketAddr = format!("{}:9000", ip("tcp")).parse().expect("tcp addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match TcpStream::connect_timeout(&tcp, Duration::from_secs(2)) {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => panic!("tcp-echo {tcp}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let writer = {
        let mut w = conn.try_clone().expect("clone");
        let payload = payload.clone();
        std::thread::spawn(move || {
            w.write_all(&payload).expect("write");
            w.shutdown(std::net::Shutdown::Write).expect("shutdown");
        })
    };
    let mut echoed = Vec::new();
    conn.read_to_end(&mut echoed).expect("read echo");
    writer.join().expect("writer");
    assert!(
        echoed == payload,
        "tcp-echo returned {} bytes, not the {} sent",
        echoed.len(),
        payload.len()
    );

    let udp: SocketAddr = format!("{}:9001", ip("udp")).parse().expect("udp addr");
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let got = (0..40).find_map(|i| {
        let datagram = format!("datagram {i}");
        sock.send_to(datagram.as_bytes(), udp).ok()?;
        let n = sock.recv(&mut buf).ok()?;
        (buf[..n] == *datagram.as_bytes()).then_some(i)
    });
    assert!(got.is_some(), "udp-echo at {udp} never echoed a datagram");
}
