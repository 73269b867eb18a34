//! End-to-end tests of `ktb mesh` and `ktb preview` on the project's test
//! cluster: two developers mesh one Service with their own marks, requests
//! are routed one by one on a keep-alive connection (headers and W3C
//! baggage), steady unmarked load sees no failure while they join and
//! leave, `exchange` and `mesh` refuse each other naming who holds the
//! Service, `recover` refuses a live mesh without `--force`, a malformed
//! mark is refused before anything is written, `status` lists every
//! session, killed laptops are ended by the dead-man rule; `preview`
//! publishes a local process by name, refuses a name someone previews, and
//! removes it. Refusals are asserted by message and exit code. Every test
//! ends asserting the Service byte-equal and nothing of ktb left. Ignored by default (they need the cluster); `cargo xtask test`
//! runs them.

use std::process::Output;
use std::time::{Duration, Instant};

use ktb_tests::cluster::{
    apply, echo_pod_manifest, free_port, kubectl, kubectl_cmd, local_echo, netns_command,
    port_is_free, probe, probe_ok, run_bounded, wait_ready, wait_rollout, wait_until,
    workspace_bin, As, Spawned, GRPC_ECHO_IMAGE, NAMESPACE,
};
use ktb_tests::exchange::*;
use serde_json::Value;

/// The line `ktb mesh` writes once marked requests reach the laptop.
const MESH_READY: &str = "Ctrl-C leaves the mesh";
/// The line `ktb preview` writes once the Service reaches the laptop.
const PREVIEW_READY: &str = "Ctrl-C removes it";
/// How long members' agents (grace 5 s) and the router (a few seconds
/// more) may take to end everything after both laptops were killed.
const DEAD_MAN_TIMEOUT: Duration = Duration::from_secs(90);
/// Steady unmarked load while developers join and leave.
const LOAD_SECONDS: u64 = 150;
const LOAD_PER_SECOND: u64 = 200;

fn mesh_args(service: &str, local_port: u16, mark: &str, grace: &str) -> Vec<String> {
    let mut args = strings(&[
        "mesh",
        service,
        "--expose",
        &format!("{local_port}:80"),
        "--header",
        mark,
        "-n",
        NAMESPACE,
    ]);
    args.extend(agent_args(grace));
    args
}

