//! What the CLI tells the developer, as events rather than log lines, so the
//! binary can print them for people and tests can assert on them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The tunnel is up; `routes` pairs an agent port with a local address.
    TunnelUp {
        agent: String,
        routes: Vec<(u16, SocketAddr)>,
    },
    /// The tunnel dropped or could not be set up; the next try is after `retry_in`.
    TunnelDown { reason: String, retry_in: Duration },
    /// A caller arrived but nothing accepts connections locally. Said once
    /// per outage, not once per caller.
    LocalUnreachable { addr: SocketAddr, error: String },
    /// The local process accepts connections again.
    LocalBack { addr: SocketAddr },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::TunnelUp { agent, routes } => {
                write!(f, "tunnel up ({agent}):")?;
                for (port, local) in routes {
                    write!(f, " agent port {port} → {local};")?;
                }
                Ok(())
            }
            Event::TunnelDown { reason, retry_in } => {
                write!(f, "tunnel down: {reason}; reconnecting in {:.1}s", retry_in.as_secs_f32())
            }
            Event::LocalUnreachable { addr, error } => write!(
                f,
                "nothing listens on {addr} ({error}): callers are being reset until it does; start your process there"
            ),
            Event::LocalBack { addr } => write!(f, "{addr} accepts connections again"),
        }
    }
}

/// Where events go. Cloned freely; called from many tasks.
#[derive(Clone)]
pub struct Reporter(Arc<dyn Fn(Event) + Send + Sync>);

impl Reporter {
    pub fn new(f: impl Fn(Event) + Send + Sync + 'static) -> Self {
        Reporter(Arc::new(f))
    }

    pub fn report(&self, event: Event) {
        (self.0)(event)
    }
}
