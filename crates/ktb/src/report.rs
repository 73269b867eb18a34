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
    /// A step of a command: what it is doing or has done ("creating shadow
    /// pod …", "✔ Service … now reaches this machine").
    Progress(String),
    /// Something the developer should know that does not stop the command.
    Warning(String),
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
            Event::Progress(message) => write!(f, "{message}"),
            Event::Warning(message) => write!(f, "warning: {message}"),
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

    /// Reports a step of a command.
    pub fn progress(&self, message: impl std::fmt::Display) {
        self.report(Event::Progress(message.to_string()))
    }

    /// Reports a warning.
    pub fn warn(&self, message: impl std::fmt::Display) {
        self.report(Event::Warning(message.to_string()))
    }
}