fn start_until(who: As, args: &[String], ready: &str) -> Spawned {
    let mut ktb = start_ktb(who, args);
    ktb.wait_for_stderr(ready, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb {} never became ready: {e}", args[0]));
    ktb
}

/// Stops ktb with SIGINT; it must exit 0 within [`EXIT_TIMEOUT`] (plus the
/// router's teardown for the last member) and say `says`.
fn stop(ktb: &mut Spawned, says: &str) {
    ktb.signal(libc::SIGINT);
    let status = ktb
        .wait_exit(EXIT_TIMEOUT + Duration::from_secs(30))
        .unwrap_or_else(|| panic!("ktb still running after SIGINT:\n{}", ktb.stderr()));
    assert_eq!(
        status.code(),
        Some(0),
        "ktb exited {status}:\n{}",
        ktb.stderr()
    );
    assert!(
        ktb.stderr().contains(says),
        "ktb's stderr does not say {says:?}:\n{}",
        ktb.stderr()
    );
}

/// Requests on one keep-alive connection from the workload's client pod,
/// one per header (`-` for none): who answered each, or the failure.
fn try_answers(w: &Workload, headers: &[&str]) -> Result<Vec<String>, String> {
    let target = w.target_on(80);
    let mut args = vec!["requests", target.as_str()];
    args.extend_from_slice(headers);
    let out = probe(&w.namespace, &w.client, &args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

fn answers(w: &Workload, headers: &[&str]) -> Vec<String> {
    try_answers(w, headers).unwrap_or_else(|e| panic!("requests {headers:?}: {e}"))
}

/// `ktb status -o json` as `who`: the rows for `service`.
fn status_rows(who: As, service: &str) -> Vec<Value> {
    let out = run_ktb(who, &strings(&["status", "-n", NAMESPACE, "-o", "json"]));
    expect_exit(&out, 0, "ktb status");
    let rows: Value = serde_json::from_slice(&out.stdout).expect("status prints JSON");
    rows.as_array()
        .expect("an array of sessions")
        .iter()
        .filter(|r| r["service"] == service)
        .cloned()
        .collect()
}

fn row_summary(rows: &[Value]) -> Vec<(String, String, String, String)> {
    let mut summary: Vec<_> = rows
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
            (field("kind"), field("user"), field("mark"), field("health"))
        })
        .collect();
    summary.sort();
    summary
}

/// Unmarked requests at a steady rate from the client pod for
/// [`LOAD_SECONDS`], in a thread; its output once joined.
fn steady_load(w: &Workload) -> std::thread::JoinHandle<Output> {
    let args: Vec<String> = [
        "-n",
        &w.namespace,
        "exec",
        &w.client,
        "--",
        "/probe",
        "load",
        &w.target_on(80),
        &LOAD_SECONDS.to_string(),
        &LOAD_PER_SECOND.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_bounded(
            kubectl_cmd(As::Admin, &args),
            Duration::from_secs(LOAD_SECONDS + 60),
        )
    })
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn two_developers_mesh_one_service_each_request_goes_by_its_mark() {
    let w = Workload::deploy(NAMESPACE, "mesh-two");
    let port_a = free_port(&["laptop-a"]);
    let port_b = free_port(&["laptop-b"]);
    let _local_a = local_echo("laptop-a", port_a, LOCAL_A);
    let _local_b = local_echo("laptop-b", port_b, LOCAL_B);

    // A malformed mark is a usage error, refused before the cluster is asked.
    for bad in ["bad header", "x-mark"] {
        let what = format!("mesh with --header {bad:?}");
        let refused = run_ktb(As::DevA, &mesh_args(&w.name, port_a, bad, "30s"));
        expect_exit(&refused, 2, &what);
        expect_stderr(&refused, "expected NAME=VALUE", &what);
        expect_stderr(
            &refused,
            &format!("invalid value '{bad}' for '--header"),
            &what,
        );
        w.assert_untouched(&what);
        let left = w.ktb_objects();
        assert!(left.is_empty(), "{what}: ktb created {left:?}");
    }

    let load_started = Instant::now();
    let load = steady_load(&w);

    let mut dev_a = start_until(
        As::DevA,
        &mesh_args(&w.name, port_a, "x-dev=a", "30s"),
        MESH_READY,
    );
    assert!(
        dev_a.stderr().contains("curl -H 'x-dev: a'"),
        "no ready-made curl line:\n{}",
        dev_a.stderr()
    );
    let mut dev_b = start_until(
        As::DevB,
        &mesh_args(&w.name, port_b, "x-dev=b", "30s"),
        MESH_READY,
    );

    // Marks alternate on one keep-alive connection; baggage counts too.
    let got = answers(
        &w,
        &[
            "x-dev: a",
            "x-dev: b",
            "-",
            "X-Dev: a",
            "baggage: team=x, x-dev=b;ttl=1",
            "x-dev: c",
        ],
    );
    assert_eq!(got.len(), 6, "answers: {got:?}");
    assert_eq!(&got[..2], [LOCAL_A, LOCAL_B], "answers: {got:?}");
    assert!(
        w.original_pods.contains(&got[2]),
        "unmarked went to {:?}",
        got[2]
    );
    assert_eq!(&got[3..5], [LOCAL_A, LOCAL_B], "answers: {got:?}");
    assert!(
        w.original_pods.contains(&got[5]),
        "an unknown mark went to {:?}",
        got[5]
    );

    // Everyone sees every session of the Service, from the cluster alone.
    let rows = status_rows(As::DevB, &w.name);
    assert_eq!(
        row_summary(&rows),
        vec![
            (
                "mesh".into(),
                "dev-a".into(),
                "x-dev=a".into(),
                "live".into()
            ),
            (
                "mesh".into(),
                "dev-b".into(),
                "x-dev=b".into(),
                "live".into()
            ),
            (
                "mesh-router".into(),
                "dev-a".into(),
                "-".into(),
                "live".into()
            ),
        ],
        "status rows: {rows:?}"
    );

    // A meshed Service cannot be exchanged: the refusal names the members.
    let refused = run_ktb(As::DevB, &exchange_args(&w.name, NAMESPACE, port_b, "30s"));
    expect_exit(&refused, 3, "exchange of a meshed Service");
    expect_stderr(
        &refused,
        "is meshed by dev-a on",
        "exchange of a meshed Service",
    );
    expect_stderr(&refused, "dev-b on", "exchange of a meshed Service");
    // Nor can a mark be taken twice.
    let port_c = free_port(&["laptop-a"]);
    let twice = run_ktb(As::DevA, &mesh_args(&w.name, port_c, "x-dev=b", "30s"));
    expect_exit(&twice, 3, "a second member with a taken mark");
    expect_stderr(&twice, "already used", "a second member with a taken mark");
    // Nor recovered without --force while its router is live, by anyone:
    // not even by dev-a, whose own session the router is.
    for who in [As::DevB, As::DevA] {
        let what = format!("recover of a meshed Service by {}", who.user());
        let refused = run_ktb(who, &strings(&["recover", &w.name, "-n", NAMESPACE]));
        expect_exit(&refused, 3, &what);
        expect_stderr(&refused, "meshed through a live router", &what);
        expect_stderr(&refused, "dev-a on", &what);
        expect_stderr(&refused, "dev-b on", &what);
        expect_stderr(
            &refused,
            &format!("`ktb recover --force {}`", w.name),
            &what,
        );
    }
    assert_eq!(
        answers(&w, &["x-dev: a", "x-dev: b"]),
        [LOCAL_A, LOCAL_B],
        "the marks after the refused recovers"
    );

    // A member leaves its routes before its agent goes: once it has
    // exited, its mark reaches the original pods, and never fails.
    stop(&mut dev_a, "still meshed by dev-b");
    let got = answers(&w, &["x-dev: a", "x-dev: b"]);
    assert!(
        w.original_pods.contains(&got[0]),
        "dev-a's mark after dev-a left went to {:?}",
        got[0]
    );
    assert_eq!(got[1], LOCAL_B, "dev-b's mark after dev-a left");
    stop(
        &mut dev_b,
        &format!(
            "restored Service {NAMESPACE}/{}: no one meshes it any more",
            w.name
        ),
    );
    let left_at = load_started.elapsed();
    assert!(
        left_at < Duration::from_secs(LOAD_SECONDS - 5),
        "joining and leaving took {left_at:?}, longer than the steady load ran; raise LOAD_SECONDS"
    );

    let load = load.join().expect("the load thread");
    let report = String::from_utf8_lossy(&load.stdout);
    eprintln!("steady load: {report}");
    assert!(
        load.status.success(),
        "unmarked requests failed while developers joined and left: {report} {}",
        String::from_utf8_lossy(&load.stderr)
    );
    assert!(report.contains(" failed 0"), "{report}");

    w.assert_restored("after both members left");
    assert!(w.ktb_annotations().is_empty(), "{:?}", w.ktb_annotations());
    w.wait_reaches_original("after both members left");
    w.assert_ktb_objects_gone("after both members left");
    assert!(
        status_rows(As::DevA, &w.name).is_empty(),
        "status after both left"
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn exchange_refuses_mesh_and_killed_members_are_ended_by_the_dead_man_rule() {
    let w = Workload::deploy(NAMESPACE, "mesh-kill");
    let port_a = free_port(&["laptop-a"]);
    let port_b = free_port(&["laptop-b"]);
    let _local_a = local_echo("laptop-a", port_a, LOCAL_A);
    let _local_b = local_echo("laptop-b", port_b, LOCAL_B);

    // An exchanged Service cannot be meshed: the refusal names who holds it.
    let mut exchanged = exchange_until_local(As::DevA, &w, port_a, "5s", LOCAL_A);
    let refused = run_ktb(As::DevB, &mesh_args(&w.name, port_b, "x-dev=b", "5s"));
    expect_exit(&refused, 3, "mesh of an exchanged Service");
    expect_stderr(
        &refused,
        "is exchanged by dev-a on",
        "mesh of an exchanged Service",
    );
    w.stop_and_check_restored(&mut exchanged, "the exchange before the mesh");

    let mut dev_a = start_until(
        As::DevA,
        &mesh_args(&w.name, port_a, "x-dev=a", "5s"),
        MESH_READY,
    );
    let mut dev_b = start_until(
        As::DevB,
        &mesh_args(&w.name, port_b, "x-dev=b", "5s"),
        MESH_READY,
    );
    assert_eq!(answers(&w, &["x-dev: b", "x-dev: a"]), [LOCAL_B, LOCAL_A]);
    dev_a.kill();
    dev_b.kill();
    // Each member's agent ends its membership after the grace period; the
    // router, with no member left, restores the Service and ends itself.
    wait_until(
        "the router to restore the Service after both laptops vanished",
        DEAD_MAN_TIMEOUT,
        Duration::from_millis(500),
        || match (w.spec_now() == w.spec, w.ktb_annotations()) {
            (true, a) if a.is_empty() => Ok(()),
            (same, a) => Err(format!("spec restored: {same}, annotations {a:?}")),
        },
    );
    w.assert_restored("after both laptops were killed");
    w.wait_reaches_original("after both laptops were killed");
    // The router drains for a few seconds after restoring, then deletes its
    // Lease; garbage collection takes the rest.
    wait_ktb_objects_gone(
        &w.name,
        "the router's Lease and every object it owns to be gone",
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn preview_publishes_a_local_process_by_name_and_removes_it() {
    let client = "preview-client";
    apply(As::Admin, &echo_pod_manifest(client, NAMESPACE, client));
    wait_ready(As::Admin, NAMESPACE, &format!("app={client}"));
    let _client = Cleanup(vec![format!("pod/{client}")]);
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    let port_b = free_port(&["laptop-b"]);
    let name = "pv-orders";
    let args_on = |port: u16, grace: &str| {
        let mut args = strings(&[
            "preview",
            name,
            "--expose",
            &format!("{port}:80"),
            "-n",
            NAMESPACE,
        ]);
        args.extend(agent_args(grace));
        args
    };
    let args = |grace: &str| args_on(port, grace);

    // A name that exists is refused, and nothing is created.
    let w = Workload::deploy(NAMESPACE, "pv-existing");
    let mut existing = args("5s");
    existing[1] = w.name.clone();
    let refused = run_ktb(As::DevA, &existing);
    expect_exit(&refused, 3, "preview of an existing Service");
    expect_stderr(&refused, "already exists", "preview of an existing Service");
    w.assert_untouched("a refused preview");

    let mut ktb = start_until(As::DevA, &args("5s"), PREVIEW_READY);
    let target = format!("{name}.{NAMESPACE}:80");
    assert_eq!(
        probe_ok(NAMESPACE, client, &["http", &target]).trim(),
        LOCAL_A
    );
    let only_dev_a = vec![("preview".into(), "dev-a".into(), "-".into(), "live".into())];
    let rows = status_rows(As::DevB, name);
    assert_eq!(row_summary(&rows), only_dev_a, "{rows:?}");

    // A name someone previews is refused, naming them; theirs still serves.
    let what = "a preview of a name dev-a previews";
    let refused = run_ktb(As::DevB, &args_on(port_b, "5s"));
    expect_exit(&refused, 3, what);
    expect_stderr(&refused, "is previewed by dev-a on", what);
    expect_stderr(&refused, "choose another name", what);
    assert_eq!(
        probe_ok(NAMESPACE, client, &["http", &target]).trim(),
        LOCAL_A,
        "{what}: dev-a's preview"
    );
    let rows = status_rows(As::DevA, name);
    assert_eq!(row_summary(&rows), only_dev_a, "{what}: {rows:?}");
    stop(&mut ktb, &format!("removed Service {NAMESPACE}/{name}"));
    assert_preview_gone(name);

    // A killed laptop: the agent ends the session, and the Service goes with it.
    let mut ktb = start_until(As::DevA, &args("5s"), PREVIEW_READY);
    ktb.kill();
    assert_preview_gone(name);
}

/// Waits (bounded) until no ktb object mentioning `name` is left.
fn wait_ktb_objects_gone(name: &str, what: &str) {
    wait_until(
        what,
        DEAD_MAN_TIMEOUT,
        Duration::from_millis(500),
        || match ktb_objects(NAMESPACE, Some(name)) {
            left if left.is_empty() => Ok(()),
            left => Err(format!("{left:?}")),
        },
    );
}

/// The previewed Service and every ktb object of it are gone (bounded).
fn assert_preview_gone(name: &str) {
    wait_ktb_objects_gone(name, &format!("Service {name} and its objects to be gone"));
    let out = kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "get",
            "service",
            name,
            "--ignore-not-found",
            "-o",
            "name",
        ],
    );
    assert!(out.is_empty(), "Service {name} still exists");
}

/// A Deployment of two gRPC echo pods and its Service (port 9090).
fn grpc_manifests(name: &str) -> (String, String) {
    let deployment = format!(
        r#"{{"apiVersion":"apps/v1","kind":"Deployment","metadata":{{"name":"{name}","namespace":"{NAMESPACE}"}},
"spec":{{"replicas":2,"selector":{{"matchLabels":{{"app":"{name}"}}}},"template":{{"metadata":{{"labels":{{"app":"{name}"}}}},
"spec":{{"terminationGracePeriodSeconds":2,"containers":[{{"name":"grpc","image":"{GRPC_ECHO_IMAGE}","imagePullPolicy":"Never",
"ports":[{{"containerPort":9090}}],"readinessProbe":{{"tcpSocket":{{"port":9090}},"periodSeconds":1}}}}]}}}}}}}}"#
    );
    let service = format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{NAMESPACE}"}},
"spec":{{"selector":{{"app":"{name}"}},"ports":[{{"name":"grpc","port":9090,"targetPort":9090}}]}}}}"#
    );
    (deployment, service)
}

