//! `cluster up`, `down` and `status`: the order in which things are built,
//! started, waited for, stopped and undone.
//!
//! Ordering matters on this machine: the laptops' network namespaces exist
//! before containerd and the kubelet start (and go after they stop); the
//! controller-manager starts only once the apiserver is ready; containers
//! are killed before containerd, and mounts are undone before any
//! directory is removed. Every wait is bounded.

use super::{
    build, config, net, pki, process, snapshot, Layout, APISERVER_PORT, CLUSTER_DOMAIN,
    COREDNS_VERSION, DEV_B_NAMESPACE, DNS_IP, ETCD_VERSION, K8S_VERSION, LAPTOPS, NODE_BRIDGE,
    NODE_IP, NODE_NAME, SERVICE_CIDR, SHARED_NAMESPACE,
};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Daemons in start order; `down` stops them in reverse, except that the
/// containers go before containerd (see [`down`]).
const DAEMONS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

fn require_root() -> Result<()> {
    let uid = process::run("id", &["-u"])?;
    if uid.trim() != "0" {
        bail!("the test cluster needs root (network namespaces, mounts, nftables)");
    }
    Ok(())
}

/// Debian packages (and tools) `up` relies on.
fn check_tools() -> Result<()> {
    let needed = [
        ("containerd", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("iptables", "iptables"),
        ("nft", "nftables"),
        ("conntrack", "conntrack"),
        ("openssl", "openssl"),
        ("ip", "iproute2"),
        ("setsid", "util-linux"),
        ("go", "Go 1.26 (https://go.dev/dl)"),
    ];
    let mut missing = Vec::new();
    for (tool, package) in needed {
        if !process::on_path(tool) {
            missing.push(format!("{tool} (from {package})"));
        }
    }
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists() {
            missing.push(format!(
                "/usr/lib/cni/{plugin} (from containernetworking-plugins)"
            ));
        }
    }
    if !missing.is_empty() {
        bail!(
            "the test cluster cannot start, missing: {} (apt-get install containerd runc containernetworking-plugins iptables nftables conntrack openssl iproute2 util-linux)",
            missing.join(", ")
        );
    }
    let cgroups = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let enabled = |controller: &str| {
        cgroups.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.first() == Some(&controller) && fields.last() == Some(&"1")
        })
    };
    if !["cpu", "memory", "pids"].into_iter().all(enabled) {
        bail!(
            "the test cluster cannot start: the kubelet needs the cpu, memory and pids cgroup controllers, \
             and /proc/cgroups does not list them all as enabled (a container without its own cgroups? \
             run it privileged, or on a VM)"
        );
    }
    Ok(())
}

fn snapshot_path(layout: &Layout) -> PathBuf {
    layout.state.join("snapshot-before-up.json")
}

fn marker(layout: &Layout) -> PathBuf {
    layout.state.join("cluster-up")
}

/// Every daemon of a completed `up` is alive and the apiserver answers.
pub fn is_up(layout: &Layout) -> Result<bool> {
    let daemons = process::recorded(&layout.state)?;
    let all_alive = marker(layout).exists()
        && DAEMONS
            .iter()
            .all(|name| daemons.iter().any(|d| d.name == *name && process::alive(d)));
    Ok(all_alive && apiserver_ready(layout))
}

pub fn up(layout: &Layout) -> Result<()> {
    require_root()?;
    check_tools()?;
    let started = Instant::now();
    if snapshot_path(layout).exists() {
        if is_up(layout)? {
            println!("The test cluster is already up.");
            print_usage(layout);
            return Ok(());
        }
        println!(
            "A previous cluster is partly running or was not torn down: running `down` first."
        );
        down(layout)?;
    }

    println!("Building components (cache: {}):", layout.cache.display());
    let go = build::go_binaries(layout)?;
    let images_dir = layout.run().join("images");
    // Old logs go; a fresh run dir must not hold anything of a previous cluster.
    for dir in [layout.logs(), layout.run()] {
        if dir.exists() {
            remove_tree(&dir)?;
        }
    }
    let images = build::images(layout, &go, &images_dir)?;
    let build_time = started.elapsed();

    std::fs::create_dir_all(&layout.state)?;
    let before = snapshot::take()?;
    snapshot::save(&before, &snapshot_path(layout))?;
    if let Err(e) = start(layout, &go, &images) {
        eprintln!(
            "cluster up failed: {e:#}\nLogs: {}\nTearing down what was started.",
            layout.logs().display()
        );
        if let Err(down_err) = down(layout) {
            eprintln!("and tearing down failed too: {down_err:#}");
        }
        return Err(e);
    }
    std::fs::write(marker(layout), "")?;
    println!(
        "Cluster up in {:.1?} (building/checking components {:.1?}, starting {:.1?}).",
        started.elapsed(),
        build_time,
        started.elapsed() - build_time
    );
    print_usage(layout);
    Ok(())
}

