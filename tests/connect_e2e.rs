//! End-to-end tests of `ktb connect` and `ktb clean --local` against the
//! project's test cluster (`cargo xtask cluster up`).
//!
//! The admin deploys an http-echo pod behind Service `cweb` (80 → 8080)
//! and a udp-echo pod behind `cudp` (9001/UDP) in `team-a`. Then `ktb`
//! runs as `dev-a` inside `laptop-a`, which reaches nothing but the
//! apiserver on its own, and the tests call the cluster from the laptop
//! with the tools a developer would use (curl, dig, getent), through the
//! laptop's own `resolv.conf` and `hosts` (`/etc/netns/laptop-a/`, which
//! `ip netns exec` mounts over `/etc`). Every test checks what is left on
//! the laptop afterwards, byte for byte.
//!
//! The tests share `laptop-a` and its `ktb0` device: run them one at a
//! time (`cargo xtask test` does). Every wait is bounded; ktb is stopped
//! by its PID.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use ktb_workloads::half_close;

use ktb_tests::cluster::{
    apply, kubectl, netns_command, run_bounded, target_file, wait_ready, wait_until, workspace_bin,
    As, Spawned, AGENT_IMAGE, HTTP_ECHO_IMAGE, NAMESPACE,
};
use ktb_tests::connect::{
    connect_args, in_laptop_cmd, ktb_cmd, laptop, laptop_file, laptop_state, start_connect, stop,
    StateDir, COMMAND_TIMEOUT, EXIT_TIMEOUT, READY, READY_TIMEOUT,
};
use ktb_tests::resolved::{FakeUpstream, Sandbox, Setup};

const WEB: &str = "cweb";
const WEB_POD: &str = "cweb-0";
const UDP: &str = "cudp";

/// The cluster side every test uses, deployed once per test (idempotent).
struct Fixture {
    web_ip: String,
    web_pod_ip: String,
    udp_ip: String,
}

fn deploy() -> Fixture {
    deploy_web(NAMESPACE, WEB, WEB_POD);
    apply(
        As::Admin,
        &format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[
{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"cudp-0","namespace":"{NAMESPACE}","labels":{{"app":"{UDP}"}}}},
 "spec":{{"terminationGracePeriodSeconds":2,"containers":[{{"name":"echo","image":"ktb.test/udp-echo:dev","imagePullPolicy":"Never"}}]}}}},
{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{UDP}","namespace":"{NAMESPACE}"}},
 "spec":{{"selector":{{"app":"{UDP}"}},"ports":[{{"name":"echo","protocol":"UDP","port":9001,"targetPort":9001}}]}}}}
]}}"#
        ),
    );
    wait_ready(As::Admin, NAMESPACE, &format!("app={UDP}"));
    let get = |kind: &str, name: &str, path: &str| {
        kubectl(
            As::Admin,
            &[
                "-n",
                NAMESPACE,
                "get",
                kind,
                name,
                "-o",
                &format!("jsonpath={path}"),
            ],
        )
        .trim()
        .to_owned()
    };
    Fixture {
        web_ip: get("service", WEB, "{.spec.clusterIP}"),
        web_pod_ip: get("pod", WEB_POD, "{.status.podIP}"),
        udp_ip: get("service", UDP, "{.spec.clusterIP}"),
    }
}

/// An http-echo pod `pod` behind Service `name` (80 → 8080) in `namespace`.
fn deploy_web(namespace: &str, name: &str, pod: &str) {
    apply(
        As::Admin,
        &format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[
{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{pod}","namespace":"{namespace}","labels":{{"app":"{name}"}}}},
 "spec":{{"terminationGracePeriodSeconds":2,"containers":[{{"name":"echo","image":"{HTTP_ECHO_IMAGE}","imagePullPolicy":"Never",
 "ports":[{{"containerPort":8080}}],"readinessProbe":{{"tcpSocket":{{"port":8080}},"periodSeconds":1}}}}]}}}},
{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{namespace}"}},
 "spec":{{"selector":{{"app":"{name}"}},"ports":[{{"name":"http","port":80,"targetPort":8080}}]}}}}
]}}"#
        ),
    );
    wait_ready(As::Admin, namespace, &format!("app={name}"));
}

/// `curl` on the laptop: the body, or why it failed.
fn curl(who: As, args: &[&str]) -> Result<String, String> {
    let mut full = vec!["--silent", "--show-error", "--max-time", "5"];
    full.extend_from_slice(args);
    let out = in_laptop_cmd(who, "curl", &full);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "curl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn getent(who: As, name: &str) -> Result<String, String> {
    let out = in_laptop_cmd(who, "getent", &["hosts", name]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!("getent hosts {name}: exit {}", out.status))
    }
}

/// The connect agent pods of a namespace (`ktb-connect-*`).
fn connect_pods(namespace: &str) -> Vec<String> {
    kubectl(
        As::Admin,
        &[
            "-n",
            namespace,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/managed-by=ktb",
            "-o",
            "name",
        ],
    )
    .lines()
    .filter(|l| l.contains("ktb-connect-"))
    .map(str::to_owned)
    .collect()
}

