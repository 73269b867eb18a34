//! Opening a port-forward: the WebSocket upgrade through the apiserver,
//! offering both protocols ktb speaks, best first.
//!
//! kube's `Client::connect` offers only the channel protocols, so the
//! upgrade is done here on `Client::send`, which keeps kube's
//! authentication and TLS. The apiserver answers with the one it chose:
//! `SPDY/3.1+portforward.k8s.io` when it can tunnel SPDY to the runtime,
//! else `v4.channel.k8s.io`. A refusal (no such pod, no RBAC verb) comes
//! back as the apiserver's own message.

use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderValue, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use kube::client::Body;
use kube::Client;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// An open port-forward, before either protocol is spoken on it.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// The port-forward protocol the apiserver chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// SPDY/3.1 inside the WebSocket, passed through to the runtime.
    Spdy,
    /// One channel byte in front of each WebSocket message.
    Channel,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Spdy => "SPDY/3.1",
            Protocol::Channel => CHANNEL,
        })
    }
}

const SPDY: &str = "SPDY/3.1+portforward.k8s.io";
const CHANNEL: &str = "v4.channel.k8s.io";
/// Both, the preferred first.
const OFFER: &str = "SPDY/3.1+portforward.k8s.io, v4.channel.k8s.io";

/// Upgrades `request` (a port-forward GET) to a WebSocket; Err with the
/// apiserver's reason if it refused.
pub async fn open(
    client: &Client,
    request: http::Request<Vec<u8>>,
) -> Result<(Protocol, Socket), String> {
    let (mut parts, body) = request.into_parts();
    let key = generate_key();
    let headers = &mut parts.headers;
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(OFFER));
    headers.insert(
        SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).expect("a generated key is a valid header"),
    );
    let response = client
        .send(http::Request::from_parts(parts, Body::from(body)))
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        return Err(refusal(status, &body));
    }
    let accepted = response
        .headers()
        .get(SEC_WEBSOCKET_ACCEPT)
        .map(HeaderValue::as_bytes);
    if accepted != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return Err("the apiserver's WebSocket handshake does not answer ktb's key".into());
    }
    let chosen = response
        .headers()
        .get(SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    let protocol = match chosen {
        Some(SPDY) => Protocol::Spdy,
        Some(CHANNEL) => Protocol::Channel,
        other => {
            return Err(format!(
                "the apiserver chose protocol {other:?}, which ktb did not offer"
            ))
        }
    };
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| format!("the upgraded connection was lost: {e}"))?;
    let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    Ok((protocol, socket))
}

/// The apiserver's reason for a refusal: its Status message, else the body.
fn refusal(status: StatusCode, body: &[u8]) -> String {
    if let Ok(reply) = serde_json::from_slice::<kube::core::Status>(body) {
        if !reply.message.is_empty() {
            return reply.message;
        }
    }
    match String::from_utf8_lossy(body).trim() {
        "" => format!("HTTP {status}"),
        text => format!("HTTP {status}: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offer_names_both_protocols_spdy_first() {
        assert_eq!(OFFER, format!("{SPDY}, {CHANNEL}"));
    }

    #[test]
    fn a_refusal_says_the_apiserver_s_reason() {
        let forbidden = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \"web\" is forbidden: User \"dev\" cannot create resource \"pods/portforward\"","reason":"Forbidden","code":403}"#;
        let reason = refusal(StatusCode::FORBIDDEN, forbidden);
        assert!(reason.starts_with("pods \"web\" is forbidden"), "{reason}");
        assert_eq!(
            refusal(StatusCode::BAD_GATEWAY, b" proxy down\n"),
            "HTTP 502 Bad Gateway: proxy down"
        );
        assert_eq!(
            refusal(StatusCode::BAD_REQUEST, b""),
            "HTTP 400 Bad Request"
        );
    }
}
