//! kt-connect's data path on the project's cluster, the row `bench
//! exchange` compares ktb with: a shadow pod running Debian's sshd,
//! `kubectl port-forward` to it, and `ssh -R` from this machine, so that
//! connections to the pod's port [`PORT`] reach a local server. This is
//! what `ktctl exchange` sets up.
//!
//! The pod runs this machine's own sshd (Debian's openssh-server, installed
//! by [`paths::ensure_sshd`]) as root, like kt-connect's shadow pod. The
//! node is this machine, so `/usr` and its libraries are mounted from it
//! read-only, and its configuration and throwaway keys come from the
//! bench's scratch directory. The pod's image is only a root filesystem to
//! mount them in. `GatewayPorts` lets the forward listen on the pod's IP.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use super::paths::{self, Process, SshKeys};
use super::wait_until_listening;
use crate::cluster::Admin;

/// The port callers reach on the pod (the forwarded one).
pub(super) const PORT: u16 = 9000;
const POD: &str = "kt-connect-sshd";
const SSHD_PORT: u16 = 2222;

/// The running path; dropping it stops ssh and the port-forward (the pod
/// goes with the bench's namespace).
pub(super) struct KtConnectPath {
    /// Where callers connect: the pod's IP, port [`PORT`].
    pub(super) entry: SocketAddr,
    _ssh: Process,
    _port_forward: Process,
}

impl KtConnectPath {
    /// Starts the sshd pod in `namespace` and forwards its port [`PORT`] to
    /// `local` on this machine.
    pub(super) async fn start(
        cluster: &Admin,
        namespace: &str,
        scratch: &Path,
        local: SocketAddr,
    ) -> anyhow::Result<KtConnectPath> {
        paths::ensure_sshd()?;
        let etc = scratch.join("kt-connect-etc");
        let privsep = scratch.join("kt-connect-run-sshd");
        fs::create_dir_all(etc.join("ssh"))?;
        fs::create_dir_all(&privsep)?;
        let keys = SshKeys::generate(&etc.join("ssh"))?;
        write_pod_etc(&etc)?;
        cluster.apply(&pod_manifest(namespace, &etc, &privsep))?;
        cluster
            .kubectl(&[
                "-n",
                namespace,
                "wait",
                "--for=condition=Ready",
                &format!("pod/{POD}"),
                "--timeout=90s",
            ])
            .context("the sshd pod did not become ready")?;
        let pod_ip = cluster.kubectl(&[
            "-n",
            namespace,
            "get",
            "pod",
            POD,
            "-o",
            "jsonpath={.status.podIP}",
        ])?;

        let (port_forward, forwarded) = paths::port_forward(
            cluster,
            namespace,
            POD,
            SSHD_PORT,
            &scratch.join("kt-connect-port-forward.log"),
        )
        .await?;
        let ssh = Process::spawn(
            &mut paths::ssh_remote_forward(
                &keys.client,
                forwarded.port(),
                &format!("0.0.0.0:{PORT}:{local}"),
                "root",
            ),
            &scratch.join("kt-connect-ssh.log"),
        )?;
        let entry: SocketAddr = format!("{pod_ip}:{PORT}")
            .parse()
            .with_context(|| format!("the sshd pod's IP {pod_ip:?}"))?;
        wait_until_listening(entry, "ssh -R on the sshd pod")
            .await
            .with_context(|| {
                fs::read_to_string(scratch.join("kt-connect-ssh.log")).unwrap_or_default()
            })?;
        Ok(KtConnectPath {
            entry,
            _ssh: ssh,
            _port_forward: port_forward,
        })
    }
}

/// The pod's `/etc`: root and sshd's privilege-separation user, and the
/// server's configuration (the keys are already in `ssh/`). sshd admits
/// no user whose shell does not exist, so root's is the node's `/usr/bin/sh`.
fn write_pod_etc(etc: &Path) -> anyhow::Result<()> {
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/:/usr/bin/sh\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n",
    )?;
    fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(
        etc.join("ssh/sshd_config"),
        format!(
            "Port {SSHD_PORT}\nHostKey /etc/ssh/host_key\nPidFile none\n\
             AuthorizedKeysFile /etc/ssh/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nGatewayPorts yes\n\
             LogLevel ERROR\n"
        ),
    )?;
    Ok(())
}

/// The shadow pod: sshd in the foreground, as root, on the node's `/usr`.
fn pod_manifest(namespace: &str, etc: &Path, privsep: &Path) -> String {
    let host = |name: &str, path: &str| {
        format!(r#"{{"name":"{name}","hostPath":{{"path":"{path}","type":"Directory"}}}}"#)
    };
    let mount = |name: &str, at: &str, read_only: bool| {
        format!(r#"{{"name":"{name}","mountPath":"{at}","readOnly":{read_only}}}"#)
    };
    let volumes = [
        host("usr", "/usr"),
        host("lib", "/usr/lib"),
        host("lib64", "/usr/lib64"),
        host("etc", &etc.display().to_string()),
        host("privsep", &privsep.display().to_string()),
    ]
    .join(",");
    let mounts = [
        mount("usr", "/usr", true),
        mount("lib", "/lib", true),
        mount("lib64", "/lib64", true),
        // Writable: the kubelet mounts the pod's hosts and resolv.conf onto it.
        mount("etc", "/etc", false),
        mount("privsep", "/run/sshd", true),
    ]
    .join(",");
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{POD}","namespace":"{namespace}"}},
"spec":{{"containers":[{{"name":"sshd","image":"{image}","imagePullPolicy":"Never",
"command":["{sshd}","-D","-e","-f","/etc/ssh/sshd_config"],
"securityContext":{{"runAsUser":0}},"volumeMounts":[{mounts}]}}],
"volumes":[{volumes}]}}}}"#,
        image = crate::cluster::TCP_ECHO_IMAGE,
        sshd = paths::SSHD,
    )
}
