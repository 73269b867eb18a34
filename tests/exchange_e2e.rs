//! End-to-end tests of `ktb exchange` and `ktb recover` against the
//! project's test cluster (`cargo xtask cluster up`).
//!
//! Each test deploys, as the admin, its own Deployment of two http-echo
//! pods behind its own Service (port 80 → 8080) and a client pod in the
//! cluster that calls the Service by its DNS name; runs the developer's
//! "local process" (the http-echo binary from `target/debug`, answering
//! `laptop-a-local`) inside the laptop's network namespace; and runs
//! `target/debug/ktb` there too, as the developer, exactly as a developer
//! would. Then it checks what the cluster's callers reach, how ktb exits
//! and what it leaves behind.
//!
//! Every test is ignored by default and needs the cluster and the binaries:
//!
//! ```text
//! cargo build -p ktb -p ktb-workloads
//! cargo test -p ktb-tests --test exchange -- --ignored --test-threads=1
//! ```
//!
//! Without a cluster they fail rather than skip. Each test uses its own
//! Service name (no name is a prefix of another), so they do not interfere
//! when run in parallel, and deletes its workloads (also when it fails).
//! Every wait is bounded; ktb and the local servers are stopped by PID.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use ktb_tests::cluster::{
    apply, command_as, echo_deployment_manifest, echo_pod_manifest, free_port, get_json,
    http_probe, kubectl, local_echo, service_manifest, try_kubectl, wait_ready, wait_rollout,
    wait_until, workspace_bin, As, Spawned, TempNamespace, AGENT_IMAGE, NAMESPACE,
};
use serde_json::{json, Value};

/// The line ktb writes once the exchange is in place.
const READY: &str = "Ctrl-C restores it";
/// How long ktb may take to get there (pod start, port-forward, tunnel).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long ktb may take to restore and exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a ktb command that fails or finishes on its own may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The label on everything ktb creates.
const MANAGED: &str = "app.kubernetes.io/managed-by=ktb";
/// The kinds of object ktb creates in the namespace.
const KTB_KINDS: &str = "pods,secrets,serviceaccounts,roles,rolebindings,leases";
/// What the developer's local process answers.
const LOCAL_A: &str = "laptop-a-local";
const LOCAL_B: &str = "laptop-b-local";

fn ktb_bin() -> PathBuf {
    workspace_bin("ktb", "ktb")
}

/// `ktb ARGS` as the developer `who`, on their laptop, with their
/// kubeconfig in `KUBECONFIG`.
fn ktb_cmd(who: As, args: &[String]) -> Command {
    assert_ne!(who, As::Admin, "ktb runs as a developer on a laptop");
    let mut cmd = command_as(who, ktb_bin());
    cmd.env("KUBECONFIG", who.kubeconfig())
        .env("NO_COLOR", "1")
        .args(args);
    cmd
}

/// Starts `ktb ARGS` as `who`; it keeps running until signalled.
fn start_ktb(who: As, args: &[String]) -> Spawned {
    eprintln!("+ [{}] ktb {}", who.user(), args.join(" "));
    Spawned::start(&format!("ktb {}", who.user()), ktb_cmd(who, args))
}

/// Runs `ktb ARGS` as `who` to completion (bounded). A command expected
/// to finish on its own must not bring an exchange up: if ktb says it is
/// ready, it is stopped (SIGINT, restoring the Service) and the test fails.
fn run_ktb(who: As, args: &[String]) -> Output {
    let mut ktb = start_ktb(who, args);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = ktb.wait_exit(Duration::from_millis(200)) {
            break status;
        }
        if ktb.stderr().contains(READY) {
            ktb.signal(libc::SIGINT);
            let _ = ktb.wait_exit(EXIT_TIMEOUT);
            panic!(
                "ktb {} as {} was expected to finish on its own, but exchanged the Service:\n{}",
                args.join(" "),
                who.user(),
                ktb.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "ktb {} as {} still running after {RUN_TIMEOUT:?}:\n{}",
            args.join(" "),
            who.user(),
            ktb.stderr()
        );
    };
    eprintln!("  -> {}", describe(status));
    Output {
        status,
        stdout: ktb.stdout().into_bytes(),
        stderr: ktb.stderr().into_bytes(),
    }
}

