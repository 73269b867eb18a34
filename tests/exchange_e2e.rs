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
use std::time::{Duration, Instant};

use ktb_tests::cluster::{
    apply, command_as, free_port, get_json, kubectl, local_echo, service_manifest, try_kubectl,
    wait_until, As, Spawned, TempNamespace, NAMESPACE,
};
use ktb_tests::exchange::*;
use ktb_tests::rbac::{developer_role_without, role_file};

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

    w.stop_and_check_restored(&mut ktb, "after SIGINT");
}

/// Progress is for a person at a terminal. Under a pseudo-terminal
/// (util-linux `script`), exchange's waits draw a spinner that names the
/// phase and counts its seconds; piped, as in every other test here, stderr
/// holds `ktb: ` lines and not one escape sequence or spinner frame.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn progress_spins_on_a_terminal_and_never_in_a_pipe() {
    const FRAMES: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let w = Workload::deploy(NAMESPACE, "exh-progress");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    let args = exchange_args(&w.name, NAMESPACE, port, "5s");

    let mut piped = start_ktb(As::DevA, &args);
    wait_ready_line(&mut piped);
    stop_ktb(&mut piped, libc::SIGINT, NAMESPACE, &w.name);
    let stderr = piped.stderr();
    assert!(
        !stderr.contains('\x1b') && !stderr.contains(FRAMES),
        "progress escaped into a pipe:\n{stderr:?}"
    );
    w.assert_restored("after the piped exchange");

    // `script` runs the line in a shell on a new pseudo-terminal and copies
    // what it shows to stdout; the shell execs ktb, script's one child.
    let line = format!("exec {} {}", ktb_bin().display(), args.join(" "));
    let mut script = command_as(As::DevA, "script");
    script
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .env("KUBECONFIG", As::DevA.kubeconfig())
        .env("TERM", "xterm-256color")
        .env_remove("KTB_NO_PROGRESS");
    let mut terminal = Spawned::start("ktb under script", script);
    terminal
        .wait_for_stdout(READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb exchange under a terminal never became ready: {e}"));
    w.wait_reaches_local(LOCAL_A);
    let pid = terminal.pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("script's children");
    let ktb: Vec<i32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ktb.len(), 1, "script has one child, ktb: {children:?}");
    // SAFETY: kill(2) on ktb, started by this test under script, which has
    // not exited: script is running, and its child's PID is not reaped.
    assert_eq!(unsafe { libc::kill(ktb[0], libc::SIGINT) }, 0);
    let status = terminal.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "ktb under script did not exit 0 after SIGINT:\n{:?}",
        terminal.stdout()
    );
    let screen = terminal.stdout();
    let restored = format!("restored Service {NAMESPACE}/{}", w.name);
    assert!(
        screen.contains(&restored),
        "ktb under a terminal did not say {restored:?}:\n{screen:?}"
    );
    assert!(
        screen.contains(FRAMES) && screen.contains("\x1b[") && screen.contains("[0s]"),
        "no spinner (frame, escape, seconds) on the terminal:\n{screen:?}"
    );
    w.assert_restored("after the exchange under a terminal");
    w.wait_reaches_original("after the exchange under a terminal");
    w.assert_ktb_objects_gone("after the exchange under a terminal");
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
    let mut ktb = exchange_until_local(As::DevA, &w, port, "5s", LOCAL_A);
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
    let mut ktb_a = exchange_until_local(As::DevA, &w, port, "5s", LOCAL_A);
    let held_by_a = w.service()["metadata"]["annotations"]["ktb.dev/session"].clone();
    let objects_a = w.ktb_objects();

    // dev-b, on the other laptop, is told who holds it and since when.
    let out = run_ktb(As::DevB, &exchange_args(&w.name, NAMESPACE, port, "5s"));
    expect_exit(&out, 3, "dev-b exchanging a Service dev-a holds");
    expect_stderr(&out, "is exchanged by dev-a on ", "dev-b refused");
    expect_stderr(&out, "since", "dev-b refused");
    // Nor may dev-b restore it while dev-a's ktb renews its Lease.
    let recover = run_ktb(As::DevB, &strings(&["recover", &w.name, "-n", NAMESPACE]));
    expect_exit(&recover, 3, "dev-b recovering a Service dev-a holds");
    expect_stderr(
        &recover,
        "is still being renewed",
        "dev-b's recover refused",
    );
    // ...and dev-a's exchange is untouched by the attempts.
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
    let mut ktb_b = exchange_until_local(As::DevB, &w, port, "5s", LOCAL_B);
    w.stop_and_check_restored(&mut ktb_b, "after dev-b's SIGINT");
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

