//! The cluster admin's kubectl, for the tools that set the stage on a
//! running test cluster (benchmarks, the demo): they deploy workloads and
//! read objects as `admin`, while ktb itself runs as a developer.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

/// `kubectl` with the admin's kubeconfig.
#[derive(Clone)]
pub struct Admin {
    pub kubectl: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Admin {
    /// The running test cluster's admin, or an error saying how to start it.
    pub fn find() -> anyhow::Result<Admin> {
        let state = PathBuf::from(
            std::env::var("KTB_CLUSTER_DIR").unwrap_or_else(|_| "/var/lib/ktb-cluster".into()),
        );
        let admin = Admin {
            kubectl: state.join("bin/kubectl"),
            kubeconfig: state.join("kubeconfig/admin.yaml"),
        };
        admin
            .kubectl(&["get", "--raw", "/readyz"])
            .context("the test cluster is not up: run `cargo xtask cluster up` first")?;
        Ok(admin)
    }

    /// A kubectl command to spawn (a port-forward, a watch).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.kubectl);
        command.env("KUBECONFIG", &self.kubeconfig).args(args);
        command
    }

    /// Runs kubectl to completion: its stdout, or its stderr as the error.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn apply(&self, manifest: &str) -> anyhow::Result<()> {
        let path = std::env::temp_dir().join(format!("ktb-xtask-{}.yaml", std::process::id()));
        std::fs::write(&path, manifest)?;
        let result = self
            .kubectl(&["apply", "-f", &path.to_string_lossy()])
            .map(drop);
        let _ = std::fs::remove_file(path);
        result
    }

    /// Deletes `namespace` and waits until it is gone: one left terminating
    /// by a bench before (they run back to back) would refuse new pods.
    pub fn remove_namespace(&self, namespace: &str) -> anyhow::Result<()> {
        self.kubectl(&[
            "delete",
            "namespace",
            namespace,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ])
        .map(drop)
        .with_context(|| format!("namespace {namespace} of an earlier run is still terminating"))
    }

    /// Applies `manifest` in a fresh `namespace` and waits until its
    /// Deployment `deployment` has rolled out.
    pub fn deploy(&self, namespace: &str, manifest: &str, deployment: &str) -> anyhow::Result<()> {
        self.remove_namespace(namespace)?;
        self.apply(manifest)?;
        self.rollout(namespace, deployment)
    }

    /// Waits (bounded) until Deployment `deployment` has rolled out.
    pub fn rollout(&self, namespace: &str, deployment: &str) -> anyhow::Result<()> {
        self.kubectl(&[
            "-n",
            namespace,
            "rollout",
            "status",
            "deployment",
            deployment,
            "--timeout=90s",
        ])
        .map(drop)
    }
}
