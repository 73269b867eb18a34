//! `--transport direct`: TLS to the agent on its pod IP, accepting only
//! the certificate the agent made for itself.
//!
//! The agent makes its key and certificate in the pod when it starts (see
//! the agent's `tls` module). ktb asks for the certificate's SHA-256
//! through a port-forward first, where the apiserver vouches that the
//! answer comes from that pod, then dials the pod IP and accepts only that
//! certificate: names, issuers and expiry mean nothing here, the pin does.
//! Inside TLS the tunnel's own handshake proves this laptop's key to the
//! agent, as on every link.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::agent_http;
use crate::tunnel::{Direct, LinkKind, Transport};

/// The agent's endpoint that answers its certificate's fingerprint.
const FINGERPRINT_PATH: &str = "/tls-fingerprint";
/// How long the TLS handshake may take once TCP is connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    fn of(certificate: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(certificate).into())
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    /// 64 hex digits, as the agent answers them.
    fn from_str(text: &str) -> Result<Fingerprint, String> {
        let text = text.trim();
        let digit = |i: usize| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        };
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = digit(2 * i).filter(|_| text.len() == 64).ok_or_else(|| {
                format!("expected a certificate's SHA-256 as 64 hex digits, not {text:?}")
            })?;
        }
        Ok(Fingerprint(bytes))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Asks the agent behind `trusted` (a port-forward) for its certificate's
/// fingerprint.
pub async fn fetch_fingerprint<T: Transport>(trusted: &T) -> anyhow::Result<Fingerprint> {
    let (status, body) = agent_http::get(trusted, FINGERPRINT_PATH)
        .await
        .with_context(|| {
            format!(
                "asking the agent for its TLS certificate through {}",
                trusted.describe()
            )
        })?;
    anyhow::ensure!(
        status == 200,
        "the agent has no TLS certificate to offer ({status}: {}); it is older than this CLI: \
         use an agent image of this CLI's release, or --transport port-forward",
        body.trim()
    );
    body.parse().map_err(anyhow::Error::msg)
}

/// TLS over TCP to the agent's address, accepting only the pinned
/// certificate.
#[derive(Clone)]
pub struct PinnedTls {
    tcp: Direct,
    pin: Fingerprint,
    connector: TlsConnector,
}

impl PinnedTls {
    pub fn new(addr: String, pin: Fingerprint) -> PinnedTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
            .with_no_client_auth();
        PinnedTls {
            tcp: Direct { addr },
            pin,
            connector: TlsConnector::from(Arc::new(config)),
        }
    }
}

impl Transport for PinnedTls {
    type Io = TlsStream<TcpStream>;

    async fn connect(&self) -> io::Result<Self::Io> {
        let tcp = self.tcp.connect().await?;
        let name = ServerName::try_from("ktb-agent").expect("a valid DNS name");
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no TLS handshake with {} in {HANDSHAKE_TIMEOUT:?}",
                        self.tcp.addr
                    ),
                )
            })?
    }

    fn describe(&self) -> String {
        format!(
            "{} over TLS, certificate {}…",
            self.tcp.addr,
            &self.pin.to_string()[..12]
        )
    }

    fn authority(&self) -> String {
        self.tcp.addr.clone()
    }

    fn link(&self) -> LinkKind {
        LinkKind::WebSocket
    }
}

/// Accepts the one certificate whose fingerprint is `pin`, and checks
/// the handshake's signatures with it as TLS requires.
#[derive(Debug)]
struct Pinned {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let offered = Fingerprint::of(end_entity);
        if offered == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the agent's address answered with certificate {offered}, not the agent's {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_64_hex_digits() {
        let text = "00ff".repeat(16);
        let pin: Fingerprint = format!("{text}\n").parse().unwrap();
        assert_eq!(pin.to_string(), text);
        for bad in [
            "",
            "00ff",
            &"0g".repeat(32),
            &"00".repeat(33),
            "é".repeat(32).as_str(),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?}");
        }
    }
}
