//! `cargo xtask bench tunnel`: what the ktb tunnel costs, measured side by
//! side with the alternatives on loopback in one run.
//!
//! Three paths lead from a caller to the same local server: direct TCP (the
//! floor), OpenSSH remote forwarding (`ssh -R`, kt-connect's transport) and
//! the ktb tunnel (agent exposed port → WebSocket → `ktb attach` → local
//! server). Rounds are interleaved so that noise from the shared machine
//! hits every path alike, and medians are reported. Results go to the
//! terminal and to `target/bench/tunnel.json`.
//!
//! The run is also the tunnel's regression guard: it fails (after writing
//! its figures) when ktb's throughput falls below [`GUARD_VS_DIRECT`] of
//! direct TCP or [`GUARD_VS_SSH`] of `ssh -R` measured in the same run.

mod connect;
mod cpu;
mod exchange;
mod far;
mod figures;
mod kt_connect;
mod load;
mod mesh;
mod paths;

pub use connect::connect;
pub use exchange::{exchange, measure_here};
pub use mesh::mesh;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use load::{Figures, LocalServer};
use paths::{KtbPath, SshPath};

/// Rounds per path; medians are taken across rounds.
const ROUNDS: usize = 3;
const THROUGHPUT_BYTES: u64 = 1 << 30;
const LATENCY_ROUND_TRIPS: usize = 3000;
const CONCURRENT_CONNECTIONS: usize = 1000;
const CONCURRENT_BYTES: usize = 64 * 1024;
/// The least share of direct loopback throughput the tunnel must keep: a
/// forwarded byte crosses three loopback connections where direct crosses
/// one, so about a third is the ceiling of any relay here.
const GUARD_VS_DIRECT: f64 = 0.3;
/// The least multiple of `ssh -R`'s throughput (kt-connect's transport).
const GUARD_VS_SSH: f64 = 1.5;

pub fn tunnel(workspace: &Path) -> anyhow::Result<()> {
    paths::build_release(workspace)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    in_scratch(workspace, |scratch| {
        runtime.block_on(run(workspace, scratch))
    })
}

async fn run(workspace: &Path, scratch: &Path) -> anyhow::Result<()> {
    let server = LocalServer::start().await?;
    let ssh = SshPath::start(scratch, server.addr)
        .await
        .context("setting up ssh -R")?;
    let ktb = KtbPath::start(workspace, scratch, server.addr)
        .await
        .context("setting up the ktb tunnel")?;
    let paths: [(&str, SocketAddr); 3] = [
        ("direct", server.addr),
        ("ssh -R", ssh.entry),
        ("ktb", ktb.entry),
    ];

    let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); paths.len()];
    for round in 1..=ROUNDS {
        for (i, (name, addr)) in paths.iter().enumerate() {
            eprintln!("round {round}/{ROUNDS}: {name}");
            rounds[i].push(
                load::measure(
                    *addr,
                    THROUGHPUT_BYTES,
                    LATENCY_ROUND_TRIPS,
                    CONCURRENT_CONNECTIONS,
                    CONCURRENT_BYTES,
                )
                .await?,
            );
        }
    }
    let agent_peak_rss_kib = ktb.agent_peak_rss_kib()?;
    let cli_peak_rss_kib = ktb.cli_peak_rss_kib()?;
    drop(ktb);
    drop(ssh);

    let medians: Vec<Figures> = rounds.iter().map(|r| Figures::median(r)).collect();
    let (direct, ssh, ktb) = (&medians[0], &medians[1], &medians[2]);
    print_table(&paths.map(|p| p.0), &medians);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!();
    println!(
        "ktb vs ssh -R:  throughput {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
        ratio(ktb.throughput_gbps, ssh.throughput_gbps),
        ratio(ktb.p50_us, ssh.p50_us),
        ratio(ktb.p99_us, ssh.p99_us)
    );
    println!(
        "ktb vs direct:  throughput {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
        ratio(ktb.throughput_gbps, direct.throughput_gbps),
        ratio(ktb.p50_us, direct.p50_us),
        ratio(ktb.p99_us, direct.p99_us)
    );
    println!(
        "agent peak RSS: {} KiB; ktb CLI peak RSS: {} KiB",
        agent_peak_rss_kib, cli_peak_rss_kib
    );

    let per_path = |f: &Figures| {
        json!({
            "throughput_gbps": f.throughput_gbps,
            "p50_us": f.p50_us,
            "p99_us": f.p99_us,
            "concurrent_ms": f.concurrent_ms,
            "concurrent_errors": f.concurrent_errors,
        })
    };
    let report = json!({
        "rounds": ROUNDS,
        "throughput_bytes": THROUGHPUT_BYTES,
        "latency_round_trips": LATENCY_ROUND_TRIPS,
        "concurrent_connections": CONCURRENT_CONNECTIONS,
        "concurrent_bytes_each": CONCURRENT_BYTES,
        "direct": per_path(direct),
        "ssh": per_path(ssh),
        "ktb": per_path(ktb),
        "ratio_vs_ssh": {
            "throughput": ratio(ktb.throughput_gbps, ssh.throughput_gbps),
            "p50": ratio(ktb.p50_us, ssh.p50_us),
            "p99": ratio(ktb.p99_us, ssh.p99_us),
        },
        "ratio_vs_direct": {
            "throughput": ratio(ktb.throughput_gbps, direct.throughput_gbps),
            "p50": ratio(ktb.p50_us, direct.p50_us),
            "p99": ratio(ktb.p99_us, direct.p99_us),
        },
        "agent_peak_rss_kib": agent_peak_rss_kib,
        "cli_peak_rss_kib": cli_peak_rss_kib,
    });
    let out = workspace.join("target/bench/tunnel.json");
    std::fs::create_dir_all(out.parent().expect("has a parent"))?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("written to {}", out.display());
    guard(
        ratio(ktb.throughput_gbps, direct.throughput_gbps),
        ratio(ktb.throughput_gbps, ssh.throughput_gbps),
    )
}