/// `ktb exchange SERVICE --expose LOCAL:80 -n NS` with the test cluster's
/// agent image and the given grace period.
fn exchange_args(service: &str, namespace: &str, local_port: u16, grace: &str) -> Vec<String> {
    [
        "exchange",
        service,
        "--expose",
        &format!("{local_port}:80"),
        "-n",
        namespace,
        "--agent-image",
        AGENT_IMAGE,
        "--image-pull-policy",
        "Never",
        "--grace",
        grace,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Waits for the ready line; fails the test with ktb's stderr otherwise.
fn wait_ready_line(ktb: &mut Spawned) {
    ktb.wait_for_stderr(READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb exchange never became ready: {e}"));
    let stderr = ktb.stderr();
    let line = stderr.lines().find(|l| l.contains(READY)).unwrap_or("");
    assert!(
        line.starts_with("ktb: "),
        "the ready line is not a `ktb: ` progress line: {line:?}"
    );
}

/// Sends `signal` to a running ktb and expects it to restore the Service
/// and exit 0 within [`EXIT_TIMEOUT`], saying so.
fn stop_ktb(ktb: &mut Spawned, signal: i32, namespace: &str, service: &str) {
    let sent = Instant::now();
    ktb.signal(signal);
    let status = ktb.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "ktb still running {EXIT_TIMEOUT:?} after signal {signal}; stderr:\n{}",
            ktb.stderr()
        )
    });
    eprintln!(
        "ktb exited {status} {:?} after signal {signal}",
        sent.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "ktb exited {status} after signal {signal}, not 0; stderr:\n{}",
        ktb.stderr()
    );
    let restored = format!("restored Service {namespace}/{service}");
    assert!(
        ktb.stderr().contains(&restored),
        "ktb's stderr does not say {restored:?}:\n{}",
        ktb.stderr()
    );
}

fn expect_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status {}, expected {code}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn expect_stderr(out: &Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "{what}: stderr does not contain {needle:?}:\n{stderr}"
    );
}

/// An object ktb created (label `app.kubernetes.io/managed-by=ktb`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct KtbObject {
    kind: String,
    name: String,
    deleting: bool,
}

/// Every object labelled managed-by=ktb in `namespace`, of the kinds ktb
/// creates, whose JSON mentions `mention` (a Service name; None for all).
fn ktb_objects(namespace: &str, mention: Option<&str>) -> Vec<KtbObject> {
    let list = get_json(namespace, &[KTB_KINDS, "-l", MANAGED]);
    let mut found: Vec<KtbObject> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|o| mention.is_none_or(|m| o.to_string().contains(m)))
        .map(|o| KtbObject {
            kind: o["kind"].as_str().unwrap_or("?").to_owned(),
            name: o["metadata"]["name"].as_str().unwrap_or("?").to_owned(),
            deleting: !o["metadata"]["deletionTimestamp"].is_null(),
        })
        .collect();
    found.sort();
    found
}

/// The test's workload: Deployment and Service `NAME` (2 http-echo pods,
/// port 80 → 8080, selector app=NAME) and a client pod `NAME-client`, all
/// created by the admin, with the Service's original state recorded.
/// Dropping it deletes them and anything ktb left for this Service.
struct Workload {
    namespace: String,
    name: String,
    client: String,
    original_pods: BTreeSet<String>,
    /// `.spec` of the Service as the apiserver serialises it.
    spec: String,
    resource_version: String,
}

