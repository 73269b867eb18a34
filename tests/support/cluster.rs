//! Helpers for end-to-end tests against the project's test cluster
//! (`cargo xtask cluster up`, see `tests/cluster/README.md`): `kubectl` as
//! the admin or as a developer on a simulated laptop, commands inside a
//! laptop's network namespace, manifests, bounded waits, probes from inside
//! a pod, and processes (ktb itself, a local server) the test started and
//! must stop again.
//!
//! Every wait here is bounded, every process is stopped by its own PID, and
//! everything talks only to the cluster's ranges, the node and the laptops.
//! Helpers panic with what they were doing: tests fail rather than skip
//! when the cluster is not up.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Addresses and names fixed by `xtask/src/cluster` (mirrored, not imported:
/// xtask is a binary).
pub const NODE_IP: &str = "10.77.0.1";
pub const DNS_IP: &str = "10.96.0.10";
/// The namespace both developers work in.
pub const NAMESPACE: &str = "team-a";
pub const HTTP_ECHO_IMAGE: &str = "ktb.test/http-echo:dev";
pub const GRPC_ECHO_IMAGE: &str = "ktb.test/grpc-echo:dev";
pub const AGENT_IMAGE: &str = "ktb.test/ktb-agent:dev";

/// How long one `kubectl` call may take before the test fails.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// The cluster's state dir (`KTB_CLUSTER_DIR`, default `/var/lib/ktb-cluster`).
pub fn state_dir() -> PathBuf {
    std::env::var_os("KTB_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/ktb-cluster"))
}

/// Who runs a command: the admin on this machine, or a developer on a laptop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum As {
    Admin,
    DevA,
    DevB,
}

impl As {
    pub fn user(self) -> &'static str {
        match self {
            As::Admin => "admin",
            As::DevA => "dev-a",
            As::DevB => "dev-b",
        }
    }

    /// The laptop's network namespace; None for the admin (this machine).
    pub fn netns(self) -> Option<&'static str> {
        match self {
            As::Admin => None,
            As::DevA => Some("laptop-a"),
            As::DevB => Some("laptop-b"),
        }
    }

    /// The kubeconfig `cargo xtask cluster up` wrote for this identity;
    /// panics if it is missing (the cluster is not up).
    pub fn kubeconfig(self) -> PathBuf {
        let path = state_dir().join(format!("kubeconfig/{}.yaml", self.user()));
        assert!(
            path.exists(),
            "{} missing: the test cluster is not up (cargo xtask cluster up)",
            path.display()
        );
        path
    }
}

/// `program` run as `who`: inside the laptop's network namespace for a
/// developer (`ip netns exec` execs in place, so the child's PID is the
/// program's), directly for the admin. The environment is inherited.
pub fn command_as(who: As, program: impl Into<PathBuf>) -> Command {
    let program = program.into();
    match who.netns() {
        Some(ns) => netns_command(ns, program),
        None => Command::new(program),
    }
}

/// `ip netns exec NETNS PROGRAM`: the program replaces `ip`, so signals
/// sent to the child's PID reach it.
pub fn netns_command(netns: &str, program: impl Into<PathBuf>) -> Command {
    assert!(
        std::path::Path::new("/run/netns").join(netns).exists(),
        "network namespace {netns} missing: the test cluster is not up (cargo xtask cluster up)"
    );
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program.into());
    c
}

/// `kubectl` as `who`, in the laptop's network namespace for developers.
pub fn kubectl_cmd(who: As, args: &[&str]) -> Command {
    let kubectl = state_dir().join("bin/kubectl");
    let kubeconfig = who.kubeconfig();
    assert!(
        kubectl.exists(),
        "{} missing: the test cluster is not up (cargo xtask cluster up)",
        kubectl.display()
    );
    let mut cmd = command_as(who, kubectl);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=20s")
        .args(args);
    cmd
}

/// Run with a deadline; the child is killed (by its PID) if it overruns.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    wait_output_bounded(child, &format!("{cmd:?}"), timeout)
}

/// Run with `input` on stdin and a deadline.
pub fn run_bounded_with_input(mut cmd: Command, input: &str, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_owned();
    // A writer thread: a child that does not read cannot block the test.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = wait_output_bounded(child, &format!("{cmd:?}"), timeout);
    let _ = writer.join();
    out
}

