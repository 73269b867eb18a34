//! `cargo xtask`: the project's automation, in Rust rather than shell scripts.
//!
//! - `cluster up|down|status|env NAME`: the throwaway single-node Kubernetes that
//!   every end-to-end test runs against (see `tests/cluster/`).
//! - `bench tunnel`: the loopback tunnel benchmark against direct TCP and `ssh -R`.
//! - `test`: the one command that runs every test, as the README and CI call it.

mod cluster;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Cluster { command } => cluster::run(command),
    }
}
