//! End-to-end tests of the session layer's promises between developers who
//! share a namespace, on the project's test cluster: a laptop that wakes up
//! after its session was taken over touches nothing of its successor's; a
//! laptop clock far ahead does not make `ktb clean` end live sessions; two
//! developers racing for one Service never both win; a Service whose
//! target port is a name (or one of several ports) reaches the laptop in
//! both modes, and comes back after SIGINT and after SIGKILL.
//!
//! Every test deploys its own workload as the admin, runs `ktb` as dev-a or
//! dev-b on their laptops, and ends by asserting the Service is restored
//! byte for byte and nothing of ktb is left. Ignored by default (they need
//! the cluster); `cargo xtask test` runs them.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use ktb_tests::cluster::{
    apply, command_as, echo_deployment_manifest, free_port, get_json, kubectl, kubectl_cmd,
    kubectl_forbidden, local_echo, run_bounded, target_file, try_kubectl, wait_until, As, Spawned,
    NAMESPACE,
};
use ktb_tests::exchange::*;
use serde_json::Value;

/// How long the agent may take to restore after its laptop fell silent
/// (grace 5 s, then a restore and the Lease's deletion).
const AGENT_RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

fn lease_name(service: &str) -> String {
    format!("ktb-exchange-{service}")
}

/// The Lease of `service`'s exchange, if there is one (read as the admin).
fn lease(service: &str) -> Option<Value> {
    let out = try_kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "get",
            "lease",
            &lease_name(service),
            "-o",
            "json",
            "--ignore-not-found",
        ],
    );
    assert!(
        out.status.success(),
        "reading the Lease of {service}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    (!text.trim().is_empty()).then(|| serde_json::from_str(&text).expect("Lease JSON"))
}

/// The machine's hostname: the laptops are network namespaces of this
/// machine, so ktb names this host for both developers.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned()
}

fn uid(object: &Value) -> String {
    object["metadata"]["uid"].as_str().expect("uid").to_owned()
}

/// The session a Service is exchanged by (its `ktb.dev/session` annotation).
fn service_session(w: &Workload) -> Value {
    w.service()["metadata"]["annotations"]["ktb.dev/session"].clone()
}

