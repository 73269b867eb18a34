//! Building the cluster's components, or reusing them from the cache.
//!
//! Go components come from the modules under `tests/cluster/` (pinned
//! upstream releases) and are cached under `~/.cache/ktb/go/`, keyed by
//! the component version and a hash of the module's files, the Go version
//! and the link flags: a later session or the CI run reuses them, and any
//! change rebuilds. Builds run under `nice -n 10` because the machine's two
//! cores are shared with the Rust builds. Rust workloads and the agent are
//! built by cargo (which has its own cache) for the static musl target and
//! packed into images.

use super::{
    process, Layout, AGENT_IMAGE, COREDNS_IMAGE, COREDNS_VERSION, ETCD_VERSION, GRPC_ECHO_IMAGE,
    HTTP_ECHO_IMAGE, K8S_VERSION, PAUSE_IMAGE, TCP_ECHO_IMAGE, TOXIPROXY_VERSION, UDP_ECHO_IMAGE,
};
use anyhow::{bail, Context, Result};
use ktb_image::Image;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The components of the multi-call Kubernetes binary.
pub const K8S_COMMANDS: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

/// Cached Go binaries.
pub struct GoBinaries {
    pub k8s: PathBuf,
    pub etcd: PathBuf,
    pub coredns: PathBuf,
}

pub fn go_binaries(layout: &Layout) -> Result<GoBinaries> {
    let mut ldflags = String::from("-s -w");
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        let minor = K8S_VERSION.split('.').nth(1).context("K8S_VERSION")?;
        ldflags.push_str(&format!(
            " -X {pkg}.gitVersion={K8S_VERSION} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} \
             -X {pkg}.gitTreeState=clean -X {pkg}.buildDate=1970-01-01T00:00:00Z"
        ));
    }
    Ok(GoBinaries {
        k8s: go_build(layout, "k8s", K8S_VERSION, &ldflags)?,
        etcd: go_build(layout, "etcd", ETCD_VERSION, "-s -w")?,
        coredns: go_build(layout, "coredns", COREDNS_VERSION, "-s -w")?,
    })
}

/// Toxiproxy with one delaying proxy set from flags (`tests/cluster/toxiproxy`).
pub fn toxiproxy(layout: &Layout) -> Result<PathBuf> {
    go_build(layout, "toxiproxy", TOXIPROXY_VERSION, "-s -w")
}

/// Build `tests/cluster/NAME` into the cache unless it is there already.
fn go_build(layout: &Layout, name: &str, version: &str, ldflags: &str) -> Result<PathBuf> {
    let src = layout.workspace.join("tests/cluster").join(name);
    let go_version =
        process::run("go", &["version"]).context("Go is required (go 1.26 on PATH)")?;
    let mut hasher = Sha256::new();
    for part in [name, version, go_version.trim(), ldflags] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    for file in ["go.mod", "go.sum", "main.go"] {
        let path = src.join(file);
        hasher.update(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
        hasher.update([0]);
    }
    let key: String = hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = layout
        .cache
        .join("go")
        .join(format!("{name}-{version}-{key}"));
    let bin = dir.join(name);
    if bin.exists() {
        println!("  {name} {version}: cached ({})", bin.display());
        return Ok(bin);
    }
    println!(
        "  {name} {version}: building into {} (cold: minutes)",
        dir.display()
    );
    let tmp = layout
        .cache
        .join("go")
        .join(format!(".{name}-{version}-{key}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let started = Instant::now();
    let out = Command::new("nice")
        .args([
            "-n",
            "10",
            "go",
            "build",
            "-trimpath",
            "-ldflags",
            ldflags,
            "-o",
        ])
        .arg(tmp.join(name))
        .arg(".")
        .current_dir(&src)
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-buildvcs=false")
        .output()
        .context("running go build")?;
    if !out.status.success() {
        bail!(
            "go build of {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)?;
    println!("  {name} {version}: built in {:.0?}", started.elapsed());
    Ok(bin)
}

/// An image archive to import, or why it could not be built.
pub struct ImageArchive {
    pub reference: &'static str,
    pub archive: Result<PathBuf>,
}

/// Build the Rust binaries and write every image archive into `out`.
pub fn images(layout: &Layout, go: &GoBinaries, out: &Path) -> Result<Vec<ImageArchive>> {
    std::fs::create_dir_all(out)?;
    let workloads = cargo_musl(layout, "ktb-workloads").context(
        "building crates/ktb-workloads for x86_64-unknown-linux-musl \
         (needs: rustup target add x86_64-unknown-linux-musl)",
    )?;
    let w = |bin: &str| workloads.join(bin);
    let tools = || -> Vec<(&'static str, PathBuf)> {
        ["http-echo", "grpc-echo", "tcp-echo", "udp-echo", "probe"]
            .into_iter()
            .map(|b| (b, w(b)))
            .collect()
    };
    let mut images = vec![
        Image {
            reference: PAUSE_IMAGE,
            files: vec![("pause", w("pause"))],
            entrypoint: &["/pause"],
            user: 65532,
        },
        Image {
            reference: COREDNS_IMAGE,
            files: vec![("coredns", go.coredns.clone())],
            entrypoint: &["/coredns"],
            // Binds port 53 inside its pod.
            user: 0,
        },
    ];
    // The echo images share one layer (all tools, `/probe` and
    // `/grpc-echo` included, so any of them can be a test's client pod)
    // and differ in their entrypoint.
    for (reference, entry) in [
        (HTTP_ECHO_IMAGE, &["/http-echo"][..]),
        (GRPC_ECHO_IMAGE, &["/grpc-echo", "serve"]),
        (TCP_ECHO_IMAGE, &["/tcp-echo"]),
        (UDP_ECHO_IMAGE, &["/udp-echo"]),
    ] {
        images.push(Image {
            reference,
            files: tools(),
            entrypoint: entry,
            user: 65532,
        });
    }
    let mut archives = Vec::new();
    for img in &images {
        let path = out.join(archive_name(img.reference));
        ktb_image::write_archive(img, &path)?;
        archives.push(ImageArchive {
            reference: img.reference,
            archive: Ok(path),
        });
    }
    // The agent may not compile while it is being written: report and go on.
    let agent = cargo_musl(layout, "ktb-agent").and_then(|dir| {
        let path = out.join(archive_name(AGENT_IMAGE));
        ktb_image::write_archive(&ktb_image::agent(AGENT_IMAGE, dir.join("ktb-agent")), &path)?;
        Ok(path)
    });
    archives.push(ImageArchive {
        reference: AGENT_IMAGE,
        archive: agent,
    });
    Ok(archives)
}

fn archive_name(reference: &str) -> String {
    format!("{}.tar", reference.replace(['/', ':'], "_"))
}

/// `cargo build --release --target x86_64-unknown-linux-musl -p PACKAGE`;
/// returns the directory holding its binaries.
fn cargo_musl(layout: &Layout, package: &str) -> Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = Command::new("nice")
        .args(["-n", "10"])
        .arg(cargo)
        .args(["build", "--release", "--target", TARGET, "-p", package])
        .current_dir(&layout.workspace)
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        bail!(
            "cargo build -p {package} --target {TARGET} failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    println!(
        "  {package} (musl): built or up to date in {:.0?}",
        started.elapsed()
    );
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| layout.workspace.join("target"));
    Ok(target_dir.join(TARGET).join("release"))
}
