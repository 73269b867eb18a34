//! Progress for the person at the terminal: while a step of a command
//! waits (the apiserver slow to answer, the agent pod being scheduled and
//! its image pulled, the port-forward opening, routes and DNS being set
//! up), a spinner under the step's `ktb: …` line names the phase and counts
//! its seconds, so that a slow cluster does not pass for a hung ktb.
//!
//! Only where a person watches: when stderr is not a terminal (a pipe, a
//! file, CI), `TERM` is unset or `dumb`, or `KTB_NO_PROGRESS` is set to
//! anything but the empty string, ktb writes its `ktb: …` lines and nothing
//! else, byte for byte as without this module: scripts and the end-to-end
//! tests parse them. `NO_COLOR` leaves progress on: it asks for no colour,
//! and the spinner has none.
//!
//! The library reports steps, not the waits between them, so whether a step
//! is a wait is read off the command's [`Course`]. Until the ready line
//! ("✔ …") each step is what the command waits on until the next event, so
//! the latest one spins. From the ready line on, the command serves: its
//! lines are news, possibly followed by hours of quiet, and nothing spins.
//! Once Ctrl-C (or SIGTERM, SIGHUP) asks it to stop, the steps of undoing
//! are waits again. Warnings and tunnel events interrupt a wait without
//! ending it: they are printed above the spinner, which keeps its phase and
//! its clock.
//!
//! Every line on stderr, the log's included ([`LogWriter`]), goes through
//! the [`Screen`], which takes the spinner off before writing and puts it
//! back after, so that no line ever shares a row with it.

use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use ktb::report::Event;

/// How often the spinner turns: often enough to show that ktb is alive.
const TICK: Duration = Duration::from_millis(100);

/// ktb's stderr, for people and for scripts alike.
pub struct Screen {
    /// The spinner when progress is on; `None` when it is off (see
    /// [`wanted`]), and stderr gets the `ktb: …` lines alone.
    spinner: Option<Mutex<Spinner>>,
}

/// What is drawn, and what the next step means.
struct Spinner {
    /// Where the command is, which decides whether its next step spins.
    course: Course,
    /// The phase being waited on, drawn below the last line; `None`
    /// between waits.
    bar: Option<ProgressBar>,
}

/// Where a command is in its course.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Course {
    /// Before the ready line: each step is a wait for the next.
    Starting,
    /// After the ready line: steps are news; nothing spins.
    Serving,
    /// After Ctrl-C, SIGTERM or SIGHUP: each step of undoing is a wait.
    Stopping,
    /// The command returned: what a task left running still says is
    /// printed, never spun, as nothing would clear it.
    Ended,
}

/// What an event does to the spinner.
#[derive(Debug, PartialEq, Eq)]
enum Effect {
    /// The event's line, then a spinner on this phase in place of the last.
    Spin(String),
    /// The event's line, and no spinner after it.
    Stop,
    /// The event's line above the spinner, which keeps its phase.
    Keep,
}

impl Screen {
    /// Progress on stderr if a person is likely to watch it (see [`wanted`]).
    pub fn for_stderr() -> Screen {
        let wanted = wanted(
            io::stderr().is_terminal(),
            std::env::var("TERM").ok().as_deref(),
            std::env::var("KTB_NO_PROGRESS").ok().as_deref(),
        );
        let spinner = Spinner {
            course: Course::Starting,
            bar: None,
        };
        Screen {
            spinner: wanted.then(|| Mutex::new(spinner)),
        }
    }

    /// Prints `event` as a `ktb: …` line, and spins or stops as [`effect`]
    /// says.
    pub fn show(&self, event: &Event) {
        let line = format!("ktb: {event}");
        let Some(mut spinner) = self.lock() else {
            print_line(&line);
            return;
        };
        let (effect, course) = effect(spinner.course, event);
        spinner.course = course;
        match effect {
            Effect::Keep => spinner.above(|| print_line(&line)),
            Effect::Stop => {
                spinner.clear();
                print_line(&line);
            }
            Effect::Spin(phase) => {
                spinner.clear();
                print_line(&line);
                spinner.spin(phase);
            }
        }
    }

