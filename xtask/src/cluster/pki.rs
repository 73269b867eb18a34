//! The cluster's certificates and kubeconfigs, made with the `openssl` CLI.
//!
//! Every identity is a client certificate signed by one throwaway CA, as
//! in a kubeadm cluster: the admin (`system:masters`), each component
//! (`system:kube-controller-manager`, `system:node:NODE`, ...) and the two
//! developers (`dev-a`, `dev-b` in group `developers`, which RBAC binds
//! only to the developer Role). The apiserver's serving certificate names
//! the node address and the `kubernetes` Service address, so clients on the
//! laptops and in pods both verify it.

use super::{process, Layout, APISERVER_PORT, CLUSTER_DOMAIN, LAPTOPS, NODE_IP, NODE_NAME};
use anyhow::Result;
use std::path::Path;

/// Client identities: (file and kubeconfig name, CN, O).
const CLIENTS: &[(&str, &str, &str)] = &[
    ("admin", "kubernetes-admin", "system:masters"),
    ("controller-manager", "system:kube-controller-manager", ""),
    ("scheduler", "system:kube-scheduler", ""),
    ("kubelet", "system:node:ktb-node", "system:nodes"),
    ("kube-proxy", "system:kube-proxy", ""),
    (
        "apiserver-kubelet-client",
        "kube-apiserver-kubelet-client",
        "system:masters",
    ),
];

/// The first address of the Service range: the `kubernetes` Service.
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

pub fn generate(layout: &Layout) -> Result<()> {
    let dir = layout.pki();
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(layout.state.join("kubeconfig"))?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();

    new_ca(&dir, "ca", "ktb-test-cluster-ca")?;
    // The aggregation layer's CA (kept apart from the client CA, as upstream
    // recommends): the apiserver trusts X-Remote-User headers only from
    // clients with a certificate from this one.
    new_ca(&dir, "front-proxy-ca", "ktb-test-front-proxy-ca")?;
    // ServiceAccount token signing key pair.
    process::run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &p("sa.key"),
        ],
    )?;
    process::run(
        "openssl",
        &["pkey", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")],
    )?;

    let sans = format!(
        "subjectAltName=IP:{NODE_IP},IP:{KUBERNETES_SERVICE_IP},DNS:{NODE_NAME},DNS:kubernetes,\
         DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}"
    );
    sign(
        &dir,
        "apiserver",
        "/CN=kube-apiserver",
        &format!("{sans}\nextendedKeyUsage=serverAuth\n"),
    )?;

    let client_ext = "extendedKeyUsage=clientAuth\n";
    for (name, cn, org) in CLIENTS {
        sign(&dir, name, &subject(cn, org), client_ext)?;
    }
    sign_with(
        &dir,
        "front-proxy-ca",
        "front-proxy-client",
        "/CN=front-proxy-client",
        client_ext,
    )?;
    for laptop in &LAPTOPS {
        sign(
            &dir,
            laptop.user,
            &subject(laptop.user, "developers"),
            client_ext,
        )?;
    }

    for name in CLIENTS
        .iter()
        .map(|c| c.0)
        .filter(|n| *n != "apiserver-kubelet-client")
        .chain(LAPTOPS.iter().map(|l| l.user))
    {
        write_kubeconfig(layout, name)?;
    }
    Ok(())
}

fn subject(cn: &str, org: &str) -> String {
    if org.is_empty() {
        format!("/CN={cn}")
    } else {
        format!("/O={org}/CN={cn}")
    }
}

/// A self-signed CA, `NAME.key` and `NAME.crt`.
fn new_ca(dir: &Path, name: &str, cn: &str) -> Result<()> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    process::run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.crt")),
            "-days",
            "3650",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
    )?;
    Ok(())
}

/// Key and certificate `NAME.key`/`NAME.crt` signed by the cluster CA.
fn sign(dir: &Path, name: &str, subject: &str, extensions: &str) -> Result<()> {
    sign_with(dir, "ca", name, subject, extensions)
}

/// Key and certificate `NAME.key`/`NAME.crt` signed by CA `ca`.
fn sign_with(dir: &Path, ca: &str, name: &str, subject: &str, extensions: &str) -> Result<()> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let ext = p(&format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{extensions}"),
    )?;
    let csr = process::run(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p(&format!("{name}.key")),
            "-subj",
            subject,
        ],
    )?;
    process::run_with_input(
        "openssl",
        &[
            "x509",
            "-req",
            "-CA",
            &p(&format!("{ca}.crt")),
            "-CAkey",
            &p(&format!("{ca}.key")),
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            &ext,
            "-out",
            &p(&format!("{name}.crt")),
        ],
        &csr,
    )?;
    std::fs::remove_file(ext)?;
    Ok(())
}

/// A kubeconfig for `name` that points at the apiserver on the node address,
/// the only cluster address the laptops can reach.
fn write_kubeconfig(layout: &Layout, name: &str) -> Result<()> {
    let pki = layout.pki();
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: ktb\n  cluster:\n    server: https://{NODE_IP}:{APISERVER_PORT}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: {name}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
         contexts:\n\
         - name: {name}@ktb\n  context:\n    cluster: ktb\n    user: {name}\n{ns}\
         current-context: {name}@ktb\n",
        ca = pki.join("ca.crt").display(),
        crt = pki.join(format!("{name}.crt")).display(),
        key = pki.join(format!("{name}.key")).display(),
        ns = LAPTOPS
            .iter()
            .find(|l| l.user == name)
            .map(|l| format!("    namespace: {}\n", l.namespace))
            .unwrap_or_default(),
    );
    std::fs::write(layout.kubeconfig(name), text)?;
    Ok(())
}