fn start(layout: &Layout, go: &build::GoBinaries, images: &[build::ImageArchive]) -> Result<()> {
    let bin = layout.bin();
    std::fs::create_dir_all(&bin)?;
    for cmd in build::K8S_COMMANDS {
        symlink(&go.k8s, &bin.join(cmd))?;
    }
    symlink(&go.etcd, &bin.join("etcd"))?;
    symlink(&go.coredns, &bin.join("coredns"))?;
    for dir in ["kubelet", "etcd", "pod-logs", "volume-plugins"] {
        std::fs::create_dir_all(layout.run().join(dir))?;
    }

    println!("Certificates and configuration...");
    pki::generate(layout)?;
    let files = config::render(layout)?;
    let args = config::args(layout, &files);

    println!("Node network {NODE_BRIDGE} {NODE_IP}, laptops, guard rules...");
    net::create_node_network()?;
    net::create_laptops()?;
    net::install_guard()?;
    net::set_sysctls()?;
    // Host -> Service traffic must never follow the default route to the
    // uplink, even before kube-proxy has written its rules.
    process::run(
        "ip",
        &[
            "route",
            "add",
            SERVICE_CIDR,
            "dev",
            NODE_BRIDGE,
            "src",
            NODE_IP,
        ],
    )?;

    let logs = layout.logs();
    let t = Instant::now();
    let spawn = |name: &str, program: PathBuf, args: &[String]| -> Result<()> {
        process::spawn(&layout.state, &logs, name, &program, args).map(|_| ())
    };
    println!("Starting etcd, kube-apiserver...");
    spawn("etcd", bin.join("etcd"), &args.etcd)?;
    wait_for(layout, "etcd health", Duration::from_secs(30), etcd_healthy)?;
    spawn(
        "kube-apiserver",
        bin.join("kube-apiserver"),
        &args.apiserver,
    )?;
    wait_apiserver_ready(layout)?;

    println!("Starting containerd, importing images...");
    spawn("containerd", "containerd".into(), &args.containerd)?;
    let sock = layout.containerd_socket();
    wait_for(layout, "containerd socket", Duration::from_secs(30), || {
        process::run("ctr", &["--address", &sock.to_string_lossy(), "version"]).is_ok()
    })?;
    import_images(layout, images)?;

    println!("Starting kube-controller-manager, kube-scheduler, kubelet, kube-proxy...");
    spawn(
        "kube-controller-manager",
        bin.join("kube-controller-manager"),
        &args.controller_manager,
    )?;
    spawn(
        "kube-scheduler",
        bin.join("kube-scheduler"),
        &args.scheduler,
    )?;
    spawn("kubelet", bin.join("kubelet"), &args.kubelet)?;
    spawn("kube-proxy", bin.join("kube-proxy"), &args.kube_proxy)?;

    let kubectl = |a: &[&str]| -> Result<String> {
        let kc = layout.kubeconfig("admin");
        let mut full = vec!["--kubeconfig", kc.to_str().context("path")?];
        full.extend_from_slice(a);
        process::run(&layout.kubectl().to_string_lossy(), &full)
    };
    wait_for(layout, "node Ready", Duration::from_secs(120), || {
        kubectl(&[
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .map(|s| s.trim() == "True")
        .unwrap_or(false)
    })?;
    println!(
        "  node Ready {:.1?} after the first process started",
        t.elapsed()
    );
    let addons = files.addons.to_string_lossy().into_owned();
    // RBAC bootstrap policy may still be settling: retry briefly.
    wait_for(layout, "add-ons applied", Duration::from_secs(30), || {
        kubectl(&["apply", "--server-side", "-f", &addons]).is_ok()
    })?;
    for ns in ["default", SHARED_NAMESPACE, DEV_B_NAMESPACE] {
        wait_for(
            layout,
            &format!("ServiceAccount {ns}/default"),
            Duration::from_secs(60),
            || kubectl(&["-n", ns, "get", "serviceaccount", "default"]).is_ok(),
        )?;
    }
    wait_for(layout, "CoreDNS answers", Duration::from_secs(120), || {
        dns_answers(&format!("kubernetes.default.svc.{CLUSTER_DOMAIN}"))
    })?;
    println!(
        "  CoreDNS answers {:.1?} after the first process started",
        t.elapsed()
    );
    Ok(())
}

/// Stops the kube-apiserver this tooling started and starts it again with
/// the command line it ran with; returns once it answers `/readyz` again.
pub fn restart_apiserver(layout: &Layout) -> Result<()> {
    const NAME: &str = "kube-apiserver";
    let daemon = process::recorded(&layout.state)?
        .into_iter()
        .find(|d| d.name == NAME && process::alive(d))
        .context("kube-apiserver is not running: `cargo xtask cluster up` first")?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemon.pid))
        .with_context(|| format!("reading the command line of {NAME} (pid {})", daemon.pid))?;
    let mut words = cmdline
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned());
    let program = PathBuf::from(
        words
            .next()
            .context("kube-apiserver has an empty command line")?,
    );
    let args: Vec<String> = words.collect();
    let t = Instant::now();
    println!("Stopping {NAME} (pid {})...", daemon.pid);
    process::stop(&layout.state, &daemon, Duration::from_secs(15))?;
    process::spawn(&layout.state, &layout.logs(), NAME, &program, &args)?;
    wait_apiserver_ready(layout)?;
    println!(
        "  {NAME} ready again {:.1?} after it was stopped",
        t.elapsed()
    );
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link)?;
    }
    std::os::unix::fs::symlink(target, link)?;
    Ok(())
}

