//! How much a tunnel's TCP socket may hold that it has not sent yet.
//!
//! On a long path Linux grows a socket's send buffer to megabytes, and the
//! kernel sends it in order: a 1 KiB request, an `Open` or a `Credit`
//! written behind a bulk stream's megabytes waits until they have left,
//! tens of milliseconds at a 20 ms round trip, and a credit stuck there
//! stalls the peer's stream too. With `TCP_NOTSENT_LOWAT` the socket is
//! writable only while less than [`UNSENT_LIMIT`] is unsent, so bulk data
//! waits in the session's own bounded queue instead, where control frames
//! go first (see [`crate::session`]). Bytes in flight (sent, not yet
//! acknowledged) are not limited, so the path still fills.
//!
//! Both ends set it on the socket that carries the tunnel: the CLI on its
//! connections to the apiserver (or the agent, going direct), the agent on
//! the connections it accepts.

/// Unsent bytes a tunnel socket keeps: enough to keep a loopback socket
/// busy between two writes of the session's writer (it writes batches of
/// up to 32 frames), a few milliseconds of a port-forward's pace.
pub const UNSENT_LIMIT: u32 = 256 * 1024;

/// Sets `TCP_NOTSENT_LOWAT` to [`UNSENT_LIMIT`] on Linux (the agent's
/// side and Linux laptops); elsewhere the socket keeps the system's
/// behaviour (Windows has no such option; macOS has one that the `libc`
/// crate does not name).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn limit_unsent(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    let value = UNSENT_LIMIT as libc::c_int;
    // SAFETY: the descriptor is borrowed from a live socket, and the option
    // value is a c_int that outlives the call, as setsockopt requires.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket keeps the system's behaviour here (see the Linux version).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn limit_unsent<S>(_socket: &S) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_set_on_a_tcp_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        limit_unsent(&tcp).unwrap();
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len are live locals of the sizes getsockopt is told.
        let result = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&tcp),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(result, 0);
        assert_eq!(value as u32, UNSENT_LIMIT);
    }
}