    /// Spins on `phase` while `work` runs: a wait of ktb's own, which
    /// `work` does not report and no line announces, as a line would change
    /// what scripts read.
    pub async fn during<T>(&self, phase: &str, work: impl Future<Output = T>) -> T {
        if let Some(mut spinner) = self.lock() {
            if matches!(spinner.course, Course::Starting | Course::Stopping) {
                spinner.spin(phase.to_owned());
            }
        }
        let output = work.await;
        if let Some(mut spinner) = self.lock() {
            spinner.clear();
        }
        output
    }

    /// Ctrl-C, SIGTERM or SIGHUP arrived: the steps from here on undo what
    /// the command changed, and are waits again.
    pub fn stopping(&self) {
        if let Some(mut spinner) = self.lock() {
            spinner.course = Course::Stopping;
        }
    }

    /// Takes the spinner off for good: the command returned, and its last
    /// line (or the process's exit) must not find it drawn.
    pub fn finish(&self) {
        if let Some(mut spinner) = self.lock() {
            spinner.clear();
            spinner.course = Course::Ended;
        }
    }

    /// Runs `write` with the spinner off the screen.
    fn suspended<T>(&self, write: impl FnOnce() -> T) -> T {
        match self.lock() {
            Some(spinner) => spinner.above(write),
            None => write(),
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, Spinner>> {
        // A panic while printing must not silence every later line.
        self.spinner
            .as_ref()
            .map(|spinner| spinner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Spinner {
    fn spin(&mut self, phase: String) {
        self.clear();
        let bar = ProgressBar::new_spinner()
            .with_style(style())
            .with_message(phase);
        bar.enable_steady_tick(TICK);
        self.bar = Some(bar);
    }

    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Runs `write` with the spinner, if any, lifted and then redrawn.
    fn above<T>(&self, write: impl FnOnce() -> T) -> T {
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

/// The log's stderr: each record is written with the spinner off the
/// screen, so that `-v` output never lands on the spinner's row.
pub struct LogWriter(
    /// The screen whose spinner is lifted while a record is written.
    pub Arc<Screen>,
);

impl Write for LogWriter {
    fn write(&mut self, record: &[u8]) -> io::Result<usize> {
        // The whole record under one suspension: the formatter hands it
        // over in one piece, and a partial write would let the spinner be
        // redrawn mid-line.
        self.0.suspended(|| io::stderr().write_all(record))?;
        Ok(record.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Writes `line` to stderr, ignoring a failure: a terminal that hung up
/// (an SSH session dropped, a closed window) must not stop ktb from
/// restoring what it changed, as `eprintln!`'s panic would.
fn print_line(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Whether to draw progress: only on a terminal that takes escape sequences
/// (`TERM` set and not `dumb`, which is what Emacs' shell says), and not
/// when `KTB_NO_PROGRESS` is set to anything but the empty string (read as
/// `NO_COLOR` is).
fn wanted(stderr_is_terminal: bool, term: Option<&str>, no_progress: Option<&str>) -> bool {
    stderr_is_terminal
        && term.is_some_and(|term| !term.is_empty() && term != "dumb")
        && no_progress.is_none_or(str::is_empty)
}

/// What `event` does to the spinner in `course`, and the course after it.
fn effect(course: Course, event: &Event) -> (Effect, Course) {
    let Event::Progress(message) = event else {
        return (Effect::Keep, course);
    };
    match (course, message.starts_with('✔')) {
        (Course::Ended, _) => (Effect::Stop, course),
        (_, true) => (Effect::Stop, Course::Serving),
        (Course::Starting | Course::Stopping, false) => (Effect::Spin(message.clone()), course),
        (Course::Serving, false) => (Effect::Stop, course),
    }
}

/// The spinner, the phase's seconds so far, and the phase, cut to the
/// terminal's width: a wrapped line could not be cleared.
fn style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}")
        .expect("the spinner's template is valid")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn step(message: &str) -> Event {
        Event::Progress(message.to_owned())
    }

    /// Which of `events` spin, from the start of a command, with Ctrl-C
    /// arriving before the event at `interrupted_at`.
    fn spun(events: &[Event], interrupted_at: usize) -> Vec<bool> {
        let mut course = Course::Starting;
        let mut spins = Vec::new();
        for (i, event) in events.iter().enumerate() {
            if i == interrupted_at {
                course = Course::Stopping;
            }
            let (effect, next) = effect(course, event);
            spins.push(matches!(effect, Effect::Spin(_)));
            course = next;
        }
        spins
    }

    #[test]
    fn progress_is_drawn_only_on_a_terminal_that_takes_it_unless_turned_off() {
        assert!(wanted(true, Some("xterm-256color"), None));
        assert!(
            wanted(true, Some("xterm"), Some("")),
            "set but empty is unset"
        );
        assert!(!wanted(false, Some("xterm"), None), "a pipe or a file");
        assert!(!wanted(true, Some("dumb"), None));
        assert!(!wanted(true, None, None), "no TERM: escapes may not work");
        assert!(!wanted(true, Some(""), None));
        assert!(!wanted(true, Some("xterm"), Some("1")));
        assert!(
            !wanted(true, Some("xterm"), Some("0")),
            "any value turns it off"
        );
    }

    #[test]
    fn an_exchange_spins_on_each_step_until_ready_and_again_after_ctrl_c() {
        let events = [
            step("creating agent pod ktb-exchange-orders-1"),
            step("waiting for the agent pod to be ready"),
            Event::Warning("the image is large".into()),
            step("opening the tunnel (port-forward through the apiserver)"),
            step("✔ Service team/orders now reaches this machine: 8080. Ctrl-C restores it"),
            step("orders: listing its pods works again"),
            // Ctrl-C
            step("waiting until callers reach the workload's pods again"),
            step("restored Service team/orders (selector)"),
        ];
        let expected = [true, true, false, true, false, false, true, true];
        assert_eq!(spun(&events, 6), expected);
    }

    #[test]
    fn the_ready_line_ends_the_spinner_and_what_follows_it_does_not_spin() {
        let ready = step("✔ connected to namespace team in 3.1 s: routes. Ctrl-C disconnects");
        assert_eq!(
            effect(Course::Starting, &ready),
            (Effect::Stop, Course::Serving)
        );
        let hint = step("  try: curl -H 'x-ktb-mark: me' http://orders.team.svc:80/");
        assert_eq!(
            effect(Course::Serving, &hint),
            (Effect::Stop, Course::Serving)
        );
    }

    #[test]
    fn warnings_and_tunnel_events_keep_the_phase_spinning() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("an address");
        let news = [
            Event::Warning("10.0.0.0/8 overlaps the route …".into()),
            Event::TunnelDown {
                reason: "reset".into(),
                retry_in: Duration::from_secs(1),
            },
            Event::LocalUnreachable {
                addr,
                error: "refused".into(),
            },
            Event::LocalBack { addr },
        ];
        for course in [Course::Starting, Course::Serving, Course::Stopping] {
            for event in &news {
                assert_eq!(effect(course, event), (Effect::Keep, course), "{event}");
            }
        }
    }

    #[test]
    fn after_the_command_returns_nothing_spins() {
        for event in [step("disconnected"), step("✔ ready")] {
            assert_eq!(effect(Course::Ended, &event), (Effect::Stop, Course::Ended));
        }
    }

    #[test]
    fn the_spinner_style_parses() {
        style();
    }
}
