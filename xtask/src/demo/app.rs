//! The demo's sample application, deployed and asked as the cluster admin.
//!
//! Two Services in the developers' namespace, both the workspace's
//! `http-echo`: `frontend` calls `backend` before answering (its
//! `KTB_ECHO_CALL`), so an answer lists every process the request went
//! through, one per line, in order. Requests start inside the cluster: the
//! admin `kubectl exec`s `/probe` (shipped in every workload image) in the
//! frontend pod. Who answered is told by the last line: a `backend-…` pod
//! is the cluster, [`LAPTOP_NAME`] is dev-a's local process.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Interrupted;
use crate::cluster::{Admin, SHARED_NAMESPACE};

pub const BACKEND: &str = "backend";
/// The name dev-a's local backend answers with (its `POD_NAME`).
pub const LAPTOP_NAME: &str = "laptop-a";
/// Every object of the app carries it, so one selector removes them all.
const PART_OF: &str = "app.kubernetes.io/part-of=ktb-demo";
/// How long a request may keep failing before the demo gives up: right
/// after the rollout, CoreDNS and kube-proxy may need a moment.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long pods ktb deleted may take to terminate.
const LEFTOVERS_TIMEOUT: Duration = Duration::from_secs(60);

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: backend, namespace: team-a, labels: {app.kubernetes.io/part-of: ktb-demo}}
spec:
  replicas: 1
  selector: {matchLabels: {app: backend}}
  template:
    metadata: {labels: {app: backend}}
    spec:
      containers:
      - {name: echo, image: "ktb.test/http-echo:dev", imagePullPolicy: Never, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: team-a, labels: {app.kubernetes.io/part-of: ktb-demo}}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: frontend, namespace: team-a, labels: {app.kubernetes.io/part-of: ktb-demo}}
spec:
  replicas: 1
  selector: {matchLabels: {app: frontend}}
  template:
    metadata: {labels: {app: frontend}}
    spec:
      containers:
      - name: echo
        image: "ktb.test/http-echo:dev"
        imagePullPolicy: Never
        ports: [{containerPort: 8080}]
        env: [{name: KTB_ECHO_CALL, value: "http://backend.team-a.svc.cluster.local/"}]
---
apiVersion: v1
kind: Service
metadata: {name: frontend, namespace: team-a, labels: {app.kubernetes.io/part-of: ktb-demo}}
spec:
  selector: {app: frontend}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// Who answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A `backend-…` pod of the cluster.
    Cluster,
    /// dev-a's local process on laptop-a.
    Laptop,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Answer::Cluster => "cluster",
            Answer::Laptop => "laptop",
        })
    }
}

pub struct App {
    admin: Admin,
    /// Set on Ctrl-C: a request failing then is not retried.
    interrupted: Interrupted,
}

impl App {
    pub fn new(admin: Admin, interrupted: Interrupted) -> App {
        App { admin, interrupted }
    }

    /// A fresh copy of the app, rolled out.
    pub fn deploy(&self) -> anyhow::Result<()> {
        self.remove()?;
        self.admin.apply(MANIFEST)?;
        for deployment in ["backend", "frontend"] {
            self.admin.rollout(SHARED_NAMESPACE, deployment)?;
        }
        Ok(())
    }

    pub fn remove(&self) -> anyhow::Result<()> {
        self.admin
            .kubectl(&[
                "-n",
                SHARED_NAMESPACE,
                "delete",
                "deployments,services",
                "-l",
                PART_OF,
                "--ignore-not-found",
                // Their pods go too before this returns.
                "--cascade=foreground",
                "--wait=true",
                "--timeout=60s",
            ])
            .map(drop)
    }

    /// `GET http://frontend/`, which calls backend: who answered at the
    /// end of the chain, and the whole path.
    pub fn ask_frontend(&self) -> anyhow::Result<(Answer, String)> {
        println!("   $ kubectl exec deploy/frontend -- /probe http frontend");
        let body = self.ask(&["http", "frontend.team-a:80"])?;
        let hops: Vec<&str> = body.lines().collect();
        Ok((who(hops.last().copied())?, hops.join(" → ")))
    }

    /// Two requests to backend on one connection: the first carrying
    /// `mark`, the second none.
    pub fn ask_backend_marked(&self, mark: (&str, &str)) -> anyhow::Result<[(Answer, String); 2]> {
        let header = format!("{}: {}", mark.0, mark.1);
        println!(
            "   $ kubectl exec deploy/frontend -- /probe requests backend '{header}' -   (marked, then unmarked)"
        );
        let body = self.ask(&["requests", "backend.team-a:80", &header, "-"])?;
        let mut lines = body.lines();
        let mut next = |what: &str| -> anyhow::Result<(Answer, String)> {
            let line = lines.next();
            Ok((who(line)?, format!("{what}: {}", line.unwrap_or_default())))
        };
        Ok([next("marked")?, next("unmarked")?])
    }

    /// Nothing ktb creates or marks is left in the namespace.
    pub fn assert_nothing_of_ktb_left(&self) -> anyhow::Result<()> {
        self.wait_no_ktb_objects()?;
        for service in ["backend", "frontend"] {
            let annotations = self.admin.kubectl(&[
                "-n",
                SHARED_NAMESPACE,
                "get",
                "service",
                service,
                "-o",
                "jsonpath={.metadata.annotations}",
            ])?;
            anyhow::ensure!(
                !annotations.contains("ktb.dev/"),
                "Service {service} still carries ktb's annotations: {annotations}"
            );
        }
        Ok(())
    }

    /// Waits until no object ktb created is left in the namespace, once
    /// the pods ktb deleted on its way out have finished terminating.
    pub fn wait_no_ktb_objects(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + LEFTOVERS_TIMEOUT;
        loop {
            let left = self.admin.kubectl(&[
                "-n",
                SHARED_NAMESPACE,
                "get",
                "pods,services,leases,serviceaccounts,roles,rolebindings",
                "-l",
                "app.kubernetes.io/managed-by=ktb",
                "-o",
                "name",
            ])?;
            if left.trim().is_empty() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "ktb left behind, {LEFTOVERS_TIMEOUT:?} after it ended: {left}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }

    /// `/probe ARGS` in the frontend pod, retried while it fails.
    fn ask(&self, probe: &[&str]) -> anyhow::Result<String> {
        let mut args = vec![
            "-n",
            SHARED_NAMESPACE,
            "exec",
            "deploy/frontend",
            "-c",
            "echo",
            "--",
            "/probe",
        ];
        args.extend_from_slice(probe);
        let deadline = Instant::now() + ASK_TIMEOUT;
        loop {
            match self.admin.kubectl(&args) {
                Ok(body) => return Ok(body),
                Err(e) if self.interrupted.load(Ordering::SeqCst) => return Err(e),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("no answer within {ASK_TIMEOUT:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// Who a line of an answer names.
fn who(line: Option<&str>) -> anyhow::Result<Answer> {
    match line.map(str::trim) {
        Some(LAPTOP_NAME) => Ok(Answer::Laptop),
        Some(pod) if pod.starts_with("backend-") => Ok(Answer::Cluster),
        other => anyhow::bail!("an answer from neither backend nor laptop-a: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hop_tells_who_answered() {
        assert_eq!(who(Some("backend-5f9c-x2")).unwrap(), Answer::Cluster);
        assert_eq!(who(Some("laptop-a")).unwrap(), Answer::Laptop);
        assert!(who(Some("frontend-1")).is_err());
        assert!(who(None).is_err());
    }
}
