//! `cargo xtask test`: every test of the project, as the README gives it and
//! CI runs it.
//!
//! First the workspace's own tests (unit tests and the loopback tunnel
//! tests; end-to-end tests show as ignored there), then the end-to-end tests
//! against the project's cluster, which is brought up for them and always
//! brought down again, also when they fail. The last line sums up every
//! test run, so a glance (or CI) sees how many ran.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::cluster;

/// Tests counted across the cargo runs.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

pub fn run(workspace: &Path, without_cluster: bool) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    let result = run_all(workspace, without_cluster, &mut tally);
    println!("summary: {} passed, {} failed", tally.passed, tally.failed);
    result
}

fn run_all(workspace: &Path, without_cluster: bool, tally: &mut Tally) -> anyhow::Result<()> {
    cargo_test(workspace, &["test", "--workspace"], tally)?;
    if without_cluster {
        println!("cargo xtask test: end-to-end tests NOT run (--without-cluster)");
        return Ok(());
    }
    // The end-to-end tests run these binaries as a developer would.
    cargo(workspace, &["build", "-p", "ktb", "-p", "ktb-workloads"])?;
    cluster::run(cluster::Command::Up)?;
    let tests = cargo_test(
        workspace,
        &[
            "test",
            "-p",
            "ktb-tests",
            "--",
            "--ignored",
            "--test-threads=1",
        ],
        tally,
    );
    let down = cluster::run(cluster::Command::Down);
    tests?;
    down
}

fn cargo_command(workspace: &Path, args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("+ cargo {}", args.join(" "));
    let mut command = Command::new(cargo);
    command.current_dir(workspace).args(args);
    command
}

/// Runs `cargo ARGS` in the workspace, its output passed through.
pub fn cargo(workspace: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_command(workspace, args).status()?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// Runs cargo test, passing its output through and counting its results.
fn cargo_test(workspace: &Path, args: &[&str], tally: &mut Tally) -> anyhow::Result<()> {
    let mut child = cargo_command(workspace, args)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((passed, failed)) = parse_result(&line) {
            tally.passed += passed;
            tally.failed += failed;
        }
    }
    let status = child.wait()?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// `test result: ok. 13 passed; 0 failed; …` → (13, 0).
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn results_are_counted() {
        let ok = "test result: ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.38s";
        assert_eq!(parse_result(ok), Some((13, 0)));
        let failed = "test result: FAILED. 9 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2s";
        assert_eq!(parse_result(failed), Some((9, 1)));
        assert_eq!(parse_result("running 3 tests"), None);
    }
}