/// Poll `ready` every 250 ms for at most `timeout`, failing at once (with
/// the end of its log) if a daemon started so far has exited.
fn wait_for(
    layout: &Layout,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(dead) = process::recorded(&layout.state)?
            .into_iter()
            .find(|d| !process::alive(d))
        {
            let log = layout.logs().join(format!("{}.log", dead.name));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            bail!(
                "{} (pid {}) exited while waiting for {what}; end of {}:\n{}",
                dead.name,
                dead.pid,
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn etcd_healthy() -> bool {
    let get = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(
            &"127.0.0.1:2379".parse().expect("addr"),
            Duration::from_secs(1),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    get()
        .map(|r| r.contains("\"health\":\"true\""))
        .unwrap_or(false)
}

fn wait_apiserver_ready(layout: &Layout) -> Result<()> {
    wait_for(
        layout,
        "kube-apiserver /readyz",
        Duration::from_secs(90),
        || apiserver_ready(layout),
    )
}

fn apiserver_ready(layout: &Layout) -> bool {
    let kc = layout.kubeconfig("admin");
    process::run(
        &layout.kubectl().to_string_lossy(),
        &[
            "--kubeconfig",
            &kc.to_string_lossy(),
            "--request-timeout=2s",
            "get",
            "--raw=/readyz",
        ],
    )
    .map(|s| s.trim() == "ok")
    .unwrap_or(false)
}

/// One A query to the cluster DNS Service; true on NOERROR with an answer.
fn dns_answers(name: &str) -> bool {
    let query = || -> std::io::Result<bool> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut q = vec![0x4b, 0x54, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        sock.send_to(&q, (DNS_IP, 53))?;
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf)?;
        Ok(n >= 12
            && buf[..2] == q[..2]
            && buf[3] & 0x0f == 0
            && u16::from_be_bytes([buf[6], buf[7]]) > 0)
    };
    query().unwrap_or(false)
}

fn print_usage(layout: &Layout) {
    let state = layout.state.display();
    println!(
        "\nKubernetes {K8S_VERSION} (etcd {ETCD_VERSION}, CoreDNS {COREDNS_VERSION}), node {NODE_NAME} at {NODE_IP}, \
         apiserver https://{NODE_IP}:{APISERVER_PORT}\n\
         State and logs: {state}\n\n\
         As the admin, on this machine:\n    eval \"$(cargo xtask cluster env admin)\"; kubectl get pods -A\n"
    );
    for l in &LAPTOPS {
        println!(
            "As {user} on {netns} (namespace {ns}):\n    eval \"$(cargo xtask cluster env {user})\"; \
             ip netns exec {netns} kubectl get pods\n",
            user = l.user,
            netns = l.netns,
            ns = l.namespace
        );
    }
    println!(
        "End-to-end tests: cargo test -p ktb-tests --test cluster -- --include-ignored\n\
         Stop and restore the machine: cargo xtask cluster down"
    );
}

pub fn status(layout: &Layout) -> Result<()> {
    let daemons = process::recorded(&layout.state)?;
    if daemons.is_empty() {
        println!(
            "The test cluster is down (no daemons recorded in {}).",
            layout.state.display()
        );
        return Ok(());
    }
    let (mut rss, mut pss) = (0, 0);
    println!(
        "{:<24} {:<12} {:<8} {:>8} {:>8}",
        "", "", "", "RSS MiB", "PSS MiB"
    );
    for d in &daemons {
        let alive = process::alive(d);
        let (r, p) = if alive {
            process::memory_kib(d.pid)
        } else {
            (0, 0)
        };
        rss += r;
        pss += p;
        println!(
            "{:<24} pid {:<8} {:<8} {:>8} {:>8}",
            d.name,
            d.pid,
            if alive { "running" } else { "DEAD" },
            r / 1024,
            p / 1024
        );
    }
    let others = workload_pids(layout);
    let (r, p) = others
        .iter()
        .map(|pid| process::memory_kib(*pid))
        .fold((0, 0), |(a, b), (r, p)| (a + r, b + p));
    rss += r;
    pss += p;
    println!(
        "{:<24} {:<21} {:>8} {:>8}",
        "containers and shims",
        format!("{} processes", others.len()),
        r / 1024,
        p / 1024
    );
    println!(
        "{:<24} {:<21} {:>8} {:>8}",
        "total",
        "",
        rss / 1024,
        pss / 1024
    );
    if apiserver_ready(layout) {
        let kc = layout.kubeconfig("admin");
        let out = process::run(
            &layout.kubectl().to_string_lossy(),
            &[
                "--kubeconfig",
                &kc.to_string_lossy(),
                "get",
                "nodes,pods",
                "-A",
                "-o",
                "wide",
            ],
        )?;
        print!("\n{out}");
    } else {
        println!("\nThe apiserver is not ready.");
    }
    Ok(())
}

/// Containers (every process in the kubelet's `kubepods` cgroups) and the
/// containerd shims started for our containerd.
fn workload_pids(layout: &Layout) -> Vec<u32> {
    let mut pids = std::collections::BTreeSet::new();
    for h in snapshot::hierarchies() {
        collect_cgroup_pids(&Path::new(&h).join("kubepods"), &mut pids);
    }
    pids.extend(process::pids_with_arg(
        &layout.containerd_socket().to_string_lossy(),
    ));
    pids.into_iter().collect()
}

fn collect_cgroup_pids(dir: &Path, pids: &mut std::collections::BTreeSet<u32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_cgroup_pids(&e.path(), pids);
            }
        }
    }
}

