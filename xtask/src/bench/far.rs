//! A laptop far from its cluster: `--rtt-ms N` on `bench exchange` and
//! `bench connect`.
//!
//! Developers sit tens of milliseconds from their apiserver, and the
//! kernel here has no netem. So every apiserver client of the benchmark
//! (`kubectl port-forward`, ktb, kt-connect's port-forward) reaches it
//! through Toxiproxy with a latency toxic of N/2 ms each way
//! (`tests/cluster/toxiproxy`). The toxic delays each chunk by its own
//! arrival time, so chunks are pipelined: it adds round-trip time without
//! capping bandwidth, as a long link does.
//!
//! The proxy listens on the loopback of the network namespace the clients
//! run in (the machine's for exchange, `laptop-a`'s for connect). A
//! kubeconfig in the benchmark's scratch directory points there and names
//! the apiserver's certificate with `tls-server-name`. The proxy is proven
//! end to end (`kubectl get --raw /readyz` through it) before it is used.
//!
//! [`print_goals`] holds issue 11's goals for a far laptop against the
//! port-forward measured through the same proxy in the same run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::figures::Figures;
use super::paths::{free_port, in_netns, Process};
use crate::cluster::{Admin, APISERVER_PORT, NODE_IP};

/// A name in the apiserver certificate's SANs that is not the proxy's address.
const APISERVER_NAME: &str = "kubernetes";
/// How long the proxy may take to carry its first request.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The apiserver behind a delaying proxy, for clients in one network namespace.
pub(super) struct FarApiserver {
    _proxy: Process,
    /// The admin's kubeconfig, pointing at the proxy.
    pub(super) kubeconfig: PathBuf,
}

impl FarApiserver {
    /// For a far run (`rtt_ms` > 0): starts the proxy in `netns` (`None`:
    /// the machine's own) and waits until kubectl there reaches the
    /// apiserver through it. For a near one: no proxy.
    pub(super) fn start_if_far(
        netns: Option<&str>,
        rtt_ms: u32,
        admin: &Admin,
        scratch: &Path,
    ) -> anyhow::Result<Option<FarApiserver>> {
        if rtt_ms == 0 {
            return Ok(None);
        }
        let toxiproxy = crate::cluster::toxiproxy()?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        let name = netns.unwrap_or("host");
        let proxy = Process::spawn(
            in_netns(netns, &toxiproxy)
                .args(["-listen", &listen])
                .args(["-upstream", &format!("{NODE_IP}:{APISERVER_PORT}")])
                .args(["-latency-ms", &(rtt_ms / 2).to_string()]),
            &scratch.join(format!("toxiproxy-{name}.log")),
        )?;

        let direct = std::fs::read_to_string(&admin.kubeconfig)
            .with_context(|| format!("reading {}", admin.kubeconfig.display()))?;
        let server = format!("server: https://{NODE_IP}:{APISERVER_PORT}\n");
        anyhow::ensure!(
            direct.contains(&server),
            "{} has no line {server:?}",
            admin.kubeconfig.display()
        );
        let kubeconfig = scratch.join(format!("far-{name}.yaml"));
        std::fs::write(
            &kubeconfig,
            direct.replace(
                &server,
                &format!("server: https://{listen}\n    tls-server-name: {APISERVER_NAME}\n"),
            ),
        )?;

        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let ready = in_netns(netns, &admin.kubectl)
                .env("KUBECONFIG", &kubeconfig)
                .args(["get", "--raw", "/readyz"])
                .output()?;
            if ready.status.success() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the apiserver did not answer through toxiproxy on {listen} ({name}) within {READY_WITHIN:?}: {}",
                String::from_utf8_lossy(&ready.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("the apiserver is {rtt_ms} ms away from {name}: toxiproxy on {listen}");
        Ok(Some(FarApiserver {
            _proxy: proxy,
            kubeconfig,
        }))
    }

    /// The cluster's admin, as seen from the far side.
    pub(super) fn admin(&self, near: &Admin) -> Admin {
        Admin {
            kubectl: near.kubectl.clone(),
            kubeconfig: self.kubeconfig.clone(),
        }
    }
}

/// The far laptop's goals, each against its bar, for the ktb path `ktb`
/// and the port-forward `raw` measured through the same proxy. A new
/// connection is held against the nominal round trip and against the
/// path's own RR p50, which also pays the proxy's and the chain's time.
pub(super) fn print_goals(rtt_ms: u32, name: &str, ktb: &Figures, raw: &Figures) {
    let rtt_us = f64::from(rtt_ms) * 1000.0;
    let ms = |us: f64| us / 1000.0;
    println!(
        "at {rtt_ms} ms: {name} bulk {:.2}x port-forward (goal ≥ 1.0x)",
        ktb.mib_per_s / raw.mib_per_s
    );
    println!(
        "at {rtt_ms} ms: {name} new connection's first byte p50 {:.1} ms: {rtt_ms} ms + {:.1} ms, its RR p50 + {:.1} ms (goal ≤ round trip + 2 ms; port-forward {:.1} ms)",
        ms(ktb.connect_p50_us),
        ms(ktb.connect_p50_us - rtt_us),
        ms(ktb.connect_p50_us - ktb.rr_p50_us),
        ms(raw.connect_p50_us),
    );
    println!(
        "at {rtt_ms} ms: {name} 1 KiB RR beside bulk p99 {:.1} ms = {:.1}x the round trip (goal ≤ 3x; port-forward {:.1}x)",
        ms(ktb.beside_bulk_p99_us),
        ktb.beside_bulk_p99_us / rtt_us,
        raw.beside_bulk_p99_us / rtt_us,
    );
}

/// Writes a benchmark's figures as JSON to `target/bench/NAME.json`, or
/// `NAME-rtt20.json` for a far run, so a far run keeps the near figures.
pub(super) fn write_report(
    workspace: &Path,
    bench: &str,
    rtt_ms: u32,
    report: &serde_json::Value,
) -> anyhow::Result<()> {
    let name = match rtt_ms {
        0 => format!("target/bench/{bench}.json"),
        _ => format!("target/bench/{bench}-rtt{rtt_ms}.json"),
    };
    let out = workspace.join(name);
    std::fs::write(&out, serde_json::to_string_pretty(report)?)?;
    println!("written to {}", out.display());
    Ok(())
}
