//! TCP stream messages: where a new stream should connect.
//!
//! The stream frames themselves (`Open`, `Opened`, `Data`, `Fin`, `Reset`,
//! `Credit`) are plain enough to live in [`crate::codec`]; what needs a module
//! is the target, which differs by role: the agent in exchange role names the
//! port a cluster caller connected to, the client in connect role names an
//! address or a host name for the agent to dial from inside the cluster.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, BytesMut};

use crate::wire::{put_short_string, DecodeError, Reader};

mod tag {
    pub const AGENT_PORT: u8 = 0;
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
    pub const HOST: u8 = 0x48;
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A caller connected to this port of the agent (exchange role); the
    /// client maps it to a local port.
    AgentPort { port: u16 },
    /// Dial this address from inside the cluster (connect role).
    Addr(SocketAddr),
    /// Resolve this name with the cluster's DNS and dial it (connect role,
    /// SOCKS5 with remote resolution).
    Host { host: String, port: u16 },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::AgentPort { port } => write!(f, "agent port {port}"),
            Target::Addr(addr) => write!(f, "{addr}"),
            Target::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Target {
    pub(crate) fn encode(&self, out: &mut BytesMut) {
        match self {
            Target::AgentPort { port } => {
                out.put_u8(tag::AGENT_PORT);
                out.put_u16(*port);
            }
            Target::Addr(addr) => put_socket_addr(out, addr),
            Target::Host { host, port } => {
                out.put_u8(tag::HOST);
                put_short_string(out, host);
                out.put_u16(*port);
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        match r.u8()? {
            tag::AGENT_PORT => Ok(Target::AgentPort { port: r.u16()? }),
            tag::HOST => Ok(Target::Host {
                host: r.short_string("host name")?,
                port: r.u16()?,
            }),
            family => Ok(Target::Addr(socket_addr_after_tag(r, family)?)),
        }
    }
}

/// An address as tag (4 or 6), IP bytes, port.
pub(crate) fn put_socket_addr(out: &mut BytesMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(tag::V4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(tag::V6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(addr.port());
}

pub(crate) fn get_socket_addr(r: &mut Reader) -> Result<SocketAddr, DecodeError> {
    let family = r.u8()?;
    socket_addr_after_tag(r, family)
}

fn socket_addr_after_tag(r: &mut Reader, family: u8) -> Result<SocketAddr, DecodeError> {
    let ip = match family {
        tag::V4 => {
            let b = r.take(4)?;
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        tag::V6 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&r.take(16)?);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => {
            return Err(DecodeError::Invalid {
                field: "address family",
            })
        }
    };
    Ok(SocketAddr::new(ip, r.u16()?))
}
