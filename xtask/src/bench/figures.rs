//! The figures of one path on the cluster (throughput, round trips, new
//! connections, a round trip beside bulk, CPU and who spent it), their
//! medians across rounds, their JSON (`target/bench/*.json`, and the
//! connect benchmark's measurer inside a laptop's namespace reports through
//! it) and the tables both cluster benchmarks print.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use serde_json::json;

/// Figures of one path.
#[derive(Default, Clone)]
pub(super) struct Figures {
    pub(super) mib_per_s: f64,
    pub(super) rr_p50_us: f64,
    pub(super) rr_p99_us: f64,
    pub(super) connect_p50_us: f64,
    pub(super) connect_p99_us: f64,
    /// RR p99 while another connection on the same path carries bulk.
    pub(super) beside_bulk_p99_us: f64,
    /// Busy CPU seconds of the whole machine per GiB moved in bulk.
    pub(super) cpu_s_per_gib: f64,
    /// The same by program (`super::cpu`): command name → seconds per GiB.
    pub(super) cpu_by_program: BTreeMap<String, f64>,
}

impl Figures {
    /// The median of each figure across rounds.
    pub(super) fn median(rounds: &[Figures]) -> Figures {
        let med = |pick: fn(&Figures) -> f64| median(rounds.iter().map(pick).collect());
        Figures {
            mib_per_s: med(|x| x.mib_per_s),
            rr_p50_us: med(|x| x.rr_p50_us),
            rr_p99_us: med(|x| x.rr_p99_us),
            connect_p50_us: med(|x| x.connect_p50_us),
            connect_p99_us: med(|x| x.connect_p99_us),
            beside_bulk_p99_us: med(|x| x.beside_bulk_p99_us),
            cpu_s_per_gib: med(|x| x.cpu_s_per_gib),
            cpu_by_program: median_by_program(rounds),
        }
    }

    /// Seconds per GiB `program` spent; zero for one not seen.
    fn cpu_of(&self, program: &str) -> f64 {
        self.cpu_by_program.get(program).copied().unwrap_or(0.0)
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        json!({
            "mib_per_s": self.mib_per_s, "rr_p50_us": self.rr_p50_us, "rr_p99_us": self.rr_p99_us,
            "connect_p50_us": self.connect_p50_us, "connect_p99_us": self.connect_p99_us,
            "beside_bulk_p99_us": self.beside_bulk_p99_us, "cpu_s_per_gib": self.cpu_s_per_gib,
            "cpu_s_per_gib_by_program": self.cpu_by_program,
        })
    }

    pub(super) fn from_json(value: &serde_json::Value) -> anyhow::Result<Figures> {
        let get = |key: &str| {
            value[key]
                .as_f64()
                .with_context(|| format!("no {key} in {value}"))
        };
        Ok(Figures {
            mib_per_s: get("mib_per_s")?,
            rr_p50_us: get("rr_p50_us")?,
            rr_p99_us: get("rr_p99_us")?,
            connect_p50_us: get("connect_p50_us")?,
            connect_p99_us: get("connect_p99_us")?,
            beside_bulk_p99_us: get("beside_bulk_p99_us")?,
            cpu_s_per_gib: get("cpu_s_per_gib")?,
            cpu_by_program: serde_json::from_value(value["cpu_s_per_gib_by_program"].clone())
                .with_context(|| format!("no cpu_s_per_gib_by_program in {value}"))?,
        })
    }
}

/// Each program's median across rounds; a round where a program spent
/// nothing counts as zero.
fn median_by_program(rounds: &[Figures]) -> BTreeMap<String, f64> {
    programs(rounds.iter())
        .into_iter()
        .map(|program| {
            let spent = rounds.iter().map(|r| r.cpu_of(program)).collect();
            (program.clone(), median(spent))
        })
        .collect()
}

/// Every program that spent CPU in any of `figures`.
fn programs<'a>(figures: impl Iterator<Item = &'a Figures>) -> BTreeSet<&'a String> {
    figures.flat_map(|f| f.cpu_by_program.keys()).collect()
}