pub fn down(layout: &Layout) -> Result<()> {
    require_root()?;
    let before = match snapshot::load(&snapshot_path(layout)) {
        Ok(s) => s,
        Err(_) if process::recorded(&layout.state)?.is_empty() => {
            println!(
                "The test cluster is not up (no snapshot in {}).",
                layout.state.display()
            );
            return Ok(());
        }
        Err(e) => {
            return Err(e).context("daemons are recorded but the pre-`up` snapshot is unreadable")
        }
    };
    let _ = std::fs::remove_file(marker(layout));
    let mut problems = Vec::new();
    let daemons = process::recorded(&layout.state)?;
    let stop = |name: &str, problems: &mut Vec<String>| {
        for d in daemons.iter().filter(|d| d.name == name) {
            println!("Stopping {name} (pid {})", d.pid);
            if let Err(e) = process::stop(&layout.state, d, Duration::from_secs(15)) {
                problems.push(format!("{e:#}"));
            }
        }
    };
    for name in [
        "kube-proxy",
        "kube-scheduler",
        "kube-controller-manager",
        "kubelet",
    ] {
        stop(name, &mut problems);
    }
    // Containers and shims: started by our containerd, found through our
    // kubepods cgroups and our containerd's socket path.
    let workloads = workload_pids(layout);
    if !workloads.is_empty() {
        println!("Killing {} container and shim processes", workloads.len());
    }
    for pid in workloads {
        if let Err(e) = process::kill_started_by_us(pid) {
            problems.push(format!("{e:#}"));
        }
    }
    for name in ["containerd", "kube-apiserver", "etcd"] {
        stop(name, &mut problems);
    }
    for d in process::recorded(&layout.state)? {
        stop(&d.name, &mut problems);
    }

    println!("Restoring the machine...");
    for l in &LAPTOPS {
        if Path::new("/run/netns").join(l.netns).exists() {
            if let Err(e) = process::run("ip", &["netns", "del", l.netns]) {
                problems.push(format!("{e:#}"));
            }
        }
    }
    unmount_new(layout, &before, &mut problems);
    let now = snapshot::take()?;
    // Only what the cluster names its interfaces (ours: ktb*, CNI's pod
    // veths: veth*); anything else new is someone else's and only reported.
    for link in snapshot::added(&before, &now, "interface") {
        if link.starts_with("ktb") || link.starts_with("veth") {
            // Deleting one end of a veth pair removes the other: ignore "not found".
            let _ = process::run("ip", &["link", "del", &link]);
        }
    }
    // Tables the cluster creates: iptables-nft's (kubelet, kube-proxy,
    // portmap), kube-proxy's own and the guard.
    const CLUSTER_TABLES: &[&str] = &[
        "filter",
        "nat",
        "mangle",
        "raw",
        "kube-proxy",
        net::GUARD_TABLE,
    ];
    for table in snapshot::added(&before, &now, "nft-table") {
        if !CLUSTER_TABLES
            .iter()
            .any(|t| table.split_whitespace().nth(1) == Some(*t))
        {
            continue;
        }
        let mut args = vec!["delete", "table"];
        args.extend(table.split_whitespace());
        if let Err(e) = process::run("nft", &args) {
            problems.push(format!("{e:#}"));
        }
    }
    for entry in before.get("sysctl").into_iter().flatten() {
        if let Some((key, value)) = entry.split_once('=') {
            if snapshot::read_sysctl(key).as_deref() != Some(value) {
                if let Err(e) = snapshot::write_sysctl(key, value) {
                    problems.push(format!("restoring {key}={value}: {e:#}"));
                }
            }
        }
    }
    for cgroup in snapshot::added(&before, &now, "cgroup") {
        // The kubelet's (cgroupfs driver): kubepods and its children.
        if !Path::new(&cgroup).ends_with("kubepods") {
            continue;
        }
        if let Err(e) = remove_cgroup(Path::new(&cgroup)) {
            problems.push(format!("removing cgroup {cgroup}: {e:#}"));
        }
    }
    let mut new_paths: Vec<String> = snapshot::added(&before, &now, "path");
    new_paths.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in new_paths {
        if let Err(e) = remove_tree(Path::new(&path)) {
            problems.push(format!("{e:#}"));
        }
    }
    for dir in ["run", "bin", "pki", "kubeconfig", "config"] {
        let p = layout.state.join(dir);
        if p.exists() {
            if let Err(e) = remove_tree(&p) {
                problems.push(format!("{e:#}"));
            }
        }
    }

    let after = snapshot::take()?;
    let mut leftovers = snapshot::diff(&before, &after);
    let me = std::process::id();
    for pid in process::pids_with_arg(&layout.state.to_string_lossy()) {
        if pid != me {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            leftovers.push(format!(
                "+ process: {pid} {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    leftovers.extend(problems.into_iter().map(|p| format!("! {p}")));
    let report = layout.state.join("down-leftovers.txt");
    if leftovers.is_empty() {
        let _ = std::fs::remove_file(&report);
        std::fs::remove_file(snapshot_path(layout))?;
        println!(
            "The test cluster is down; the machine is as `up` found it (logs kept in {}).",
            layout.logs().display()
        );
        Ok(())
    } else {
        std::fs::write(&report, leftovers.join("\n") + "\n")?;
        bail!(
            "`down` could not restore the machine; differences from before `up` (also in {}):\n{}",
            report.display(),
            leftovers.join("\n")
        )
    }
}

/// Unmount every mount point that was not there before `up` and lies in
/// the state dir or a path the components write to, deepest first, in a
/// few passes (stacked and propagated mounts reappear one level up).
/// Other new mounts are not ours: the final comparison reports them.
fn unmount_new(layout: &Layout, before: &snapshot::Snapshot, problems: &mut Vec<String>) {
    let old = before.get("mount").cloned().unwrap_or_default();
    let ours = |m: &str| {
        let m = Path::new(m);
        m.starts_with(&layout.state) || snapshot::WATCHED_PATHS.iter().any(|p| m.starts_with(p))
    };
    for pass in 0..5 {
        let Ok(now) = snapshot::mount_points() else {
            return;
        };
        let mut new: Vec<&String> = now.difference(&old).filter(|m| ours(m)).collect();
        if new.is_empty() {
            return;
        }
        new.sort_by_key(|m| std::cmp::Reverse(m.matches('/').count()));
        for m in new {
            if process::run("umount", &[m]).is_err() {
                if let Err(e) = process::run("umount", &["-l", m]) {
                    if pass == 4 {
                        problems.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
}

/// `rm -rf`, refusing to descend into a tree that still holds a mount point
/// (that would delete whatever is mounted there).
fn remove_tree(path: &Path) -> Result<()> {
    let prefix = format!("{}/", path.display());
    if let Some(m) = snapshot::mount_points()?
        .into_iter()
        .find(|m| m == &path.to_string_lossy() || m.starts_with(&prefix))
    {
        bail!("not removing {}: {m} is still mounted", path.display());
    }
    match path.symlink_metadata() {
        Ok(md) if md.is_dir() => {
            std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(_) => Ok(()),
    }
}

/// cgroup directories are removed with rmdir, children first.
fn remove_cgroup(dir: &Path) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Loads image archives into the cluster's containerd; an image that could
/// not be built is reported and skipped.
fn import_images(layout: &Layout, images: &[build::ImageArchive]) -> Result<()> {
    let sock = layout.containerd_socket();
    for image in images {
        match &image.archive {
            Ok(path) => {
                process::run(
                    "ctr",
                    &[
                        "--address",
                        &sock.to_string_lossy(),
                        "-n",
                        "k8s.io",
                        "images",
                        "import",
                        &path.to_string_lossy(),
                    ],
                )
                .with_context(|| format!("importing {}", image.reference))?;
                println!("  {}: imported", image.reference);
            }
            Err(e) => println!(
                "  {}: NOT AVAILABLE, the rest of the cluster works without it:\n{}",
                image.reference,
                indent(&format!("{e:#}"))
            ),
        }
    }
    Ok(())
}

/// Rebuilds the images made from the workspace (agent, workloads) and
/// imports them into the running cluster, so a changed agent can be tried
/// without restarting the cluster. New pods get the new images.
pub fn reload_images(layout: &Layout) -> Result<()> {
    require_root()?;
    if !apiserver_ready(layout) {
        bail!("the test cluster is not up: run `cargo xtask cluster up`");
    }
    let go = build::go_binaries(layout)?;
    let images = build::images(layout, &go, &layout.run().join("images"))?;
    import_images(layout, &images)
}