/// Waits until team-a has no connect agent pod left.
fn wait_for_no_connect_agent(what: &str, timeout: Duration) {
    wait_until(what, timeout, Duration::from_millis(500), || {
        let pods = connect_pods(NAMESPACE);
        if pods.is_empty() {
            Ok(())
        } else {
            Err(format!("{pods:?}"))
        }
    });
}

/// The workloads' probe as `cargo xtask cluster up` built it (static, so
/// it runs in a laptop namespace as well as in a pod).
fn probe_bin() -> std::path::PathBuf {
    target_file(
        "x86_64-unknown-linux-musl/release/probe",
        "run `cargo xtask cluster up`",
    )
}

/// One UDP datagram to `addr` from the laptop and its echo.
fn udp_round_trip(addr: SocketAddr) -> Result<(), String> {
    ktb_tests::cluster::in_laptop(laptop(As::DevA), move || {
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        for i in 0..10 {
            let datagram = format!("through ktb {i}");
            socket
                .send_to(datagram.as_bytes(), addr)
                .map_err(|e| e.to_string())?;
            if let Ok(n) = socket.recv(&mut buf) {
                if buf[..n] == *datagram.as_bytes() {
                    return Ok(());
                }
            }
        }
        Err(format!("no echo from {addr} in 10 tries"))
    })
}

