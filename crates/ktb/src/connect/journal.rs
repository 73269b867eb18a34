//! The journal of what `ktb connect` changed on this machine.
//!
//! Every local change (route, DNS line, hosts block, systemd-resolved link
//! settings) is written here
//! *before* it is made, so whatever moment ktb dies at, the journal holds at
//! least what was done; undoing an entry whose change never happened is
//! harmless (a missing route is ignored, a line or block that is not in the
//! file leaves the file alone). The one exception is the TUN device: it is
//! recorded *after* ktb created it, with what identifies it, because a
//! record made before could only name it, and undoing a failed creation by
//! name would delete whoever's device already had that name. A device ktb
//! dies before recording dies with it: it is not persistent.
//!
//! Undo takes back only ktb's own part of each change and leaves everything
//! else as it is *now*: a file gets ktb's line or block removed, not its old
//! content written back, so what a VPN or DHCP client changed meanwhile
//! stays. On exit the entries are undone in reverse and the journal
//! removed; after a crash `ktb clean --local` does the same from the file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::system::{self, OwnDevice};

/// The journal format this ktb writes and undoes. Format 1 (no `version`
/// field) recorded whole files to write back and devices by name alone,
/// neither of which is safe to undo, so it is refused with advice instead.
const FORMAT: u32 = 2;

/// One change, with what is needed to undo exactly it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum Change {
    /// The TUN device ktb created; deleted on undo only while the device
    /// with its name is still this one.
    Device(OwnDevice),
    /// A route ktb added (`net` like `10.96.0.0/16`) into its own device;
    /// deleted on undo only while that device is still there, since a
    /// route dies with its device and another device of the same name has
    /// routes of its own.
    Route { net: String, device: OwnDevice },
    /// A line ktb inserted into a file (its `nameserver` line in
    /// `resolv.conf`); `line` is its exact text, which names the session, so
    /// removing every line equal to it removes ktb's and nothing else.
    Line { path: PathBuf, line: String },
    /// Lines ktb added to a file between two marker lines, `begin` and
    /// `end`, which name the session; undo removes them and what is between.
    Block {
        path: PathBuf,
        begin: String,
        end: String,
    },
    /// ktb's DNS server and the cluster's domains registered with
    /// systemd-resolved on ktb's `device` (`connect::resolved`); reverted
    /// on undo (`RevertLink`) only while the device is still ktb's, since
    /// resolved forgets a link's settings when the link goes.
    ResolvedLink { device: OwnDevice },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    /// The format, [`FORMAT`] for journals this ktb writes.
    version: u32,
    /// The ktb process that made the changes.
    pid: u32,
    changes: Vec<Change>,
}

/// What every journal format has: enough to refuse a foreign one well.
#[derive(Deserialize)]
struct Header {
    /// Absent in format 1, the first one.
    #[serde(default = "first_format")]
    version: u32,
    pid: u32,
}

fn first_format() -> u32 {
    1
}

/// The journal file and what it holds.
pub struct Journal {
    path: PathBuf,
    contents: Contents,
}

/// The journal's file in a state directory.
pub fn journal_path(state_dir: &Path) -> PathBuf {
    state_dir.join("connect-journal.json")
}

impl Journal {
    /// Starts a journal for this process. A journal left by a live ktb means
    /// another `connect` runs; one left by a dead ktb is undone first.
    pub fn start(state_dir: &Path) -> anyhow::Result<Journal> {
        std::fs::create_dir_all(state_dir).with_context(|| {
            format!("cannot create the state directory {}", state_dir.display())
        })?;
        let path = journal_path(state_dir);
        if let Some(old) = Journal::load(&path)? {
            if process_alive(old.contents.pid) {
                anyhow::bail!(
                    "`ktb connect` already runs on this machine (pid {}); stop it first",
                    old.contents.pid
                );
            }
            tracing::warn!(
                "undoing what an earlier `ktb connect` (pid {}) left behind",
                old.contents.pid
            );
            old.undo()?;
        }
        let journal = Journal {
            path,
            contents: Contents {
                version: FORMAT,
                pid: std::process::id(),
                changes: Vec::new(),
            },
        };
        journal.save()?;
        Ok(journal)
    }

    /// The journal at `path`, if there is one. A journal of another format
    /// is an error that says what to do with it, unless its ktb still runs
    /// (that one will undo its own changes).
    pub fn load(path: &Path) -> anyhow::Result<Option<Journal>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let not_a_journal = || format!("{} is not a ktb journal", path.display());
        let header: Header = serde_json::from_str(&text).with_context(not_a_journal)?;
        if header.version != FORMAT {
            if header.pid != std::process::id() && process_alive(header.pid) {
                anyhow::bail!(
                    "`ktb connect` (pid {}) of another ktb version runs on this machine; stop it first",
                    header.pid
                );
            }
            anyhow::bail!(
                "{} was written by a ktb with journal format {} (this one undoes format {FORMAT}), \
                 so its changes are not undone automatically. Read it, take back by hand what is \
                 still there (`ip link`, `ip route`, the `nameserver 127.0.0.153` line in \
                 /etc/resolv.conf, the `# BEGIN ktb connect` block in /etc/hosts), then delete it",
                path.display(),
                header.version
            );
        }
        let contents = serde_json::from_str(&text).with_context(not_a_journal)?;
        Ok(Some(Journal {
            path: path.to_owned(),
            contents,
        }))
    }

    /// Records a change that is about to be made (or, for the device, that
    /// was just made).
    pub fn record(&mut self, change: Change) -> anyhow::Result<()> {
        self.contents.changes.push(change);
        self.save()
    }

    /// The ktb process that keeps this journal, if it still runs.
    pub fn live_owner(&self) -> Option<u32> {
        let pid = self.contents.pid;
        (pid != std::process::id() && process_alive(pid)).then_some(pid)
    }

    pub fn changes(&self) -> &[Change] {
        &self.contents.changes
    }

    fn save(&self) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(&self.contents)?;
        system::write_file(&self.path, &text)
            .with_context(|| format!("cannot write the journal {}", self.path.display()))
    }

    /// Undoes every change, newest first, then removes the journal. Keeps
    /// going past failures and keeps the journal if any, so a later
    /// `ktb clean --local` can retry.
    pub fn undo(self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for change in self.contents.changes.iter().rev() {
            if let Err(e) = undo(change) {
                failures.push(format!("{e:#}"));
            }
        }
        if !failures.is_empty() {
            anyhow::bail!(
                "could not undo every local change ({}); the journal {} is kept: run `ktb clean --local` to retry",
                failures.join("; "),
                self.path.display()
            );
        }
        std::fs::remove_file(&self.path)
            .with_context(|| format!("cannot remove the journal {}", self.path.display()))
    }
}

