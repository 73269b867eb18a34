//! Which laptop is attached right now.
//!
//! Exchange listeners ask this for the current tunnel on every accepted
//! connection. A laptop that reconnects after a network blip attaches a new
//! tunnel before the agent has noticed the old one is dead, so the newest
//! attachment wins and the older one is closed with a reason.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ktb_proto::handshake::{close_code, Welcome};
use ktb_proto::Session;

use crate::Config;

pub struct Attachment {
    ports: Vec<u16>,
    config: Arc<Config>,
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    session: Option<Session>,
    shut_down: bool,
}

impl Attachment {
    pub fn new(ports: Vec<u16>, config: Arc<Config>) -> Self {
        Attachment {
            ports,
            config,
            current: Mutex::default(),
        }
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The attached tunnel, if it is alive.
    pub fn session(&self) -> Option<Session> {
        let current = self.current.lock().expect("attachment lock");
        current.session.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Makes `session` the attached tunnel, closing the one it replaces.
    /// Returns false (and closes `session`) when the agent is shutting down.
    ///
    /// The `Welcome` is queued under the same lock that publishes the
    /// session: the client counts the tunnel as up when it reads Welcome,
    /// so no caller may find the agent unattached after that, and no stream
    /// may be opened on the tunnel ahead of it.
    pub fn attach(&self, session: Session, welcome: Welcome) -> bool {
        let mut current = self.current.lock().expect("attachment lock");
        if current.shut_down {
            session.close(close_code::SHUTDOWN, "the agent is shutting down");
            return false;
        }
        session.welcome(welcome);
        if let Some(old) = current.session.replace(session) {
            old.close(
                close_code::REPLACED,
                "a newer client attached to this agent",
            );
        }
        true
    }

    /// Waits until the attached laptop, if any, detaches, or `limit` has
    /// passed. A shadow pod being deleted gracefully is still an endpoint
    /// kube-proxy may send callers to until it has caught up; the laptop
    /// keeps its tunnel until probes land elsewhere, and the agent keeps
    /// serving until then. A laptop that vanished is not waited for.
    pub async fn detached(&self, limit: Duration) {
        let Some(session) = self.session() else {
            return;
        };
        tracing::info!(?limit, "serving until the laptop detaches");
        if tokio::time::timeout(limit, session.closed()).await.is_err() {
            tracing::warn!(?limit, "the laptop is still attached: exiting anyway");
        }
    }

    /// Refuses new attachments and closes the current one, waiting briefly
    /// so its close frame (with the reason) reaches the client.
    pub async fn shut_down(&self) {
        let session = {
            let mut current = self.current.lock().expect("attachment lock");
            current.shut_down = true;
            current.session.take()
        };
        if let Some(session) = session {
            let reason = "the agent is shutting down";
            session
                .close_and_flush(close_code::SHUTDOWN, reason, Duration::from_secs(1))
                .await;
        }
    }
}