fn dig(args: &[&str]) -> String {
    let mut full = vec!["+short", "+time=3", "+tries=1"];
    full.extend_from_slice(args);
    let out = in_laptop_cmd(As::DevA, "dig", &full);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_tun_reaches_pods_services_and_names_and_ctrl_c_restores_the_laptop() {
    let fx = deploy();
    let before = laptop_state(As::DevA);
    let web = format!("http://{}/", fx.web_ip);
    assert!(
        curl(As::DevA, &[&web]).is_err(),
        "the laptop reaches a ClusterIP before connect"
    );
    assert!(
        getent(As::DevA, WEB).is_err(),
        "the laptop resolves {WEB} before connect"
    );

    let state = StateDir::new("tun");
    let mut ktb = start_connect(As::DevA, NAMESPACE, &[], &state);
    let summary = ktb.stderr();
    assert!(
        summary.contains("routed through ktb0"),
        "no summary of the routes:\n{summary}"
    );

    for url in [
        format!("http://{WEB}/"),
        format!("http://{WEB}.{NAMESPACE}/"),
        format!("http://{WEB}.{NAMESPACE}.svc.cluster.local/"),
        web.clone(),
        format!("http://{}:8080/", fx.web_pod_ip),
    ] {
        let body =
            curl(As::DevA, &[&url]).unwrap_or_else(|e| panic!("{e}\nktb:\n{}", ktb.stderr()));
        assert!(
            body.contains(WEB_POD),
            "{url} answered {body:?}, not {WEB_POD}"
        );
    }
    // A request travels with the stream's open; a port nobody listens on
    // still fails as a reset, not as curl's own timeout.
    let closed = curl(As::DevA, &[&format!("http://{}:8081/", fx.web_pod_ip)]);
    let failure = closed.expect_err("a closed pod port answered through connect");
    assert!(
        failure.contains("reset")
            || failure.contains("refused")
            || failure.contains("Recv failure"),
        "a closed port failed otherwise than with a reset: {failure}"
    );
    let udp: SocketAddr = format!("{}:9001", fx.udp_ip).parse().expect("udp addr");
    udp_round_trip(udp)
        .unwrap_or_else(|e| panic!("UDP through connect: {e}\nktb:\n{}", ktb.stderr()));

    let fqdn = format!("{WEB}.{NAMESPACE}.svc.cluster.local");
    assert_eq!(dig(&[&fqdn]), fx.web_ip, "dig over UDP");
    assert_eq!(dig(&["+tcp", &fqdn]), fx.web_ip, "dig over TCP");
    assert_eq!(
        dig(&[&format!("{WEB}.{NAMESPACE}")]),
        fx.web_ip,
        "dig of name.namespace"
    );

    // The laptop's own names keep working.
    let own = getent(As::DevA, "laptop-only.test").expect("a name from the laptop's hosts file");
    assert!(own.starts_with("192.0.2.10"), "laptop-only.test is {own}");
    getent(As::DevA, "localhost").expect("localhost");

    stop(&mut ktb, libc::SIGINT);
    assert_eq!(
        laptop_state(As::DevA),
        before,
        "the laptop is not as it was before connect"
    );
    assert!(
        curl(As::DevA, &[&web]).is_err(),
        "the laptop still reaches a ClusterIP after disconnect"
    );
    wait_for_no_connect_agent("the connect agent to be deleted", Duration::from_secs(30));
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_after_sigkill_clean_local_restores_the_laptop_and_the_agent_leaves_after_grace() {
    let fx = deploy();
    let before = laptop_state(As::DevA);
    let state = StateDir::new("crash");
    let mut ktb = start_connect(As::DevA, NAMESPACE, &["--dns", "hosts"], &state);
    let resolved = getent(As::DevA, WEB).unwrap_or_else(|e| panic!("{e}\nktb:\n{}", ktb.stderr()));
    assert!(
        resolved.starts_with(&fx.web_ip),
        "{WEB} resolves to {resolved} through /etc/hosts"
    );
    assert_eq!(
        connect_pods(NAMESPACE).len(),
        1,
        "one connect agent while connected"
    );

    stop(&mut ktb, libc::SIGKILL);
    let left = laptop_state(As::DevA);
    assert_ne!(
        left.hosts, before.hosts,
        "the hosts block should still be there after SIGKILL"
    );

    let out = run_bounded(
        ktb_cmd(As::DevA, &["clean", "--local"], &state.0),
        COMMAND_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "ktb clean --local failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        laptop_state(As::DevA),
        before,
        "clean --local did not restore the laptop"
    );

    // Nobody renews the Lease or holds a tunnel: the agent ends the session
    // after the 5 s grace period and garbage collection removes its pod.
    wait_for_no_connect_agent(
        "the connect agent to leave after grace",
        Duration::from_secs(60),
    );
}

/// `ktb connect` with `extra` flags as an unprivileged user (nobody, uid
/// 65534) on laptop-a. The user gets its own readable copies of ktb and of
/// dev-a's kubeconfig in `dir`, and a state directory there it may write.
fn connect_as_nobody(dir: &StateDir, extra: &[&str]) -> Command {
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    std::fs::create_dir_all(&dir.0).expect("dir");
    let ktb_copy = dir.0.join("ktb");
    std::fs::copy(workspace_bin("ktb", "ktb"), &ktb_copy).expect("copy ktb");
    // Flattened: the key and certificates inline, not paths only root may read.
    let kubeconfig = dir.0.join("kubeconfig");
    let flat = kubectl(As::DevA, &["config", "view", "--raw", "--flatten"]);
    std::fs::write(&kubeconfig, flat).expect("write kubeconfig");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&kubeconfig, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).expect("chown state dir");

    let mut cmd = netns_command(laptop(As::DevA), "setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&ktb_copy)
        .args(connect_args(NAMESPACE, extra))
        .env("KUBECONFIG", &kubeconfig)
        .env("KTB_STATE_DIR", &state)
        .env("HOME", &dir.0);
    cmd
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_socks5_as_a_non_root_user_reaches_a_service_by_name() {
    deploy();
    let dir = StateDir::new("socks");
    let port = ktb_tests::cluster::free_port(&[laptop(As::DevA)]);
    let listen = format!("127.0.0.1:{port}");
    let cmd = connect_as_nobody(&dir, &["--mode", "socks5", "--socks", &listen]);
    let mut ktb = Spawned::start("ktb connect socks5", cmd);
    ktb.wait_for_stderr(READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb connect --mode socks5 never became ready: {e}"));

    let proxy = listen.clone();
    let body = curl(
        As::DevA,
        &["--socks5-hostname", &proxy, &format!("http://{WEB}/")],
    )
    .unwrap_or_else(|e| panic!("{e}\nktb:\n{}", ktb.stderr()));
    assert!(
        body.contains(WEB_POD),
        "through SOCKS5 {WEB} answered {body:?}"
    );
    let refused = curl(
        As::DevA,
        &["--socks5-hostname", &proxy, "http://no-such-service-here/"],
    );
    assert!(
        refused.is_err(),
        "an unknown name through SOCKS5 answered: {refused:?}"
    );
    stop(&mut ktb, libc::SIGINT);
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_refuses_a_range_that_overlaps_a_laptop_route_and_changes_nothing() {
    let before = laptop_state(As::DevA);
    let pods_before = connect_pods(NAMESPACE);
    let state = StateDir::new("conflict");
    let args = connect_args(NAMESPACE, &["--cidr", "10.77.0.0/16"]);
    let started = Instant::now();
    let out = run_bounded(ktb_cmd(As::DevA, &args, &state.0), COMMAND_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "ktb connect with a conflicting --cidr: {stderr}"
    );
    assert!(
        stderr.contains("10.77.0.0/16") && stderr.contains("10.77.0.0/24 dev eth0"),
        "the refusal does not name both ranges:\n{stderr}"
    );
    assert!(
        stderr.contains("--exclude"),
        "the refusal does not say what to do:\n{stderr}"
    );
    eprintln!("refused in {:?}", started.elapsed());
    assert_eq!(
        laptop_state(As::DevA),
        before,
        "a refused connect changed the laptop"
    );
    assert_eq!(
        connect_pods(NAMESPACE),
        pods_before,
        "a refused connect changed the cluster"
    );
}

/// The connect Leases of a namespace (`ktb-connect-*`).
fn connect_leases(namespace: &str) -> Vec<String> {
    kubectl(As::Admin, &["-n", namespace, "get", "leases", "-o", "name"])
        .lines()
        .filter(|l| l.contains("ktb-connect-"))
        .map(str::to_owned)
        .collect()
}

/// Runs `cmd`, a `ktb connect` that must be refused: it exits 1 (failure)
/// with a message holding each of `says`. Returns the message. One that
/// connects instead is stopped with Ctrl-C, so it restores what it changed,
/// and fails the test.
fn expect_refusal(what: &str, cmd: Command, says: &[&str]) -> String {
    eprintln!("+ {what}: {cmd:?}");
    let mut ktb = Spawned::start(what, cmd);
    if ktb.wait_for_stderr(READY, READY_TIMEOUT).is_ok() {
        stop(&mut ktb, libc::SIGINT);
        panic!("{what} connected instead of refusing:\n{}", ktb.stderr());
    }
    let status = ktb
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("{what} neither connected nor exited:\n{}", ktb.stderr()));
    let stderr = ktb.stderr();
    assert_eq!(status.code(), Some(1), "{what} exited {status}:\n{stderr}");
    for part in says {
        assert!(
            stderr.contains(part),
            "{what}: the refusal does not say {part:?}:\n{stderr}"
        );
    }
    stderr
}

/// While `ktb connect` runs, a second one on the same machine (the same
/// state directory) is refused with exit 1 and told which process to stop
/// first: as typed again, and with another device and `--force-routes`,
/// which pass the device and route checks. Neither changes the laptop or
/// the cluster, the first keeps working, and its Ctrl-C still restores
/// everything.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_refuses_a_second_connect_on_the_same_machine_and_the_first_keeps_going() {
    deploy();
    let before = laptop_state(As::DevA);
    let state = StateDir::new("second");
    let mut first = start_connect(As::DevA, NAMESPACE, &[], &state);
    let connected = laptop_state(As::DevA);
    let (pods, leases) = (connect_pods(NAMESPACE), connect_leases(NAMESPACE));
    assert_eq!(pods.len(), 1, "one connect agent while connected: {pods:?}");

    let pid = format!("pid {}", first.pid());
    for extra in [&["--device", "ktb1", "--force-routes"][..], &[]] {
        let what = format!("a second ktb connect {}", extra.join(" "))
            .trim_end()
            .to_owned();
        expect_refusal(
            &what,
            ktb_cmd(As::DevA, &connect_args(NAMESPACE, extra), &state.0),
            &["already runs on this machine", &pid, "stop it first"],
        );
        assert_eq!(
            laptop_state(As::DevA),
            connected,
            "{what} changed the laptop"
        );
        assert_eq!(
            (connect_pods(NAMESPACE), connect_leases(NAMESPACE)),
            (pods.clone(), leases.clone()),
            "{what} changed the cluster"
        );
    }
    let body = curl(As::DevA, &[&format!("http://{WEB}/")])
        .unwrap_or_else(|e| panic!("{e}\nthe first ktb:\n{}", first.stderr()));
    assert!(
        body.contains(WEB_POD),
        "after the refusal {WEB} answered {body:?}"
    );

    stop(&mut first, libc::SIGINT);
    assert_eq!(
        laptop_state(As::DevA),
        before,
        "the laptop is not as it was before connect"
    );
    wait_for_no_connect_agent("the connect agent to be deleted", Duration::from_secs(30));
}

/// `ktb connect` refuses with exit 1 and a message saying what to do, and
/// leaves the laptop and the cluster as they were, when `--device` names an
/// interface the laptop has (`eth0`), when tun mode runs without root or
/// CAP_NET_ADMIN, and when there is no `/dev/net/tun`: each before the
/// agent pod is started. And when the cluster's DNS does not answer the
/// agent: after, so the agent is taken back. Every journal is removed.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_refusals_say_what_to_do_and_change_nothing() {
    deploy();
    wait_for_no_connect_agent(
        "earlier tests' connect agents to leave",
        Duration::from_secs(60),
    );
    let before = laptop_state(As::DevA);
    let leases_before = connect_leases(NAMESPACE);
    let refused = |what: &str, cmd: Command, says: &[&str], state: &std::path::Path| {
        let stderr = expect_refusal(what, cmd, says);
        let agent_started = stderr.contains("starting agent pod");
        eprintln!(
            "{what}: refused {} the agent pod was started",
            if agent_started { "after" } else { "before" }
        );
        assert_eq!(
            connect_leases(NAMESPACE),
            leases_before,
            "{what} left its Lease"
        );
        assert!(
            !ktb::connect::journal::journal_path(state).exists(),
            "{what} left its journal"
        );
        assert_eq!(laptop_state(As::DevA), before, "{what} changed the laptop");
        wait_for_no_connect_agent(
            &format!("the connect agent to be taken back after {what}"),
            Duration::from_secs(30),
        );
        agent_started
    };

    // An interface of the laptop's own: refused before the cluster is touched.
    let state = StateDir::new("device");
    let taken = refused(
        "--device eth0",
        ktb_cmd(
            As::DevA,
            &connect_args(NAMESPACE, &["--device", "eth0"]),
            &state.0,
        ),
        &["eth0 already exists on this machine", "--device"],
        &state.0,
    );
    assert!(
        !taken,
        "--device eth0 was refused only after the agent pod started"
    );

    // Tun mode as an unprivileged user: it is told about socks5 mode.
    let dir = StateDir::new("nobody-tun");
    let started = refused(
        "tun mode as a non-root user",
        connect_as_nobody(&dir, &[]),
        &["needs root or CAP_NET_ADMIN", "--mode socks5"],
        &dir.0.join("state"),
    );
    assert!(
        !started,
        "tun mode as nobody was refused only after the agent pod started"
    );

    // No TUN device node: /dev/net hidden under an empty tmpfs, in a mount
    // namespace of ktb's own (private, so the mount goes with it). Read-only,
    // as where ktb may not make the node: the TUN library makes a missing
    // one itself when it can.
    let state = StateDir::new("no-tun");
    let mut cmd = netns_command(laptop(As::DevA), "unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        r#"mount -t tmpfs -o ro none /dev/net && exec "$0" "$@""#,
    ])
    .arg(workspace_bin("ktb", "ktb"))
    .args(connect_args(NAMESPACE, &[]))
    .env("KUBECONFIG", As::DevA.kubeconfig())
    .env("KTB_STATE_DIR", &state.0);
    let started = refused(
        "tun mode without /dev/net/tun",
        cmd,
        &["/dev/net/tun", "modprobe tun"],
        &state.0,
    );
    assert!(
        !started,
        "a missing /dev/net/tun was refused only after the agent pod started"
    );

    // The cluster's DNS gone: found through the agent before ktb says it is
    // connected, so the agent it started is taken back.
    let dns_down = CoreDnsDown::new();
    let state = StateDir::new("no-dns");
    let started = refused(
        "connect while CoreDNS is down",
        ktb_cmd(As::DevA, &connect_args(NAMESPACE, &[]), &state.0),
        &["cannot reach the cluster's DNS server", "--dns off"],
        &state.0,
    );
    assert!(started, "the DNS check runs through the agent");
    drop(dns_down);
}

/// CoreDNS scaled to zero until dropped; then one replica again, rolled out.
struct CoreDnsDown;

impl CoreDnsDown {
    const SCALE: [&'static str; 5] = ["-n", "kube-system", "scale", "deployment", "coredns"];

    fn new() -> CoreDnsDown {
        kubectl(As::Admin, &[&Self::SCALE[..], &["--replicas=0"]].concat());
        let down = CoreDnsDown;
        wait_until(
            "CoreDNS's pods to be gone",
            Duration::from_secs(90),
            Duration::from_millis(500),
            || {
                let pods = kubectl(
                    As::Admin,
                    &[
                        "-n",
                        "kube-system",
                        "get",
                        "pods",
                        "-l",
                        "k8s-app=kube-dns",
                        "-o",
                        "name",
                    ],
                );
                if pods.trim().is_empty() {
                    Ok(())
                } else {
                    Err(pods)
                }
            },
        );
        down
    }
}

impl Drop for CoreDnsDown {
    fn drop(&mut self) {
        // Never panics here: a failing test is unwinding through this.
        let up = [&Self::SCALE[..], &["--replicas=1"]].concat();
        let rolled = [
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment",
            "coredns",
            "--timeout=120s",
        ];
        for args in [&up[..], &rolled[..]] {
            let out = ktb_tests::cluster::try_kubectl(As::Admin, args);
            if !out.status.success() {
                eprintln!(
                    "restoring CoreDNS: kubectl {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn two_developers_connect_at_once_and_one_exchanges_while_the_other_calls_it() {
    deploy();
    deploy_web("team-b", "bweb", "bweb-0");
    let (before_a, before_b) = (laptop_state(As::DevA), laptop_state(As::DevB));
    let (state_a, state_b) = (StateDir::new("pair-a"), StateDir::new("pair-b"));
    let mut connect_a = start_connect(As::DevA, NAMESPACE, &[], &state_a);
    let mut connect_b = start_connect(As::DevB, "team-b", &[], &state_b);
    assert_eq!(connect_pods(NAMESPACE).len(), 1, "dev-a's own agent");
    assert_eq!(connect_pods("team-b").len(), 1, "dev-b's own agent");

    // Short names resolve in each developer's own namespace.
    let answer = |who: As, url: &str| {
        curl(who, &[url]).unwrap_or_else(|e| {
            panic!(
                "{e}\nktb dev-a:\n{}\nktb dev-b:\n{}",
                connect_a.stderr(),
                connect_b.stderr()
            )
        })
    };
    assert!(answer(As::DevA, &format!("http://{WEB}/")).contains(WEB_POD));
    assert!(answer(As::DevB, "http://bweb/").contains("bweb-0"));
    assert!(answer(As::DevB, &format!("http://{WEB}.{NAMESPACE}/")).contains(WEB_POD));

    // dev-a exchanges cweb while connected; dev-b's call lands on dev-a's laptop.
    let port = ktb_tests::cluster::free_port(&[laptop(As::DevA)]);
    let _local = ktb_tests::cluster::local_echo(laptop(As::DevA), port, "laptop-a-local");
    let expose = format!("{port}:80");
    let args = [
        "exchange",
        WEB,
        "--expose",
        &expose,
        "-n",
        NAMESPACE,
        "--agent-image",
        AGENT_IMAGE,
        "--image-pull-policy",
        "Never",
    ];
    let mut exchange = Spawned::start("ktb exchange", ktb_cmd(As::DevA, &args, &state_a.0));
    exchange
        .wait_for_stderr("Ctrl-C restores it", READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb exchange beside connect never became ready: {e}"));
    let through_b = format!("http://{WEB}.{NAMESPACE}/");
    wait_until(
        "dev-b's call to reach dev-a's laptop",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || match curl(As::DevB, &[&through_b]) {
            Ok(body) if body.contains("laptop-a-local") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    stop(&mut exchange, libc::SIGINT);
    // kube-proxy moves the Service back within its sync period.
    wait_until(
        "dev-b's call to reach cweb-0 again after the exchange",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || match curl(As::DevB, &["--max-time", "2", &through_b]) {
            Ok(body) if body.contains(WEB_POD) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    stop(&mut connect_a, libc::SIGINT);
    stop(&mut connect_b, libc::SIGINT);
    assert_eq!(
        laptop_state(As::DevA),
        before_a,
        "laptop-a after disconnect"
    );
    assert_eq!(
        laptop_state(As::DevB),
        before_b,
        "laptop-b after disconnect"
    );
}

/// Through tun, a connection that ends with a half-close keeps going the
/// other way until that side finishes too: uploads of 1 B to 256 MiB whose
/// digest the server answers after the laptop's FIN, and a server that
/// half-closes first and still receives what the laptop sends after. Every
/// byte is checked by SHA-256 at the far end.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_tun_delivers_every_byte_when_either_side_half_closes() {
    const TCP: &str = "ctcp";
    apply(
        As::Admin,
        &format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{TCP}-0","namespace":"{NAMESPACE}","labels":{{"app":"{TCP}"}}}},
 "spec":{{"terminationGracePeriodSeconds":2,"containers":[{{"name":"echo","image":"ktb.test/tcp-echo:dev","imagePullPolicy":"Never",
 "readinessProbe":{{"tcpSocket":{{"port":9001}},"periodSeconds":1}}}}]}}}}"#
        ),
    );
    wait_ready(As::Admin, NAMESPACE, &format!("app={TCP}"));
    let pod_ip = kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "get",
            "pod",
            &format!("{TCP}-0"),
            "-o",
            "jsonpath={.status.podIP}",
        ],
    )
    .trim()
    .to_owned();
    let probe = probe_bin();
    let probe = probe.to_str().expect("utf-8 path");
    let before = laptop_state(As::DevA);
    let state = StateDir::new("half-close");
    let mut ktb = start_connect(As::DevA, NAMESPACE, &[], &state);

    // The laptop half-closes after its last write; the server answers the
    // digest of what arrived, then closes. Then 256 MiB twenty times: a
    // stack that stalls now and then would hang one of them.
    let big = 256 * 1024 * 1024u64;
    let lengths = [1u64, 1024, 1024 * 1024].into_iter().chain([big; 20]);
    for len in lengths {
        let out = in_laptop_cmd(
            As::DevA,
            probe,
            &["upload", &format!("{pod_ip}:9001"), &len.to_string()],
        );
        assert!(
            out.status.success(),
            "uploading {len} bytes then half-closing: {}\nktb:\n{}",
            String::from_utf8_lossy(&out.stderr),
            ktb.stderr()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            half_close::expected(len),
            "the server's digest of {len} bytes"
        );
    }

    // The server half-closes first; the laptop reads to the end, then sends.
    let sent = 1024 * 1024u64;
    let out = in_laptop_cmd(
        As::DevA,
        probe,
        &[
            "hear-then-upload",
            &format!("{pod_ip}:9002"),
            &sent.to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "after the server half-closed: {}\nktb:\n{}",
        String::from_utf8_lossy(&out.stderr),
        ktb.stderr()
    );
    let received = format!("speaks-first received {}", half_close::expected(sent));
    wait_until(
        "the speaks-first server to log what it received after its half-close",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let logs = kubectl(As::Admin, &["-n", NAMESPACE, "logs", &format!("{TCP}-0")]);
            if logs.contains(&received) {
                Ok(())
            } else {
                Err(logs)
            }
        },
    );

    stop(&mut ktb, libc::SIGINT);
    assert_eq!(
        laptop_state(As::DevA),
        before,
        "the laptop is not as it was before connect"
    );
    wait_for_no_connect_agent("the connect agent to be deleted", Duration::from_secs(30));
    kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "delete",
            "pod",
            &format!("{TCP}-0"),
            "--wait=false",
        ],
    );
}

/// kt-connect's `--dnsCacheTtl`, kept by ktb's resolver: a cluster name
/// asked again within its TTL is answered on the laptop, without a round
/// trip to the cluster's DNS; `--dns-cache-ttl 0` asks every time. ktb's
/// debug log names every query it sends to the cluster, so the count of
/// those lines tells a cache from none.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_answers_a_repeated_cluster_name_from_its_cache() {
    let fx = deploy();
    let before = laptop_state(As::DevA);
    let fqdn = format!("{WEB}.{NAMESPACE}.svc.cluster.local");
    for (extra, expected_asks) in [(&["-vv"][..], 1), (&["-vv", "--dns-cache-ttl", "0"][..], 5)] {
        let state = StateDir::new("dns-cache");
        let mut ktb = start_connect(As::DevA, NAMESPACE, extra, &state);
        for _ in 0..5 {
            assert_eq!(dig(&[&fqdn]), fx.web_ip, "dig {fqdn} with {extra:?}");
        }
        stop(&mut ktb, libc::SIGINT);
        let asked = format!("{fqdn}.");
        let asks = ktb
            .stderr()
            .lines()
            .filter(|line| line.contains("asked the cluster's DNS") && line.contains(&asked))
            .count();
        assert_eq!(
            asks, expected_asks,
            "five lookups of {fqdn} with {extra:?} asked the cluster {asks} times"
        );
        assert_eq!(
            laptop_state(As::DevA),
            before,
            "the laptop is not as it was before connect"
        );
    }
    wait_for_no_connect_agent("the connect agent to be deleted", Duration::from_secs(30));
}

/// The names of ktb's "a DNS query arrived" debug lines, colours removed.
fn queries_arrived(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("a DNS query arrived"))
        .filter_map(|l| {
            let mut plain = String::new();
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    // An escape sequence runs to its final letter.
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    plain.push(c);
                }
            }
            plain
                .split_once("name=")
                .map(|(_, name)| name.trim().to_owned())
        })
        .collect()
}

