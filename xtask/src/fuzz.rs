//! `cargo xtask fuzz [--seconds N]`: every fuzz target of `ktb-proto` for
//! a time budget each, and how many inputs each one ran.
//!
//! The targets live in `crates/ktb-proto/fuzz/`, a crate of its own because
//! cargo-fuzz needs nightly Rust and sanitizer flags the workspace must not
//! get: `decode` (any bytes as a frame), `handshake` (the agent's side of
//! the handshake fed anything a client could send) and `session` (a live
//! session's reader fed any frame sequence). They are built once, then each
//! runs under libFuzzer's own time limit; its closing line ("Done N runs in
//! S second(s)") gives the count. A crash stops the run with the input
//! libFuzzer saved, to reproduce with `cargo +nightly fuzz run TARGET FILE`.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long building the targets may take on a small machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Beyond its budget, how long a target may take to start and wind down.
const RUN_GRACE: Duration = Duration::from_secs(120);

pub fn run(workspace: &Path, seconds: u64) -> anyhow::Result<()> {
    let fuzz_dir = workspace.join("crates/ktb-proto/fuzz");
    let logs = workspace.join("target/fuzz-logs");
    fs::create_dir_all(&logs)?;
    check_tools(&fuzz_dir)?;
    let targets = list_targets(&fuzz_dir)?;
    println!("+ cargo +nightly fuzz build ({})", targets.join(", "));
    let build = cargo_fuzz(&fuzz_dir, &["build"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start cargo +nightly fuzz build")?;
    wait_bounded(build, BUILD_TIMEOUT, "cargo +nightly fuzz build")?;

    let mut results = Vec::new();
    for target in &targets {
        let log = logs.join(format!("{target}.log"));
        println!(
            "+ cargo +nightly fuzz run {target} -- -max_total_time={seconds} (log: {})",
            log.display()
        );
        let child = cargo_fuzz(
            &fuzz_dir,
            &["run", target, "--", &format!("-max_total_time={seconds}")],
        )
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::options().append(true).open(&log)?)
        .spawn()
        .with_context(|| format!("cannot start fuzz target {target}"))?;
        let outcome = wait_bounded(child, Duration::from_secs(seconds) + RUN_GRACE, target);
        let text = fs::read_to_string(&log)?;
        if let Err(e) = outcome {
            let saved = text
                .lines()
                .filter(|l| l.contains("Test unit written to") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join("\n");
            anyhow::bail!(
                "fuzz target {target} failed: {e:#}\n{saved}\n(full output in {})",
                log.display()
            );
        }
        let (runs, took) = parse_done(&text)
            .with_context(|| format!("no closing \"Done N runs\" line in {}", log.display()))?;
        println!(
            "{target}: {runs} executions in {took} s ({} per second)",
            runs / took.max(1)
        );
        results.push((target.clone(), runs, took));
    }
    println!("fuzz summary:");
    for (target, runs, took) in results {
        println!("  {target:<10} {runs:>12} executions in {took} s");
    }
    Ok(())
}

fn cargo_fuzz(fuzz_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(fuzz_dir)
        .args(["+nightly", "fuzz"])
        .args(args)
        // Its own process group, so that a timeout also ends the fuzzer
        // cargo-fuzz started.
        .process_group(0);
    command
}

/// Nightly Rust and cargo-fuzz, or what to install.
fn check_tools(fuzz_dir: &Path) -> anyhow::Result<()> {
    let nightly = Command::new("cargo")
        .current_dir(fuzz_dir)
        .args(["+nightly", "--version"])
        .output();
    anyhow::ensure!(
        nightly.is_ok_and(|o| o.status.success()),
        "no nightly toolchain: rustup toolchain install nightly --profile minimal"
    );
    let fuzz = Command::new("cargo")
        .current_dir(fuzz_dir)
        .args(["+nightly", "fuzz", "--version"])
        .output();
    anyhow::ensure!(
        fuzz.is_ok_and(|o| o.status.success()),
        "no cargo-fuzz: cargo install cargo-fuzz"
    );
    Ok(())
}

fn list_targets(fuzz_dir: &Path) -> anyhow::Result<Vec<String>> {
    let output = Command::new("cargo")
        .current_dir(fuzz_dir)
        .args(["+nightly", "fuzz", "list"])
        .output()
        .context("cannot run cargo +nightly fuzz list")?;
    anyhow::ensure!(output.status.success(), "cargo +nightly fuzz list failed");
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Waits for `child` at most `timeout`, then ends its process group.
fn wait_bounded(mut child: Child, timeout: Duration, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(status.success(), "{what} failed ({status})");
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = crate::cluster::signal_group(child.id(), "KILL");
            let _ = child.wait();
            anyhow::bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// libFuzzer's `Done 1234 runs in 61 second(s)` → (1234, 61).
fn parse_done(output: &str) -> Option<(u64, u64)> {
    let line = output.lines().rev().find(|l| l.starts_with("Done "))?;
    let mut words = line.split_whitespace();
    let runs = words.nth(1)?.parse().ok()?;
    let seconds = words.nth(2)?.parse().ok()?;
    Some((runs, seconds))
}

#[cfg(test)]
mod tests {
    use super::parse_done;

    #[test]
    fn the_closing_line_gives_runs_and_seconds() {
        let output = "#1048576\tpulse  cov: 10 ft: 12 corp: 3/9b exec/s: 1000 rss: 40Mb\n\
                      #2000000\tDONE   cov: 10 ft: 12 corp: 3/9b exec/s: 33333 rss: 40Mb\n\
                      Done 2000000 runs in 61 second(s)\n";
        assert_eq!(parse_done(output), Some((2_000_000, 61)));
        assert_eq!(parse_done("INFO: Seed: 1\n"), None);
    }
}
