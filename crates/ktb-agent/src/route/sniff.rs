//! Which protocol a new connection speaks, told from its first bytes.
//!
//! The router only peeks: the bytes stay in the socket for whoever serves
//! the connection next (hyper, or the raw bridge). Only clear HTTP is routed
//! per request; anything else, and a client that waits for the server to
//! speak first (MySQL, SMTP, ...), is carried to the original pods as is.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a new connection may stay silent before it is taken for a
/// server-speaks-first protocol. Every HTTP client sends its request at
/// once, so this only delays protocols whose server talks first, by this
/// much, once per connection; shorter would risk misreading an HTTP client
/// on a busy node as such a protocol.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// How long to wait before peeking again when the first bytes arrived but
/// do not decide yet (a request line split across packets). Peeking does
/// not consume, so the socket stays readable and peeking at once would spin.
const PARTIAL_RETRY: Duration = Duration::from_millis(2);

/// The HTTP/2 connection preface a prior-knowledge (h2c) client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request lines of HTTP/1 start with one of these (RFC 9110 methods and PATCH).
const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x: a request line with a known method.
    Http1,
    /// HTTP/2 with prior knowledge: the connection preface.
    Http2,
    /// Anything else, or nothing within [`SNIFF_TIMEOUT`].
    Raw,
}

/// Peeks at the connection's first bytes until they decide, the peer closes
/// or [`SNIFF_TIMEOUT`] passes.
pub async fn sniff(tcp: &TcpStream) -> Protocol {
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let seen = match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Protocol::Raw,
            Ok(Ok(n)) => n,
        };
        if let Some(protocol) = classify(&first[..seen]) {
            return protocol;
        }
        if Instant::now() + PARTIAL_RETRY >= deadline {
            return Protocol::Raw;
        }
        tokio::time::sleep(PARTIAL_RETRY).await;
    }
}

/// The protocol these first bytes show, or `None` while more bytes could
/// still change the answer.
fn classify(first: &[u8]) -> Option<Protocol> {
    let could_become = |expected: &[u8]| expected.starts_with(first);
    if first.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if HTTP1_METHODS.iter().any(|method| first.starts_with(method)) {
        return Some(Protocol::Http1);
    }
    if could_become(H2_PREFACE) || HTTP1_METHODS.iter().any(|method| could_become(method)) {
        return None;
    }
    Some(Protocol::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"PATCH "), Some(Protocol::Http1));
        assert_eq!(classify(b"GETX / HTTP/1.1"), Some(Protocol::Raw));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Raw));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Raw));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Raw));
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"DELETE"), None);
    }

    #[tokio::test]
    async fn silent_client_is_raw_after_the_timeout_and_split_request_line_is_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        assert_eq!(sniff(&accepted).await, Protocol::Raw);
        assert!(started.elapsed() >= SNIFF_TIMEOUT);

        let mut split = TcpStream::connect(addr).await.unwrap();
        split.set_nodelay(true).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sniffing = tokio::spawn(async move { sniff(&accepted).await });
        use tokio::io::AsyncWriteExt;
        split.write_all(b"PO").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        split.write_all(b"ST / HTTP/1.1\r\n").await.unwrap();
        let protocol = tokio::time::timeout(Duration::from_secs(5), sniffing)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(protocol, Protocol::Http1);
    }
}
