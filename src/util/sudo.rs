//! The user behind `sudo`: `sudo kiln flash --node …` needs root for the disk only, so the build
//! before it runs as the user who typed the command (`SUDO_UID`/`SUDO_GID`), and what it makes —
//! `out/` files, cache entries — is theirs, as if they had built without sudo.
//!
//! Why build as the user rather than chown afterwards: a build creates files in places kiln does
//! not list in one spot (out/, the cache's downloads, images, digests and OCI blobs, temporaries
//! it renames), and a missed one is a root-owned file that fails the user's next run. With the
//! effective ids switched, every file is created with the right owner and the build can only
//! touch what the user could. The switch is of the *effective* ids only (the saved uid stays
//! root) so kiln can take root back for the write; it is ownership hygiene, not a sandbox — the
//! tools kiln runs (mke2fs, debugfs) inherit a real uid of root.

use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::unistd::{Gid, Uid, User, getegid, geteuid, getuid, setegid, seteuid};

/// Who ran `sudo kiln …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvokingUser {
    pub uid: u32,
    pub gid: u32,
}

/// The user behind sudo from its variables, when kiln runs as root and they name someone else.
pub fn invoking_user_from(
    euid: u32,
    sudo_uid: Option<&str>,
    sudo_gid: Option<&str>,
) -> Option<InvokingUser> {
    if euid != 0 {
        return None;
    }
    let uid = sudo_uid?.trim().parse().ok()?;
    let gid = sudo_gid?.trim().parse().ok()?;
    // `sudo` from a root shell: nobody to hand the files to.
    (uid != 0).then_some(InvokingUser { uid, gid })
}

/// [`invoking_user_from`] for this process.
pub fn invoking_user() -> Option<InvokingUser> {
    let var = |k| std::env::var(k).ok();
    invoking_user_from(
        geteuid().as_raw(),
        var("SUDO_UID").as_deref(),
        var("SUDO_GID").as_deref(),
    )
}

/// Runs `f` with the effective ids of the user behind sudo, then takes root back; just runs it
/// when kiln was not started through sudo.
pub fn as_invoking_user<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(user) = invoking_user() else {
        return f();
    };
    let (root_uid, root_gid) = (geteuid(), getegid());
    // The group first: once the uid is not root, changing the group is no longer allowed.
    setegid(Gid::from_raw(user.gid))
        .with_context(|| format!("switching to group {} (SUDO_GID) for the build", user.gid))?;
    if let Err(e) = seteuid(Uid::from_raw(user.uid)) {
        let _ = setegid(root_gid);
        return Err(e)
            .with_context(|| format!("switching to user {} (SUDO_UID) for the build", user.uid));
    }
    let result = f();
    seteuid(root_uid).context("taking root back after the build")?;
    setegid(root_gid).context("taking root's group back after the build")?;
    result
}

/// The home directory of the effective user while [`as_invoking_user`] has switched to it
/// (real uid root, effective uid not), from the password database: sudo on Linux sets `HOME` to
/// root's, and the user's cache is in theirs. None otherwise: then `HOME` is the one to use.
pub fn switched_home() -> Option<PathBuf> {
    let (real, effective) = (getuid(), geteuid());
    if real == effective || !real.is_root() {
        return None;
    }
    User::from_uid(effective)
        .ok()
        .flatten()
        .map(|u| u.dir)
        .filter(|d| d.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_started_by_another_user_through_sudo_switches() {
        let u = invoking_user_from(0, Some("1000"), Some("1000"));
        assert_eq!(
            u,
            Some(InvokingUser {
                uid: 1000,
                gid: 1000
            })
        );
        // Not root: nothing to give back.
        assert_eq!(invoking_user_from(1000, Some("1000"), Some("1000")), None);
        // Root without sudo, sudo from root, and variables that are not ids.
        assert_eq!(invoking_user_from(0, None, None), None);
        assert_eq!(invoking_user_from(0, Some("0"), Some("0")), None);
        assert_eq!(invoking_user_from(0, Some("me"), Some("1000")), None);
        assert_eq!(invoking_user_from(0, Some("1000"), None), None);
    }
}
