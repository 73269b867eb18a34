//! ktb's exit codes: what a script can tell from `$?` without parsing
//! messages. Stable across releases, listed in `ktb --help` and the README.
//!
//! clap exits with [`USAGE`] itself when the flags are wrong; every other
//! failure is sorted by [`ktb::refusal::kind_of`].

use std::process::ExitCode;

use ktb::refusal::Kind;

/// The command did what it was asked (or was stopped by Ctrl-C after
/// restoring everything).
pub const SUCCESS: u8 = 0;
/// Any other failure; the message says what and what to do.
pub const FAILURE: u8 = 1;
/// The command line is wrong (clap's own code for usage errors).
pub const USAGE: u8 = 2;
/// Refused: a colleague's session (or an object of theirs) holds what was
/// asked for; the message says who and since when.
pub const HELD: u8 = 3;
/// Refused: a permission is missing; the message names it and the Role
/// that grants it.
pub const FORBIDDEN: u8 = 4;

/// The table `ktb --help` ends with.
pub const HELP: &str = "\
Exit codes:
  0  success (also after Ctrl-C, once everything is restored)
  1  failure (the message says what and what to do)
  2  usage: the command line is wrong
  3  refused: someone else's session holds it (the message says who and since when)
  4  refused: a permission is missing (the message names it and the Role granting it)";

/// The exit code of a failed command.
pub fn of(error: &anyhow::Error) -> ExitCode {
    ExitCode::from(code_of(ktb::refusal::kind_of(error)))
}

fn code_of(kind: Kind) -> u8 {
    match kind {
        Kind::Failed => FAILURE,
        Kind::Held => HELD,
        Kind::Forbidden => FORBIDDEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_code_and_the_help_lists_it() {
        let codes = [SUCCESS, USAGE]
            .into_iter()
            .chain([Kind::Failed, Kind::Held, Kind::Forbidden].map(code_of))
            .collect::<Vec<_>>();
        let mut distinct = codes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), codes.len(), "codes collide: {codes:?}");
        for code in codes {
            assert!(
                HELP.lines()
                    .any(|line| line.trim_start().starts_with(&format!("{code} "))),
                "the help does not list exit code {code}"
            );
        }
    }
}
