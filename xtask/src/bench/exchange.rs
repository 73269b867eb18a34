//! `cargo xtask bench exchange`: what `ktb exchange` costs on the project's
//! cluster, against raw `kubectl port-forward` over the same apiserver.
//!
//! Three paths cross the apiserver → kubelet → containerd port-forward
//! chain: raw `kubectl port-forward` to an echo pod; ktb, which adds its
//! agent, its tunnel framing and the Service hop; and kt-connect's data
//! path ([`kt_connect`]: `ssh -R` over a port-forward to an sshd pod),
//! the tool ktb replaces. ktb and kt-connect carry callers to the same
//! local server, so they are also measured one stream at a time in each
//! direction: uploads (cluster → laptop) and downloads (laptop → cluster).
//! Where the laptop reaches pod IPs (the node does), `ktb exchange
//! --transport direct` (TLS to the agent's pod IP) is measured against
//! direct TCP to the echo pod.
//! Callers are on the node itself (it reaches ClusterIPs), and ktb runs
//! there as the cluster admin: the bytes take the same path as from a
//! laptop, and the load generator needs no network namespace. Also timed:
//! from starting `ktb exchange` to the first request served locally, and
//! from Ctrl-C to the Service restored.
//!
//! With `--rtt-ms N` every apiserver client of the run reaches it through a
//! delaying proxy ([`super::far`]): the same table for a laptop N ms from
//! its cluster, with the far laptop's goals printed below it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::cpu::CpuSample;
use super::far::FarApiserver;
use super::figures::{median, print_cpu_table, print_table, Figures};
use super::kt_connect::KtConnectPath;
use super::load::{self, limited, LocalServer, Target};
use super::paths::{port_forward, Process};
use crate::cluster::Admin;

pub(super) const NAMESPACE: &str = "ktb-bench";
pub(super) const SERVICE: &str = "bench-echo";
const ROUNDS: usize = 3;
const BULK_BYTES: usize = 256 << 20;

/// How many round trips and new connections a path is measured with.
#[derive(Clone, Copy)]
pub(super) struct Load {
    round_trips: usize,
    new_connections: usize,
}

impl Load {
    /// Fewer samples when each costs a long round trip through the apiserver
    /// (`rtt_ms` > 0), so that a far run takes minutes, not an hour.
    pub(super) fn for_rtt(rtt_ms: u32) -> Load {
        match rtt_ms {
            0 => Load {
                round_trips: 2000,
                new_connections: 200,
            },
            _ => Load {
                round_trips: 300,
                new_connections: 100,
            },
        }
    }
}

/// The benchmark's echo Deployment and Service, rolled out.
pub(super) fn deploy_echo(cluster: &Admin) -> anyhow::Result<()> {
    cluster.deploy(NAMESPACE, WORKLOAD, SERVICE)
}

/// A field of the benchmark's Service, by JSONPath.
pub(super) fn service_field(cluster: &Admin, jsonpath: &str) -> anyhow::Result<String> {
    let output = format!("jsonpath={{{jsonpath}}}");
    cluster.kubectl(&["-n", NAMESPACE, "get", "svc", SERVICE, "-o", &output])
}

/// The name of the benchmark's echo pod.
pub(super) fn echo_pod(cluster: &Admin) -> anyhow::Result<String> {
    cluster.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        "app=bench-echo",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])
}

