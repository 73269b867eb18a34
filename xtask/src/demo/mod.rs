//! `cargo xtask demo`: ktb doing its main job, narrated, on the project's
//! own cluster, for someone who has never seen it.
//!
//! The stage: the test cluster (reused if it runs, else brought up), a
//! sample application in the developers' namespace ([`app`]: `frontend`
//! calls `backend`, each answer names every pod it went through), and
//! developer dev-a on laptop-a, a network namespace that reaches only the
//! apiserver. The play, each act checked before the next:
//!
//! 1. a request from inside the cluster: frontend → backend, both pods;
//! 2. `ktb exchange backend` on the laptop, beside a local `http-echo`
//!    from the workspace: the same request now ends on the laptop;
//! 3. Ctrl-C to ktb: the cluster's backend answers again;
//! 4. `ktb mesh backend`: a request carrying dev-a's mark goes to the
//!    laptop, one without it to the cluster; Ctrl-C: the cluster again.
//!
//! Every answer is printed as `answer: cluster …` or `answer: laptop …`,
//! which CI reads back from the transcript. The demo ends with how to keep
//! playing and how to tear down, leaving the app and the cluster running.
//! Ctrl-C at any point (or any failure) ends the ktb processes the way a
//! developer would, removes the app, and brings the cluster down again if
//! the demo brought it up: the cluster is left as the demo found it.

mod app;
mod laptop;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;

use crate::cluster::{self, Admin};
use app::{Answer, App};
use laptop::Laptop;

/// The mark dev-a's mesh session routes on.
const MARK: (&str, &str) = ("x-dev", "dev-a");

/// Shared with the signal thread: set once Ctrl-C (or SIGTERM) arrives.
pub type Interrupted = Arc<AtomicBool>;

pub fn run(workspace: &Path, clean: bool) -> anyhow::Result<()> {
    let interrupted = watch_signals()?;
    if clean {
        let removed = App::new(Admin::find()?, interrupted).remove();
        println!("The sample app is gone; `cargo xtask cluster down` stops the cluster.");
        return removed;
    }
    step(
        &interrupted,
        "Building ktb and the sample app's server (cargo build -p ktb -p ktb-workloads)",
    )?;
    crate::test::cargo(workspace, &["build", "-p", "ktb", "-p", "ktb-workloads"])?;
    let was_up = cluster::is_up()?;
    step(
        &interrupted,
        if was_up {
            "Reusing the running test cluster"
        } else {
            "Bringing up the test cluster: a real single-node Kubernetes on this machine (cargo xtask cluster up)"
        },
    )?;
    cluster::run(cluster::Command::Up)?;
    let app = App::new(Admin::find()?, Arc::clone(&interrupted));
    let played = play(workspace, &app, &interrupted);
    if played.is_ok() {
        return Ok(());
    }
    println!("\n▶ Stopped: putting the cluster back as the demo found it");
    let removed = app.remove().and_then(|()| app.wait_no_ktb_objects());
    let down = if was_up {
        Ok(())
    } else {
        cluster::run(cluster::Command::Down)
    };
    let result = played.and(removed).and(down);
    if interrupted.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted; the cluster is as the demo found it");
    }
    result
}

fn play(workspace: &Path, app: &App, interrupted: &Interrupted) -> anyhow::Result<()> {
    step(
        interrupted,
        "Deploying the sample app in namespace team-a: frontend calls backend",
    )?;
    app.deploy()?;
    let laptop = Laptop::new(workspace, Arc::clone(interrupted))?;

    step(
        interrupted,
        "1. A request from inside the cluster, to frontend",
    )?;
    expect(app.ask_frontend()?, Answer::Cluster)?;

    step(
        interrupted,
        "2. dev-a runs backend's code on laptop-a, and exchanges the cluster's backend for it",
    )?;
    let local = laptop.serve_backend()?;
    let exchange = laptop.ktb(&[
        "exchange",
        app::BACKEND,
        "--expose",
        &laptop.backend_expose(),
    ])?;
    step(interrupted, "   The same request from inside the cluster:")?;
    expect(app.ask_frontend()?, Answer::Laptop)?;

    step(interrupted, "3. Ctrl-C in ktb's terminal restores backend")?;
    exchange.interrupt_and_wait()?;
    expect(app.ask_frontend()?, Answer::Cluster)?;

    let mark = format!("{}={}", MARK.0, MARK.1);
    step(interrupted, &format!(
        "4. ktb mesh: only requests marked {}: {} reach laptop-a; colleagues keep the cluster's backend",
        MARK.0, MARK.1
    ))?;
    let mesh = laptop.ktb(&[
        "mesh",
        app::BACKEND,
        "--expose",
        &laptop.backend_expose(),
        "--header",
        &mark,
    ])?;
    step(
        interrupted,
        "   Two requests to backend from inside the cluster, marked and unmarked:",
    )?;
    let [marked, unmarked] = app.ask_backend_marked(MARK)?;
    expect(marked, Answer::Laptop)?;
    expect(unmarked, Answer::Cluster)?;
    step(interrupted, "   Ctrl-C ends the mesh session:")?;
    mesh.interrupt_and_wait()?;
    expect(app.ask_frontend()?, Answer::Cluster)?;
    drop(local);
    app.assert_nothing_of_ktb_left()?;

    let debug = workspace.join("target/debug");
    step(
        interrupted,
        "Done: the cluster is as before, and nothing of ktb is left in it.",
    )?;
    println!(
        "\nKeep playing; the app and the cluster stay up.\n\
         \x20 As dev-a, on laptop-a (a shell there: eval \"$(cargo xtask cluster env dev-a)\"; ip netns exec laptop-a bash):\n\
         \x20   PORT=8080 POD_NAME=mine {debug}/http-echo &\n\
         \x20   {debug}/ktb exchange backend --expose 8080:80 --agent-image ktb.test/ktb-agent:dev --image-pull-policy Never\n\
         \x20 As the admin, from this machine (eval \"$(cargo xtask cluster env admin)\"):\n\
         \x20   kubectl exec -n team-a deploy/frontend -- /probe http frontend\n\
         Tear down: cargo xtask demo --clean (the app), then cargo xtask cluster down (the cluster).",
        debug = debug.display()
    );
    Ok(())
}

/// Prints an answer and checks who gave it.
fn expect(answer: (Answer, String), wanted: Answer) -> anyhow::Result<()> {
    let (who, detail) = answer;
    println!("   answer: {who} ({detail})");
    anyhow::ensure!(
        who == wanted,
        "expected the {wanted} to answer, but the {who} did ({detail})"
    );
    Ok(())
}

/// Announces the next step, unless Ctrl-C came first.
fn step(interrupted: &Interrupted, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(!interrupted.load(Ordering::SeqCst), "interrupted");
    println!("\n▶ {what}");
    Ok(())
}

/// Sets the returned flag on SIGINT or SIGTERM, from a thread of its own so
/// that every wait of the demo can look at it between polls.
fn watch_signals() -> anyhow::Result<Interrupted> {
    let interrupted = Interrupted::default();
    let flag = Arc::clone(&interrupted);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        })
    });
    Ok(interrupted)
}
