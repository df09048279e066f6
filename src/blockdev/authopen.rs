//! Opening a Mac's raw disk without running kiln as root, the way Raspberry Pi Imager does:
//! Apple's `/usr/libexec/authopen` shows the system's administrator dialog, opens the node itself
//! and passes the open descriptor back over a socket (`-stdoutpipe`, SCM_RIGHTS). kiln never sees
//! the password and never runs as root, so a `--node` build made on the way belongs to the user.
//! Opt-in (`kiln flash --authopen`): no dialog can appear in CI or over ssh, where the plain
//! EACCES message ("run kiln with sudo") is the right answer.
//!
//! Receiving the descriptor is plain socket code, tested here on any Unix; starting authopen is
//! macOS-only and has not run on a Mac.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use anyhow::{Context, Result};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// The descriptor the peer of `sock` sent with SCM_RIGHTS; None when it closed without one (a
/// cancelled dialog, a refused authorization).
pub fn receive_fd(sock: &UnixStream) -> Result<Option<OwnedFd>> {
    let mut data = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut data)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .context("receiving the descriptor from authopen")?;
    for c in msg.cmsgs().context("reading authopen's message")? {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            // SAFETY: SCM_RIGHTS installed this descriptor in our table; nothing else owns it.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok(None)
}

/// Opens `raw` (`/dev/rdisk4`) for reading and writing through authopen, which asks for an
/// administrator's password first.
#[cfg(target_os = "macos")]
pub fn open(raw: &str) -> Result<std::fs::File> {
    use std::process::{Command, Stdio};
    let (ours, theirs) = UnixStream::pair().context("making a socket pair for authopen")?;
    let child = crate::util::cmd::spawn(
        Command::new("/usr/libexec/authopen")
            .args(["-stdoutpipe", "-o", &nix::libc::O_RDWR.to_string(), raw])
            .stdin(Stdio::null())
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .stderr(Stdio::piped()),
        // An absolute name: `require` finds it whatever PATH holds.
        "/usr/libexec/authopen",
    )?;
    // The Command (and our copy of its end of the pair) is gone: if authopen exits without
    // sending, this read sees end-of-file instead of waiting forever.
    let fd = receive_fd(&ours);
    let out = child.wait_with_output().context("waiting for authopen")?;
    match fd? {
        Some(fd) => Ok(std::fs::File::from(fd)),
        None => anyhow::bail!(
            "authopen did not open {raw} (was the password dialog cancelled?) {}; nothing was written",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, sendmsg};
    use std::io::{IoSlice, Read, Seek, Write};

    #[test]
    fn a_descriptor_sent_over_the_socket_is_received_and_usable() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"card").unwrap();
        // What authopen does on the other end: one byte of data, the descriptor alongside.
        let fds = [file.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            theirs.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut got = std::fs::File::from(receive_fd(&ours).unwrap().expect("a descriptor"));
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "card");
    }

    #[test]
    fn a_peer_that_closes_without_sending_is_none() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(receive_fd(&ours).unwrap().is_none());
    }
}
