//! What the exchange-level end-to-end tests share: running `ktb` as a
//! developer on a laptop, a test workload (Deployment, Service, client pod)
//! created as the admin with its original state recorded, what callers of
//! its Service reach, and the assertions that nothing of ktb is left.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::{
    apply, command_as, echo_deployment_manifest, echo_pod_manifest, get_json, http_probe, kubectl,
    service_manifest, try_kubectl, wait_ready, wait_rollout, wait_until, workspace_bin, As,
    Spawned, AGENT_IMAGE,
};

/// The line ktb writes once the exchange is in place.
pub const READY: &str = "Ctrl-C restores it";
/// How long ktb may take to get there (pod start, port-forward, tunnel).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long ktb may take to restore and exit after a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a ktb command that fails or finishes on its own may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The label on everything ktb creates.
pub const MANAGED: &str = "app.kubernetes.io/managed-by=ktb";
/// The kinds of object ktb creates in the namespace.
pub const KTB_KINDS: &str = "pods,services,secrets,serviceaccounts,roles,rolebindings,leases";
/// What the developer's local process answers.
pub const LOCAL_A: &str = "laptop-a-local";
pub const LOCAL_B: &str = "laptop-b-local";

pub fn ktb_bin() -> PathBuf {
    workspace_bin("ktb", "ktb")
}

/// `ktb ARGS` as the developer `who`, on their laptop, with their
/// kubeconfig in `KUBECONFIG`.
pub fn ktb_cmd(who: As, args: &[String]) -> Command {
    assert_ne!(who, As::Admin, "ktb runs as a developer on a laptop");
    let mut cmd = command_as(who, ktb_bin());
    cmd.env("KUBECONFIG", who.kubeconfig())
        .env("NO_COLOR", "1")
        .args(args);
    cmd
}

/// Starts `ktb ARGS` as `who`; it keeps running until signalled.
pub fn start_ktb(who: As, args: &[String]) -> Spawned {
    eprintln!("+ [{}] ktb {}", who.user(), args.join(" "));
    Spawned::start(&format!("ktb {}", who.user()), ktb_cmd(who, args))
}