/// Fails the run when the tunnel's throughput has fallen below its guard.
fn guard(vs_direct: f64, vs_ssh: f64) -> anyhow::Result<()> {
    let missed: Vec<String> = [
        (vs_direct, GUARD_VS_DIRECT, "direct"),
        (vs_ssh, GUARD_VS_SSH, "ssh -R"),
    ]
    .into_iter()
    // NaN (a path that moved nothing) misses too.
    .filter(|(ratio, least, _)| ratio.is_nan() || ratio < least)
    .map(|(ratio, least, path)| format!("{ratio:.2}x {path} (guard {least}x)"))
    .collect();
    if missed.is_empty() {
        println!("guard kept: ktb throughput {vs_direct:.2}x direct, {vs_ssh:.2}x ssh -R");
        return Ok(());
    }
    anyhow::bail!(
        "the tunnel's throughput fell below its guard: {}",
        missed.join(", ")
    )
}

fn print_table(names: &[&str], figures: &[Figures]) {
    println!();
    println!(
        "{:<8} {:>12} {:>10} {:>10} {:>16} {:>8}",
        "path", "throughput", "RR p50", "RR p99", "1000 conns", "errors"
    );
    for (name, f) in names.iter().zip(figures) {
        println!(
            "{:<8} {:>7.2} Gb/s {:>7.0} µs {:>7.0} µs {:>13.0} ms {:>8}",
            name, f.throughput_gbps, f.p50_us, f.p99_us, f.concurrent_ms, f.concurrent_errors
        );
    }
}

/// Runs a bench with a directory of its own under `target/bench` for its
/// logs, keys and kubeconfigs (`run` returns once the processes it started
/// have ended): removed after a run that succeeded, kept and named after
/// one that failed, so that its logs can be read.
fn in_scratch(
    workspace: &Path,
    run: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let scratch = workspace.join(format!("target/bench/scratch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    match run(&scratch) {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(())
        }
        Err(e) => {
            eprintln!("the run failed; its logs are kept in {}", scratch.display());
            Err(e)
        }
    }
}

/// Polls until `addr` accepts a connection.
async fn wait_until_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what} did not start listening on {addr} within 10 s")
}
