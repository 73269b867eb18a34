//! The project's test cluster (being built; see issue 3).

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Build (or reuse cached) components and start the cluster.
    Up,
    /// Stop everything `up` started and restore the machine.
    Down,
    /// Show what is running.
    Status,
    /// Print the environment for `admin`, `dev-a` or `dev-b`.
    Env { name: String },
}

pub fn run(_command: Command) -> anyhow::Result<()> {
    anyhow::bail!("the test cluster tooling is not built yet")
}