/// On a laptop whose `/etc/resolv.conf` is systemd-resolved's stub, connect
/// leaves the file alone and registers the cluster's domains with resolved
/// on ktb0: cluster names resolve through resolved, every other name stays
/// with the laptop's own server, and Ctrl-C takes it all back. resolved is
/// a real one, in laptop-a's network namespace and a private mount
/// namespace ([`Sandbox`]); ktb runs there too, so the laptop's own files
/// are never touched. Without a system bus, or with resolv.conf linked to
/// resolved's file of upstream servers, connect refuses (exit 1) and says
/// what to do.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn connect_tun_registers_with_systemd_resolved_and_ctrl_c_reverts_it() {
    const OUTSIDE: &str = "outside.test";
    let fx = deploy();
    let before = laptop_state(As::DevA);
    // The laptop's own DNS server, for every name outside the cluster.
    let laptop_dns = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let upstream = FakeUpstream::start(
        laptop(As::DevA),
        SocketAddr::from((laptop_dns, 53)),
        &[(OUTSIDE, std::net::Ipv4Addr::new(192, 0, 2, 99))],
    );
    let sandbox = Sandbox::start(
        laptop(As::DevA),
        Setup {
            hosts: Some(laptop_file(As::DevA, "hosts")),
            global_dns: Some(laptop_dns),
        },
    );
    let fqdn = format!("{WEB}.{NAMESPACE}.svc.cluster.local");
    assert!(
        sandbox.getent(&fqdn).is_err(),
        "{fqdn} resolves before connect"
    );
    let links_before = sandbox.run("ip", &["-o", "link", "show"]).stdout;

    let state = StateDir::new("resolved");
    let mut cmd = sandbox.command(workspace_bin("ktb", "ktb"));
    cmd.args(connect_args(NAMESPACE, &["-vv"]))
        .env("KUBECONFIG", As::DevA.kubeconfig())
        .env("KTB_STATE_DIR", &state.0);
    let mut ktb = Spawned::start("ktb connect (resolved)", cmd);
    ktb.wait_for_stderr(READY, READY_TIMEOUT)
        .unwrap_or_else(|e| {
            panic!(
                "ktb connect never became ready: {e}\nresolved:\n{}",
                sandbox.log()
            )
        });
    let summary = ktb.stderr();
    assert!(
        summary.contains("registered with systemd-resolved on ktb0"),
        "the summary does not name resolved:\n{summary}"
    );

    // Cluster names, through resolved's stub as programs ask, and its API.
    let in_namespace = format!("{WEB}.{NAMESPACE}");
    for name in [fqdn.as_str(), WEB, in_namespace.as_str()] {
        let answer = sandbox
            .getent(name)
            .unwrap_or_else(|e| panic!("{e}\nktb:\n{}", ktb.stderr()));
        assert!(answer.starts_with(&fx.web_ip), "{name} is {answer}");
    }
    // Asked on ktb0 alone (`-i`): the answer is the link's.
    let query = sandbox.resolvectl_ok(&["query", "--cache=no", "-i", "ktb0", &fqdn]);
    assert!(
        query.contains(&fx.web_ip),
        "resolved did not answer {fqdn} through ktb0:\n{query}"
    );
    let out = sandbox.run(
        "curl",
        &[
            "--silent",
            "--show-error",
            "--max-time",
            "5",
            &format!("http://{WEB}/"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(WEB_POD),
        "curl http://{WEB}/ through resolved: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A name the cluster does not have: its "no such name", from ktb.
    let missing = format!("no-such-service.{NAMESPACE}.svc.cluster.local");
    let out = sandbox.resolvectl(&["query", "--cache=no", &missing]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{missing}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The domains are ktb0's alone, and other names never reach ktb.
    let domains = sandbox.resolvectl_ok(&["domain"]);
    let holding: Vec<&str> = domains
        .lines()
        .filter(|l| l.contains("cluster.local"))
        .collect();
    assert_eq!(
        holding.len(),
        1,
        "cluster domains on one link only:\n{domains}"
    );
    assert!(
        holding[0].contains("(ktb0)") && holding[0].contains("~cluster.local"),
        "{domains}"
    );
    let outside = sandbox.getent(OUTSIDE).expect("a name outside the cluster");
    assert!(outside.starts_with("192.0.2.99"), "{OUTSIDE} is {outside}");
    let asked = upstream.asked();
    assert!(
        asked.iter().any(|n| n == OUTSIDE),
        "the laptop's server got {asked:?}"
    );
    assert!(
        !asked.iter().any(|n| n.contains("cluster.local")),
        "a cluster name went to the laptop's own server: {asked:?}"
    );
    // What reached ktb: names in the cluster's domains only. A failed
    // lookup may come back completed with the link's search domains
    // (`outside.test.team-a.svc.cluster.local`, as in a pod), which is a
    // cluster name; the laptop's own name never arrives.
    let arrived = queries_arrived(&ktb.stderr());
    assert!(
        arrived.contains(&format!("{fqdn}.")),
        "ktb's log names no query for {fqdn}: {arrived:?}"
    );
    assert!(
        arrived.iter().all(|n| n.ends_with(".cluster.local.")),
        "ktb was sent a name outside the cluster's domains: {arrived:?}"
    );

    stop(&mut ktb, libc::SIGINT);
    assert!(
        ktb.stderr()
            .contains("restored this machine's network and DNS settings"),
        "{}",
        ktb.stderr()
    );
    let after = sandbox.resolvectl_ok(&["domain"]);
    assert!(
        !after.contains("cluster.local") && !after.contains("ktb0"),
        "resolved still has ktb's link:\n{after}"
    );
    assert!(
        !sandbox.resolvectl_ok(&["dns"]).contains("127.0.0.153"),
        "resolved still has ktb's server"
    );
    assert!(
        sandbox.getent(&fqdn).is_err(),
        "{fqdn} resolves after disconnect"
    );
    assert_eq!(
        sandbox.run("ip", &["-o", "link", "show"]).stdout,
        links_before,
        "the sandbox's links differ after disconnect"
    );

    // Refused with what to do, exit 1, and nothing left: with the system
    // bus out of reach, and with resolv.conf linked to resolved's file of
    // upstream servers (which programs read past resolved), not its stub.
    let refuse = |what: &str, bus: Option<&str>, says: &[&str]| {
        let state = StateDir::new("resolved-refused");
        let mut cmd = sandbox.command(workspace_bin("ktb", "ktb"));
        cmd.args(connect_args(NAMESPACE, &[]))
            .env("KUBECONFIG", As::DevA.kubeconfig())
            .env("KTB_STATE_DIR", &state.0);
        if let Some(bus) = bus {
            cmd.env("DBUS_SYSTEM_BUS_ADDRESS", bus);
        }
        expect_refusal(what, cmd, says);
        assert!(
            !ktb::connect::journal::journal_path(&state.0).exists(),
            "{what}: the journal is left"
        );
        assert_eq!(
            sandbox.run("ip", &["-o", "link", "show"]).stdout,
            links_before,
            "{what}: the sandbox's links changed"
        );
        let domains = sandbox.resolvectl_ok(&["domain"]);
        assert!(!domains.contains("cluster.local"), "{what}: {domains}");
        wait_for_no_connect_agent(
            &format!("the agent to leave after {what}"),
            Duration::from_secs(30),
        );
    };
    refuse(
        "connect without a system bus",
        Some("unix:path=/nonexistent/ktb-test-bus"),
        &["system bus cannot be reached", "--dns hosts"],
    );
    let relink = |target: &str| {
        let out = sandbox.run("ln", &["-sfn", target, "/etc/resolv.conf"]);
        assert!(out.status.success(), "ln {target}: {out:?}");
    };
    relink("../run/systemd/resolve/resolv.conf");
    refuse(
        "connect with resolv.conf linked to resolved's upstream file",
        None,
        &[
            "which lists no stub (127.0.0.53)",
            "stub-resolv.conf",
            "--dns hosts",
        ],
    );
    relink("../run/systemd/resolve/stub-resolv.conf");

    let link = sandbox.run("readlink", &["/etc/resolv.conf"]);
    assert_eq!(
        String::from_utf8_lossy(&link.stdout).trim(),
        "../run/systemd/resolve/stub-resolv.conf",
        "resolv.conf is no longer resolved's link"
    );
    assert!(
        !ktb::connect::journal::journal_path(&state.0).exists(),
        "the journal is left"
    );
    drop(sandbox);
    assert_eq!(
        laptop_state(As::DevA),
        before,
        "the laptop is not as it was before connect"
    );
    wait_for_no_connect_agent("the connect agent to be deleted", Duration::from_secs(30));
}
