//! Whether `ktb connect` (tun mode, its default) can create its device on
//! this machine: `/dev/net/tun` must exist and open, and creating an
//! interface and its routes takes CAP_NET_ADMIN (root has it).
//!
//! Opening the device file without configuring it creates nothing; the
//! capability is read from this process's effective set
//! (`/proc/self/status`), so running `sudo ktb doctor` answers for `sudo
//! ktb connect`. A machine that cannot is a WARN, not a FAIL: `connect
//! --mode socks5` needs neither, and no other command needs a device.

use super::Check;

const NAME: &str = "tun";

/// The row for this machine.
#[cfg(target_os = "linux")]
pub fn check() -> Check {
    let access = crate::connect::system::tun_access();
    judge(access.opened, access.net_admin)
}

/// Elsewhere `connect` has no tun mode.
#[cfg(not(target_os = "linux"))]
pub fn check() -> Check {
    Check::warn(
        NAME,
        "`ktb connect` creates its TUN device on Linux only",
        "use `ktb connect --mode socks5` on this machine",
    )
}

/// What opening the device (`opened`) and the capability (`net_admin`,
/// `None` when unknown) mean for `ktb connect`.
#[cfg(target_os = "linux")]
fn judge(opened: std::io::Result<()>, net_admin: Option<bool>) -> Check {
    let socks = "or use `ktb connect --mode socks5`, which needs neither";
    match (opened, net_admin) {
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => Check::warn(
            NAME,
            "/dev/net/tun does not exist: this kernel (or container) offers no TUN devices",
            format!(
                "`sudo modprobe tun` loads the driver (a container needs /dev/net/tun passed \
                 in, e.g. `--device /dev/net/tun`); {socks}"
            ),
        ),
        (Err(e), _) => Check::warn(
            NAME,
            format!("cannot open /dev/net/tun: {e}"),
            format!("run `sudo ktb connect` (tun mode needs root or CAP_NET_ADMIN); {socks}"),
        ),
        (Ok(()), Some(false)) => Check::warn(
            NAME,
            "/dev/net/tun opens, but this process lacks CAP_NET_ADMIN, which creating the \
             device and its routes takes",
            format!("run `sudo ktb connect`; {socks}"),
        ),
        (Ok(()), None) => Check::warn(
            NAME,
            "/dev/net/tun opens; whether this process holds CAP_NET_ADMIN is unknown (no \
             CapEff in /proc/self/status)",
            format!("if `ktb connect` cannot create its device, run it with sudo; {socks}"),
        ),
        (Ok(()), Some(true)) => Check::pass(
            NAME,
            "/dev/net/tun opens and this process holds CAP_NET_ADMIN: `ktb connect` can \
             create its device and routes",
        ),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn only_an_open_device_and_the_capability_pass() {
        assert_eq!(judge(Ok(()), Some(true)).status, Status::Pass);
        let no_cap = judge(Ok(()), Some(false));
        assert_eq!(no_cap.status, Status::Warn);
        assert!(no_cap.hint.unwrap().contains("sudo ktb connect"));
        let missing = judge(Err(std::io::ErrorKind::NotFound.into()), Some(true));
        assert_eq!(missing.status, Status::Warn);
        assert!(missing.hint.unwrap().contains("modprobe tun"));
        let denied = judge(Err(std::io::ErrorKind::PermissionDenied.into()), Some(true));
        assert!(denied.detail.starts_with("cannot open /dev/net/tun"));
        assert!(denied.hint.unwrap().contains("--mode socks5"));
    }
}
