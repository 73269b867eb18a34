//! Keeping a session's Lease renewed while the command runs.
//!
//! Shutdown is watched on its own, beside the renewals, so a renewal stuck
//! on a slow apiserver never delays Ctrl-C; each renewal is bounded by the
//! renewal period, and a failed call is retried on the next tick (two may
//! fail before the Lease expires). Losing the Lease to someone else, or
//! finding it gone, ends the session with [`SessionEnded`], which says who
//! holds it now.

use std::future::Future;
use std::pin::Pin;

use ktb_kube::lease::Lost;

use super::lock::Lock;
use crate::report::{Event, Reporter};

/// The session's Lease is no longer this session's: ktb stops serving and
/// touches nothing of whoever holds it now.
#[derive(Debug, thiserror::Error)]
#[error("this session is over: {0}. ktb stops serving and changes nothing of the session that holds it now")]
pub struct SessionEnded(pub Lost);

/// Renews `lock` until `shutdown` completes (`Ok`) or the Lease is lost.
pub async fn keep_alive(
    lock: &Lock,
    reporter: &Reporter,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<(), SessionEnded> {
    let every = lock.renew_every();
    let renewing = async {
        let mut renew = tokio::time::interval(every);
        loop {
            renew.tick().await;
            match tokio::time::timeout(every, lock.renew()).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => reporter.report(Event::Warning(format!(
                    "cannot renew the session's Lease ({e:#}); retrying in {every:?}"
                ))),
                Ok(Err(lost)) => return SessionEnded(lost),
                Err(_) => reporter.report(Event::Warning(format!(
                    "renewing the session's Lease took over {every:?}; retrying"
                ))),
            }
        }
    };
    tokio::select! {
        _ = shutdown.as_mut() => Ok(()),
        ended = renewing => Err(ended),
    }
}