/// Collects stdout and stderr on threads (so a chatty child cannot fill a
/// pipe and stall) and waits at most `timeout`, killing the child after.
fn wait_output_bounded(mut child: Child, what: &str, timeout: Duration) -> Output {
    fn drain(r: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!(
                "{what} did not finish within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// kubectl as `who`, whatever its outcome.
pub fn try_kubectl(who: As, args: &[&str]) -> Output {
    run_bounded(kubectl_cmd(who, args), KUBECTL_TIMEOUT)
}

/// kubectl that must succeed; returns stdout.
pub fn kubectl(who: As, args: &[&str]) -> String {
    let out = try_kubectl(who, args);
    assert!(
        out.status.success(),
        "kubectl {} as {} failed: {}",
        args.join(" "),
        who.user(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kubectl that must be refused by authorization.
pub fn kubectl_forbidden(who: As, args: &[&str]) {
    let out = try_kubectl(who, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("forbidden"),
        "kubectl {} as {} should be forbidden; status {}, stderr: {stderr}",
        args.join(" "),
        who.user(),
        out.status
    );
}

/// `kubectl get ... -o json` as the admin, parsed.
pub fn get_json(namespace: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-n", namespace, "get"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let out = kubectl(As::Admin, &full);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("kubectl {}: not JSON ({e}): {out}", full.join(" ")))
}

/// `kubectl apply -f -` of `manifest` (JSON or YAML) as `who`.
pub fn apply(who: As, manifest: &str) {
    let out = run_bounded_with_input(
        kubectl_cmd(who, &["apply", "-f", "-"]),
        manifest,
        KUBECTL_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "kubectl apply as {} failed: {}\nmanifest:\n{manifest}",
        who.user(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits (at most 60 s) until every pod matching `selector` is Ready.
pub fn wait_ready(who: As, namespace: &str, selector: &str) {
    kubectl(
        who,
        &[
            "-n",
            namespace,
            "wait",
            "pod",
            "-l",
            selector,
            "--for=condition=Ready",
            "--timeout=60s",
        ],
    );
}

/// Waits (at most 60 s) until a Deployment has rolled out.
pub fn wait_rollout(namespace: &str, deployment: &str) {
    kubectl(
        As::Admin,
        &[
            "-n",
            namespace,
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            "--timeout=60s",
        ],
    );
}

/// `/probe ARGS` inside a pod (the echo images ship it; they have no shell).
pub fn probe(namespace: &str, pod: &str, args: &[&str]) -> Output {
    let mut full = vec!["-n", namespace, "exec", pod, "--", "/probe"];
    full.extend_from_slice(args);
    run_bounded(kubectl_cmd(As::Admin, &full), Duration::from_secs(30))
}

pub fn probe_ok(namespace: &str, pod: &str, args: &[&str]) -> String {
    let out = probe(namespace, pod, args);
    assert!(
        out.status.success(),
        "/probe {} in {pod} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/probe http TARGET` from `pod`: the answering pod's name, or the error.
pub fn http_probe(namespace: &str, pod: &str, target: &str) -> Result<String, String> {
    let out = probe(namespace, pod, &["http", target]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "/probe http {target} in {pod}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Polls `f` every `interval` until it returns Some, for at most `timeout`;
/// panics naming `what` and the last state `f` reported otherwise.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(interval),
        }
    }
}

/// Run `f` on a thread that has entered the laptop's network namespace
/// (setns affects only the calling thread).
pub fn in_laptop<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e} (is the cluster up?)"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd; only this thread changes namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("laptop thread panicked")
}

/// A namespace of the test's own, deleted (without waiting) when dropped.
pub struct TempNamespace(pub String);

impl TempNamespace {
    /// `PREFIX-PID`, created now.
    pub fn new(prefix: &str) -> Self {
        Self::named(&format!("{prefix}-{}", std::process::id()))
    }

    /// Exactly `name`; one left over by an earlier run is deleted first.
    pub fn named(name: &str) -> Self {
        kubectl(
            As::Admin,
            &[
                "delete",
                "namespace",
                name,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=90s",
            ],
        );
        kubectl(As::Admin, &["create", "namespace", name]);
        TempNamespace(name.to_owned())
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        let _ = run_bounded(
            kubectl_cmd(As::Admin, &["delete", "namespace", &self.0, "--wait=false"]),
            Duration::from_secs(30),
        );
    }
}

/// Pods of the test's own in an existing namespace, deleted when dropped.
pub struct TempPods {
    pub who: As,
    pub namespace: String,
    pub names: Vec<String>,
}

impl Drop for TempPods {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = run_bounded(
                kubectl_cmd(
                    self.who,
                    &["-n", &self.namespace, "delete", "pod", name, "--wait=false"],
                ),
                Duration::from_secs(30),
            );
        }
    }
}

/// Objects (`KIND/NAME`) of the test's own in an existing namespace,
/// deleted (without waiting) when dropped.
pub struct TempObjects {
    pub who: As,
    pub namespace: String,
    pub objects: Vec<String>,
}

impl Drop for TempObjects {
    fn drop(&mut self) {
        if self.objects.is_empty() {
            return;
        }
        let mut args = vec![
            "-n",
            self.namespace.as_str(),
            "delete",
            "--ignore-not-found",
            "--wait=false",
        ];
        args.extend(self.objects.iter().map(String::as_str));
        let _ = run_bounded(kubectl_cmd(self.who, &args), Duration::from_secs(30));
    }
}

/// A pod of `ktb.test/http-echo:dev` labelled `app=APP`, Ready when it listens.
pub fn echo_pod_manifest(name: &str, namespace: &str, app: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"{namespace}","labels":{{"app":"{app}"}}}},
"spec":{{"terminationGracePeriodSeconds":2,"containers":[{{"name":"echo","image":"{HTTP_ECHO_IMAGE}","imagePullPolicy":"Never",
"ports":[{{"containerPort":8080}}],"readinessProbe":{{"tcpSocket":{{"port":8080}},"periodSeconds":1}}}}]}}}}"#
    )
}

/// A Deployment `NAME` of `replicas` http-echo pods labelled `app=NAME`.
pub fn echo_deployment_manifest(name: &str, namespace: &str, replicas: u32) -> String {
    format!(
        r#"{{"apiVersion":"apps/v1","kind":"Deployment","metadata":{{"name":"{name}","namespace":"{namespace}","labels":{{"app":"{name}"}}}},
"spec":{{"replicas":{replicas},"selector":{{"matchLabels":{{"app":"{name}"}}}},
"template":{{"metadata":{{"labels":{{"app":"{name}"}}}},
"spec":{{"terminationGracePeriodSeconds":2,"containers":[{{"name":"echo","image":"{HTTP_ECHO_IMAGE}","imagePullPolicy":"Never",
"ports":[{{"name":"http","containerPort":8080}}],"readinessProbe":{{"tcpSocket":{{"port":8080}},"periodSeconds":1}}}}]}}}}}}}}"#
    )
}