fn wait_exit(ktb: &mut Spawned, timeout: Duration, what: &str) -> ExitStatus {
    ktb.wait_exit(timeout).unwrap_or_else(|| {
        panic!(
            "{what}: ktb still running after {timeout:?}; stderr:\n{}",
            ktb.stderr()
        )
    })
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_laptop_that_wakes_after_a_takeover_exits_and_leaves_its_successor_alone() {
    let w = Workload::deploy(NAMESPACE, "ses-sleep");
    let port = free_port(&["laptop-a", "laptop-b"]);
    let _local_a = local_echo("laptop-a", port, LOCAL_A);
    let _local_b = local_echo("laptop-b", port, LOCAL_B);
    let mut ktb_a = exchange_until_local(As::DevA, &w, port, "5s", LOCAL_A);

    // dev-a's laptop sleeps: its agent restores after the grace period and
    // ends the session.
    ktb_a.signal(libc::SIGSTOP);
    wait_until(
        "the agent to end dev-a's session (its Lease deleted)",
        AGENT_RESTORE_TIMEOUT,
        Duration::from_millis(500),
        || match lease(&w.name) {
            None => Ok(()),
            Some(l) => Err(format!("Lease still there: {}", l["spec"])),
        },
    );
    // The agent restored before it deleted the Lease; its pod is going
    // away with the Lease, and the Service settles on the originals.
    w.assert_restored("after dev-a's laptop fell asleep");
    wait_until(
        "garbage collection to remove dev-a's session objects",
        AGENT_RESTORE_TIMEOUT,
        Duration::from_millis(500),
        || match w.ktb_objects().as_slice() {
            [] => Ok(()),
            left => Err(format!("{left:?}")),
        },
    );
    w.wait_reaches_original("after dev-a's laptop fell asleep");

    // dev-b takes the Service.
    let mut ktb_b = exchange_until_local(As::DevB, &w, port, "5s", LOCAL_B);
    let session_b = service_session(&w);
    let lease_b = lease(&w.name).expect("dev-b's Lease");
    let pods_b = w.shadow_pods();
    assert_eq!(pods_b.len(), 1, "dev-b's shadow pod: {pods_b:?}");

    // dev-a wakes up: it must notice, say who took over, and exit.
    ktb_a.signal(libc::SIGCONT);
    let status = wait_exit(&mut ktb_a, Duration::from_secs(60), "dev-a after waking");
    assert_eq!(
        status.code(),
        Some(1),
        "dev-a's ktb should fail (its session is over); stderr:\n{}",
        ktb_a.stderr()
    );
    let said = ktb_a.stderr();
    assert!(
        said.contains("this session is over")
            && said.contains(&format!("now belongs to dev-b on {}", host())),
        "dev-a's ktb does not say who took over:\n{said}"
    );

    // Nothing of dev-b's session was touched.
    assert_eq!(
        service_session(&w),
        session_b,
        "the Service's session changed"
    );
    let lease_now = lease(&w.name).expect("dev-b's Lease after dev-a woke up");
    assert_eq!(uid(&lease_now), uid(&lease_b), "dev-b's Lease was replaced");
    assert_eq!(
        lease_now["metadata"]["labels"]["ktb.dev/session"],
        lease_b["metadata"]["labels"]["ktb.dev/session"],
        "dev-b's Lease changed hands"
    );
    assert_eq!(w.shadow_pods(), pods_b, "dev-b's shadow pod was touched");
    w.wait_reaches_local(LOCAL_B);
    assert!(
        ktb_b.try_status().is_none(),
        "dev-b's ktb died:\n{}",
        ktb_b.stderr()
    );

    w.stop_and_check_restored(&mut ktb_b, "after dev-b's SIGINT");
}

/// Makes `w` look like the leftover of a session whose laptop and agent
/// both vanished: the Service pointed at session `deadbeef` with its
/// original selector saved, and a Lease of 5 s that nobody renews.
fn leave_a_vanished_session(w: &Workload) {
    let patch = serde_json::json!({
        "metadata": { "annotations": {
            "ktb.dev/original-selector": format!("{{\"app\":\"{}\"}}", w.name),
            "ktb.dev/session": "deadbeef",
        }},
        "spec": { "selector": { "app": null, "ktb.dev/session": "deadbeef" } },
    });
    kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "patch",
            "service",
            &w.name,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
    );
    apply(
        As::Admin,
        &serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": lease_name(&w.name),
                "namespace": NAMESPACE,
                "labels": {
                    "ktb.dev/session": "deadbeef",
                    "ktb.dev/kind": "exchange",
                    "app.kubernetes.io/managed-by": "ktb",
                },
                "annotations": { "ktb.dev/user": "dev-c", "ktb.dev/host": "laptop-gone" },
            },
            "spec": { "holderIdentity": "dev-c@laptop-gone", "leaseDurationSeconds": 5 },
        })
        .to_string(),
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn clean_with_a_clock_ten_minutes_ahead_spares_live_sessions_and_repairs_expired_ones() {
    let live = Workload::deploy(NAMESPACE, "ses-live");
    let dead = Workload::deploy(NAMESPACE, "ses-dead");
    let port = free_port(&["laptop-a"]);
    let _local_a = local_echo("laptop-a", port, LOCAL_A);
    let mut ktb_a = exchange_until_local(As::DevA, &live, port, "30s", LOCAL_A);
    let session_a = service_session(&live);
    let lease_a = lease(&live.name).expect("dev-a's Lease");

    leave_a_vanished_session(&dead);
    // Expired by the apiserver's clock: more than its 5 s without a write.
    std::thread::sleep(Duration::from_secs(9));

    // dev-b's laptop clock is ten minutes ahead.
    let mut clean = command_as(As::DevB, "faketime");
    clean
        .args(["-f", "+10m"])
        .arg(workspace_ktb())
        .args(["clean", "-n", NAMESPACE])
        .env("KUBECONFIG", As::DevB.kubeconfig());
    let out = run_bounded(clean, Duration::from_secs(60));
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "ktb clean under faketime failed:\n{said}"
    );
    assert!(
        said.contains(&format!(
            "leaving alone the live session of dev-a on {}",
            host()
        )),
        "clean did not see dev-a's session as live:\n{said}"
    );
    assert!(
        said.contains(&format!("restored Service {NAMESPACE}/ses-dead"))
            && said.contains("removed the expired session of dev-c on laptop-gone"),
        "clean did not repair the vanished session:\n{said}"
    );

    // dev-a's live session is untouched and still serving.
    assert_eq!(
        service_session(&live),
        session_a,
        "dev-a's Service was changed"
    );
    let lease_now = lease(&live.name).expect("dev-a's Lease after clean");
    assert_eq!(uid(&lease_now), uid(&lease_a), "dev-a's Lease was replaced");
    assert!(
        ktb_a.try_status().is_none(),
        "dev-a's ktb died:\n{}",
        ktb_a.stderr()
    );
    live.wait_reaches_local(LOCAL_A);

    // The vanished session is repaired.
    dead.assert_restored("the vanished session after clean");
    dead.wait_reaches_original("the vanished session after clean");
    assert!(
        lease(&dead.name).is_none(),
        "the expired Lease is still there"
    );

    stop_ktb(&mut ktb_a, libc::SIGINT, NAMESPACE, &live.name);
    live.assert_restored("after dev-a's SIGINT");
    live.assert_ktb_objects_gone("after dev-a's SIGINT");
    dead.assert_ktb_objects_gone("after clean");
}

