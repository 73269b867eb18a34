//! Paired integration testing, ktb's seed scenario, end to end on the
//! project's test cluster (`cargo xtask cluster up`): two developers each
//! exchange one Service of a call chain and connect their laptop to the
//! cluster, so a call that starts in the cluster runs through both laptops.
//!
//! ```text
//! in-cluster client ─▶ svc-a ─▶ laptop-a: http-echo "laptop-a-local"
//!     (ktb exchange svc-a, dev-a)      │ GET svc-b.NS.svc.cluster.local
//!                                      ▼ (through laptop-a's ktb connect)
//!                           svc-b ─▶ laptop-b: http-echo "laptop-b-local"
//!                                    (ktb exchange svc-b, dev-b)
//! ```
//!
//! The client gets both identities, in order. Then both developers press
//! Ctrl-C and the test checks the whole way back: both Services byte for
//! byte as they were, nothing of ktb in the namespace, and nothing on
//! either laptop (resolv.conf, hosts, routes, links, the connect journal).
//!
//! The test works in a namespace of its own where both developers hold the
//! developer Role of `deploy/rbac/developer.yaml`. It shares the laptops'
//! `ktb0` devices with `tests/connect_e2e.rs`: run them one at a time.
//!
//! ```text
//! cargo build -p ktb -p ktb-workloads
//! cargo test -p ktb-tests --test paired -- --ignored
//! ```

use std::time::Duration;

use ktb_tests::cluster::{
    apply, free_port, local_echo, local_echo_calling, wait_until, As, TempNamespace,
};
use ktb_tests::connect::{self, laptop_state, start_connect, StateDir};
use ktb_tests::exchange::{
    exchange_args, exchange_until_local, ktb_objects, start_ktb, wait_ready_line, Workload,
    LOCAL_A, LOCAL_B,
};

/// Every developer in group `developers` may use ktb in `namespace`.
fn grant_developers(namespace: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac/developer.yaml");
    let yaml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    apply(As::Admin, &yaml.replace("NAMESPACE", namespace));
}

#[test]
#[ignore = "needs the project cluster: cargo xtask test"]
fn a_call_from_the_cluster_runs_through_both_laptops_and_ctrl_c_leaves_nothing() {
    let ns = TempNamespace::new("paired");
    let ns = ns.0.as_str();
    grant_developers(ns);
    let svc_a = Workload::deploy(ns, "svc-a");
    let svc_b = Workload::deploy(ns, "svc-b");
    let (before_a, before_b) = (laptop_state(As::DevA), laptop_state(As::DevB));
    let (state_a, state_b) = (StateDir::new("paired-a"), StateDir::new("paired-b"));

    let mut connect_a = start_connect(As::DevA, ns, &[], &state_a);
    let mut connect_b = start_connect(As::DevB, ns, &[], &state_b);

    // laptop-b serves svc-b.
    let port_b = free_port(&["laptop-b"]);
    let _local_b = local_echo("laptop-b", port_b, LOCAL_B);
    let mut exchange_b = exchange_until_local(As::DevB, &svc_b, port_b, "5s", LOCAL_B);

    // laptop-a serves svc-a, calling svc-b by its cluster name on the way.
    let port_a = free_port(&["laptop-a"]);
    let next_hop = format!("http://svc-b.{ns}.svc.cluster.local/");
    let _local_a = local_echo_calling("laptop-a", port_a, LOCAL_A, &next_hop);
    let mut exchange_a = start_ktb(As::DevA, &exchange_args(&svc_a.name, ns, port_a, "5s"));
    wait_ready_line(&mut exchange_a);

    let through_both = format!("{LOCAL_A}\n{LOCAL_B}");
    svc_a.wait_reaches(
        &format!("callers of {} to run through both laptops", svc_a.target()),
        |got| got == through_both,
        Duration::from_secs(60),
    );
    assert_eq!(
        svc_a.answer().as_deref(),
        Ok(through_both.as_str()),
        "the in-cluster client's answer"
    );

    svc_a.stop_and_check_restored(&mut exchange_a, "svc-a after dev-a's Ctrl-C");
    svc_b.stop_and_check_restored(&mut exchange_b, "svc-b after dev-b's Ctrl-C");
    connect::stop(&mut connect_a, libc::SIGINT);
    connect::stop(&mut connect_b, libc::SIGINT);

    for (who, state, before) in [
        (As::DevA, &state_a, before_a),
        (As::DevB, &state_b, before_b),
    ] {
        assert_eq!(
            laptop_state(who),
            before,
            "{}'s laptop is not as it was before the test",
            who.user()
        );
        let journal = ktb::connect::journal::journal_path(&state.0);
        assert!(
            !journal.exists(),
            "{}'s connect journal is left: {}",
            who.user(),
            journal.display()
        );
    }
    wait_until(
        &format!("nothing of ktb left in {ns}"),
        Duration::from_secs(60),
        Duration::from_millis(500),
        || match ktb_objects(ns, None).as_slice() {
            [] => Ok(()),
            left => Err(format!("{left:?}")),
        },
    );
}
