//! The handshake's own messages: `Hello` (the client's version range and
//! nonce) and `Welcome` (what the agent tells a proven client), with the
//! protocol versions they carry. Kept apart from the exchange that sends
//! them ([`super`]) so that the codec, which decodes every message family,
//! does not depend on the handshake's procedure.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, BytesMut};

use crate::auth::{KeyError, Nonce};
use crate::tcp::{get_socket_addr, put_socket_addr};
use crate::wire::{kind, put_short_string, DecodeError, Reader};

/// The version this build speaks. Bump it for any incompatible change to the
/// wire format, and keep [`MIN_PROTOCOL_VERSION`] at the oldest one still
/// understood.
///
/// Version 2: `Welcome` tells the client the agent's resolver (for `ktb connect`).
/// Version 3: a per-session key pair replaces the shared token (`Challenge`,
/// `Proof`); streams start with [`crate::stream::INITIAL_WINDOW`] of credit
/// and every `Data` frame costs at least [`crate::stream::MIN_DATA_COST`].
/// Version 4: a receiver may grant a stream up to
/// [`crate::stream::MAX_WINDOW`] (16 MiB), beyond what a version-3 sender
/// accepts (its own window, 4 MiB).
pub const PROTOCOL_VERSION: u16 = 4;
pub const MIN_PROTOCOL_VERSION: u16 = 4;
/// Four bytes that make a stray connection (or another protocol) obvious.
pub const MAGIC: &[u8; 4] = b"ktb!";

/// The client's first message: the protocol versions it speaks and the
/// nonce its proof will cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The oldest and newest protocol versions the client speaks.
    pub min_version: u16,
    pub max_version: u16,
    /// Fresh for every connection; part of what the client signs.
    pub nonce: Nonce,
}

/// The agent's last handshake message, sent once the client proved its
/// key: from here on the tunnel carries streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version both sides speak from now on.
    pub version: u16,
    /// The ports the agent accepts connections on for this client (exchange role).
    pub ports: Vec<u16>,
    /// The agent's build, for diagnostics.
    pub agent: String,
    /// How the agent resolves names: what `ktb connect` asks for cluster
    /// names, with the search path of the agent's namespace.
    pub resolver: Resolver,
}

/// The agent's DNS configuration, as its pod's `resolv.conf` gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolver {
    pub nameservers: Vec<SocketAddr>,
    /// Search domains, most specific first (`ns.svc.cluster.local`, …).
    pub search: Vec<String>,
}

impl Resolver {
    /// Reads `nameserver` and `search` lines of a `resolv.conf`.
    pub fn parse_resolv_conf(text: &str) -> Resolver {
        let mut resolver = Resolver::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        resolver.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
                Some("search") => resolver.search = words.map(str::to_owned).collect(),
                _ => {}
            }
        }
        resolver
    }
}

impl Hello {
    /// This build's version range and a fresh nonce.
    pub fn new() -> Result<Self, KeyError> {
        Ok(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            nonce: Nonce::random()?,
        })
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_slice(MAGIC);
        out.put_u16(self.min_version);
        out.put_u16(self.max_version);
        put_short_string(out, &self.nonce.to_hex());
    }

    pub(crate) fn decode_body(r: &mut Reader) -> Result<Self, DecodeError> {
        if r.take(MAGIC.len())?.as_ref() != MAGIC {
            return Err(DecodeError::Invalid { field: "magic" });
        }
        let min_version = r.u16()?;
        let max_version = r.u16()?;
        let nonce =
            Nonce::from_hex(&r.short_string("client nonce")?).ok_or(DecodeError::Invalid {
                field: "client nonce",
            })?;
        Ok(Hello {
            min_version,
            max_version,
            nonce,
        })
    }

    /// The version range of a message that starts like a `Hello` of any
    /// protocol version, whatever follows it: read before anything else so
    /// that a mismatch is reported as one, not as a malformed frame.
    pub fn peek_versions(message: &[u8]) -> Option<(u16, u16)> {
        let rest = message.strip_prefix(&[kind::HELLO])?.strip_prefix(MAGIC)?;
        match rest {
            [a, b, c, d, ..] => Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
            _ => None,
        }
    }
}

impl Welcome {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.version);
        out.put_u16(self.ports.len() as u16);
        for port in &self.ports {
            out.put_u16(*port);
        }
        put_short_string(out, &self.agent);
        let Resolver {
            nameservers,
            search,
        } = &self.resolver;
        out.put_u8(nameservers.len().min(u8::MAX.into()) as u8);
        for server in nameservers.iter().take(u8::MAX.into()) {
            put_socket_addr(out, server);
        }
        out.put_u8(search.len().min(u8::MAX.into()) as u8);
        for domain in search.iter().take(u8::MAX.into()) {
            put_short_string(out, domain);
        }
    }

    pub(crate) fn decode_body(r: &mut Reader) -> Result<Self, DecodeError> {
        let version = r.u16()?;
        let count = r.u16()?;
        let ports = (0..count).map(|_| r.u16()).collect::<Result<_, _>>()?;
        let agent = r.short_string("agent build")?;
        let count = r.u8()?;
        let nameservers = (0..count)
            .map(|_| get_socket_addr(r))
            .collect::<Result<_, _>>()?;
        let count = r.u8()?;
        let search = (0..count)
            .map(|_| r.short_string("search domain"))
            .collect::<Result<_, _>>()?;
        Ok(Welcome {
            version,
            ports,
            agent,
            resolver: Resolver {
                nameservers,
                search,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_nameservers_and_search_path() {
        let resolver = Resolver::parse_resolv_conf(
            "# pod\nsearch team-a.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\nnameserver not-an-ip\noptions ndots:5\n",
        );
        assert_eq!(resolver.nameservers, vec!["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(
            resolver.search,
            [
                "team-a.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
    }
}
