//! TLS for the direct transport (a laptop that dials the pod IP, over a
//! network the apiserver does not guard).
//!
//! The agent makes its key and a self-signed certificate when it starts,
//! in the pod, and keeps both in memory only. The laptop learns the
//! certificate's SHA-256 at `GET /tls-fingerprint` through a port-forward,
//! which the apiserver authenticates, and then accepts only that
//! certificate on the pod IP; nothing a colleague reads in the cluster
//! lets them stand in for the agent. Inside TLS the tunnel's own handshake
//! still proves the laptop's key to the agent, as on every link.

use std::sync::Arc;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// The name the certificate carries; the laptop pins the certificate
/// itself and never checks names.
const NAME: &str = "ktb-agent";

/// The agent's TLS identity for this run.
pub struct AgentTls {
    pub acceptor: TlsAcceptor,
    /// The certificate's SHA-256, 64 lowercase hex digits.
    pub fingerprint: String,
}

impl AgentTls {
    /// A fresh ECDSA P-256 key and a certificate for it.
    pub fn generate() -> anyhow::Result<AgentTls> {
        let key = rcgen::KeyPair::generate().context("generating the agent's TLS key")?;
        let certificate = rcgen::CertificateParams::new(vec![NAME.to_owned()])?
            .self_signed(&key)
            .context("signing the agent's TLS certificate")?;
        let der = certificate.der().clone();
        let fingerprint = Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![der],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .context("the agent's TLS configuration")?;
        Ok(AgentTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_has_its_own_certificate() {
        let (a, b) = (AgentTls::generate().unwrap(), AgentTls::generate().unwrap());
        assert_eq!(a.fingerprint.len(), 64);
        assert!(a.fingerprint.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.fingerprint, b.fingerprint);
    }
}