/// In a namespace `ns` of its own where dev-a holds the developer Role
/// with `keep_verbs` of pods/portforward, `ktb exchange` must fail before
/// changing anything, naming each missing `VERB pods/portforward`.
fn preflight_refuses(ns: &str, keep_verbs: &[&str]) {
    let ns = TempNamespace::named(ns);
    let ns = ns.0.as_str();
    let (role, removed) = developer_role_without(ns, As::DevA, "pods/portforward", keep_verbs);
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
    expect_exit(&out, 4, &what);
    expect_stderr(&out, "missing permission", &what);
    for verb in &removed {
        expect_stderr(&out, &format!("{verb} pods/portforward"), &what);
    }
    // …and which Role grants them.
    expect_stderr(&out, "deploy/rbac/exchange.yaml", &what);

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

    // A namespace that does not exist answers as one dev-a may not read.
    let nowhere = "exh-no-such-namespace";
    let out = run_ktb(
        As::DevA,
        &exchange_args(name, nowhere, free_port(&["laptop-a"]), "5s"),
    );
    let what = "exchange in a namespace that does not exist";
    expect_exit(&out, 4, what);
    expect_stderr(
        &out,
        "or namespace exh-no-such-namespace does not exist",
        what,
    );
    expect_stderr(&out, "is -n right?", what);
    let ns = try_kubectl(As::Admin, &["get", "namespace", nowhere]);
    assert!(!ns.status.success(), "ktb created namespace {nowhere}");
}

/// `--transport auto` goes straight to the agent's pod IP (TLS, its
/// certificate pinned) where that address answers, and takes the
/// port-forward where it does not, saying which: laptop-a reaches pod IPs
/// only while its own `ktb connect` runs.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn transport_auto_goes_direct_only_where_the_pod_ip_answers() {
    use ktb_tests::connect::{laptop_state, start_connect, stop, StateDir};
    let w = Workload::deploy(NAMESPACE, "exh-auto");
    let port = free_port(&["laptop-a"]);
    let _local = local_echo("laptop-a", port, LOCAL_A);
    let mut args = exchange_args(&w.name, NAMESPACE, port, "5s");
    args.extend(strings(&["--transport", "auto"]));
    let exchange_once = |expected: &[&str]| {
        let mut ktb = start_ktb(As::DevA, &args);
        wait_ready_line(&mut ktb);
        w.wait_reaches_local(LOCAL_A);
        let said = ktb.stderr();
        for part in expected {
            assert!(said.contains(part), "ktb does not say {part:?}:\n{said}");
        }
        stop_ktb(&mut ktb, libc::SIGINT, NAMESPACE, &w.name);
        w.assert_restored("after the exchange with --transport auto");
        w.assert_ktb_objects_gone("after the exchange with --transport auto");
    };

    // No route from laptop-a to the pod network: the port-forward.
    exchange_once(&[
        "does not answer from here",
        "taking the port-forward",
        "opening the tunnel (port-forward through the apiserver)",
    ]);

    // With connect running, the pod IP answers: TLS, pinned.
    let before = laptop_state(As::DevA);
    let state = StateDir::new("auto");
    let mut connect = start_connect(As::DevA, NAMESPACE, &["--dns", "off"], &state);
    exchange_once(&["answers from here: going direct", "over TLS, certificate"]);
    stop(&mut connect, libc::SIGINT);
    assert_eq!(
        laptop_state(As::DevA),
        before,
        "connect left the laptop changed"
    );
    w.wait_reaches_original("after both exchanges");
}

/// Services ktb cannot stand in for, and ports they do not have: each
/// refusal names the Service and the cause, exits 1 and leaves nothing; a
/// malformed flag is a usage error (exit 2) before the cluster is asked.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn services_ktb_cannot_exchange_are_named_and_nothing_is_created() {
    let spec = |name: &str, spec: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{NAMESPACE}"}},"spec":{spec}}}"#
        )
    };
    let port = r#"[{"name":"http","port":80,"targetPort":8080}]"#;
    let unfit = [
        (
            "exh-noselector",
            spec("exh-noselector", &format!(r#"{{"ports":{port}}}"#)),
            "Service exh-noselector has no selector",
        ),
        (
            "exh-headless",
            spec(
                "exh-headless",
                &format!(
                    r#"{{"clusterIP":"None","selector":{{"app":"exh-headless"}},"ports":{port}}}"#
                ),
            ),
            "Service exh-headless is headless (clusterIP: None)",
        ),
        (
            "exh-alias",
            spec(
                "exh-alias",
                r#"{"type":"ExternalName","externalName":"db.example.internal"}"#,
            ),
            "Service exh-alias is an ExternalName alias",
        ),
    ];
    let local_port = free_port(&["laptop-a"]);
    for (name, manifest, saying) in &unfit {
        apply(As::Admin, manifest);
        let out = run_ktb(As::DevA, &exchange_args(name, NAMESPACE, local_port, "5s"));
        expect_exit(&out, 1, name);
        expect_stderr(&out, saying, name);
        let left = ktb_objects(NAMESPACE, Some(name));
        assert!(left.is_empty(), "{name}: ktb left {left:?}");
        let service = get_json(NAMESPACE, &["service", name]);
        assert!(
            ktb_annotations(&service).is_empty(),
            "{name}: ktb annotated the Service it refused"
        );
        kubectl(As::Admin, &["-n", NAMESPACE, "delete", "service", name]);
    }

    // A port the Service does not have; the listing says which it has.
    let w = Workload::deploy(NAMESPACE, "exh-noport");
    let mut args = exchange_args(&w.name, NAMESPACE, local_port, "5s");
    let expose = args.iter().position(|a| a == "--expose").expect("--expose") + 1;
    args[expose] = format!("{local_port}:81");
    let out = run_ktb(As::DevA, &args);
    expect_exit(&out, 1, "--expose to port 81");
    expect_stderr(&out, "no port 81 on the Service", "--expose to port 81");
    expect_stderr(
        &out,
        "Service exh-noport has ports: http",
        "--expose to port 81",
    );
    w.assert_untouched("after --expose to a port it does not have");
    w.assert_ktb_objects_gone("after --expose to a port it does not have");

    // Malformed: clap's usage error, the flag named.
    args[expose] = "a:b:c".to_owned();
    let out = run_ktb(As::DevA, &args);
    expect_exit(&out, 2, "--expose a:b:c");
    expect_stderr(&out, "--expose", "--expose a:b:c");
    w.assert_untouched("after a usage error");
}

/// Nothing listens on the local port yet: exchange still starts (the
/// developer may start the process after ktb), warns once, saying where,
/// and restores on Ctrl-C as always.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_closed_local_port_is_a_warning_and_the_exchange_still_restores() {
    let w = Workload::deploy(NAMESPACE, "exh-closed");
    let local_port = free_port(&["laptop-a"]);
    let mut ktb = start_ktb(
        As::DevA,
        &exchange_args(&w.name, NAMESPACE, local_port, "5s"),
    );
    wait_ready_line(&mut ktb);
    ktb.wait_for_stderr(
        &format!("nothing listens on 127.0.0.1:{local_port}"),
        Duration::from_secs(5),
    )
    .expect("the warning about the closed local port");
    stop_ktb(&mut ktb, libc::SIGINT, NAMESPACE, &w.name);
    w.assert_restored("after the exchange to a closed port");
    w.assert_ktb_objects_gone("after the exchange to a closed port");
    w.wait_reaches_original("after the exchange to a closed port");
}