fn undo(change: &Change) -> anyhow::Result<()> {
    match change {
        Change::Device(device) => system::remove_device(device),
        Change::Route { net, device } => system::remove_route(net, device),
        Change::Line { path, line } => system::remove_line(path, line),
        Change::Block { path, begin, end } => system::remove_block(path, begin, end),
        #[cfg(target_os = "linux")]
        Change::ResolvedLink { device } => super::resolved::revert(device),
        // Only Linux registers with systemd-resolved; a journal that says
        // otherwise was carried here from another machine.
        #[cfg(not(target_os = "linux"))]
        Change::ResolvedLink { .. } => Ok(()),
    }
}

/// Whether `pid` runs; a zombie (dead, not yet reaped by its parent) does not.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ktb-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_ktbs_own_lines_go_and_what_others_changed_stays() {
        let dir = temp_dir("undo");
        let resolv = dir.join("resolv.conf");
        let hosts = dir.join("hosts");
        std::fs::write(&resolv, "nameserver 192.0.2.1\noptions timeout:1\n").unwrap();
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();

        let mut journal = Journal::start(&dir).unwrap();
        system::switch_resolv_conf(&mut journal, &resolv, "127.0.0.153".parse().unwrap(), "s1")
            .unwrap();
        let entry = system::HostEntry::new("10.96.0.5".parse().unwrap(), ["web"]).unwrap();
        system::add_hosts_block(&mut journal, &hosts, "s1", &[entry]).unwrap();
        // Meanwhile a VPN client adds its server, and someone a host.
        let resolv_now = std::fs::read_to_string(&resolv).unwrap();
        std::fs::write(
            &resolv,
            format!("{resolv_now}nameserver 198.51.100.7 # vpn\n"),
        )
        .unwrap();
        std::fs::write(
            &hosts,
            format!(
                "{}192.0.2.9 printer\n",
                std::fs::read_to_string(&hosts).unwrap()
            ),
        )
        .unwrap();

        // A crash: the journal on disk is all that is left.
        drop(journal);
        let left = Journal::load(&journal_path(&dir)).unwrap().unwrap();
        assert_eq!(left.changes().len(), 2);
        left.undo().unwrap();
        assert_eq!(
            std::fs::read_to_string(&resolv).unwrap(),
            "nameserver 192.0.2.1\noptions timeout:1\nnameserver 198.51.100.7 # vpn\n"
        );
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1 localhost\n192.0.2.9 printer\n"
        );
        assert!(!journal_path(&dir).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn devices_and_routes_are_read_back_as_written() {
        let device = OwnDevice {
            name: "ktb0".into(),
            index: 7,
        };
        let changes = vec![
            Change::Device(device.clone()),
            Change::Route {
                net: "10.96.0.0/16".into(),
                device: device.clone(),
            },
            Change::ResolvedLink { device },
        ];
        let text = serde_json::to_string(&changes).unwrap();
        assert!(
            text.contains(r#"{"change":"device","name":"ktb0","index":7}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"{"change":"resolved-link","device":{"name":"ktb0","index":7}}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Vec<Change>>(&text).unwrap(), changes);
    }

    #[test]
    fn a_journal_of_the_first_format_is_refused_with_advice_not_undone() {
        let dir = temp_dir("old");
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.153\n").unwrap();
        let old = serde_json::json!({
            "pid": 999_999_999u32,
            "changes": [
                { "change": "device", "name": "tun0" },
                { "change": "file", "path": resolv, "original": "" },
            ],
        });
        std::fs::write(journal_path(&dir), old.to_string()).unwrap();
        for refused in [
            Journal::load(&journal_path(&dir)).err(),
            Journal::start(&dir).err(),
        ] {
            let message = format!("{:#}", refused.expect("refused"));
            assert!(message.contains("journal format 1"), "{message}");
            assert!(message.contains("then delete it"), "{message}");
        }
        assert_eq!(
            std::fs::read_to_string(&resolv).unwrap(),
            "nameserver 127.0.0.153\n"
        );
        assert!(Journal::load(&dir.join("absent.json")).unwrap().is_none());
        std::fs::write(journal_path(&dir), r#"{"hello": 1}"#).unwrap();
        assert!(
            format!("{:#}", Journal::load(&journal_path(&dir)).err().unwrap())
                .contains("is not a ktb journal")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
