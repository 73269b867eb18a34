//! The figures of one path on the cluster (throughput, round trips, new
//! connections, a round trip beside bulk, CPU), their medians across
//! rounds, their JSON (`target/bench/*.json`, and the connect benchmark's
//! measurer inside a laptop's namespace reports through it) and the table
//! both cluster benchmarks print.

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
    pub(super) cpu_s_per_gib: f64,
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
        }
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        json!({
            "mib_per_s": self.mib_per_s, "rr_p50_us": self.rr_p50_us, "rr_p99_us": self.rr_p99_us,
            "connect_p50_us": self.connect_p50_us, "connect_p99_us": self.connect_p99_us,
            "beside_bulk_p99_us": self.beside_bulk_p99_us, "cpu_s_per_gib": self.cpu_s_per_gib,
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
        })
    }
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