/// A namespace being deleted takes no new objects, and no Role would change
/// that: exchange says the namespace is being deleted (not a missing
/// permission), exits 1 and creates nothing. Finalizers hold the Service,
/// the developer's Role and RoleBinding, and the namespace itself in place
/// while it terminates; dropping [`Held`] lets them all go.
#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_namespace_being_deleted_is_named_and_nothing_is_created() {
    let ns = TempNamespace::new("exh-terminating");
    apply(As::Admin, &role_file("exchange.yaml", &ns.0, As::DevA));
    apply(
        As::Admin,
        &service_manifest("doomed", &ns.0, "doomed", 80, 8080),
    );
    let held = Held::new(&ns.0);
    kubectl(As::Admin, &["delete", "namespace", &ns.0, "--wait=false"]);
    wait_until(
        "the namespace to be terminating",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let phase = kubectl(
                As::Admin,
                &["get", "namespace", &ns.0, "-o", "jsonpath={.status.phase}"],
            );
            (phase == "Terminating").then_some(()).ok_or(phase)
        },
    );

    let out = run_ktb(
        As::DevA,
        &exchange_args("doomed", &ns.0, free_port(&["laptop-a"]), "5s"),
    );
    expect_exit(&out, 1, "exchange in a namespace being deleted");
    expect_stderr(
        &out,
        "the namespace is being deleted and takes no new objects",
        "exchange in a namespace being deleted",
    );
    let left = ktb_objects(&ns.0, None);
    assert!(left.is_empty(), "ktb created objects: {left:?}");
    let service = kubectl(
        As::Admin,
        &[
            "-n",
            &ns.0,
            "get",
            "service",
            "doomed",
            "-o",
            "jsonpath={.spec.selector}",
        ],
    );
    assert_eq!(service, r#"{"app":"doomed"}"#, "the Service was changed");
    drop(held);
}

/// What a test holds in its namespace with a finalizer of its own: every
/// Role, RoleBinding and Service there. Dropped, the finalizers go, and the
/// namespace's deletion completes.
struct Held {
    namespace: String,
    objects: Vec<String>,
}

const HOLD: &str = r#"{"metadata":{"finalizers":["ktb.test/hold"]}}"#;
const RELEASE: &str = r#"{"metadata":{"finalizers":null}}"#;

impl Held {
    fn new(namespace: &str) -> Held {
        let names = kubectl(
            As::Admin,
            &[
                "-n",
                namespace,
                "get",
                "roles,rolebindings,services",
                "-o",
                "name",
            ],
        );
        let objects: Vec<String> = names.lines().map(str::to_owned).collect();
        assert!(objects.len() >= 3, "nothing to hold: {objects:?}");
        let held = Held {
            namespace: namespace.to_owned(),
            objects,
        };
        for object in &held.objects {
            kubectl(
                As::Admin,
                &["-n", namespace, "patch", object, "--type=merge", "-p", HOLD],
            );
        }
        held
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for object in &self.objects {
            let _ = try_kubectl(
                As::Admin,
                &[
                    "-n",
                    &self.namespace,
                    "patch",
                    object,
                    "--type=merge",
                    "-p",
                    RELEASE,
                ],
            );
        }
    }
}