/// Runs `ktb ARGS` as `who` to completion (bounded). A command expected
/// to finish on its own must not bring an exchange up: if ktb says it is
/// ready, it is stopped (SIGINT, restoring the Service) and the test fails.
pub fn run_ktb(who: As, args: &[String]) -> Output {
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
pub fn exchange_args(service: &str, namespace: &str, local_port: u16, grace: &str) -> Vec<String> {
    let mut args = strings(&[
        "exchange",
        service,
        "--expose",
        &format!("{local_port}:80"),
        "-n",
        namespace,
    ]);
    args.extend(agent_args(grace));
    args
}

/// The agent flags every cluster-side command takes in the tests: the
/// test cluster's agent image, never pulled, and `grace`.
pub fn agent_args(grace: &str) -> Vec<String> {
    strings(&[
        "--agent-image",
        AGENT_IMAGE,
        "--image-pull-policy",
        "Never",
        "--grace",
        grace,
    ])
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Starts `ktb exchange` of `w` as `who` towards the local process on
/// `port`; returns once ktb says it is ready and callers reach `local`.
pub fn exchange_until_local(who: As, w: &Workload, port: u16, grace: &str, local: &str) -> Spawned {
    let mut ktb = start_ktb(who, &exchange_args(&w.name, &w.namespace, port, grace));
    wait_ready_line(&mut ktb);
    w.wait_reaches_local(local);
    ktb
}

/// Waits for the ready line; fails the test with ktb's stderr otherwise.
pub fn wait_ready_line(ktb: &mut Spawned) {
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
pub fn stop_ktb(ktb: &mut Spawned, signal: i32, namespace: &str, service: &str) {
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

pub fn expect_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status {}, expected {code}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn expect_stderr(out: &Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "{what}: stderr does not contain {needle:?}:\n{stderr}"
    );
}

/// An object ktb created (label `app.kubernetes.io/managed-by=ktb`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KtbObject {
    pub kind: String,
    pub name: String,
    pub deleting: bool,
}

/// Every object labelled managed-by=ktb in `namespace`, of the kinds ktb
/// creates, whose JSON mentions `mention` (a Service name; None for all).
pub fn ktb_objects(namespace: &str, mention: Option<&str>) -> Vec<KtbObject> {
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

/// ktb, having exited, left nothing in `namespace` (whose JSON mentions
/// `mention`; None for all) it did not at least delete, and what it deleted
/// is gone within 60 s.
pub fn assert_ktb_objects_gone(namespace: &str, mention: Option<&str>, what: &str) {
    let left: Vec<KtbObject> = ktb_objects(namespace, mention)
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
            let left = ktb_objects(namespace, mention);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    );
}

/// The test's workload: Deployment and Service `NAME` (2 http-echo pods,
/// port 80 → 8080, selector app=NAME) and a client pod `NAME-client`, all
/// created by the admin, with the Service's original state recorded.
/// Dropping it deletes them and anything ktb left for this Service.
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub client: String,
    pub original_pods: BTreeSet<String>,
    /// `.spec` of the Service as the apiserver serialises it.
    pub spec: String,
    pub resource_version: String,
}

impl Workload {
    pub fn deploy(namespace: &str, name: &str) -> Workload {
        Workload::deploy_from(
            namespace,
            name,
            &echo_deployment_manifest(name, namespace, 2),
            &service_manifest(name, namespace, name, 80, 8080),
        )
    }

    /// Like [`Workload::deploy`], with the given manifests for the
    /// Deployment (2 pods labelled `app=NAME`) and the Service (port 80
    /// among its ports).
    pub fn deploy_from(namespace: &str, name: &str, deployment: &str, service: &str) -> Workload {
        let client = format!("{name}-client");
        // Whatever an earlier, interrupted run left behind.
        delete_workload(namespace, name, &client, true);
        apply(As::Admin, deployment);
        apply(As::Admin, service);
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

    pub fn service(&self) -> Value {
        get_json(&self.namespace, &["service", &self.name])
    }

    pub fn spec_now(&self) -> String {
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

    pub fn selector_now(&self) -> Value {
        self.service()["spec"]["selector"].clone()
    }

    pub fn original_selector(&self) -> Value {
        json!({ "app": self.name })
    }

    /// The Service's annotations under `ktb.dev/`.
    pub fn ktb_annotations(&self) -> Vec<String> {
        ktb_annotations(&self.service())
    }

    /// The DNS name callers in the cluster use, on Service port 80.
    pub fn target(&self) -> String {
        self.target_on(80)
    }

    pub fn target_on(&self, port: u16) -> String {
        format!("{}.{}:{port}", self.name, self.namespace)
    }

    /// Who answers a call to the Service (port 80) from the client pod.
    pub fn answer(&self) -> Result<String, String> {
        self.answer_on(80)
    }

    pub fn answer_on(&self, port: u16) -> Result<String, String> {
        http_probe(&self.namespace, &self.client, &self.target_on(port))
    }

    /// Waits until callers of the Service reach `expected`, then requires
    /// the next 5 calls to reach it too: every caller, not some.
    pub fn wait_reaches(&self, what: &str, expected: impl Fn(&str) -> bool, timeout: Duration) {
        self.wait_reaches_on(80, what, expected, timeout)
    }

    /// [`Workload::wait_reaches`] on Service port `port`.
    pub fn wait_reaches_on(
        &self,
        port: u16,
        what: &str,
        expected: impl Fn(&str) -> bool,
        timeout: Duration,
    ) {
        wait_until(what, timeout, Duration::from_millis(300), || {
            let got = self.answer_on(port)?;
            if expected(&got) {
                Ok(())
            } else {
                Err(format!("answered by {got:?}"))
            }
        });
        for i in 0..5 {
            let got = self.answer_on(port);
            assert!(
                matches!(&got, Ok(name) if expected(name)),
                "{what}: call {i} after the first success got {got:?}"
            );
        }
    }

    pub fn wait_reaches_local(&self, local: &str) {
        self.wait_reaches(
            &format!("callers of {} to reach {local}", self.target()),
            |got| got == local,
            Duration::from_secs(60),
        );
    }

    pub fn wait_reaches_original(&self, what: &str) {
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

    /// Like [`Workload::wait_reaches_original`] on `port`, but any pod of
    /// the Deployment counts: after scale mode the workload's pods are new.
    pub fn wait_reaches_workload_on(&self, port: u16, what: &str) {
        let prefix = format!("{}-", self.name);
        self.wait_reaches_on(
            port,
            &format!(
                "{what}: callers of {} to reach a pod of Deployment {}",
                self.target_on(port),
                self.name
            ),
            |got| got.starts_with(&prefix),
            Duration::from_secs(60),
        );
    }

    /// Stops `ktb` with SIGINT and checks the whole way back: the Service
    /// byte for byte as recorded, its callers at the original pods, nothing
    /// of ktb left.
    pub fn stop_and_check_restored(&self, ktb: &mut Spawned, what: &str) {
        stop_ktb(ktb, libc::SIGINT, &self.namespace, &self.name);
        self.assert_restored(what);
        self.wait_reaches_original(what);
        self.assert_ktb_objects_gone(what);
    }

    /// ktb's objects for this Service.
    pub fn ktb_objects(&self) -> Vec<KtbObject> {
        ktb_objects(&self.namespace, Some(&self.name))
    }

    /// The Service's spec is byte-for-byte the recorded one and it carries
    /// no ktb annotation.
    pub fn assert_restored(&self, what: &str) {
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
    pub fn assert_untouched(&self, what: &str) {
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

    /// ktb, having exited, left nothing of this Service's it did not at
    /// least delete, and what it deleted is gone within 60 s.
    pub fn assert_ktb_objects_gone(&self, what: &str) {
        assert_ktb_objects_gone(&self.namespace, Some(&self.name), what);
    }

    /// The shadow (agent) pods ktb runs for this Service.
    pub fn shadow_pods(&self) -> Vec<KtbObject> {
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

pub fn ktb_annotations(service: &Value) -> Vec<String> {
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
pub fn delete_workload(namespace: &str, name: &str, client: &str, wait: bool) {
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

pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}
