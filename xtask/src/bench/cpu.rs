//! Where a bulk phase's CPU goes: busy seconds of the whole machine and of
//! each program on it, read from `/proc` before and after.
//!
//! A path through the cluster crosses many programs (the apiserver,
//! kubelet, containerd, kubectl or ktb's two ends, the load itself), and
//! on a machine whose cores they all share, the fastest path is the one
//! that costs them least. The machine's busy time says how much a path
//! costs; this breakdown says who pays, in every run rather than in a
//! one-off profile. Programs are told apart by their command name (kernel
//! threads without their `/N` suffix); a program that starts and ends
//! inside the phase is not seen, and what no process was charged with
//! (interrupts, softirq network processing on kernels that account it
//! apart) is its own row.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;

/// The row of CPU time no process was charged with.
const UNATTRIBUTED: &str = "(interrupts, unattributed)";

/// Busy CPU time so far, in `/proc`'s ticks: the machine's and every
/// process's. Kept in whole ticks, so that differences are exact: in
/// floating-point seconds, the machine's large counter lost a fraction
/// of a tick to rounding and could come out below a process's.
pub(super) struct CpuSample {
    machine: u64,
    /// pid → (program, user + system ticks of all its threads).
    processes: HashMap<u32, (String, u64)>,
}

impl CpuSample {
    pub(super) fn take() -> anyhow::Result<CpuSample> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let machine = machine_busy_ticks(&stat).context("parsing /proc/stat")?;
        let mut processes = HashMap::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // A process may end between the listing and the read.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((program, busy)) = process_busy_ticks(&stat) {
                processes.insert(pid, (program, busy));
            }
        }
        Ok(CpuSample { machine, processes })
    }

    /// What was spent between `before` and this sample: the machine's
    /// busy seconds, and per program (several processes of one program
    /// summed), with the remainder under [`UNATTRIBUTED`].
    pub(super) fn since(&self, before: &CpuSample) -> (f64, BTreeMap<String, f64>) {
        let machine = self.machine.saturating_sub(before.machine);
        let mut by_program: BTreeMap<String, u64> = BTreeMap::new();
        for (pid, (program, busy)) in &self.processes {
            let earlier = match before.processes.get(pid) {
                Some((same, earlier)) if same == program => *earlier,
                _ => 0,
            };
            let spent = busy.saturating_sub(earlier);
            if spent > 0 {
                *by_program.entry(program.clone()).or_default() += spent;
            }
        }
        let attributed: u64 = by_program.values().sum();
        by_program.insert(UNATTRIBUTED.into(), machine.saturating_sub(attributed));
        let seconds = |ticks: u64| ticks as f64 / TICKS_PER_SECOND;
        let by_program = by_program
            .into_iter()
            .map(|(program, ticks)| (program, seconds(ticks)))
            .collect();
        (seconds(machine), by_program)
    }
}

/// `/proc/stat`'s first line: every field except idle and iowait, in ticks.
fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let fields = stat.lines().next()?.strip_prefix("cpu ")?;
    let busy = fields
        .split_whitespace()
        .filter_map(|f| f.parse::<u64>().ok())
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy)
}

/// A `/proc/PID/stat` line's program and its utime + stime in ticks. The
/// command name is in parentheses and may itself hold spaces and
/// parentheses, so the fields are counted from the last `)`.
fn process_busy_ticks(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let program = comm.split('/').next().unwrap_or(comm).to_owned();
    // After ")": state is field 3 of the whole line; utime and stime are
    // fields 14 and 15.
    let mut rest = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((program, utime + stime))
}

/// Ticks per second of `/proc`'s CPU times: the kernel's `USER_HZ`, 100
/// on every architecture Linux reports through `/proc`.
const TICKS_PER_SECOND: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_line_gives_its_program_and_busy_ticks() {
        let line = "4242 (tokio (x) w/1) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    150 50 0 0 20 0 9 0 12345 1000 200 18446744073709551615";
        assert_eq!(
            process_busy_ticks(line),
            Some(("tokio (x) w".to_owned(), 200))
        );
        assert_eq!(process_busy_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn the_machine_line_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 20 30 9000 40 5 6 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(machine_busy_ticks(stat), Some(168));
    }

    #[test]
    fn spending_is_counted_per_program_and_the_rest_is_unattributed() {
        let sample = |machine: u64, processes: &[(u32, &str, u64)]| CpuSample {
            machine,
            processes: processes
                .iter()
                .map(|&(pid, program, busy)| (pid, (program.to_owned(), busy)))
                .collect(),
        };
        // In ticks: 100 a second.
        let before = sample(
            1000,
            &[(1, "kubelet", 200), (2, "ktb", 100), (3, "ktb", 500)],
        );
        // pid 3 ended and its number went to a new program; pid 4 is new.
        let after = sample(
            2000,
            &[
                (1, "kubelet", 400),
                (2, "ktb", 250),
                (3, "sh", 50),
                (4, "ktb", 100),
            ],
        );
        let (machine, by_program) = after.since(&before);
        assert_eq!(machine, 10.0);
        assert_eq!(by_program["kubelet"], 2.0);
        assert_eq!(by_program["ktb"], 2.5);
        assert_eq!(by_program["sh"], 0.5);
        assert_eq!(by_program[UNATTRIBUTED], 5.0);
    }

    #[test]
    fn this_process_is_seen_spending() {
        let before = CpuSample::take().unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let (machine, by_program) = CpuSample::take().unwrap().since(&before);
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        let mine = by_program.get(me.trim()).copied().unwrap_or(0.0);
        assert!(mine >= 0.1, "300 ms of spinning counted as {mine} s");
        // Not `machine >= mine`: a process's times come from its precise
        // run time, the machine's from ticks counted per CPU, and the two
        // disagree by a tick or two (seen: 0.57 s against 0.58 s).
        assert!(
            machine >= 0.1,
            "the machine's 300 ms of this process's spinning counted as {machine} s"
        );
    }
}
