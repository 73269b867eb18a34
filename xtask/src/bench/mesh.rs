//! `cargo xtask bench mesh`: what the shared router of `ktb mesh` costs,
//! side by side in one run on the project's cluster.
//!
//! One HTTP Service (two http-echo pods) and one local HTTP server on this
//! machine. Four paths, measured from the node (which reaches ClusterIPs)
//! with the same HTTP/1.1 keep-alive load: straight to the Service without
//! ktb; through `ktb mesh` without the mark (router → the original pods);
//! with the mark (router → the member's agent → tunnel → local server);
//! and `ktb exchange` of the same Service to the same local server. Rounds
//! are interleaved and medians reported; the figures go to the terminal
//! and to `target/bench/mesh.json`, whose keys release checks read.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::figures::median;
use super::paths::Process;
use crate::cluster::Admin;

const NAMESPACE: &str = "ktb-bench-mesh";
const SERVICE: &str = "bench-http";
const ROUNDS: usize = 3;
const MARK: (&str, &str) = ("x-bench", "1");
/// Sequential requests on one connection, for latency.
const LATENCY_REQUESTS: usize = 2000;
/// Connections at once, and requests on each, for throughput.
const CONNECTIONS: usize = 8;
const REQUESTS_EACH: usize = 1500;
/// Bound on any one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ktb-bench-mesh}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: bench-http, namespace: ktb-bench-mesh}
spec:
  replicas: 2
  selector: {matchLabels: {app: bench-http}}
  template:
    metadata: {labels: {app: bench-http}}
    spec:
      containers:
      - {name: echo, image: "ktb.test/http-echo:dev", imagePullPolicy: Never, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: bench-http, namespace: ktb-bench-mesh}
spec:
  selector: {app: bench-http}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// Figures of one path.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    requests_per_s: f64,
}

impl Figures {
    fn median(rounds: &[Figures]) -> Figures {
        let med = |pick: fn(&Figures) -> f64| median(rounds.iter().map(pick).collect());
        Figures {
            p50_us: med(|f| f.p50_us),
            p99_us: med(|f| f.p99_us),
            requests_per_s: med(|f| f.requests_per_s),
        }
    }

    fn to_json(self) -> serde_json::Value {
        json!({ "p50_us": self.p50_us, "p99_us": self.p99_us, "requests_per_s": self.requests_per_s })
    }
}

pub fn mesh(workspace: &Path) -> anyhow::Result<()> {
    super::paths::build_release(workspace)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = Admin::find()?;
    cluster.deploy(NAMESPACE, WORKLOAD, SERVICE)?;
    let result = super::in_scratch(workspace, |scratch| {
        runtime.block_on(run(workspace, scratch, &cluster))
    });
    let removed = cluster.remove_namespace(NAMESPACE);
    result?;
    removed
}

async fn run(workspace: &Path, scratch: &Path, cluster: &Admin) -> anyhow::Result<()> {
    let ip = cluster.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "svc",
        SERVICE,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let service: SocketAddr = format!("{ip}:80").parse()?;
    let local = local_server().await?;
    let ktb = workspace.join("target/release/ktb");
    let ktb_run = |args: &[&str], log: &str| {
        Process::spawn(
            Command::new(&ktb)
                .env("KUBECONFIG", &cluster.kubeconfig)
                .args(args)
                .args(["-n", NAMESPACE, "--expose", &format!("{}:80", local.port())])
                .args([
                    "--agent-image",
                    "ktb.test/ktb-agent:dev",
                    "--image-pull-policy",
                    "Never",
                ]),
            &scratch.join(log),
        )
    };
    let mark = format!("{}={}", MARK.0, MARK.1);
    // kube-proxy programs the ClusterIP shortly after the pods are ready.
    wait_answered_by(service, None, |body| body.starts_with(SERVICE)).await?;
    let mut figures: [Vec<Figures>; 4] = Default::default();
    for round in 1..=ROUNDS {
        eprintln!("round {round}/{ROUNDS}: straight to the Service");
        figures[0].push(measure(service, None).await.context("straight")?);

        eprintln!("round {round}/{ROUNDS}: ktb mesh, unmatched and matched");
        let meshed = ktb_run(
            &["mesh", SERVICE, "--header", &mark],
            &format!("mesh-{round}.log"),
        )?;
        wait_answered_by(service, Some(MARK), |body| body == "local").await?;
        figures[1].push(measure(service, None).await.context("unmatched")?);
        figures[2].push(measure(service, Some(MARK)).await.context("matched")?);
        meshed.interrupt()?;
        meshed.wait_exit(Duration::from_secs(60))?;
        wait_restored(cluster).await?;

        eprintln!("round {round}/{ROUNDS}: ktb exchange");
        let exchanged = ktb_run(&["exchange", SERVICE], &format!("exchange-{round}.log"))?;
        wait_answered_by(service, None, |body| body == "local").await?;
        figures[3].push(measure(service, None).await.context("exchange")?);
        exchanged.interrupt()?;
        exchanged.wait_exit(Duration::from_secs(60))?;
        wait_restored(cluster).await?;
    }
    let [straight, unmatched, matched, exchange] = figures.map(|f| Figures::median(&f));
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "path", "p50", "p99", "requests/s"
    );
    for (name, f) in [
        ("straight to the Service", straight),
        ("mesh, unmatched (router)", unmatched),
        ("mesh, matched (to laptop)", matched),
        ("exchange (to laptop)", exchange),
    ] {
        println!(
            "{name:<28} {:>7.0} µs {:>7.0} µs {:>12.0}",
            f.p50_us, f.p99_us, f.requests_per_s
        );
    }
    let report = json!({
        "rounds": ROUNDS,
        "straight": straight.to_json(),
        "unmatched": unmatched.to_json(),
        "matched": matched.to_json(),
        "exchange": exchange.to_json(),
        "unmatched_p50_extra_us": unmatched.p50_us - straight.p50_us,
        "unmatched_throughput_ratio": unmatched.requests_per_s / straight.requests_per_s,
        "matched_throughput_vs_exchange": matched.requests_per_s / exchange.requests_per_s,
    });
    println!();
    println!(
        "unmatched: p50 +{:.0} µs over straight (goal ≤ 300), throughput {:.2}x straight (goal ≥ 0.80); \
         matched: throughput {:.2}x exchange (goal ≥ 0.90)",
        report["unmatched_p50_extra_us"].as_f64().unwrap_or(f64::NAN),
        report["unmatched_throughput_ratio"].as_f64().unwrap_or(f64::NAN),
        report["matched_throughput_vs_exchange"].as_f64().unwrap_or(f64::NAN),
    );
    let out = workspace.join("target/bench/mesh.json");
    std::fs::create_dir_all(out.parent().context("target/bench")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("written to {}", out.display());
    Ok(())
}