fn selector(cluster: &Admin) -> anyhow::Result<String> {
    service_field(cluster, ".spec.selector")
}

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ktb-bench}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: bench-echo, namespace: ktb-bench}
spec:
  replicas: 1
  selector: {matchLabels: {app: bench-echo}}
  template:
    metadata: {labels: {app: bench-echo}}
    spec:
      containers:
      - {name: echo, image: "ktb.test/tcp-echo:dev", imagePullPolicy: Never, ports: [{containerPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: bench-echo, namespace: ktb-bench}
spec:
  selector: {app: bench-echo}
  ports: [{port: 9000, targetPort: 9000}]
"#;

/// `xtask bench measure ADDR [--socks5 PROXY] [--rtt-ms N]`: the echo load
/// against ADDR (through a SOCKS5 proxy when given) from wherever this
/// process runs (the connect benchmark runs it inside a laptop's network
/// namespace), printed as JSON.
pub fn measure_here(
    addr: SocketAddr,
    socks5: Option<SocketAddr>,
    rtt_ms: u32,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let figures = runtime.block_on(async {
        match socks5 {
            Some(proxy) => super::wait_until_listening(proxy, "the SOCKS5 proxy").await?,
            None => super::wait_until_listening(addr, "the echo server").await?,
        }
        measure(Target { addr, socks5 }, None, Load::for_rtt(rtt_ms)).await
    })?;
    println!("{}", figures.to_json());
    Ok(())
}

pub fn exchange(workspace: &Path, rtt_ms: u32) -> anyhow::Result<()> {
    super::paths::build_release(workspace)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = Admin::find()?;
    deploy_echo(&cluster)?;
    let result = super::in_scratch(workspace, |scratch| {
        runtime.block_on(run(workspace, scratch, &cluster, rtt_ms))
    });
    let removed = cluster.remove_namespace(NAMESPACE);
    result?;
    removed
}

async fn run(workspace: &Path, scratch: &Path, near: &Admin, rtt_ms: u32) -> anyhow::Result<()> {
    let far = FarApiserver::start_if_far(None, rtt_ms, near, scratch)?;
    // Every client of the apiserver from here on: far when asked for.
    let cluster = &far
        .as_ref()
        .map_or_else(|| near.clone(), |far| far.admin(near));
    let paths = Paths::start(workspace, scratch, cluster).await?;
    let summary = Summary::of(paths.measure(Load::for_rtt(rtt_ms)).await?);
    summary.print(rtt_ms);
    super::far::write_report(workspace, "exchange", rtt_ms, &summary.to_json(rtt_ms))
}

/// The paths a round measures besides ktb's own, set up once for every
/// round; each is torn down when this is dropped.
struct Paths<'a> {
    /// The local server that ktb and kt-connect carry callers to.
    _local: LocalServer,
    /// `kubectl port-forward` to the echo pod, listening at `forwarded`.
    _port_forward: Process,
    forwarded: SocketAddr,
    kt_connect: KtConnectPath,
    /// The echo pod's own address, for direct TCP.
    straight: SocketAddr,
    /// The Service's ClusterIP and port, which `ktb exchange` takes over.
    service: SocketAddr,
    exchanges: Exchanges<'a>,
}

impl<'a> Paths<'a> {
    async fn start(
        workspace: &Path,
        scratch: &'a Path,
        cluster: &'a Admin,
    ) -> anyhow::Result<Paths<'a>> {
        let service_ip = service_field(cluster, ".spec.clusterIP")?;
        let service: SocketAddr = format!("{service_ip}:9000").parse()?;
        let pod = echo_pod(cluster)?;
        let original_selector = selector(cluster)?;
        let local = LocalServer::start().await?;
        let (port_forward, forwarded) = port_forward(
            cluster,
            NAMESPACE,
            &pod,
            9000,
            &scratch.join("port-forward.log"),
        )
        .await?;
        let kt_connect = KtConnectPath::start(cluster, NAMESPACE, scratch, local.addr)
            .await
            .context("setting up kt-connect's path (sshd pod, port-forward, ssh -R)")?;
        let pod_ip = cluster.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pod",
            &pod,
            "-o",
            "jsonpath={.status.podIP}",
        ])?;
        let exchanges = Exchanges {
            ktb: workspace.join("target/release/ktb"),
            cluster,
            local: local.addr,
            service,
            original_selector,
            scratch,
        };
        Ok(Paths {
            _local: local,
            _port_forward: port_forward,
            forwarded,
            kt_connect,
            straight: format!("{pod_ip}:9000").parse()?,
            service,
            exchanges,
        })
    }

    /// [`ROUNDS`] rounds, each path measured once per round, interleaved so
    /// that a noisy minute of the shared machine falls on every path.
    async fn measure(&self, load: Load) -> anyhow::Result<Rounds> {
        let service = self.service;
        let mut rounds = Rounds::default();
        for round in 1..=ROUNDS {
            eprintln!("round {round}/{ROUNDS}: starting ktb exchange");
            let (exchange, ready_s) = self.exchanges.start("port-forward", round).await?;
            rounds.ready.push(ready_s);
            eprintln!(
                "round {round}/{ROUNDS}: measuring kubectl port-forward, ktb exchange, kt-connect"
            );
            let through_apiserver = [
                (self.forwarded, None, "kubectl port-forward"),
                (service, Some(b'E'), "ktb exchange"),
                (self.kt_connect.entry, Some(b'E'), "kt-connect"),
            ];
            for (path, (addr, mode, name)) in through_apiserver.into_iter().enumerate() {
                rounds.figures[path].push(measure(addr.into(), mode, load).await.context(name)?);
            }
            for (path, addr) in [service, self.kt_connect.entry].into_iter().enumerate() {
                let up = limited("upload", load::upload(addr, BULK_BYTES as u64)).await?;
                let down = limited("download", load::download(addr, BULK_BYTES as u64)).await?;
                rounds.one_way[path][0].push(up);
                rounds.one_way[path][1].push(down);
            }
            rounds.restore.push(self.exchanges.stop(exchange).await?);

            eprintln!(
                "round {round}/{ROUNDS}: direct TCP to the pod, ktb exchange --transport direct"
            );
            rounds.figures[3].push(
                measure(self.straight.into(), None, load)
                    .await
                    .context("direct TCP to the pod")?,
            );
            let (exchange, _) = self.exchanges.start("direct", round).await?;
            rounds.figures[4].push(
                measure(service.into(), Some(b'E'), load)
                    .await
                    .context("ktb exchange --transport direct")?,
            );
            self.exchanges.stop(exchange).await?;
        }
        Ok(rounds)
    }
}

