//! The journal of what `ktb connect` changed on this machine.
//!
//! Every local change (TUN device, route, DNS file, hosts block) is written
//! here *before* it is made, so whatever moment ktb dies at, the journal
//! holds at least what was done. Undoing an entry whose change never
//! happened is harmless: deleting a missing route is ignored, and a file is
//! only ever put back to the bytes it had before ktb touched it. On exit
//! the entries are undone in reverse and the journal removed; after a crash
//! `ktb clean --local` does the same from the file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One change, with what is needed to undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum Change {
    /// A network device ktb created.
    Device { name: String },
    /// A route ktb added.
    Route { net: String, device: String },
    /// A file ktb rewrote; `original` is its whole content before.
    File { path: PathBuf, original: String },
    /// Lines ktb added to a file between two marker lines.
    Block {
        path: PathBuf,
        begin: String,
        end: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    /// The ktb process that made the changes.
    pid: u32,
    changes: Vec<Change>,
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
            eprintln!(
                "ktb: undoing what an earlier `ktb connect` (pid {}) left behind",
                old.contents.pid
            );
            old.undo()?;
        }
        let journal = Journal {
            path,
            contents: Contents {
                pid: std::process::id(),
                changes: Vec::new(),
            },
        };
        journal.save()?;
        Ok(journal)
    }

    /// The journal at `path`, if there is one.
    pub fn load(path: &Path) -> anyhow::Result<Option<Journal>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let contents = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a ktb journal", path.display()))?;
        Ok(Some(Journal {
            path: path.to_owned(),
            contents,
        }))
    }

    /// Records a change that is about to be made.
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

    /// Writes the journal durably: a temporary file, synced, renamed over.
    fn save(&self) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let text = serde_json::to_string_pretty(&self.contents)?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().with_context(|| format!("cannot write the journal {}", self.path.display()))
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
        Change::Device { name } => ip_ignoring_missing(&["link", "del", name]),
        Change::Route { net, device } => ip_ignoring_missing(&["route", "del", net, "dev", device]),
        Change::File { path, original } => write_in_place(path, original),
        Change::Block { path, begin, end } => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let without = remove_block(&text, begin, end);
            if without != text {
                write_in_place(path, &without)?;
            }
            Ok(())
        }
    }
}

/// `text` without the lines from `begin` to `end` (inclusive).
pub fn remove_block(text: &str, begin: &str, end: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if !inside && bare == begin {
            inside = true;
        } else if inside && bare == end {
            inside = false;
        } else if !inside {
            out.push_str(line);
        }
    }
    out
}

/// Rewrites a file's content without replacing the file: `/etc/resolv.conf`
/// and `/etc/hosts` may be bind mounts (containers, network namespaces),
/// which a rename would fail on.
pub fn write_in_place(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `ip`; "no such device/route" counts as done, since the change
/// is already gone (a TUN device vanishes with the process that held it).
pub fn ip_ignoring_missing(args: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let gone = ["Cannot find device", "No such process", "No such device"]
        .iter()
        .any(|m| stderr.contains(m));
    if output.status.success() || gone {
        Ok(())
    } else {
        anyhow::bail!("`ip {}` failed: {}", args.join(" "), stderr.trim())
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

    #[test]
    fn a_block_is_removed_exactly() {
        let text = "127.0.0.1 localhost\n# BEGIN ktb\n10.96.0.5 web\n# END ktb\n::1 localhost\n";
        assert_eq!(
            remove_block(text, "# BEGIN ktb", "# END ktb"),
            "127.0.0.1 localhost\n::1 localhost\n"
        );
        let untouched = "no markers\nhere";
        assert_eq!(
            remove_block(untouched, "# BEGIN ktb", "# END ktb"),
            untouched
        );
    }

    #[test]
    fn files_come_back_byte_for_byte_newest_change_first() {
        let dir = std::env::temp_dir().join(format!("ktb-journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("resolv.conf");
        std::fs::create_dir_all(&dir).unwrap();
        let original = "nameserver 192.0.2.1\noptions timeout:1\n";
        std::fs::write(&file, original).unwrap();

        let mut journal = Journal::start(&dir).unwrap();
        for round in ["first", "second"] {
            let before = std::fs::read_to_string(&file).unwrap();
            journal
                .record(Change::File {
                    path: file.clone(),
                    original: before,
                })
                .unwrap();
            std::fs::write(&file, format!("nameserver 127.0.0.153 # {round}\n")).unwrap();
        }
        // A crash: the journal on disk is all that is left.
        drop(journal);
        let left = Journal::load(&journal_path(&dir)).unwrap().unwrap();
        assert_eq!(left.changes().len(), 2);
        left.undo().unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
        assert!(!journal_path(&dir).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
