//! End-to-end tests of `ktb doctor` against the project's test cluster
//! (`cargo xtask cluster up`).
//!
//! `ktb doctor -o json` runs as dev-a on laptop-a, with dev-a's kubeconfig:
//! with the developer Role every row about the cluster passes, the
//! throwaway agent included, and nothing of it is left afterwards; with a
//! Role lacking a verb, the commands that need it fail naming the verb and
//! their Role file, and the doctor exits 1; with one command's Role alone
//! (`deploy/rbac/connect.yaml`) that command and a real agent pass, which
//! shows the minimal Role is enough for what the agent's start does
//! (including the RBAC it writes); Ctrl-C while the agent starts removes
//! it before the doctor exits.
//!
//! ```text
//! cargo build -p ktb
//! cargo test -p ktb-tests --test doctor -- --ignored --test-threads=1
//! ```
//!
//! Every wait is bounded; ktb is stopped by its PID if it overruns; the
//! namespaces of the test are deleted when it ends, also when it fails.

use std::process::Output;

use serde_json::Value;

use ktb_tests::cluster::{apply, try_kubectl, As, TempNamespace, AGENT_IMAGE, NAMESPACE};
use ktb_tests::connect::StateDir;
use ktb_tests::exchange::{
    assert_ktb_objects_gone, expect_exit, expect_stderr, ktb_objects, run_ktb, start_ktb, strings,
    EXIT_TIMEOUT, READY_TIMEOUT,
};
use ktb_tests::rbac::{developer_role_without, role_file};

/// Every command's row, as the doctor names them.
const COMMANDS: [&str; 9] = [
    "exchange",
    "exchange --mode scale",
    "mesh",
    "preview",
    "forward",
    "connect",
    "status",
    "recover",
    "clean",
];

/// The name the doctor's objects share (its Lease, pod and RBAC).
const DOCTOR_OBJECTS: &str = "ktb-doctor-";

/// `ktb doctor -o json -n NAMESPACE` with the test cluster's agent image,
/// a journal directory of the test's own, and `extra`.
fn doctor_args(namespace: &str, state: &StateDir, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "doctor",
        "-o",
        "json",
        "-n",
        namespace,
        "--agent-image",
        AGENT_IMAGE,
        "--image-pull-policy",
        "Never",
        "--state-dir",
    ]);
    args.push(state.0.display().to_string());
    args.extend(strings(extra));
    args
}

/// Runs the doctor as dev-a; its rows.
fn doctor(namespace: &str, extra: &[&str]) -> (Output, Vec<Value>) {
    let state = StateDir::new("doctor");
    let out = run_ktb(As::DevA, &doctor_args(namespace, &state, extra));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ktb doctor -o json printed no JSON rows ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, rows)
}

/// The row called `name`.
fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} row in {rows:#?}"))
}

/// The row called `name` has `status`; returns its detail and hint.
fn expect_row(rows: &[Value], name: &str, status: &str) -> (String, String) {
    let r = row(rows, name);
    assert_eq!(r["status"], status, "row {name}: {r:#}");
    let text = |key: &str| r[key].as_str().unwrap_or_default().to_owned();
    (text("detail"), text("hint"))
}

