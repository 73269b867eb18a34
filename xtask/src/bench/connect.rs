//! `cargo xtask bench connect`: what `ktb connect` costs on the project's
//! cluster, measured from the `laptop-a` network namespace (which reaches
//! nothing but the apiserver on its own) against `kubectl port-forward` to
//! the same echo pod from the same laptop.
//!
//! Per round: `ktb connect` is started and timed until its ready line; the
//! load (bulk echo throughput, request/response round trips, new
//! connections) runs from inside the laptop, through the port-forward,
//! through connect to the Service's ClusterIP, and through a second
//! session, `ktb connect --mode socks5`, to the same ClusterIP: the same
//! tunnel and agent without connect's userspace TCP stack, so the stack's
//! own cost is the ratio of the two, measured in the same run. DNS round
//! trips for the Service's name are timed from the laptop through ktb's
//! resolver (one name asked again and again: answered from the cache)
//! and, as the floor, from inside the echo pod straight to CoreDNS.
//! Before it, a short `ktb connect --dns-cache-ttl 0` times the same
//! queries without the cache: every one a first query, through the
//! tunnel. Medians of the rounds are printed with their ratios and
//! written to `target/bench/connect.json`.
//!
//! With `--rtt-ms N` the laptop reaches the apiserver through a delaying
//! proxy in its own namespace ([`super::far`]), and the far laptop's goals
//! are printed below the table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::exchange::{deploy_echo, echo_pod, service_field, NAMESPACE, SERVICE};
use super::far::FarApiserver;
use super::figures::{median, print_cpu_table, print_table, Figures};
use super::paths::{free_port, in_netns, Process};
use crate::cluster::Admin;

const LAPTOP: &str = "laptop-a";
const ROUNDS: usize = 3;
const DNS_QUERIES: &str = "500";
const CLUSTER_DNS: &str = "10.96.0.10:53";
/// Where `ktb connect` answers DNS on the laptop (see `ktb::connect::dns`).
const KTB_DNS: &str = "127.0.0.153:53";
const READY_LINE: &str = "Ctrl-C disconnects";

pub fn connect(workspace: &Path, rtt_ms: u32) -> anyhow::Result<()> {
    super::paths::build_release(workspace)?;
    let probe = workspace.join("target/x86_64-unknown-linux-musl/release/probe");
    anyhow::ensure!(
        probe.exists(),
        "{} missing: `cargo xtask cluster up` builds it",
        probe.display()
    );
    let cluster = Admin::find()?;
    deploy_echo(&cluster)?;
    let result = super::in_scratch(workspace, |scratch| {
        run(workspace, scratch, &cluster, &probe, rtt_ms)
    });
    let removed = cluster.remove_namespace(NAMESPACE);
    result?;
    removed
}

/// `ip netns exec laptop-a PROGRAM`.
fn on_laptop(program: impl AsRef<std::ffi::OsStr>) -> Command {
    in_netns(Some(LAPTOP), program)
}

/// Runs `command` to completion and returns its stdout.
fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}",
        command,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The echo load from inside the laptop (`xtask bench measure`), through
/// the SOCKS5 proxy `socks5` when given.
fn measure_on_laptop(
    addr: SocketAddr,
    socks5: Option<SocketAddr>,
    rtt_ms: u32,
) -> anyhow::Result<Figures> {
    let xtask = std::env::current_exe()?;
    let mut measure = on_laptop(xtask);
    measure.args(["bench", "measure", &addr.to_string()]);
    if let Some(proxy) = socks5 {
        measure.args(["--socks5", &proxy.to_string()]);
    }
    let text = output(measure.args(["--rtt-ms", &rtt_ms.to_string()]))?;
    Figures::from_json(&serde_json::from_str(&text)?)
}