/// `grpc-echo serve` on a laptop as the developer's local gRPC server.
fn local_grpc(netns: &str, port: u16, pod_name: &str) -> Spawned {
    let mut cmd = netns_command(netns, workspace_bin("grpc-echo", "ktb-workloads"));
    cmd.arg("serve")
        .env("PORT", port.to_string())
        .env("POD_NAME", pod_name);
    let server = Spawned::start(&format!("grpc-echo {netns}:{port}"), cmd);
    wait_until(
        &format!("grpc-echo to listen on {netns}:{port}"),
        Duration::from_secs(10),
        Duration::from_millis(100),
        || match port_is_free(netns, port) {
            false => Ok(()),
            true => Err("not listening".to_owned()),
        },
    );
    server
}

/// One gRPC call from the client pod, carrying `metadata` (`k=v` each).
fn grpc_call(client: &str, target: &str, metadata: &[&str]) -> Result<String, String> {
    let mut args = vec![
        "-n",
        NAMESPACE,
        "exec",
        client,
        "--",
        "/grpc-echo",
        "call",
        target,
    ];
    for m in metadata {
        args.extend(["--metadata", m]);
    }
    let out = run_bounded(kubectl_cmd(As::Admin, &args), Duration::from_secs(30));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn grpc_calls_are_routed_by_their_metadata() {
    let name = "mesh-grpc";
    let client = "mesh-grpc-client";
    let (deployment, service) = grpc_manifests(name);
    apply(As::Admin, &deployment);
    apply(As::Admin, &service);
    apply(As::Admin, &echo_pod_manifest(client, NAMESPACE, client));
    let _cleanup = Cleanup(vec![
        format!("deployment/{name}"),
        format!("service/{name}"),
        format!("pod/{client}"),
    ]);
    wait_rollout(NAMESPACE, name);
    wait_ready(As::Admin, NAMESPACE, &format!("app={client}"));
    let spec = || {
        kubectl(
            As::Admin,
            &[
                "-n",
                NAMESPACE,
                "get",
                "service",
                name,
                "-o",
                "jsonpath={.spec}",
            ],
        )
    };
    let original = spec();
    let target = format!("{name}.{NAMESPACE}:9090");
    let original_pod = |who: &str| who.starts_with(&format!("{name}-"));
    let before = grpc_call(client, &target, &[]).expect("gRPC before the mesh");
    assert!(original_pod(&before), "answered by {before}");

    let port_a = free_port(&["laptop-a"]);
    let port_b = free_port(&["laptop-b"]);
    let _local_a = local_grpc("laptop-a", port_a, LOCAL_A);
    let _local_b = local_grpc("laptop-b", port_b, LOCAL_B);
    let args = |port: u16, mark: &str| {
        let mut args = strings(&[
            "mesh",
            name,
            "--expose",
            &format!("{port}:9090"),
            "--header",
            mark,
            "-n",
            NAMESPACE,
        ]);
        args.extend(agent_args("30s"));
        args
    };
    let mut dev_a = start_until(As::DevA, &args(port_a, "x-dev=a"), MESH_READY);
    let mut dev_b = start_until(As::DevB, &args(port_b, "x-dev=b"), MESH_READY);

    assert_eq!(
        grpc_call(client, &target, &["x-dev=a"]).as_deref(),
        Ok(LOCAL_A)
    );
    assert_eq!(
        grpc_call(client, &target, &["x-dev=b"]).as_deref(),
        Ok(LOCAL_B)
    );
    assert_eq!(
        grpc_call(client, &target, &["baggage=team=x,x-dev=a"]).as_deref(),
        Ok(LOCAL_A),
        "a baggage entry as the mark"
    );
    let unmarked = grpc_call(client, &target, &[]).expect("an unmarked gRPC call");
    assert!(
        original_pod(&unmarked),
        "an unmarked call went to {unmarked}"
    );

    stop(&mut dev_a, "still meshed by dev-b");
    stop(
        &mut dev_b,
        &format!("restored Service {NAMESPACE}/{name}: no one meshes it any more"),
    );
    assert_eq!(spec(), original, "the Service after both members left");
    let annotations = kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "get",
            "service",
            name,
            "-o",
            "jsonpath={.metadata.annotations}",
        ],
    );
    assert!(
        !annotations.contains("ktb.dev/"),
        "ktb's annotations left on the Service: {annotations}"
    );
    let after = grpc_call(client, &target, &["x-dev=a"]).expect("gRPC after the mesh");
    assert!(original_pod(&after), "after the mesh, answered by {after}");
    wait_ktb_objects_gone(name, "ktb's objects for the gRPC Service to be gone");
}

/// Deletes (as the admin) what a test created, when it ends.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut args = vec![
            "-n",
            NAMESPACE,
            "delete",
            "--ignore-not-found",
            "--wait=false",
        ];
        args.extend(self.0.iter().map(String::as_str));
        let _ = run_bounded(kubectl_cmd(As::Admin, &args), Duration::from_secs(30));
    }
}
