//! `ktb connect`'s systemd-resolved registration (`connect::resolved`)
//! against a real systemd-resolved, without the cluster: resolved runs in
//! a network namespace of the test's own (`ktb-resolved-test-<pid>`) and
//! a private mount namespace where `/etc/resolv.conf` links to its stub
//! ([`ktb_tests::resolved::Sandbox`]); nothing of this machine's DNS,
//! files or routes changes.
//!
//! The test runs its probe (`tests/bin/resolved_probe.rs`) inside the
//! sandbox: there ktb's library creates its TUN device, registers with
//! resolved and undoes it through the journal, and lookups go through
//! resolved's stub with `getent`, as programs' do.
//! Needs root (namespaces, TUN) and `apt-get download` the first time.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Output;
use std::time::Duration;

use ktb_tests::cluster::run_bounded;
use ktb_tests::resolved::{FakeUpstream, OwnNetns, Sandbox, Setup, OUTSIDE, OUTSIDE_IP};

/// Where the laptop's own servers stand in this namespace.
const LAPTOP_DNS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[test]
#[ignore = "needs root, namespaces and systemd-resolved's package: cargo test -p ktb-tests --test resolved -- --ignored"]
fn resolved_routes_the_cluster_domains_to_ktb_only_and_forgets_them_after() {
    let netns = OwnNetns::new("ktb-resolved-test");
    let upstream = FakeUpstream::start(
        &netns.0,
        SocketAddr::from((LAPTOP_DNS, 53)),
        &[(OUTSIDE, OUTSIDE_IP)],
    );
    let sandbox = Sandbox::start(
        &netns.0,
        Setup {
            hosts: None,
            global_dns: Some(LAPTOP_DNS),
        },
    );
    let mut probe = sandbox.command(env!("CARGO_BIN_EXE_resolved-probe"));
    probe.arg("sandbox").arg(&sandbox.root);
    let out = run_bounded(probe, Duration::from_secs(120));
    let shown = |out: &Output| {
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    eprintln!("inside the sandbox:\n{}", shown(&out));
    assert!(
        out.status.success(),
        "the test inside the sandbox failed:\n{}",
        shown(&out)
    );
    assert!(
        shown(&out).contains("all checked"),
        "the probe did not finish:\n{}",
        shown(&out)
    );
    // The laptop's own server got the outside name and none of the cluster's.
    let asked = upstream.asked();
    assert!(
        asked.iter().any(|n| n == OUTSIDE),
        "upstream asked {asked:?}"
    );
    assert!(
        !asked.iter().any(|n| n.ends_with("cluster.local")),
        "a cluster name went to the laptop's own server: {asked:?}"
    );
}