/// Median and p99 DNS round trip in µs, as `probe dns-latency` prints them.
fn dns_figures(text: &str) -> anyhow::Result<(f64, f64)> {
    let mut numbers = text.split_whitespace().map(str::parse::<f64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(p50)), Some(Ok(p99))) => Ok((p50, p99)),
        _ => anyhow::bail!("unexpected probe output {text:?}"),
    }
}

fn run(
    workspace: &Path,
    scratch: &Path,
    cluster: &Admin,
    probe: &Path,
    rtt_ms: u32,
) -> anyhow::Result<()> {
    let far = FarApiserver::start_if_far(Some(LAPTOP), rtt_ms, cluster, scratch)?;
    // The laptop's kubeconfig: through the proxy when far.
    let kubeconfig = far
        .as_ref()
        .map_or(&cluster.kubeconfig, |far| &far.kubeconfig);
    let laptop = Laptop::start(workspace, scratch, cluster, probe, kubeconfig)?;
    let summary = Summary::of(laptop.measure(rtt_ms)?);
    summary.print(rtt_ms);
    super::far::write_report(workspace, "connect", rtt_ms, &summary.to_json(rtt_ms))
}

/// What the rounds need on and around the laptop, set up once; the
/// port-forward is stopped when this is dropped.
struct Laptop<'a> {
    cluster: &'a Admin,
    scratch: &'a Path,
    /// The `probe` binary that times DNS queries.
    probe: &'a Path,
    /// The laptop's kubeconfig: through the delaying proxy when far.
    kubeconfig: &'a Path,
    /// The release build of `ktb`.
    ktb: PathBuf,
    /// The echo pod, from which the DNS floor is timed.
    pod: String,
    /// The Service's ClusterIP and port, and its DNS name.
    service: SocketAddr,
    name: String,
    /// `kubectl port-forward` to the echo pod, run on the laptop and
    /// listening there at `forwarded`.
    _port_forward: Process,
    forwarded: SocketAddr,
    /// Where `ktb connect --mode socks5` listens on the laptop.
    socks5_proxy: SocketAddr,
}