/// Waits until the Service carries no ktb annotation again.
async fn wait_restored(cluster: &Admin) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let annotations = cluster.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "svc",
            SERVICE,
            "-o",
            "jsonpath={.metadata.annotations}",
        ])?;
        if !annotations.contains("ktb.dev/") {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the Service was not restored within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A local HTTP/1.1 keep-alive server answering `local` to everything.
async fn local_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let (read, mut write) = tcp.into_split();
                let mut read = BufReader::new(read);
                while skip_head(&mut read).await.unwrap_or(false) {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nlocal\n";
                    if write.write_all(answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Reads one request head (the load sends no bodies); false at EOF.
async fn skip_head(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(false);
        }
        if line == "\r\n" {
            return Ok(true);
        }
    }
}

/// One keep-alive connection to `addr`, sending `mark` on every request.
struct Client {
    read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
    request: Arc<[u8]>,
}

impl Client {
    async fn connect(addr: SocketAddr, mark: Option<(&str, &str)>) -> anyhow::Result<Client> {
        let tcp = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr} timed out"))?
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (read, write) = tcp.into_split();
        let mark = mark
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .unwrap_or_default();
        let request = format!("GET / HTTP/1.1\r\nhost: {addr}\r\n{mark}\r\n");
        Ok(Client {
            read: BufReader::new(read),
            write,
            request: request.into_bytes().into(),
        })
    }

    /// One request; the answer's body.
    async fn get(&mut self) -> anyhow::Result<String> {
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            self.write.write_all(&self.request).await?;
            let mut line = String::new();
            self.read.read_line(&mut line).await?;
            anyhow::ensure!(
                line.starts_with("HTTP/1.1 200"),
                "answered {:?}",
                line.trim()
            );
            let mut length = 0;
            loop {
                line.clear();
                anyhow::ensure!(
                    self.read.read_line(&mut line).await? > 0,
                    "closed in a head"
                );
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse()?;
                    }
                }
            }
            let mut body = vec![0u8; length];
            self.read.read_exact(&mut body).await?;
            Ok(String::from_utf8_lossy(&body).trim().to_owned())
        })
        .await
        .context("a request timed out")?
    }
}

/// Waits until a request to the Service is answered with a body `wanted`
/// accepts.
async fn wait_answered_by(
    service: SocketAddr,
    mark: Option<(&str, &str)>,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let answered = async { Client::connect(service, mark).await?.get().await };
        if let Ok(got) = answered.await {
            if wanted(&got) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no expected answer from the Service at {service} within 120 s")
}

async fn measure(addr: SocketAddr, mark: Option<(&str, &str)>) -> anyhow::Result<Figures> {
    let mut client = Client::connect(addr, mark).await?;
    let mut samples = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        let start = Instant::now();
        client.get().await?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let (p50_us, p99_us) = (at(0.5), at(0.99));

    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let mark = mark.map(|(n, v)| (n.to_owned(), v.to_owned()));
        workers.spawn(async move {
            let mark = mark.as_ref().map(|(n, v)| (n.as_str(), v.as_str()));
            let mut client = Client::connect(addr, mark).await?;
            for _ in 0..REQUESTS_EACH {
                client.get().await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let requests_per_s = (CONNECTIONS * REQUESTS_EACH) as f64 / start.elapsed().as_secs_f64();
    Ok(Figures {
        p50_us,
        p99_us,
        requests_per_s,
    })
}