/// `kubectl auth can-i VERB RESOURCE` as dev-a in `namespace`.
fn dev_a_can(namespace: &str, verb: &str, resource: &str) -> bool {
    try_kubectl(
        As::DevA,
        &["-n", namespace, "auth", "can-i", verb, resource],
    )
    .status
    .success()
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_developer_passes_every_cluster_check_and_the_agent_leaves_nothing() {
    assert!(
        ktb_objects(NAMESPACE, Some(DOCTOR_OBJECTS)).is_empty(),
        "a doctor's objects are in {NAMESPACE} before the test"
    );
    let (out, rows) = doctor(NAMESPACE, &[]);
    // Warnings (this machine's DNS, a colleague's leftovers) exit 0 too.
    expect_exit(&out, 0, "ktb doctor as dev-a with the developer Role");

    let (detail, _) = expect_row(&rows, "kubeconfig", "pass");
    let kubeconfig = As::DevA.kubeconfig();
    for part in [
        format!("namespace {NAMESPACE}"),
        kubeconfig.display().to_string(),
    ] {
        assert!(
            detail.contains(&part),
            "kubeconfig row lacks {part:?}: {detail}"
        );
    }
    let (detail, _) = expect_row(&rows, "cluster", "pass");
    assert!(detail.contains("you are dev-a"), "cluster row: {detail}");
    for command in COMMANDS {
        expect_row(&rows, &format!("rbac {command}"), "pass");
    }
    let (detail, _) = expect_row(&rows, "agent", "pass");
    assert!(
        detail.contains("agent pod ready in") && detail.contains("handshake in"),
        "agent row: {detail}"
    );
    expect_row(&rows, "journal", "pass");
    for local in ["sessions", "tun", "dns"] {
        let status = &row(&rows, local)["status"];
        assert!(
            status == "pass" || status == "warn",
            "{local} row fails: {:#}",
            row(&rows, local)
        );
    }

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("creating agent pod {DOCTOR_OBJECTS}")),
        "ktb doctor did not say it created its agent pod:\n{stderr}"
    );
    assert_ktb_objects_gone(NAMESPACE, Some(DOCTOR_OBJECTS), "after ktb doctor");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_missing_verb_fails_the_commands_needing_it_naming_their_role_files() {
    let ns = TempNamespace::named("team-doctor");
    let ns = ns.0.as_str();
    let keep = ["get", "list", "create", "delete"];
    let (role, removed) = developer_role_without(ns, As::DevA, "services", &keep);
    assert_eq!(
        removed,
        ["patch"],
        "the developer Role's services verbs changed"
    );
    eprintln!("Role in {ns} (services without patch):\n{role}");
    apply(As::Admin, &role);
    assert!(
        dev_a_can(ns, "get", "services") && !dev_a_can(ns, "patch", "services"),
        "dev-a's permissions in {ns} are not the narrowed Role's"
    );

    let (out, rows) = doctor(ns, &["--no-agent"]);
    expect_exit(&out, 1, "ktb doctor without patch on services");
    expect_stderr(
        &out,
        "checks failed",
        "ktb doctor without patch on services",
    );
    expect_row(&rows, "cluster", "pass");
    let needing_patch = [
        ("exchange", "exchange.yaml"),
        ("exchange --mode scale", "exchange-scale.yaml"),
        ("mesh", "mesh.yaml"),
        ("preview", "preview.yaml"),
        ("recover", "recover.yaml"),
        ("clean", "clean.yaml"),
    ];
    for (command, file) in needing_patch {
        let (detail, hint) = expect_row(&rows, &format!("rbac {command}"), "fail");
        assert_eq!(
            detail,
            format!("missing in namespace {ns}: patch services"),
            "rbac {command}"
        );
        assert!(
            hint.contains(&format!("deploy/rbac/{file}")),
            "rbac {command}: the hint does not name deploy/rbac/{file}: {hint}"
        );
    }
    for command in ["forward", "connect", "status"] {
        expect_row(&rows, &format!("rbac {command}"), "pass");
    }
    assert!(
        rows.iter().all(|r| r["name"] != "agent"),
        "--no-agent still ran the agent check: {rows:#?}"
    );
    let objects = ktb_objects(ns, None);
    assert!(
        objects.is_empty(),
        "ktb doctor --no-agent created objects: {objects:?}"
    );
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn one_commands_role_is_enough_for_that_command_and_a_real_agent() {
    let ns = TempNamespace::named("team-doctor-connect");
    let ns = ns.0.as_str();
    apply(As::Admin, &role_file("connect.yaml", ns, As::DevA));

    let (out, rows) = doctor(ns, &[]);
    expect_exit(&out, 1, "ktb doctor with deploy/rbac/connect.yaml alone");
    expect_row(&rows, "rbac connect", "pass");
    let (detail, _) = expect_row(&rows, "agent", "pass");
    assert!(detail.contains("handshake in"), "agent row: {detail}");
    let (detail, hint) = expect_row(&rows, "rbac forward", "fail");
    assert_eq!(detail, format!("missing in namespace {ns}: get services"));
    assert!(hint.contains("deploy/rbac/forward.yaml"), "{hint}");
    assert_ktb_objects_gone(ns, None, "after ktb doctor with the connect Role");
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn ctrl_c_while_the_agent_starts_removes_it_before_exiting() {
    let state = StateDir::new("doctor-interrupted");
    let mut ktb = start_ktb(As::DevA, &doctor_args(NAMESPACE, &state, &[]));
    ktb.wait_for_stderr(
        &format!("creating agent pod {DOCTOR_OBJECTS}"),
        READY_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("ktb doctor never started its agent: {e}"));
    ktb.signal(libc::SIGINT);
    let status = ktb
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("ktb doctor still running {EXIT_TIMEOUT:?} after SIGINT"));
    assert_eq!(
        status.code(),
        Some(1),
        "ktb doctor exited {status} after SIGINT; stderr:\n{}",
        ktb.stderr()
    );
    let stderr = ktb.stderr();
    assert!(
        stderr.contains("removing agent pod")
            && stderr.contains("interrupted before the checks were done"),
        "ktb doctor did not say it removed its agent and stopped:\n{stderr}"
    );
    assert!(
        ktb.stdout().is_empty(),
        "an interrupted doctor printed rows: {}",
        ktb.stdout()
    );
    assert_ktb_objects_gone(
        NAMESPACE,
        Some(DOCTOR_OBJECTS),
        "after ktb doctor was interrupted",
    );
}