/// The middle of `values`, one figure across rounds (the upper middle of
/// an even count).
pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One line per path: throughput, round trips, new connections, CPU.
pub(super) fn print_table(paths: &[(&str, &Figures)]) {
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>12} {:>12} {:>14} {:>10}",
        "path", "MiB/s", "RR p50", "RR p99", "conn p50", "conn p99", "RR+bulk p99", "CPU s/GiB"
    );
    for (name, f) in paths {
        println!(
            "{:<22} {:>10.0} {:>7.0} µs {:>7.0} µs {:>9.0} µs {:>9.0} µs {:>11.0} µs {:>10.1}",
            name,
            f.mib_per_s,
            f.rr_p50_us,
            f.rr_p99_us,
            f.connect_p50_us,
            f.connect_p99_us,
            f.beside_bulk_p99_us,
            f.cpu_s_per_gib
        );
    }
}

/// Programs that spent at least this share of some path's CPU get a row
/// of their own in [`print_cpu_table`]; the rest are summed.
const CPU_ROW_SHARE: f64 = 0.02;

/// CPU seconds per GiB by program, one column per path, largest first.
pub(super) fn print_cpu_table(paths: &[(&str, &Figures)]) {
    let rows = cpu_rows(paths);
    print!("{:<28}", "CPU s/GiB by program");
    for (name, _) in paths {
        print!(" {:>22}", name);
    }
    println!();
    for (program, spent) in rows {
        print!("{program:<28}");
        for s in spent {
            print!(" {s:>22.2}");
        }
        println!();
    }
}

/// The rows of [`print_cpu_table`]: each program that reached
/// [`CPU_ROW_SHARE`] of a path's CPU with its seconds per GiB in every
/// path, largest first, then "(others)".
fn cpu_rows(paths: &[(&str, &Figures)]) -> Vec<(String, Vec<f64>)> {
    let (mut shown, others): (Vec<_>, Vec<_>) = programs(paths.iter().map(|(_, f)| *f))
        .into_iter()
        .partition(|program| {
            paths
                .iter()
                .any(|(_, f)| f.cpu_of(program) >= CPU_ROW_SHARE * f.cpu_s_per_gib)
        });
    let largest = |program: &str| {
        paths
            .iter()
            .map(|(_, f)| f.cpu_of(program))
            .fold(0.0, f64::max)
    };
    shown.sort_by(|a, b| largest(b).total_cmp(&largest(a)));
    let mut rows: Vec<(String, Vec<f64>)> = shown
        .into_iter()
        .map(|program| {
            (
                program.clone(),
                paths.iter().map(|(_, f)| f.cpu_of(program)).collect(),
            )
        })
        .collect();
    rows.push((
        "(others)".into(),
        paths
            .iter()
            .map(|(_, f)| others.iter().map(|program| f.cpu_of(program)).sum())
            .collect(),
    ));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spending(total: f64, programs: &[(&str, f64)]) -> Figures {
        Figures {
            cpu_s_per_gib: total,
            cpu_by_program: programs.iter().map(|&(p, s)| (p.to_owned(), s)).collect(),
            ..Figures::default()
        }
    }

    #[test]
    fn cpu_rows_put_the_largest_first_and_sum_the_small_ones() {
        let a = spending(10.0, &[("kubelet", 3.0), ("ktb", 5.0), ("sh", 0.1)]);
        let b = spending(10.0, &[("kubelet", 6.0), ("kubectl", 1.0), ("cron", 0.05)]);
        let rows = cpu_rows(&[("a", &a), ("b", &b)]);
        let names: Vec<&str> = rows.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["kubelet", "ktb", "kubectl", "(others)"]);
        assert_eq!(rows[0].1, [3.0, 6.0]);
        assert_eq!(rows[2].1, [0.0, 1.0]);
        assert_eq!(rows[3].1, [0.1, 0.05]);
    }

    #[test]
    fn a_program_missing_from_a_round_counts_as_zero_in_the_median() {
        let rounds = [
            spending(1.0, &[("ktb", 1.0)]),
            spending(1.0, &[("ktb", 3.0), ("sh", 9.0)]),
            spending(1.0, &[("ktb", 2.0)]),
        ];
        let median = median_by_program(&rounds);
        assert_eq!(median["ktb"], 2.0);
        assert_eq!(median["sh"], 0.0);
    }

    #[test]
    fn figures_survive_json() {
        let figures = spending(4.0, &[("kube-apiserver", 1.5)]);
        let back = Figures::from_json(&figures.to_json()).unwrap();
        assert_eq!(back.cpu_by_program, figures.cpu_by_program);
        assert_eq!(back.cpu_s_per_gib, 4.0);
    }
}
