//! One HTTP/1.1 GET to the agent over whichever transport reaches it: the
//! path proof's probes (see [`crate::proof`]), and the TLS certificate's
//! fingerprint asked through a port-forward (see [`crate::pinned_tls`]).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tunnel::Transport;

/// The agent's answer is one short line.
const MAX_ANSWER: usize = 4096;

/// One HTTP/1.1 GET to the agent: the status code and the body. The answer
/// is read by its `Content-Length`, not to the end of the connection: a
/// path whose FIN is late (a userspace TCP stack) must not stall the proof.
pub async fn get<T: Transport>(transport: &T, path: &str) -> std::io::Result<(u16, String)> {
    let mut io = transport.connect().await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        transport.authority()
    );
    io.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some((status, body)) = complete_answer(&answer)? {
            return Ok((status, body));
        }
        let n = io.read(&mut buf).await?;
        if n == 0 || answer.len() + n > MAX_ANSWER {
            let answer = String::from_utf8_lossy(&answer);
            return Err(std::io::Error::other(format!(
                "incomplete HTTP answer: {answer:?}"
            )));
        }
        answer.extend_from_slice(&buf[..n]);
    }
}

/// The status and body of `answer` once it holds a whole HTTP response.
fn complete_answer(answer: &[u8]) -> std::io::Result<Option<(u16, String)>> {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok(None);
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))?;
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    Ok((body.len() >= length).then(|| (status, body[..length].to_owned())))
}

#[cfg(test)]
mod tests {
    use super::complete_answer;

    #[test]
    fn an_answer_is_complete_by_its_content_length() {
        let partial = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nno ro";
        assert_eq!(complete_answer(partial).unwrap(), None);
        let whole = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nno route\n";
        assert_eq!(
            complete_answer(whole).unwrap(),
            Some((503, "no route\n".to_owned()))
        );
        assert_eq!(complete_answer(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert!(complete_answer(b"garbage\r\n\r\n").is_err());
    }
}