impl<'a> Laptop<'a> {
    fn start(
        workspace: &Path,
        scratch: &'a Path,
        cluster: &'a Admin,
        probe: &'a Path,
        kubeconfig: &'a Path,
    ) -> anyhow::Result<Laptop<'a>> {
        let service_ip = service_field(cluster, ".spec.clusterIP")?;
        let pod = echo_pod(cluster)?;
        let forwarded_port = free_port()?;
        let port_forward = Process::spawn(
            on_laptop(&cluster.kubectl)
                .env("KUBECONFIG", kubeconfig)
                .args(["-n", NAMESPACE, "port-forward", &format!("pod/{pod}")])
                .arg(format!("{forwarded_port}:9000")),
            &scratch.join("port-forward.log"),
        )?;
        Ok(Laptop {
            cluster,
            scratch,
            probe,
            kubeconfig,
            ktb: workspace.join("target/release/ktb"),
            pod,
            service: format!("{service_ip}:9000").parse()?,
            name: format!("{SERVICE}.{NAMESPACE}.svc.cluster.local"),
            _port_forward: port_forward,
            forwarded: ([127, 0, 0, 1], forwarded_port).into(),
            socks5_proxy: ([127, 0, 0, 1], free_port()?).into(),
        })
    }

    /// [`ROUNDS`] rounds, each path measured once per round, interleaved so
    /// that a noisy minute of the shared machine falls on every path.
    fn measure(&self, rtt_ms: u32) -> anyhow::Result<Rounds> {
        let mut rounds = Rounds::default();
        for round in 1..=ROUNDS {
            eprintln!(
                "round {round}/{ROUNDS}: ktb connect with its DNS cache off: every query a first one"
            );
            let uncached = self.start_connect(
                &self.scratch.join(format!("ktb-uncached-{round}.log")),
                &["--dns-cache-ttl", "0"],
            )?;
            rounds.dns[2].push(self.ktb_dns()?);
            stop(uncached)?;

            eprintln!("round {round}/{ROUNDS}: starting ktb connect on {LAPTOP}");
            let started = Instant::now();
            let connect =
                self.start_connect(&self.scratch.join(format!("ktb-{round}.log")), &[])?;
            rounds.ready.push(started.elapsed().as_secs_f64());

            eprintln!("round {round}/{ROUNDS}: load through kubectl port-forward and ktb connect");
            rounds.figures[0].push(
                measure_on_laptop(self.forwarded, None, rtt_ms).context("kubectl port-forward")?,
            );
            rounds.figures[1]
                .push(measure_on_laptop(self.service, None, rtt_ms).context("ktb connect")?);

            eprintln!("round {round}/{ROUNDS}: load through ktb connect --mode socks5");
            let socks5 = self.start_connect(
                &self.scratch.join(format!("ktb-socks5-{round}.log")),
                &[
                    "--mode",
                    "socks5",
                    "--socks",
                    &self.socks5_proxy.to_string(),
                ],
            )?;
            rounds.figures[2].push(
                measure_on_laptop(self.service, Some(self.socks5_proxy), rtt_ms)
                    .context("ktb connect --mode socks5")?,
            );
            stop(socks5)?;

            eprintln!("round {round}/{ROUNDS}: DNS from the pod (floor) and through ktb connect");
            rounds.dns[0].push(self.floor_dns()?);
            rounds.dns[1].push(self.ktb_dns()?);
            stop(connect)?;
        }
        Ok(rounds)
    }

    /// Starts `ktb connect` on the laptop with `extra` flags; returns it
    /// once it says it is ready.
    fn start_connect(&self, log: &PathBuf, extra: &[&str]) -> anyhow::Result<Process> {
        let connect = Process::spawn(
            on_laptop(&self.ktb)
                .env("KUBECONFIG", self.kubeconfig)
                .env("KTB_STATE_DIR", self.scratch.join("state"))
                .args(["connect", "-n", NAMESPACE])
                .args(["--agent-image", "ktb.test/ktb-agent:dev"])
                .args(["--image-pull-policy", "Never"])
                .args(extra),
            log,
        )?;
        wait_for_line(log, READY_LINE, Duration::from_secs(120))?;
        Ok(connect)
    }

    /// DNS round trips for the Service's name from the laptop, through
    /// ktb's resolver.
    fn ktb_dns(&self) -> anyhow::Result<(f64, f64)> {
        dns_figures(&output(on_laptop(self.probe).args([
            "dns-latency",
            KTB_DNS,
            &self.name,
            DNS_QUERIES,
        ]))?)
    }

    /// The floor: the same queries from inside the echo pod, straight to
    /// CoreDNS.
    fn floor_dns(&self) -> anyhow::Result<(f64, f64)> {
        dns_figures(&self.cluster.kubectl(&[
            "-n",
            NAMESPACE,
            "exec",
            &self.pod,
            "--",
            "/probe",
            "dns-latency",
            CLUSTER_DNS,
            &self.name,
            DNS_QUERIES,
        ])?)
    }
}

/// What every round measured, one entry per round.
#[derive(Default)]
struct Rounds {
    /// Per path: the port-forward, ktb connect, ktb connect in socks5 mode.
    figures: [Vec<Figures>; 3],
    /// DNS (p50, p99) in µs: the floor from the pod, ktb with its cache,
    /// ktb with its cache off.
    dns: [Vec<(f64, f64)>; 3],
    /// Seconds from starting `ktb connect` to its ready line.
    ready: Vec<f64>,
}

/// The medians of the rounds, as the bench prints and writes them.
struct Summary {
    raw: Figures,
    ktb: Figures,
    socks5: Figures,
    /// DNS (p50, p99) in µs: from the pod straight to CoreDNS; through
    /// ktb, a repeated name (cached); through ktb with its cache off.
    floor: (f64, f64),
    cached: (f64, f64),
    first: (f64, f64),
    ready_s: f64,
}