impl Workload {
    fn deploy(namespace: &str, name: &str) -> Workload {
        let client = format!("{name}-client");
        // Whatever an earlier, interrupted run left behind.
        delete_workload(namespace, name, &client, true);
        apply(As::Admin, &echo_deployment_manifest(name, namespace, 2));
        apply(
            As::Admin,
            &service_manifest(name, namespace, name, 80, 8080),
        );
        apply(As::Admin, &echo_pod_manifest(&client, namespace, &client));
        wait_rollout(namespace, name);
        wait_ready(As::Admin, namespace, &format!("app={client}"));
        let pods = get_json(namespace, &["pods", "-l", &format!("app={name}")]);
        let original_pods: BTreeSet<String> = pods["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| p["metadata"]["name"].as_str().expect("name").to_owned())
            .collect();
        assert_eq!(original_pods.len(), 2, "pods of {name}: {original_pods:?}");
        let mut w = Workload {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            client,
            original_pods,
            spec: String::new(),
            resource_version: String::new(),
        };
        // The Service works before ktb touches it.
        w.wait_reaches_original("the Service before the exchange");
        w.spec = w.spec_now();
        w.resource_version = w.service()["metadata"]["resourceVersion"]
            .as_str()
            .expect("resourceVersion")
            .to_owned();
        eprintln!("Service {namespace}/{name} spec: {}", w.spec);
        w
    }

    fn service(&self) -> Value {
        get_json(&self.namespace, &["service", &self.name])
    }

    fn spec_now(&self) -> String {
        kubectl(
            As::Admin,
            &[
                "-n",
                &self.namespace,
                "get",
                "service",
                &self.name,
                "-o",
                "jsonpath={.spec}",
            ],
        )
    }

    fn selector_now(&self) -> Value {
        self.service()["spec"]["selector"].clone()
    }

    fn original_selector(&self) -> Value {
        json!({ "app": self.name })
    }

    /// The Service's annotations under `ktb.dev/`.
    fn ktb_annotations(&self) -> Vec<String> {
        ktb_annotations(&self.service())
    }

    /// The DNS name callers in the cluster use.
    fn target(&self) -> String {
        format!("{}.{}:80", self.name, self.namespace)
    }

    /// Who answers a call to the Service from the client pod.
    fn answer(&self) -> Result<String, String> {
        http_probe(&self.namespace, &self.client, &self.target())
    }

    /// Waits until callers of the Service reach `expected`, then requires
    /// the next 5 calls to reach it too: every caller, not some.
    fn wait_reaches(&self, what: &str, expected: impl Fn(&str) -> bool, timeout: Duration) {
        wait_until(what, timeout, Duration::from_millis(300), || {
            let got = self.answer()?;
            if expected(&got) {
                Ok(())
            } else {
                Err(format!("answered by {got:?}"))
            }
        });
        for i in 0..5 {
            let got = self.answer();
            assert!(
                matches!(&got, Ok(name) if expected(name)),
                "{what}: call {i} after the first success got {got:?}"
            );
        }
    }

    fn wait_reaches_local(&self, local: &str) {
        self.wait_reaches(
            &format!("callers of {} to reach {local}", self.target()),
            |got| got == local,
            Duration::from_secs(60),
        );
    }

    fn wait_reaches_original(&self, what: &str) {
        self.wait_reaches(
            &format!(
                "{what}: callers of {} to reach {:?}",
                self.target(),
                self.original_pods
            ),
            |got| self.original_pods.contains(got),
            Duration::from_secs(60),
        );
    }

    /// ktb's objects for this Service.
    fn ktb_objects(&self) -> Vec<KtbObject> {
        ktb_objects(&self.namespace, Some(&self.name))
    }

    /// The Service's spec is byte-for-byte the recorded one and it carries
    /// no ktb annotation.
    fn assert_restored(&self, what: &str) {
        let spec = self.spec_now();
        assert_eq!(
            spec, self.spec,
            "{what}: Service spec differs from the original\n now: {spec}\n was: {}",
            self.spec
        );
        let annotations = self.ktb_annotations();
        assert!(
            annotations.is_empty(),
            "{what}: Service still carries ktb annotations {annotations:?}"
        );
    }

    /// Nothing wrote to the Service at all.
    fn assert_untouched(&self, what: &str) {
        self.assert_restored(what);
        let service = self.service();
        let rv = service["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("");
        assert_eq!(
            rv, self.resource_version,
            "{what}: the Service was written to (resourceVersion {} -> {rv}): {service}",
            self.resource_version
        );
    }

    /// ktb, having exited, left nothing it did not at least delete, and
    /// what it deleted is gone within 60 s.
    fn assert_ktb_objects_gone(&self, what: &str) {
        let left: Vec<KtbObject> = self
            .ktb_objects()
            .into_iter()
            .filter(|o| !o.deleting)
            .collect();
        assert!(
            left.is_empty(),
            "{what}: ktb left objects without deleting them: {left:?}"
        );
        wait_until(
            &format!("{what}: ktb's objects to be gone"),
            Duration::from_secs(60),
            Duration::from_millis(500),
            || {
                let left = self.ktb_objects();
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{left:?}"))
                }
            },
        );
    }

    /// The shadow (agent) pods ktb runs for this Service.
    fn shadow_pods(&self) -> Vec<KtbObject> {
        self.ktb_objects()
            .into_iter()
            .filter(|o| o.kind == "Pod")
            .collect()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        delete_workload(&self.namespace, &self.name, &self.client, false);
    }
}

fn ktb_annotations(service: &Value) -> Vec<String> {
    service["metadata"]["annotations"]
        .as_object()
        .map(|a| {
            a.keys()
                .filter(|k| k.starts_with("ktb.dev/"))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes (as the admin) the test's Deployment, Service and client pod
/// and every ktb object for that Service; waits for them to be gone if
/// `wait`.
fn delete_workload(namespace: &str, name: &str, client: &str, wait: bool) {
    let wait_flag = if wait { "--wait=true" } else { "--wait=false" };
    let mut targets = vec![
        format!("deployment/{name}"),
        format!("service/{name}"),
        format!("pod/{client}"),
    ];
    match std::panic::catch_unwind(|| ktb_objects(namespace, Some(name))) {
        Ok(objects) => targets.extend(
            objects
                .into_iter()
                .map(|o| format!("{}/{}", o.kind.to_lowercase(), o.name)),
        ),
        Err(_) if !wait => return, // cluster gone: nothing to clean
        Err(e) => std::panic::resume_unwind(e),
    }
    let mut args = vec![
        "-n",
        namespace,
        "delete",
        "--ignore-not-found",
        wait_flag,
        "--timeout=90s",
    ];
    args.extend(targets.iter().map(String::as_str));
    let out = try_kubectl(As::Admin, &args);
    if wait {
        assert!(
            out.status.success(),
            "cleaning up {namespace}/{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn selector_exchange_reaches_laptop_and_restores_on_sigint() {
    let w = Workload::deploy(NAMESPACE, "exh-happy");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    let mut ktb = start_ktb(As::DevA, &exchange_args(&w.name, NAMESPACE, port, "5s"));
    wait_ready_line(&mut ktb);

    // Every caller in the cluster reaches the laptop.
    w.wait_reaches_local(LOCAL_A);
    // And the cluster shows who holds the Service.
    let annotations = w.ktb_annotations();
    for a in ["ktb.dev/original-selector", "ktb.dev/session"] {
        assert!(
            annotations.iter().any(|k| k == a),
            "exchanged Service lacks annotation {a}: {annotations:?}"
        );
    }
    let objects = w.ktb_objects();
    let lease = format!("ktb-exchange-{}", w.name);
    assert!(
        objects.iter().any(|o| o.kind == "Lease" && o.name == lease),
        "no Lease {lease} labelled {MANAGED}: {objects:?}"
    );
    assert!(
        objects.iter().any(|o| o.kind == "Pod"),
        "no shadow pod labelled {MANAGED}: {objects:?}"
    );

    stop_ktb(&mut ktb, libc::SIGINT, NAMESPACE, &w.name);
    w.assert_restored("after SIGINT");
    w.wait_reaches_original("after SIGINT");
    w.assert_ktb_objects_gone("after SIGINT");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn sigterm_and_sighup_restore_like_sigint() {
    let w = Workload::deploy(NAMESPACE, "exh-signals");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let mut ktb = start_ktb(As::DevA, &exchange_args(&w.name, NAMESPACE, port, "5s"));
        wait_ready_line(&mut ktb);
        w.wait_reaches_local(LOCAL_A);
        stop_ktb(&mut ktb, signal, NAMESPACE, &w.name);
        let after = format!("after {name}");
        w.assert_restored(&after);
        w.wait_reaches_original(&after);
        w.assert_ktb_objects_gone(&after);
    }
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn agent_restores_service_after_ktb_is_killed() {
    let w = Workload::deploy(NAMESPACE, "exh-sigkill");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    let grace = Duration::from_secs(5);
    let mut ktb = start_ktb(As::DevA, &exchange_args(&w.name, NAMESPACE, port, "5s"));
    wait_ready_line(&mut ktb);
    w.wait_reaches_local(LOCAL_A);
    assert_ne!(w.selector_now(), w.original_selector(), "not exchanged");

    let killed = Instant::now();
    let status = ktb.kill();
    eprintln!("ktb: {}", describe(status));

    // The agent notices the laptop is gone and, after the grace period,
    // puts the selector back by itself.
    let original = w.original_selector();
    wait_until(
        "the agent to restore the Service's selector",
        grace + Duration::from_secs(15),
        Duration::from_millis(500),
        || {
            let now = w.selector_now();
            if now == original {
                Ok(())
            } else {
                Err(format!("selector {now}"))
            }
        },
    );
    let restored_after = killed.elapsed();
    eprintln!("selector restored {restored_after:?} after SIGKILL (grace {grace:?})");
    assert!(
        restored_after >= grace.saturating_sub(Duration::from_secs(1)),
        "restored {restored_after:?} after the laptop vanished, before the grace of {grace:?}"
    );
    wait_until(
        "the Service to be fully restored (spec and annotations)",
        Duration::from_secs(5),
        Duration::from_millis(500),
        || {
            let spec = w.spec_now();
            let annotations = w.ktb_annotations();
            if spec == w.spec && annotations.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "spec {spec} (original {}), annotations {annotations:?}",
                    w.spec
                ))
            }
        },
    );
    w.wait_reaches_original("after the agent restored the Service");

    wait_until(
        "the shadow pod to be gone",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let pods = w.shadow_pods();
            if pods.is_empty() {
                Ok(())
            } else {
                Err(format!("{pods:?}"))
            }
        },
    );
    eprintln!(
        "NOTE: {:?} after SIGKILL, ktb objects left for {}: {:?}",
        killed.elapsed(),
        w.name,
        w.ktb_objects()
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn sigterm_while_the_shadow_pod_is_created_leaves_nothing() {
    let w = Workload::deploy(NAMESPACE, "exh-early");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    let started = Instant::now();
    let mut ktb = start_ktb(As::DevA, &exchange_args(&w.name, NAMESPACE, port, "5s"));

    // Signal as soon as the shadow pod exists (it is then being created
    // and started), or 3 s after the start at the latest.
    let mut pod_seen = false;
    while started.elapsed() < Duration::from_secs(3) && ktb.try_status().is_none() {
        if !w.shadow_pods().is_empty() {
            pod_seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ktb.try_status().is_none(),
        "ktb exited before the signal; stderr:\n{}",
        ktb.stderr()
    );
    assert!(
        !ktb.stderr().contains(READY),
        "ktb was ready {:?} after its start, before the signal: this test \
         did not interrupt the setup",
        started.elapsed()
    );
    eprintln!(
        "SIGTERM {:?} after the start ({})",
        started.elapsed(),
        if pod_seen {
            "the shadow pod exists"
        } else {
            "no shadow pod yet"
        }
    );
    ktb.signal(libc::SIGTERM);
    let status = ktb.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "ktb still running {EXIT_TIMEOUT:?} after SIGTERM during setup; stderr:\n{}",
            ktb.stderr()
        )
    });
    eprintln!("ktb after SIGTERM during setup: {}", describe(status));
    assert!(
        status.code().is_some(),
        "ktb died from SIGTERM ({}) instead of handling it; stderr:\n{}",
        describe(status),
        ktb.stderr()
    );

    w.assert_restored("after SIGTERM during setup");
    w.assert_ktb_objects_gone("after SIGTERM during setup");
    w.wait_reaches_original("after SIGTERM during setup");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn second_developer_is_refused_until_the_first_is_done() {
    let w = Workload::deploy(NAMESPACE, "exh-lock");
    let port = free_port(&["laptop-a", "laptop-b"]);
    let _local_a = local_echo("laptop-a", port, LOCAL_A);
    let _local_b = local_echo("laptop-b", port, LOCAL_B);
    let mut ktb_a = start_ktb(As::DevA, &exchange_args(&w.name, NAMESPACE, port, "5s"));
    wait_ready_line(&mut ktb_a);
    w.wait_reaches_local(LOCAL_A);
    let held_by_a = w.service()["metadata"]["annotations"]["ktb.dev/session"].clone();
    let objects_a = w.ktb_objects();

    // dev-b, on the other laptop, is told who holds it and since when.
    let out = run_ktb(As::DevB, &exchange_args(&w.name, NAMESPACE, port, "5s"));
    expect_exit(&out, 1, "dev-b exchanging a Service dev-a holds");
    expect_stderr(&out, "is exchanged by dev-a@", "dev-b refused");
    expect_stderr(&out, "since", "dev-b refused");
    // ...and dev-a's exchange is untouched by the attempt.
    assert_eq!(
        w.service()["metadata"]["annotations"]["ktb.dev/session"],
        held_by_a,
        "dev-b's attempt changed the Service's session"
    );
    assert_eq!(
        w.ktb_objects(),
        objects_a,
        "dev-b's refused attempt changed ktb's objects"
    );
    w.wait_reaches_local(LOCAL_A);

    stop_ktb(&mut ktb_a, libc::SIGINT, NAMESPACE, &w.name);
    w.assert_restored("after dev-a's SIGINT");

    // Now dev-b gets it.
    let mut ktb_b = start_ktb(As::DevB, &exchange_args(&w.name, NAMESPACE, port, "5s"));
    wait_ready_line(&mut ktb_b);
    w.wait_reaches_local(LOCAL_B);
    stop_ktb(&mut ktb_b, libc::SIGINT, NAMESPACE, &w.name);
    w.assert_restored("after dev-b's SIGINT");
    w.wait_reaches_original("after dev-b's SIGINT");
    w.assert_ktb_objects_gone("after dev-b's SIGINT");
}

/// Exchange, SIGKILL ktb, and at once (long before the grace of 60 s runs
/// out and the agent would restore it) `ktb recover [--force]` as dev-a:
/// it restores the Service, and a second run finds it already original.
fn recover_after_sigkill(name: &str, force: bool) {
    let w = Workload::deploy(NAMESPACE, name);
    let local_port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", local_port, LOCAL_A);
    // A long grace: the agent must not restore the Service before recover does.
    let mut ktb = start_ktb(
        As::DevA,
        &exchange_args(&w.name, NAMESPACE, local_port, "60s"),
    );
    wait_ready_line(&mut ktb);
    w.wait_reaches_local(LOCAL_A);
    let killed = Instant::now();
    ktb.kill();
    assert_ne!(
        w.selector_now(),
        w.original_selector(),
        "the Service was restored right after SIGKILL, despite the grace of 60 s"
    );

    let mut recover = strings(&["recover", &w.name, "-n", NAMESPACE]);
    if force {
        recover.insert(1, "--force".into());
    }
    let out = run_ktb(As::DevA, &recover);
    expect_exit(&out, 0, &format!("ktb {}", recover.join(" ")));
    assert!(
        killed.elapsed() < Duration::from_secs(55),
        "recover finished {:?} after the kill, too late to tell it from the agent's restore",
        killed.elapsed()
    );
    w.assert_restored("after ktb recover");

    let again = run_ktb(As::DevA, &recover);
    expect_exit(&again, 0, &format!("ktb {}, again", recover.join(" ")));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        said.contains("already original"),
        "the second ktb recover does not say `already original`: {said}"
    );
    w.assert_restored("after the second ktb recover");
    w.wait_reaches_original("after ktb recover");

    // ktb recover may leave the shadow pod to the agent or to garbage
    // collection: give that 30 s, report what is left, then clean it as
    // the admin.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left = w.ktb_objects();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        left = w.ktb_objects();
    }
    eprintln!(
        "NOTE: {:?} after the kill and ktb recover, ktb objects left for {}: {left:?}",
        killed.elapsed(),
        w.name
    );
    if !left.is_empty() {
        let mut args = vec![
            "-n".to_owned(),
            NAMESPACE.to_owned(),
            "delete".to_owned(),
            "--ignore-not-found".to_owned(),
            "--wait=true".to_owned(),
            "--timeout=60s".to_owned(),
        ];
        args.extend(
            left.iter()
                .map(|o| format!("{}/{}", o.kind.to_lowercase(), o.name)),
        );
        kubectl(
            As::Admin,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
    assert!(
        w.shadow_pods().is_empty(),
        "shadow pod still there after cleanup"
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn recover_restores_a_service_left_exchanged() {
    recover_after_sigkill("exh-recover", false);
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn recover_force_restores_a_service_left_exchanged() {
    recover_after_sigkill("exh-forced", true);
}

/// `deploy/rbac/developer.yaml` for `namespace`, bound to user dev-a only,
/// with its `pods/portforward` rule cut down to `keep_verbs` (the rule is
/// dropped if none remain). Returns the manifest and the verbs removed.
fn role_with_portforward(namespace: &str, keep_verbs: &[&str]) -> (String, Vec<String>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac/developer.yaml");
    let yaml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // Rules are blocks starting at `  - apiGroups:`; anything unindented
    // (`---`, `kind:`, blank lines) ends one.
    let mut blocks: Vec<Vec<String>> = vec![Vec::new()];
    let mut in_rule = false;
    for line in yaml.lines() {
        if line.starts_with("  - apiGroups:") {
            blocks.push(Vec::new());
            in_rule = true;
        } else if !line.starts_with(' ') && in_rule {
            blocks.push(Vec::new());
            in_rule = false;
        }
        blocks.last_mut().expect("block").push(line.to_owned());
    }
    let mut removed = Vec::new();
    let mut found = 0;
    let mut out = Vec::new();
    for block in blocks {
        if !block.iter().any(|l| l.contains("\"pods/portforward\"")) {
            out.extend(block);
            continue;
        }
        found += 1;
        let verbs_line = block
            .iter()
            .find(|l| l.trim_start().starts_with("verbs:"))
            .unwrap_or_else(|| panic!("{path}: pods/portforward rule without verbs"));
        let verbs: Vec<String> = verbs_line
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let kept: Vec<&String> = verbs
            .iter()
            .filter(|v| keep_verbs.contains(&v.as_str()))
            .collect();
        removed = verbs
            .iter()
            .filter(|v| !keep_verbs.contains(&v.as_str()))
            .cloned()
            .collect();
        if kept.is_empty() {
            continue;
        }
        let kept = kept
            .iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(", ");
        out.extend(block.into_iter().map(|l| {
            if l.trim_start().starts_with("verbs:") {
                format!("    verbs: [{kept}]")
            } else {
                l
            }
        }));
    }
    assert_eq!(found, 1, "{path}: not exactly one pods/portforward rule");
    assert!(
        !removed.is_empty(),
        "{path}: no verb removed from pods/portforward"
    );
    let text = out.join("\n") + "\n";
    let subject = "  - kind: Group\n    name: developers\n";
    assert!(
        text.contains(subject),
        "{path}: no developers Group subject"
    );
    let text = text
        .replace("NAMESPACE", namespace)
        .replace(subject, "  - kind: User\n    name: dev-a\n");
    (text, removed)
}

/// In a namespace `ns` of its own where dev-a holds the developer Role
/// with `keep_verbs` of pods/portforward, `ktb exchange` must fail before
/// changing anything, naming each missing `VERB pods/portforward`.
fn preflight_refuses(ns: &str, keep_verbs: &[&str]) {
    let ns = TempNamespace::named(ns);
    let ns = ns.0.as_str();
    let (role, removed) = role_with_portforward(ns, keep_verbs);
    eprintln!("Role in {ns} (pods/portforward without {removed:?}):\n{role}");
    apply(As::Admin, &role);
    // The test is only meaningful if dev-a may do the rest but not that.
    let can = |verb: &str, resource: &str| {
        let mut args = vec!["-n", ns, "auth", "can-i", verb];
        match resource.split_once('/') {
            Some((resource, sub)) => args.extend([resource, "--subresource", sub]),
            None => args.push(resource),
        }
        try_kubectl(As::DevA, &args).status.success()
    };
    assert!(
        can("patch", "services") && can("create", "pods") && can("create", "leases"),
        "dev-a lacks the rest of the Role in {ns}"
    );
    for verb in &removed {
        assert!(
            !can(verb, "pods/portforward"),
            "dev-a may still {verb} pods/portforward in {ns}"
        );
    }

    let w = Workload::deploy(ns, "exh-preflight");
    let local_port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", local_port, LOCAL_A);
    let before = namespace_inventory(ns);
    let out = run_ktb(As::DevA, &exchange_args(&w.name, ns, local_port, "5s"));
    let what = format!("exchange without {removed:?} pods/portforward");
    expect_exit(&out, 1, &what);
    expect_stderr(&out, "missing permission", &what);
    for verb in &removed {
        expect_stderr(&out, &format!("{verb} pods/portforward"), &what);
    }

    w.assert_untouched("after the refused exchange");
    let objects = ktb_objects(ns, None);
    assert!(
        objects.is_empty(),
        "ktb created objects despite the missing permission: {objects:?}"
    );
    assert_eq!(
        namespace_inventory(ns),
        before,
        "the namespace changed although ktb refused to start"
    );
    w.wait_reaches_original("after the refused exchange");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn missing_portforward_rule_is_named_and_nothing_changes() {
    // The Role of deploy/rbac/developer.yaml minus its pods/portforward rule.
    preflight_refuses("team-c", &[]);
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn missing_create_portforward_is_named_and_nothing_changes() {
    // Everything but `create` on pods/portforward (what SPDY port-forward needs).
    preflight_refuses("team-d", &["get"]);
}

/// Names of the objects of the kinds ktb creates, and Services, in `namespace`.
fn namespace_inventory(namespace: &str) -> BTreeSet<String> {
    let list = get_json(namespace, &[&format!("{KTB_KINDS},services")]);
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn unknown_service_is_not_found_and_nothing_is_created() {
    let name = "exh-unknown";
    kubectl(
        As::Admin,
        &[
            "-n",
            NAMESPACE,
            "delete",
            "service",
            name,
            "--ignore-not-found",
        ],
    );
    let before = ktb_objects(NAMESPACE, Some(name));
    assert!(before.is_empty(), "leftovers before the test: {before:?}");

    let out = run_ktb(
        As::DevA,
        &exchange_args(name, NAMESPACE, free_port(&["laptop-a"]), "5s"),
    );
    expect_exit(&out, 1, "exchange of a Service that does not exist");
    expect_stderr(
        &out,
        "not found",
        "exchange of a Service that does not exist",
    );

    let after = ktb_objects(NAMESPACE, Some(name));
    assert!(
        after.is_empty(),
        "ktb created objects for a Service that does not exist: {after:?}"
    );
    let svc = try_kubectl(As::Admin, &["-n", NAMESPACE, "get", "service", name]);
    assert!(
        !svc.status.success(),
        "a Service {name} exists after the failed exchange"
    );
}
