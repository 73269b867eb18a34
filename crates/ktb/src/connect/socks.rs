//! SOCKS5 mode: a proxy on loopback for machines where the developer is not
//! root. Programs opt in (`curl --socks5-hostname`, `ALL_PROXY=socks5h://…`).
//!
//! Only what clients use for TCP is spoken: no authentication (the proxy
//! listens on loopback only) and CONNECT. A host name is not resolved here
//! but sent as is, so the agent resolves it with the cluster's DNS and its
//! namespace's search path — `orders`, `orders.shop` and the full name all
//! work. The reply waits until the agent reached the destination, so a
//! client sees a refused or unreachable target as a SOCKS error, not as a
//! connection that closes at once. The protocol is a few fixed-layout
//! messages (RFC 1928), too small to be worth a dependency that would then
//! need adapting to the tunnel's stream type.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ktb_proto::tcp::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::outbound::Outbound;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;
const REPLY_OK: u8 = 0;
const REPLY_FAILURE: u8 = 1;
const REPLY_HOST_UNREACHABLE: u8 = 4;
const REPLY_COMMAND_NOT_SUPPORTED: u8 = 7;
const REPLY_ADDRESS_NOT_SUPPORTED: u8 = 8;
/// A client that does not finish its request in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves SOCKS5 clients on `listener` until dropped.
pub async fn serve(listener: TcpListener, outbound: Outbound) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(serve_client(client, outbound.clone()));
    }
}

async fn serve_client(mut client: TcpStream, outbound: Outbound) {
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_request(&mut client)).await {
        Ok(Ok(target)) => target,
        Ok(Err(reply)) => {
            let _ = client.write_all(&reply_message(reply)).await;
            return;
        }
        Err(_) => return,
    };
    let stream = match outbound.connect(target.clone()).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(%target, error = %e, "SOCKS connect failed");
            let _ = client
                .write_all(&reply_message(REPLY_HOST_UNREACHABLE))
                .await;
            return;
        }
    };
    if client.write_all(&reply_message(REPLY_OK)).await.is_err() {
        return;
    }
    if let Err(e) = stream.bridge_tcp(client).await {
        tracing::debug!(%target, error = %e, "SOCKS connection failed");
    }
}

/// Reads the greeting and the request; `Err` carries the reply code to
/// refuse with.
async fn read_request(client: &mut TcpStream) -> Result<Target, u8> {
    let io = |_| REPLY_FAILURE;
    let mut header = [0u8; 2];
    client.read_exact(&mut header).await.map_err(io)?;
    if header[0] != VERSION {
        return Err(REPLY_FAILURE);
    }
    let mut methods = vec![0u8; usize::from(header[1])];
    client.read_exact(&mut methods).await.map_err(io)?;
    if !methods.contains(&NO_AUTH) {
        let _ = client.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await;
        return Err(REPLY_FAILURE);
    }
    client.write_all(&[VERSION, NO_AUTH]).await.map_err(io)?;

    let mut request = [0u8; 4];
    client.read_exact(&mut request).await.map_err(io)?;
    let [version, command, _reserved, address_type] = request;
    if version != VERSION {
        return Err(REPLY_FAILURE);
    }
    if command != CONNECT {
        return Err(REPLY_COMMAND_NOT_SUPPORTED);
    }
    let host = match address_type {
        ATYP_V4 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await.map_err(io)?;
            Host::Ip(Ipv4Addr::from(ip).into())
        }
        ATYP_V6 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await.map_err(io)?;
            Host::Ip(Ipv6Addr::from(ip).into())
        }
        ATYP_DOMAIN => {
            let len = client.read_u8().await.map_err(io)?;
            let mut name = vec![0u8; usize::from(len)];
            client.read_exact(&mut name).await.map_err(io)?;
            Host::Name(String::from_utf8(name).map_err(|_| REPLY_FAILURE)?)
        }
        _ => return Err(REPLY_ADDRESS_NOT_SUPPORTED),
    };
    let port = client.read_u16().await.map_err(io)?;
    Ok(match host {
        Host::Ip(ip) => Target::Addr(SocketAddr::new(ip, port)),
        Host::Name(host) => Target::Host { host, port },
    })
}

enum Host {
    Ip(std::net::IpAddr),
    Name(String),
}

/// A reply; the bound address is not meaningful through a tunnel, so it is
/// the unspecified one, as many proxies send.
fn reply_message(code: u8) -> [u8; 10] {
    [VERSION, code, 0, ATYP_V4, 0, 0, 0, 0, 0, 0]
}
