//! Progress is for people: under a pseudo-terminal `ktb` draws a spinner
//! that names the phase it waits in, and with stderr piped it writes its
//! `ktb: …` lines and not one escape sequence.
//!
//! The wait is the first contact with the cluster, so no cluster is needed:
//! the kubeconfig points at a loopback listener that takes the connection,
//! answers nothing for long enough that the spinner turns, then hangs up,
//! and ktb fails with its "cannot reach the cluster" error.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::pty::{openpty, Winsize};

/// How long the silent apiserver holds the connection: several ticks of
/// the spinner, well inside ktb's 10 s first-contact timeout.
const HOLD: Duration = Duration::from_millis(1500);

/// The longest a run of ktb may take before the test gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The phase ktb names while it waits for the apiserver.
const PHASE: &str = "connecting to the cluster";

/// What ktb says when the apiserver never answers.
const FAILURE: &str = "ktb: error: cannot reach the cluster at https://127.0.0.1:";

#[test]
fn a_terminal_sees_the_wait_spin_and_its_lines_stay_apart() {
    let pty = openpty(
        Some(&Winsize {
            ws_row: 24,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .expect("a pseudo-terminal");
    let reader = std::fs::File::from(pty.master);
    let (status, output) = run_ktb(Stdio::from(pty.slave), reader);
    let output = String::from_utf8_lossy(&output);

    assert_eq!(
        status.code(),
        Some(1),
        "an unreachable cluster is a failure (exit 1)"
    );
    assert!(output.contains(PHASE), "no phase named:\n{output:?}");
    assert!(output.contains('\x1b'), "no spinner drawn:\n{output:?}");
    let frames: std::collections::BTreeSet<char> =
        output.chars().filter(|c| is_spinner(*c)).collect();
    assert!(frames.len() >= 2, "the spinner did not turn:\n{output:?}");
    let (before, _) = output
        .split_once(FAILURE)
        .unwrap_or_else(|| panic!("no error line:\n{output:?}"));
    // The spinner is cleared (carriage return, erase line) before the
    // error is written, so the two never share a row.
    assert!(
        before.ends_with("\r\x1b[2K") || before.ends_with('\n'),
        "the error line starts on the spinner's row:\n{output:?}"
    );
}

#[test]
fn piped_stderr_holds_the_lines_alone() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    let (status, output) = run_ktb(Stdio::from(writer), reader);
    let output = String::from_utf8(output).expect("ktb writes text");

    assert_eq!(
        status.code(),
        Some(1),
        "an unreachable cluster is a failure (exit 1)"
    );
    assert!(
        !output.contains('\x1b'),
        "an escape sequence in piped output:\n{output:?}"
    );
    assert!(
        !output.chars().any(is_spinner),
        "a spinner in piped output:\n{output:?}"
    );
    assert!(output.starts_with(FAILURE), "not ktb's error:\n{output:?}");
    assert!(
        output.lines().all(|l| l.starts_with("ktb: ")),
        "a line that is not a `ktb: ` line:\n{output:?}"
    );
}

/// Runs `ktb status` against a silent apiserver with `stderr` as its
/// stderr, and returns how it exited and all it wrote, read from `reader`.
fn run_ktb(stderr: Stdio, reader: impl Read + Send + 'static) -> (ExitStatus, Vec<u8>) {
    let apiserver = silent_apiserver();
    let kubeconfig = kubeconfig_for(apiserver);
    // Built and dropped in one statement: the parent must not keep the
    // write end open, or reading would never reach its end.
    let child = Command::new(env!("CARGO_BIN_EXE_ktb"))
        .args(["status", "--kubeconfig"])
        .arg(&kubeconfig)
        .env("TERM", "xterm-256color")
        .env_remove("KTB_NO_PROGRESS")
        .env_remove("KTB_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("ktb starts");
    let output = read_in_background(reader);
    let status = wait_bounded(child);
    let output = output
        .recv_timeout(RUN_TIMEOUT)
        .expect("ktb's stderr ends when ktb exits");
    std::fs::remove_file(kubeconfig).ok();
    (status, output)
}

/// A loopback port that takes one connection, says nothing for [`HOLD`],
/// then hangs up: an apiserver too slow to answer.
fn silent_apiserver() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    std::thread::spawn(move || {
        if let Ok((connection, _)) = listener.accept() {
            std::thread::sleep(HOLD);
            drop(connection);
        }
    });
    addr
}

/// A kubeconfig whose only cluster is `apiserver`, in a file of its own.
fn kubeconfig_for(apiserver: SocketAddr) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("progress-kubeconfig-{}", apiserver.port()));
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: silent
  cluster:
    server: https://{apiserver}
    insecure-skip-tls-verify: true
contexts:
- name: silent
  context: {{cluster: silent, user: nobody, namespace: default}}
current-context: silent
users:
- name: nobody
  user: {{token: not-a-token}}
"
    );
    std::fs::write(&path, text).expect("the kubeconfig is written");
    path
}

/// Everything `reader` yields until its end, which for a pseudo-terminal's
/// master is an error (EIO) once the last holder of the other side exits.
fn read_in_background(mut reader: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut output = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(read @ 1..) = reader.read(&mut chunk) {
            output.extend_from_slice(&chunk[..read]);
        }
        sender.send(output).ok();
    });
    receiver
}

/// Waits for `child` for at most [`RUN_TIMEOUT`]; past that, kills it (this
/// test's own process, by its pid) and fails.
fn wait_bounded(mut child: Child) -> ExitStatus {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("ktb's status") {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("ktb still runs after {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A frame of ktb's spinner: a Braille pattern.
fn is_spinner(c: char) -> bool {
    ('\u{2801}'..='\u{28ff}').contains(&c)
}
