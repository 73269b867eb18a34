//! Exchange role: cluster callers in, to the attached laptop.
//!
//! Every connection accepted on an exposed port becomes a stream opened
//! towards the laptop. With no laptop attached the connection is reset at
//! once: a caller must see a prompt failure (and retry or fail over), never
//! a connection that hangs until its own timeout.

use std::sync::Arc;
use std::time::Duration;

use ktb_proto::tcp::Target;
use tokio::net::{TcpListener, TcpStream};

use crate::attachment::Attachment;
use crate::probe::Probes;

pub async fn serve_port(listener: TcpListener, attachment: Arc<Attachment>, probes: Arc<Probes>) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(port, error = %e, "cannot accept a caller");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some(session) = attachment.session() else {
            tracing::debug!(port, %peer, "no client attached: refusing caller");
            abort(tcp);
            continue;
        };
        let probes = Arc::clone(&probes);
        tokio::spawn(async move {
            if probes.claims(port, &tcp).await {
                return;
            }
            let Ok(stream) = session.open(Target::AgentPort { port }) else {
                abort(tcp);
                return;
            };
            if let Err(e) = stream.bridge_tcp(tcp).await {
                tracing::debug!(port, %peer, error = %e, "caller's stream failed");
            }
        });
    }
}

/// Closes with a TCP reset rather than a FIN, so the caller sees an error,
/// not an orderly (and misleading) end of data.
pub fn abort(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}
