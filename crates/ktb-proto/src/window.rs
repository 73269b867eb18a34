//! How wide a stream's receive window is: wider for a stream alone.
//!
//! A window trades two things on a far link. The bytes a stream may have in
//! flight bound its throughput (a window per round trip), and they are also
//! what sits in the queues of the path (the apiserver's, the kubelet's, a
//! proxy's) ahead of every other stream's next request. Measured at 20 ms:
//! a 16 MiB window moved 0.91× a port-forward's bulk where 4 MiB moved
//! 0.66×, and made a request beside the bulk stream wait 8.2× the round
//! trip instead of 3.4× (2 MiB: 2.2×, on a day when 4 MiB gave 3.6–4.0×).
//!
//! So the receiver widens a stream to [`crate::SessionConfig::lone_window`]
//! while no other stream has brought it data for [`QUIET_FOR`] (a bulk
//! transfer alone delays no one), and narrows it back to
//! [`crate::SessionConfig::window`] as soon as another stream carries data
//! (a request stream beside it). Widening sends the extra credit at once;
//! narrowing withholds credit the stream returns until the window is back,
//! so a narrowed window never strands credit the peer already holds.
//!
//! The decision is taken when a stream returns credit, that is once it has
//! delivered a quarter of its window: an idle stream neither widens nor
//! needs narrowing. [`Activity`] answers "alone?" in constant time, whatever
//! the number of streams.

use std::time::{Duration, Instant};

use crate::codec::StreamId;

/// How long the other streams must have been silent for a stream to count
/// as alone: longer than a request stream pauses between requests while it
/// waits for answers across a far link.
pub(crate) const QUIET_FOR: Duration = Duration::from_secs(1);

/// Which streams brought this side data lately, as much as "alone?" needs:
/// the stream that did last, and when any other one did last.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// The stream whose data arrived last, and when. `None`: no data yet.
    latest: Option<(StreamId, Instant)>,
    /// When data last arrived on a stream other than `latest`'s. `None`:
    /// only one stream has carried data so far.
    other: Option<Instant>,
}

impl Activity {
    /// Data for `id` arrived at `now`.
    pub(crate) fn record(&mut self, id: StreamId, now: Instant) {
        match self.latest {
            Some((latest, _)) if latest == id => {}
            // The stream that was latest is now the latest other one.
            Some((_, at)) => self.other = Some(at),
            None => {}
        }
        self.latest = Some((id, now));
    }

    /// Whether no stream but `id` has carried data within [`QUIET_FOR`].
    pub(crate) fn is_alone(&self, id: StreamId, now: Instant) -> bool {
        let others_last = match self.latest {
            Some((latest, _)) if latest == id => self.other,
            Some((_, at)) => Some(at),
            None => None,
        };
        others_last.is_none_or(|at| now.saturating_duration_since(at) >= QUIET_FOR)
    }
}

/// What a stream's returned credit becomes under its next window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resize {
    /// The stream's window from now on.
    pub(crate) window: u32,
    /// Credit to send the peer: what was returned, plus any widening,
    /// minus any narrowing withheld (0: send nothing).
    pub(crate) credit: u32,
}

/// Moves a stream's window from `current` towards `target` as far as
/// `returned` credit and `spare` budget (bytes the session may still grant
/// beyond today's windows) allow.
pub(crate) fn resize(current: u32, target: u32, returned: u32, spare: usize) -> Resize {
    if target >= current {
        let widening = (target - current).min(u32::try_from(spare).unwrap_or(u32::MAX));
        Resize {
            window: current + widening,
            credit: returned + widening,
        }
    } else {
        let withheld = (current - target).min(returned);
        Resize {
            window: current - withheld,
            credit: returned - withheld,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_alone_until_another_carries_data() {
        let start = Instant::now();
        let mut activity = Activity::default();
        assert!(activity.is_alone(1, start), "no data at all yet");
        activity.record(1, start);
        assert!(activity.is_alone(1, start));
        assert!(!activity.is_alone(3, start), "1 has just carried data");

        activity.record(3, start + Duration::from_millis(10));
        activity.record(1, start + Duration::from_millis(20));
        let soon = start + Duration::from_millis(500);
        assert!(!activity.is_alone(1, soon), "3 carried data 490 ms ago");
        assert!(!activity.is_alone(3, soon), "1 carried data 480 ms ago");

        let later = start + Duration::from_millis(10) + QUIET_FOR;
        assert!(activity.is_alone(1, later), "3 has been silent long enough");
        assert!(!activity.is_alone(3, later), "1 is still the busy one");
    }

    #[test]
    fn widening_is_bounded_by_the_budget_and_narrowing_by_the_returned_credit() {
        let mib = 1024 * 1024;
        assert_eq!(
            resize(4 * mib, 16 * mib, mib, usize::MAX),
            Resize {
                window: 16 * mib,
                credit: 13 * mib
            }
        );
        assert_eq!(
            resize(4 * mib, 16 * mib, mib, 2 * mib as usize),
            Resize {
                window: 6 * mib,
                credit: 3 * mib
            },
            "only what the budget has left"
        );
        assert_eq!(
            resize(16 * mib, 4 * mib, 4 * mib, 0),
            Resize {
                window: 12 * mib,
                credit: 0
            },
            "narrowing keeps back what was returned, never more"
        );
        assert_eq!(
            resize(5 * mib, 4 * mib, 4 * mib, 0),
            Resize {
                window: 4 * mib,
                credit: 3 * mib
            }
        );
        assert_eq!(
            resize(4 * mib, 4 * mib, mib, 0),
            Resize {
                window: 4 * mib,
                credit: mib
            }
        );
    }
}
