//! `cargo xtask test`: every test of the project, as the README gives it and
//! CI runs it.
//!
//! First the workspace's own tests (unit tests and the loopback tunnel
//! tests; end-to-end tests show as ignored there), then the end-to-end tests
//! against the project's cluster, which is brought up for them and always
//! brought down again, also when they fail.

use std::path::Path;
use std::process::Command;

use crate::cluster;

pub fn run(workspace: &Path, without_cluster: bool) -> anyhow::Result<()> {
    cargo(workspace, &["test", "--workspace"])?;
    if without_cluster {
        println!("cargo xtask test: end-to-end tests NOT run (--without-cluster)");
        return Ok(());
    }
    // The end-to-end tests run these binaries as a developer would.
    cargo(workspace, &["build", "-p", "ktb", "-p", "ktb-workloads"])?;
    cluster::run(cluster::Command::Up)?;
    let tests = cargo(
        workspace,
        &[
            "test",
            "-p",
            "ktb-tests",
            "--",
            "--ignored",
            "--test-threads=1",
        ],
    );
    let down = cluster::run(cluster::Command::Down);
    tests?;
    down
}

fn cargo(workspace: &Path, args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("+ cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(args)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}
