//! `cargo xtask`: the project's automation, in Rust rather than shell scripts.
//!
//! - `cluster up|down|status|env NAME`: the throwaway single-node Kubernetes that
//!   every end-to-end test runs against (see `tests/cluster/`).
//! - `bench tunnel`: the loopback tunnel benchmark against direct TCP and `ssh -R`.
//! - `bench exchange`, `bench connect` `[--rtt-ms N]`: ktb on the test
//!   cluster against `kubectl port-forward`, with the laptop N ms from the
//!   apiserver if asked; `bench mesh`: the mesh router against going
//!   straight to the Service and against `ktb exchange`.
//! - `demo [--clean]`: ktb's main job shown on the test cluster, narrated
//!   and checked, for a newcomer (and for CI, which reads its transcript).
//! - `test`: the one command that runs every test, as the README and CI call it.
//! - `check-targets`: clippy for every platform ktb ships to (Linux,
//!   macOS, Windows; amd64 and arm64), from this Linux machine.
//! - `fuzz [--seconds N]`: every fuzz target of `ktb-proto` for N seconds
//!   each (nightly Rust and cargo-fuzz).

mod bench;
mod cluster;
mod demo;
mod fuzz;
mod targets;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ktb project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the project's throwaway single-node test cluster.
    Cluster {
        #[command(subcommand)]
        command: cluster::Command,
    },
    /// Show ktb at work: the test cluster, a sample app, and `ktb exchange`
    /// and `ktb mesh` from a simulated laptop, each step checked. Leaves the
    /// app and the cluster running to play with.
    Demo {
        /// Only remove the sample app the demo left running.
        #[arg(long)]
        clean: bool,
    },
    /// Run every test: the workspace's, then end-to-end on the test cluster.
    Test {
        /// Only the workspace's own tests (no cluster); for quick local runs.
        #[arg(long)]
        without_cluster: bool,
    },
    /// Clippy (`-D warnings`) for every target ktb ships to: Linux x86_64
    /// and aarch64, macOS x86_64 and aarch64, Windows x86_64.
    CheckTargets,
    /// Run every fuzz target of ktb-proto for a time budget each and print
    /// the executions (needs nightly Rust and cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run a benchmark and print its figures side by side with baselines.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// The tunnel on loopback against direct TCP and `ssh -R`.
    Tunnel,
    /// `ktb exchange` on the test cluster against `kubectl port-forward`.
    Exchange {
        /// Put the apiserver this many milliseconds of round trip away
        /// (a delaying proxy in front of it); 0: as it is.
        #[arg(long, default_value_t = 0)]
        rtt_ms: u32,
    },
    /// `ktb connect` from a laptop against `kubectl port-forward`, and its
    /// DNS against CoreDNS asked from a pod.
    Connect {
        /// Put the apiserver this many milliseconds of round trip away
        /// from the laptop (a delaying proxy in its namespace); 0: as it is.
        #[arg(long, default_value_t = 0)]
        rtt_ms: u32,
    },
    /// `ktb mesh`'s router on the test cluster: unmarked requests against
    /// straight to the Service, marked ones against `ktb exchange`.
    Mesh,
    /// The echo load against ADDR from this network namespace, as JSON
    /// (run by `bench connect` inside the laptop).
    #[command(hide = true)]
    Measure {
        addr: std::net::SocketAddr,
        /// Connect to ADDR through this SOCKS5 proxy (`ktb connect --mode
        /// socks5`) instead of straight.
        #[arg(long)]
        socks5: Option<std::net::SocketAddr>,
        /// Sizes the load for a far apiserver, as the caller's `--rtt-ms`.
        #[arg(long, default_value_t = 0)]
        rtt_ms: u32,
    },
}

/// The workspace root: xtask lives one level below it.
fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Cluster { command } => cluster::run(command),
        Command::Demo { clean } => demo::run(&workspace(), clean),
        Command::Test { without_cluster } => test::run(&workspace(), without_cluster),
        Command::CheckTargets => targets::run(&workspace()),
        Command::Fuzz { seconds } => fuzz::run(&workspace(), seconds),
        Command::Bench {
            bench: Bench::Tunnel,
        } => bench::tunnel(&workspace()),
        Command::Bench {
            bench: Bench::Exchange { rtt_ms },
        } => bench::exchange(&workspace(), rtt_ms),
        Command::Bench {
            bench: Bench::Connect { rtt_ms },
        } => bench::connect(&workspace(), rtt_ms),
        Command::Bench { bench: Bench::Mesh } => bench::mesh(&workspace()),
        Command::Bench {
            bench:
                Bench::Measure {
                    addr,
                    socks5,
                    rtt_ms,
                },
        } => bench::measure_here(addr, socks5, rtt_ms),
    }
}