impl Summary {
    fn of(rounds: Rounds) -> Summary {
        let [raw, ktb, socks5] = rounds.figures.map(|rounds| Figures::median(&rounds));
        let [floor, cached, first] = rounds.dns.map(|rounds| {
            (
                median(rounds.iter().map(|r| r.0).collect()),
                median(rounds.iter().map(|r| r.1).collect()),
            )
        });
        Summary {
            raw,
            ktb,
            socks5,
            floor,
            cached,
            first,
            ready_s: median(rounds.ready),
        }
    }

    fn print(&self, rtt_ms: u32) {
        println!();
        let paths = [
            ("kubectl port-forward", &self.raw),
            ("ktb connect", &self.ktb),
            ("ktb connect, socks5", &self.socks5),
        ];
        print_table(&paths);
        println!();
        print_cpu_table(&paths);
        println!();
        println!(
            "ktb connect vs port-forward: throughput {:.2}x, RR p50 {:.2}x, new connection p50 {:.2}x",
            self.ktb.mib_per_s / self.raw.mib_per_s,
            self.ktb.rr_p50_us / self.raw.rr_p50_us,
            self.ktb.connect_p50_us / self.raw.connect_p50_us,
        );
        println!(
            "ktb connect vs the same tunnel without its TCP stack (socks5): throughput {:.2}x, RR p50 {:.2}x",
            self.ktb.mib_per_s / self.socks5.mib_per_s,
            self.ktb.rr_p50_us / self.socks5.rr_p50_us,
        );
        println!(
            "DNS A query p50/p99: CoreDNS from a pod {:.0}/{:.0} µs; through ktb connect, first query (cache off) {:.0}/{:.0} µs, {:.2} ms over the floor; repeated name (cached) {:.0}/{:.0} µs",
            self.floor.0,
            self.floor.1,
            self.first.0,
            self.first.1,
            (self.first.0 - self.floor.0) / 1000.0,
            self.cached.0,
            self.cached.1,
        );
        if rtt_ms > 0 {
            super::far::print_goals(rtt_ms, "ktb connect", &self.ktb, &self.raw);
        }
        println!(
            "ktb connect: ready (start → ready line) {:.2} s (median of {ROUNDS})",
            self.ready_s
        );
    }

    fn to_json(&self, rtt_ms: u32) -> serde_json::Value {
        json!({
            "rounds": ROUNDS,
            "rtt_ms": rtt_ms,
            "port_forward": self.raw.to_json(),
            "ktb_connect": self.ktb.to_json(),
            "ktb_connect_socks5": self.socks5.to_json(),
            "dns_us": {
                "floor_p50": self.floor.0, "floor_p99": self.floor.1,
                "ktb_first_p50": self.first.0, "ktb_first_p99": self.first.1,
                "ktb_cached_p50": self.cached.0, "ktb_cached_p99": self.cached.1,
            },
            "ready_s": self.ready_s,
            "ratio_vs_port_forward": {
                "throughput": self.ktb.mib_per_s / self.raw.mib_per_s,
                "rr_p50": self.ktb.rr_p50_us / self.raw.rr_p50_us,
                "connect_p50": self.ktb.connect_p50_us / self.raw.connect_p50_us,
            },
            "ratio_vs_socks5": {
                "throughput": self.ktb.mib_per_s / self.socks5.mib_per_s,
                "rr_p50": self.ktb.rr_p50_us / self.socks5.rr_p50_us,
            },
        })
    }
}

/// Interrupts a `ktb connect` as Ctrl-C would and waits for it to exit.
fn stop(connect: Process) -> anyhow::Result<()> {
    connect.interrupt()?;
    connect.wait_exit(Duration::from_secs(30))
}

/// Polls a log file until it holds `line`.
fn wait_for_line(log: &PathBuf, line: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).is_ok_and(|text| text.contains(line)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!(
        "no {line:?} within {timeout:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}