/// What every round measured, one entry per round.
#[derive(Default)]
struct Rounds {
    /// Per path: the port-forward, ktb, kt-connect, direct TCP to the pod,
    /// ktb over `--transport direct`.
    figures: [Vec<Figures>; 5],
    /// One stream's MiB/s: [ktb, kt-connect] × [upload, download].
    one_way: [[Vec<f64>; 2]; 2],
    /// Seconds from starting `ktb exchange` to the first request served
    /// locally.
    ready: Vec<f64>,
    /// Seconds from Ctrl-C to the Service restored.
    restore: Vec<f64>,
}

/// The medians of the rounds, as the bench prints and writes them.
struct Summary {
    raw: Figures,
    ktb: Figures,
    kt: Figures,
    straight: Figures,
    direct: Figures,
    /// One stream's MiB/s: [ktb, kt-connect] × [upload, download].
    one_way: [[f64; 2]; 2],
    ready_s: f64,
    restore_s: f64,
}

impl Summary {
    fn of(rounds: Rounds) -> Summary {
        let [raw, ktb, kt, straight, direct] =
            rounds.figures.map(|rounds| Figures::median(&rounds));
        Summary {
            raw,
            ktb,
            kt,
            straight,
            direct,
            one_way: rounds.one_way.map(|path| path.map(median)),
            ready_s: median(rounds.ready),
            restore_s: median(rounds.restore),
        }
    }

    fn print(&self, rtt_ms: u32) {
        let [[ktb_up, ktb_down], [kt_up, kt_down]] = self.one_way;
        println!();
        let paths = [
            ("kubectl port-forward", &self.raw),
            ("ktb exchange", &self.ktb),
            ("kt-connect (ssh -R)", &self.kt),
            ("direct TCP to the pod", &self.straight),
            ("ktb exchange, direct", &self.direct),
        ];
        print_table(&paths);
        println!();
        print_cpu_table(&paths);
        println!();
        println!(
            "{:<22} {:>16} {:>16}",
            "one stream, MiB/s", "cluster → laptop", "laptop → cluster"
        );
        println!("{:<22} {ktb_up:>16.0} {ktb_down:>16.0}", "ktb exchange");
        println!(
            "{:<22} {kt_up:>16.0} {kt_down:>16.0}",
            "kt-connect (ssh -R)"
        );
        println!();
        println!(
            "ktb vs port-forward: throughput {:.2}x, RR p50 {:.2}x, new connection p50 {:.2}x, CPU per GiB {:.2}x",
            self.ktb.mib_per_s / self.raw.mib_per_s,
            self.ktb.rr_p50_us / self.raw.rr_p50_us,
            self.ktb.connect_p50_us / self.raw.connect_p50_us,
            self.ktb.cpu_s_per_gib / self.raw.cpu_s_per_gib
        );
        println!(
            "ktb vs kt-connect: echo throughput {:.2}x, upload {:.2}x, download {:.2}x, RR p99 {:.2}x",
            self.ktb.mib_per_s / self.kt.mib_per_s,
            ktb_up / kt_up,
            ktb_down / kt_down,
            self.ktb.rr_p99_us / self.kt.rr_p99_us
        );
        println!(
            "ktb exchange --transport direct (TLS) vs direct TCP to the pod: throughput {:.2}x, RR p50 {:.2}x",
            self.direct.mib_per_s / self.straight.mib_per_s,
            self.direct.rr_p50_us / self.straight.rr_p50_us
        );
        if rtt_ms > 0 {
            super::far::print_goals(rtt_ms, "ktb exchange", &self.ktb, &self.raw);
        }
        println!(
            "ktb exchange: ready (start → first request served locally) {:.2} s; restore (Ctrl-C → Service restored) {:.2} s (medians of {ROUNDS})",
            self.ready_s, self.restore_s
        );
    }