fn workspace_ktb() -> std::path::PathBuf {
    ktb_tests::cluster::workspace_bin("ktb", "ktb")
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn two_developers_racing_for_one_service_one_wins_and_the_other_changes_nothing() {
    let w = Workload::deploy(NAMESPACE, "ses-race");
    let port = free_port(&["laptop-a", "laptop-b"]);
    let _local_a = local_echo("laptop-a", port, LOCAL_A);
    let _local_b = local_echo("laptop-b", port, LOCAL_B);
    let args = exchange_args(&w.name, NAMESPACE, port, "5s");
    let mut wins = [0; 2];
    for round in 0..10 {
        let mut racers = [start_ktb(As::DevA, &args), start_ktb(As::DevB, &args)];
        let (winner, loser) = settle(&mut racers, round);
        wins[winner] += 1;
        let (winner_user, winner_local) = match winner {
            0 => ("dev-a", LOCAL_A),
            _ => ("dev-b", LOCAL_B),
        };
        let refusal = racers[loser].stderr();
        assert!(
            refusal.contains(&format!("is exchanged by {winner_user} on {}", host())),
            "round {round}: the loser does not name the winner:\n{refusal}"
        );
        w.wait_reaches_local(winner_local);
        let holder = lease(&w.name).expect("the winner's Lease");
        assert_eq!(
            holder["metadata"]["annotations"]["ktb.dev/user"], winner_user,
            "round {round}: the Lease is not the winner's"
        );
        assert_eq!(
            service_session(&w),
            holder["metadata"]["labels"]["ktb.dev/session"],
            "round {round}: the Service is not marked with the winner's session"
        );
        assert_eq!(
            w.shadow_pods().len(),
            1,
            "round {round}: the loser left a pod"
        );
        stop_ktb(&mut racers[winner], libc::SIGINT, NAMESPACE, &w.name);
        w.assert_restored(&format!("round {round}, after the winner's SIGINT"));
        w.assert_ktb_objects_gone(&format!("round {round}"));
    }
    eprintln!("wins: dev-a {}, dev-b {}", wins[0], wins[1]);
    w.wait_reaches_original("after the races");
}

/// Waits until one racer is ready and the other has exited 3 (refused:
/// held by the winner); returns
/// (winner, loser) as indexes.
fn settle(racers: &mut [Spawned; 2], round: usize) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let exited: Vec<Option<ExitStatus>> = racers.iter_mut().map(|r| r.try_status()).collect();
        let ready: Vec<bool> = racers.iter().map(|r| r.stderr().contains(READY)).collect();
        for (winner, loser) in [(0, 1), (1, 0)] {
            if ready[winner] && exited[loser].is_some() {
                assert_eq!(
                    exited[loser].and_then(|s| s.code()),
                    Some(3),
                    "round {round}: the loser exited otherwise:\n{}",
                    racers[loser].stderr()
                );
                assert!(
                    exited[winner].is_none(),
                    "round {round}: the winner exited:\n{}",
                    racers[winner].stderr()
                );
                return (winner, loser);
            }
        }
        assert!(
            !(ready[0] && ready[1]),
            "round {round}: both developers exchanged the Service:\n{}\n---\n{}",
            racers[0].stderr(),
            racers[1].stderr()
        );
        assert!(
            !(exited[0].is_some() && exited[1].is_some()),
            "round {round}: both developers gave up:\n{}\n---\n{}",
            racers[0].stderr(),
            racers[1].stderr()
        );
        assert!(
            Instant::now() < deadline,
            "round {round}: no winner after 120 s:\n{}\n---\n{}",
            racers[0].stderr(),
            racers[1].stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Service `NAME` whose ports target the workload's ports by name
/// (`http` → 8080) and, when `admin` is set, by number (port 90 → 9090).
fn service_with_named_ports(name: &str, admin: bool) -> String {
    let mut ports = vec![serde_json::json!({"name": "http", "port": 80, "targetPort": "http"})];
    if admin {
        ports.push(serde_json::json!({"name": "admin", "port": 90, "targetPort": 9090}));
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": NAMESPACE },
        "spec": { "selector": { "app": name }, "ports": ports },
    })
    .to_string()
}

/// The echo Deployment with a second http-echo container on port 9090
/// (unnamed), so a two-port Service has something behind each port.
fn two_port_deployment(name: &str) -> String {
    let mut deployment: Value =
        serde_json::from_str(&echo_deployment_manifest(name, NAMESPACE, 2)).expect("manifest");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers");
    let mut admin = containers[0].clone();
    admin["name"] = "admin".into();
    admin["env"] = serde_json::json!([{ "name": "PORT", "value": "9090" }]);
    admin["ports"] = serde_json::json!([{ "containerPort": 9090 }]);
    admin["readinessProbe"]["tcpSocket"]["port"] = 9090.into();
    containers.push(admin);
    deployment.to_string()
}

/// The replicas of the workload's Deployment, as the admin reads them.
fn replicas(w: &Workload) -> Value {
    get_json(NAMESPACE, &["deployment", &w.name])["spec"]["replicas"].clone()
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_named_target_port_reaches_the_laptop_in_selector_and_scale_mode() {
    let w = Workload::deploy_from(
        NAMESPACE,
        "ses-named",
        &echo_deployment_manifest("ses-named", NAMESPACE, 2),
        &service_with_named_ports("ses-named", false),
    );
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);

    let mut ktb = exchange_until_local(As::DevA, &w, port, "5s", LOCAL_A);
    w.stop_and_check_restored(&mut ktb, "selector mode, after SIGINT");

    // Scale mode, and this time ktb is killed: the agent restores.
    let mut args = exchange_args(&w.name, NAMESPACE, port, "5s");
    args.extend(["--mode".to_owned(), "scale".to_owned()]);
    let mut ktb = start_ktb(As::DevA, &args);
    wait_ready_line(&mut ktb);
    w.wait_reaches_local(LOCAL_A);
    assert_eq!(
        replicas(&w),
        0,
        "scale mode did not scale the workload down"
    );
    let _ = ktb.kill();
    w.wait_reaches_workload_on(80, "scale mode, after SIGKILL (the agent restores)");
    wait_until(
        "the Deployment back at 2 replicas",
        AGENT_RESTORE_TIMEOUT,
        Duration::from_millis(500),
        || match replicas(&w) {
            v if v == 2 => Ok(()),
            v => Err(format!("replicas {v}")),
        },
    );
    wait_until(
        "the agent to remove the Service's annotations",
        AGENT_RESTORE_TIMEOUT,
        Duration::from_millis(500),
        || match w.ktb_annotations() {
            a if a.is_empty() => Ok(()),
            a => Err(format!("{a:?}")),
        },
    );
    w.assert_restored("scale mode, after SIGKILL");
    w.assert_ktb_objects_gone("scale mode, after SIGKILL");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_two_port_service_reaches_the_laptop_on_every_port_in_both_modes() {
    let w = Workload::deploy_from(
        NAMESPACE,
        "ses-ports",
        &two_port_deployment("ses-ports"),
        &service_with_named_ports("ses-ports", true),
    );
    let http_port = free_port(&["laptop-a"]);
    let _http = local_echo("laptop-a", http_port, "laptop-a-http");
    let admin_port = free_port(&["laptop-a"]);
    let _admin = local_echo("laptop-a", admin_port, "laptop-a-admin");
    for mode in ["selector", "scale"] {
        let mut args = strings(&[
            "exchange",
            &w.name,
            "--expose",
            &format!("{http_port}:http"),
            "--expose",
            &format!("{admin_port}:90"),
            "--mode",
            mode,
            "-n",
            NAMESPACE,
        ]);
        args.extend(agent_args("5s"));
        let mut ktb = start_ktb(As::DevA, &args);
        wait_ready_line(&mut ktb);
        for (port, local) in [(80, "laptop-a-http"), (90, "laptop-a-admin")] {
            w.wait_reaches_on(
                port,
                &format!("{mode} mode: port {port} to reach {local}"),
                |got| got == local,
                Duration::from_secs(60),
            );
        }
        stop_ktb(&mut ktb, libc::SIGINT, NAMESPACE, &w.name);
        w.assert_restored(&format!("{mode} mode, after SIGINT"));
        for port in [80, 90] {
            w.wait_reaches_workload_on(port, &format!("{mode} mode, after SIGINT"));
        }
        w.assert_ktb_objects_gone(&format!("{mode} mode, after SIGINT"));
    }
}

/// `cargo xtask` as built for `cargo xtask test` (release profile).
fn xtask_bin() -> std::path::PathBuf {
    target_file("release/xtask", "run the tests through `cargo xtask test`")
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn an_exchange_survives_an_apiserver_restart_and_still_restores() {
    let w = Workload::deploy(NAMESPACE, "ses-restart");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    // A grace longer than the restart, so the agent keeps the session.
    let mut ktb = exchange_until_local(As::DevA, &w, port, "90s", LOCAL_A);

    let mut restart = std::process::Command::new(xtask_bin());
    restart.args(["cluster", "restart-apiserver"]);
    let out = run_bounded(restart, Duration::from_secs(150));
    assert!(
        out.status.success(),
        "restarting the apiserver failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The port-forward under the tunnel died with the apiserver: ktb
    // reconnects and callers reach the laptop again.
    w.wait_reaches_local(LOCAL_A);
    assert!(
        ktb.try_status().is_none(),
        "ktb exited across the apiserver restart:\n{}",
        ktb.stderr()
    );
    w.stop_and_check_restored(&mut ktb, "after SIGINT, past the apiserver restart");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_colleague_cannot_attach_to_my_agent_with_anything_the_cluster_shows_them() {
    let w = Workload::deploy(NAMESPACE, "ses-steal");
    let port = free_port(&["laptop-a", "laptop-b"]);
    let _local_a = local_echo("laptop-a", port, LOCAL_A);
    let _local_b = local_echo("laptop-b", port, LOCAL_B);
    let mut ktb_a = exchange_until_local(As::DevA, &w, port, "30s", LOCAL_A);
    let agent = w.shadow_pods().pop().expect("dev-a's shadow pod").name;

    // Everything dev-b's Role lets them read: the agent pod's spec holds a
    // public key and nothing secret; Secrets are not readable at all.
    let pod = kubectl(
        As::DevB,
        &["-n", NAMESPACE, "get", "pod", &agent, "-o", "json"],
    );
    assert!(
        pod.contains("KTB_AGENT_CLIENT_KEY")
            && !pod.contains("secretName")
            && !pod.contains("TOKEN"),
        "the agent pod shows dev-b more than a public key:\n{pod}"
    );
    kubectl_forbidden(As::DevB, &["-n", NAMESPACE, "get", "secrets"]);

    // dev-b port-forwards to dev-a's agent (their Role allows it) and tries
    // to attach with a key of their own.
    let forward_port = free_port(&["laptop-b"]);
    let mut forward = Spawned::start(
        "kubectl port-forward dev-b",
        kubectl_cmd(
            As::DevB,
            &[
                "-n",
                NAMESPACE,
                "port-forward",
                &format!("pod/{agent}"),
                &format!("{forward_port}:7777"),
            ],
        ),
    );
    wait_until(
        "dev-b's port-forward to dev-a's agent",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || match forward.stdout().contains("Forwarding from") {
            true => Ok(()),
            false => Err(forward.stderr()),
        },
    );
    let attach = strings(&[
        "attach",
        "--agent",
        &format!("127.0.0.1:{forward_port}"),
        "--expose",
        &format!("{port}:8080"),
    ]);
    let out = run_ktb(As::DevB, &attach);
    expect_exit(&out, 1, "dev-b attaching to dev-a's agent");
    expect_stderr(&out, "wrong client key", "dev-b attaching to dev-a's agent");

    // dev-a's callers never reached dev-b, and still reach dev-a.
    for i in 0..10 {
        assert_eq!(
            w.answer().as_deref(),
            Ok(LOCAL_A),
            "call {i} after dev-b's attempt"
        );
    }
    forward.kill();
    stop_ktb(&mut ktb_a, libc::SIGINT, NAMESPACE, &w.name);
    w.assert_restored("after dev-a's SIGINT");
    w.assert_ktb_objects_gone("after dev-a's SIGINT");
}

/// The most the shadow pod may use under the flood (its limit is 384 MiB;
/// `deploy/README.md` states this bound).
const FLOOD_MEMORY_BOUND: u64 = 128 * 1024 * 1024;

/// The peak memory of a pod's cgroup (cgroup v1, as the test node runs).
fn pod_memory_peak(pod: &Value) -> u64 {
    let uid = pod["metadata"]["uid"].as_str().expect("pod uid");
    let qos = pod["status"]["qosClass"]
        .as_str()
        .expect("qosClass")
        .to_lowercase();
    let dir = match qos.as_str() {
        "guaranteed" => format!("/sys/fs/cgroup/memory/kubepods/pod{uid}"),
        qos => format!("/sys/fs/cgroup/memory/kubepods/{qos}/pod{uid}"),
    };
    let text = std::fs::read_to_string(format!("{dir}/memory.max_usage_in_bytes"))
        .unwrap_or_else(|e| panic!("reading the memory peak of pod {uid} in {dir}: {e}"));
    text.trim().parse().expect("a byte count")
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn an_agent_flooded_from_the_cluster_keeps_serving_within_its_memory_bound() {
    let w = Workload::deploy(NAMESPACE, "ses-flood");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    // `--transport direct`: the agent's tunnel endpoint listens on the pod
    // network, where any pod can reach it. laptop-a reaches pod IPs through
    // its own `ktb connect`.
    let state = std::env::temp_dir().join(format!("ktb-state-flood-{}", std::process::id()));
    let mut connect_args = strings(&["connect", "-n", NAMESPACE, "--dns", "off"]);
    connect_args.extend(agent_args("5s"));
    let mut connect = Spawned::start("ktb connect dev-a", {
        let mut cmd = ktb_cmd(As::DevA, &connect_args);
        cmd.env("KTB_STATE_DIR", &state);
        cmd
    });
    connect
        .wait_for_stderr("Ctrl-C disconnects", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("ktb connect never became ready: {e}"));
    let mut args = exchange_args(&w.name, NAMESPACE, port, "30s");
    args.extend(["--transport".to_owned(), "direct".to_owned()]);
    let mut ktb = start_ktb(As::DevA, &args);
    wait_ready_line(&mut ktb);
    w.wait_reaches_local(LOCAL_A);

    let agent = w.shadow_pods().pop().expect("the shadow pod").name;
    let pod = get_json(NAMESPACE, &["pod", &agent]);
    let pod_ip = pod["status"]["podIP"].as_str().expect("podIP").to_owned();
    let cluster_ip = w.service()["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_owned();
    let mut flood = Spawned::start(
        "probe flood",
        ktb_tests::cluster::kubectl_cmd(
            As::Admin,
            &[
                "-n",
                NAMESPACE,
                "exec",
                &w.client,
                "--",
                "/probe",
                "flood",
                &format!("{pod_ip}:7777"),
                &format!("{cluster_ip}:80"),
                "25",
            ],
        ),
    );
    // Once the flood holds its connections, the Service still reaches the
    // laptop, call after call.
    std::thread::sleep(Duration::from_secs(15));
    for i in 0..10 {
        assert_eq!(
            w.answer().as_deref(),
            Ok(LOCAL_A),
            "call {i} during the flood"
        );
    }
    let status = flood
        .wait_exit(Duration::from_secs(90))
        .unwrap_or_else(|| panic!("the flood did not end:\n{}", flood.stderr()));
    assert!(status.success(), "the flood failed:\n{}", flood.stderr());
    let report = flood.stdout();
    eprintln!("flood: {report}");
    assert!(
        report.contains("callers: 2000 connected"),
        "the flood did not hold 2,000 callers: {report}"
    );

    let pod = get_json(NAMESPACE, &["pod", &agent]);
    let restarts = &pod["status"]["containerStatuses"][0]["restartCount"];
    assert_eq!(
        restarts, 0,
        "the agent restarted under the flood: {}",
        pod["status"]
    );
    let peak = pod_memory_peak(&pod);
    eprintln!("shadow pod memory peak: {} MiB", peak / (1024 * 1024));
    assert!(
        peak < FLOOD_MEMORY_BOUND,
        "the shadow pod used {peak} bytes, over the {FLOOD_MEMORY_BOUND} bound"
    );
    w.wait_reaches_local(LOCAL_A);
    assert!(
        ktb.try_status().is_none(),
        "ktb died under the flood:\n{}",
        ktb.stderr()
    );

    stop_ktb(&mut ktb, libc::SIGINT, NAMESPACE, &w.name);
    w.assert_restored("after SIGINT, past the flood");
    w.assert_ktb_objects_gone("after SIGINT, past the flood");
    connect.signal(libc::SIGINT);
    let status = wait_exit(
        &mut connect,
        Duration::from_secs(30),
        "ktb connect after SIGINT",
    );
    assert_eq!(
        status.code(),
        Some(0),
        "ktb connect exited {status}:\n{}",
        connect.stderr()
    );
    assert!(
        !state.join("connect-journal.json").exists(),
        "ktb connect left its journal behind"
    );
    wait_until(
        "the connect agent to be gone",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || match ktb_objects(NAMESPACE, Some("ktb-connect-")).as_slice() {
            [] => Ok(()),
            left => Err(format!("{left:?}")),
        },
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// `ktb status -o json` as `who`: the sessions it lists.
fn status_rows(who: As) -> Vec<Value> {
    let out = run_ktb(who, &strings(&["status", "-n", NAMESPACE, "-o", "json"]));
    expect_exit(&out, 0, "ktb status -o json");
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("ktb status prints a JSON array")
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn status_shows_a_colleagues_session_from_the_cluster_alone() {
    let w = Workload::deploy(NAMESPACE, "ses-status");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    let mut ktb = exchange_until_local(As::DevA, &w, port, "5s", LOCAL_A);

    // dev-b's laptop holds nothing of dev-a's session: what it shows comes
    // from the cluster.
    let rows = status_rows(As::DevB);
    let row = rows
        .iter()
        .find(|r| r["service"] == w.name.as_str())
        .unwrap_or_else(|| panic!("no row for {} in {rows:?}", w.name));
    assert_eq!(row["kind"], "exchange", "{row}");
    assert_eq!(row["user"], "dev-a", "{row}");
    assert_eq!(row["health"], "live", "{row}");
    assert_eq!(row["session"], service_session(&w), "{row}");
    assert!(row["last_renewal"].is_string(), "{row}");
    let table = run_ktb(As::DevB, &strings(&["status", "-n", NAMESPACE]));
    expect_exit(&table, 0, "ktb status");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.contains(&"exchange")
                && words.contains(&w.name.as_str())
                && words.contains(&"live")
        }),
        "the table has no live exchange of {}:\n{text}",
        w.name
    );
    // Every namespace needs cluster-wide rights a developer does not have.
    let all = run_ktb(As::DevB, &strings(&["status", "-A"]));
    expect_exit(&all, 4, "ktb status -A as a developer");
    expect_stderr(&all, "in every namespace", "ktb status -A as a developer");

    w.stop_and_check_restored(&mut ktb, "after SIGINT");
    let rows = status_rows(As::DevB);
    assert!(
        rows.iter().all(|r| r["service"] != w.name.as_str()),
        "the session is still listed after it ended: {rows:?}"
    );
}