/// A ClusterIP Service `NAME`: `port` → `target_port`, selector `app=APP`.
pub fn service_manifest(
    name: &str,
    namespace: &str,
    app: &str,
    port: u16,
    target_port: u16,
) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{namespace}"}},
"spec":{{"selector":{{"app":"{app}"}},"ports":[{{"name":"http","port":{port},"targetPort":{target_port}}}]}}}}"#
    )
}

/// A file under the target directory these tests were built in (say
/// `release/xtask`), which must exist; `how` says what builds it.
pub fn target_file(relative: &str, how: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test binary lives in <target>/debug/deps");
    let file = target.join(relative);
    assert!(file.is_file(), "{} missing: {how}", file.display());
    file
}

/// A binary of this workspace in the target dir the tests were built into
/// (`target/debug/NAME`, or under `CARGO_TARGET_DIR`): the test executable
/// lives in `<target>/debug/deps/`. Panics naming the build command if the
/// binary is missing.
pub fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    if let Some(profile_dir) = exe.parent().and_then(|deps| deps.parent()) {
        candidates.push(profile_dir.join(name));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join(name));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (looked at {candidates:?}): build it first with \
                 `cargo build -p {package}`"
            )
        })
}

/// A process the test started, with its stdout and stderr collected (and
/// echoed, prefixed, into the test's captured output). Stopped by its PID
/// when dropped: SIGTERM, then SIGKILL if it has not exited in 20 s.
pub struct Spawned {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    output: Arc<Mutex<Captured>>,
    readers: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Captured {
    stdout: String,
    stderr: String,
}

impl Spawned {
    /// Starts `cmd` (stdin closed, stdout and stderr captured).
    pub fn start(label: &str, mut cmd: Command) -> Spawned {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} ({cmd:?}): {e}"));
        let output = Arc::new(Mutex::new(Captured::default()));
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, is_err) in [
            (Box::new(stdout) as Box<dyn Read + Send>, false),
            (Box::new(stderr) as Box<dyn Read + Send>, true),
        ] {
            let output = output.clone();
            let label = label.to_owned();
            readers.push(std::thread::spawn(move || {
                let mut lines = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match lines.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    eprint!(
                        "[{label} {}] {line}{}",
                        if is_err { "err" } else { "out" },
                        if line.ends_with('\n') { "" } else { "\n" }
                    );
                    let mut out = output.lock().unwrap();
                    if is_err {
                        out.stderr.push_str(&line);
                    } else {
                        out.stdout.push_str(&line);
                    }
                }
            }));
        }
        Spawned {
            label: label.to_owned(),
            child,
            status: None,
            output,
            readers,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.output.lock().unwrap().stderr.clone()
    }

    /// What the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.output.lock().unwrap().stdout.clone()
    }

    /// Its exit status if it has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits (at most `timeout`) until stderr contains `needle`. Err with
    /// the reason if the process exited first or the time ran out.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        self.wait_for(Spawned::stderr, "stderr", needle, timeout)
    }

    /// [`Spawned::wait_for_stderr`] for stdout.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        self.wait_for(Spawned::stdout, "stdout", needle, timeout)
    }

    fn wait_for(
        &mut self,
        text: fn(&Spawned) -> String,
        stream: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if text(self).contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status() {
                self.join_readers();
                if text(self).contains(needle) {
                    return Ok(());
                }
                return Err(format!(
                    "{} exited ({status}) before writing {needle:?}; {stream}:\n{}",
                    self.label,
                    text(self)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not write {needle:?} within {timeout:?}; {stream} so far:\n{}",
                    self.label,
                    text(self)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGINT`) to the process, by its PID.
    pub fn signal(&mut self, signal: i32) {
        if self.try_status().is_some() {
            return;
        }
        // SAFETY: kill(2) on the PID of our own child, which has not been
        // reaped yet (try_status above), so the PID cannot have been reused.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}) for {}: {}",
            self.pid(),
            self.label,
            std::io::Error::last_os_error()
        );
    }

    /// Waits at most `timeout` for the process to exit; None if it did not.
    /// Once it has exited, its output has been read to the end.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                self.join_readers();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} survived SIGKILL for 10 s", self.label))
    }

    fn join_readers(&mut self) {
        // The pipes close when the process (and anything it left holding
        // them) exits; bound the wait in case a grandchild keeps them open.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_exit(Duration::from_secs(20)).is_none() {
            eprintln!("{} ignored SIGTERM for 20 s: SIGKILL", self.label);
            self.signal(libc::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(10));
        }
    }
}

/// A TCP port nothing listens on in any of `netns` (asked of the kernel:
/// an ephemeral port bound and released in the first, checked in the rest).
pub fn free_port(netns: &[&str]) -> u16 {
    for _ in 0..20 {
        let port = in_laptop(netns[0], || {
            std::net::TcpListener::bind("[::]:0")
                .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .expect("bind an ephemeral port")
                .local_addr()
                .expect("local_addr")
                .port()
        });
        if netns.iter().all(|ns| port_is_free(ns, port)) {
            return port;
        }
    }
    panic!("no port free in all of {netns:?}");
}

/// Whether `port` can be bound on every address of `netns` (as http-echo
/// binds it).
pub fn port_is_free(netns: &str, port: u16) -> bool {
    in_laptop(netns, move || {
        std::net::TcpListener::bind(("::", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    })
}

/// The http-echo workload (built from `crates/ktb-workloads`) running on a
/// laptop as the developer's local process: it answers `pod_name` on every
/// address of the laptop, port `port`. Ready, and checked to be the one
/// answering on that port, when this returns.
pub fn local_echo(netns: &str, port: u16, pod_name: &str) -> Spawned {
    start_local_echo(netns, port, pod_name, None)
}

/// Like [`local_echo`], as one hop of a chain: every request first GETs
/// `next_hop` (`KTB_ECHO_CALL`) and the answer is `pod_name`'s line
/// followed by the next hop's body (or the reason it failed). Ready once it
/// answers with its own line first, whether or not the next hop answers yet.
pub fn local_echo_calling(netns: &str, port: u16, pod_name: &str, next_hop: &str) -> Spawned {
    start_local_echo(netns, port, pod_name, Some(next_hop))
}

fn start_local_echo(netns: &str, port: u16, pod_name: &str, next_hop: Option<&str>) -> Spawned {
    assert!(
        port_is_free(netns, port),
        "port {port} is already in use in {netns} by a process this test did not start"
    );
    let bin = workspace_bin("http-echo", "ktb-workloads");
    let mut cmd = netns_command(netns, bin);
    cmd.env("PORT", port.to_string()).env("POD_NAME", pod_name);
    if let Some(url) = next_hop {
        cmd.env("KTB_ECHO_CALL", url);
    }
    let answers_as_itself = |body: &str| match next_hop {
        None => body.trim() == pod_name,
        Some(_) => body.lines().next() == Some(pod_name),
    };
    let mut echo = Spawned::start(&format!("http-echo {netns}:{port}"), cmd);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = in_laptop(netns, move || http_body(addr));
        if let Some(status) = echo.try_status() {
            panic!(
                "local http-echo on {netns}:{port} exited ({status}): {}",
                echo.stderr()
            );
        }
        match answer {
            Ok(body) if answers_as_itself(&body) => return echo,
            Ok(body) => {
                panic!("127.0.0.1:{port} in {netns} is answered by {body:?}, not {pod_name}")
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "local http-echo on {netns}:{port} not answering after 10 s ({e}): {}",
                echo.stderr()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `GET /` over HTTP/1.1 with `connection: close`; the body.
fn http_body(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}