    fn to_json(&self, rtt_ms: u32) -> serde_json::Value {
        let [[ktb_up, ktb_down], [kt_up, kt_down]] = self.one_way;
        json!({
            "rounds": ROUNDS,
            "rtt_ms": rtt_ms,
            "port_forward": self.raw.to_json(),
            "ktb": self.ktb.to_json(),
            "kt_connect": self.kt.to_json(),
            "direct_tcp_to_pod": self.straight.to_json(),
            "ktb_direct_tls": self.direct.to_json(),
            "one_stream_mib_per_s": {
                "ktb": {"upload": ktb_up, "download": ktb_down},
                "kt_connect": {"upload": kt_up, "download": kt_down},
            },
            "ready_s": self.ready_s,
            "restore_s": self.restore_s,
            "ratio_vs_port_forward": {
                "throughput": self.ktb.mib_per_s / self.raw.mib_per_s,
                "rr_p50": self.ktb.rr_p50_us / self.raw.rr_p50_us,
                "connect_p50": self.ktb.connect_p50_us / self.raw.connect_p50_us,
                "cpu_per_gib": self.ktb.cpu_s_per_gib / self.raw.cpu_s_per_gib,
            },
            "ratio_direct_tls_vs_direct_tcp": {
                "throughput": self.direct.mib_per_s / self.straight.mib_per_s,
                "rr_p50": self.direct.rr_p50_us / self.straight.rr_p50_us,
            },
            "ratio_vs_kt_connect": {
                "throughput": self.ktb.mib_per_s / self.kt.mib_per_s,
                "upload": ktb_up / kt_up,
                "download": ktb_down / kt_down,
                "rr_p99": self.ktb.rr_p99_us / self.kt.rr_p99_us,
            },
        })
    }
}

/// Starting and stopping `ktb exchange` of the bench's Service towards
/// the local server.
struct Exchanges<'a> {
    ktb: std::path::PathBuf,
    cluster: &'a Admin,
    local: SocketAddr,
    service: SocketAddr,
    original_selector: String,
    scratch: &'a Path,
}

impl Exchanges<'_> {
    /// Starts an exchange over `transport` (`port-forward`, `direct`);
    /// returns it once the Service is served locally, with the seconds
    /// that took.
    async fn start(&self, transport: &str, round: usize) -> anyhow::Result<(Process, f64)> {
        let started = Instant::now();
        let exchange = Process::spawn(
            Command::new(&self.ktb)
                .env("KUBECONFIG", &self.cluster.kubeconfig)
                .args([
                    "exchange",
                    SERVICE,
                    "-n",
                    NAMESPACE,
                    "--transport",
                    transport,
                ])
                .arg("--expose")
                .arg(format!("{}:9000", self.local.port()))
                .args([
                    "--agent-image",
                    "ktb.test/ktb-agent:dev",
                    "--image-pull-policy",
                    "Never",
                ]),
            &self.scratch.join(format!("ktb-{transport}-{round}.log")),
        )?;
        wait_until_served_locally(self.service).await?;
        Ok((exchange, started.elapsed().as_secs_f64()))
    }

    /// Ctrl-C; returns the seconds until the Service was restored.
    async fn stop(&self, exchange: Process) -> anyhow::Result<f64> {
        let interrupted = Instant::now();
        exchange.interrupt()?;
        let deadline = interrupted + Duration::from_secs(60);
        while selector(self.cluster)? != self.original_selector {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the Service was not restored within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let restored = interrupted.elapsed().as_secs_f64();
        exchange.wait_exit(Duration::from_secs(30))?;
        Ok(restored)
    }
}

async fn measure(to: Target, mode: Option<u8>, load: Load) -> anyhow::Result<Figures> {
    let cpu_before = CpuSample::take()?;
    let mib_per_s = limited("bulk echo", load::echo_throughput(to, mode, BULK_BYTES)).await?;
    let (cpu, cpu_by_program) = CpuSample::take()?.since(&cpu_before);
    let gib_moved = 2.0 * BULK_BYTES as f64 / f64::from(1u32 << 30);
    let (rr_p50_us, rr_p99_us) =
        limited("round trips", load::latency(to, mode, load.round_trips)).await?;
    let (connect_p50_us, connect_p99_us) = limited(
        "new connections",
        load::new_connection(to, mode, load.new_connections),
    )
    .await?;
    let (_, beside_bulk_p99_us) = limited(
        "round trips beside bulk",
        load::latency_beside_bulk(to, mode, load.round_trips),
    )
    .await?;
    Ok(Figures {
        mib_per_s,
        rr_p50_us,
        rr_p99_us,
        connect_p50_us,
        connect_p99_us,
        beside_bulk_p99_us,
        cpu_s_per_gib: cpu / gib_moved,
        cpu_by_program: cpu_by_program
            .into_iter()
            .map(|(program, spent)| (program, spent / gib_moved))
            .collect(),
    })
}

/// Polls the Service until a request is answered by the local server: it
/// echoes what follows the mode byte, while the original echo pods echo
/// the mode byte itself.
async fn wait_until_served_locally(service: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let attempt = async {
            let mut tcp = TcpStream::connect(service).await?;
            tcp.write_all(b"Ex").await?;
            tcp.read_u8().await
        };
        if let Ok(Ok(b'x')) = tokio::time::timeout(Duration::from_millis(500), attempt).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("ktb exchange did not start serving within 120 s")
}
