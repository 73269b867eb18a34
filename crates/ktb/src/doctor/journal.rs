//! What a crashed `ktb connect` left on this machine, from its journal
//! ([`crate::connect::journal`]): the device, routes and DNS lines it
//! recorded before making them, which nothing undoes until `ktb clean
//! --local` (or the next `connect`) does.
//!
//! A journal whose `connect` still runs is that process's business, and no
//! journal at all is the normal state. Read only: the undo stays `clean
//! --local`'s, so this check never changes the machine.

use std::path::Path;

use super::Check;
use crate::connect::journal::{journal_path, Change, Journal};

const NAME: &str = "journal";

/// The row for the journal in `state_dir`.
pub fn check(state_dir: &Path) -> Check {
    let path = journal_path(state_dir);
    let clean_local = format!(
        "`sudo ktb clean --local --state-dir {}` undoes them",
        state_dir.display()
    );
    match Journal::load(&path) {
        Ok(None) => Check::pass(
            NAME,
            format!(
                "no journal at {}: no `ktb connect` left changes on this machine",
                path.display()
            ),
        ),
        Ok(Some(journal)) => match journal.live_owner() {
            Some(pid) => Check::pass(
                NAME,
                format!("`ktb connect` (pid {pid}) runs and will undo its own changes"),
            ),
            None => Check::warn(
                NAME,
                format!(
                    "a `ktb connect` that did not exit cleanly left {} ({})",
                    describe(journal.changes()),
                    path.display()
                ),
                clean_local,
            ),
        },
        Err(e) => Check::warn(
            NAME,
            format!("{e:#}"),
            "if the file cannot be read, `sudo ktb doctor` can; otherwise the message says what to do",
        ),
    }
}

/// `TUN device ktb0, route 10.96.0.0/16, a line in /etc/resolv.conf`.
fn describe(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "an empty journal".into();
    }
    changes
        .iter()
        .map(|change| match change {
            Change::Device(device) => format!("TUN device {}", device.name),
            Change::Route { net, .. } => format!("route {net}"),
            Change::Line { path, .. } => format!("a line in {}", path.display()),
            Change::Block { path, .. } => format!("a block in {}", path.display()),
            Change::ResolvedLink { device } => {
                format!("systemd-resolved DNS settings on {}", device.name)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::system::OwnDevice;
    use crate::doctor::Status;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ktb-doctor-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn no_journal_passes_and_a_dead_connects_journal_warns_with_the_undo() {
        let dir = temp_dir("journal");
        assert_eq!(check(&dir).status, Status::Pass);
        let device = OwnDevice {
            name: "ktb0".into(),
            index: 7,
        };
        // What a connect that died (pid 999999999 runs nowhere) left.
        let left = serde_json::json!({
            "version": 2,
            "pid": 999_999_999u32,
            "changes": [
                Change::Device(device.clone()),
                Change::Route { net: "10.96.0.0/16".into(), device },
                Change::Line { path: "/etc/resolv.conf".into(), line: "nameserver 127.0.0.153".into() },
            ],
        });
        std::fs::write(journal_path(&dir), left.to_string()).unwrap();
        let row = check(&dir);
        assert_eq!(row.status, Status::Warn);
        assert!(
            row.detail.starts_with(
                "a `ktb connect` that did not exit cleanly left TUN device ktb0, route \
                 10.96.0.0/16, a line in /etc/resolv.conf ("
            ),
            "{}",
            row.detail
        );
        assert_eq!(
            row.hint.unwrap(),
            format!(
                "`sudo ktb clean --local --state-dir {}` undoes them",
                dir.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
