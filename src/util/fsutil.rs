//! File-system helpers: atomic writes, so an interrupted kiln never leaves half a file behind,
//! and the sweep that removes what a killed kiln could not.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A temporary path beside `dest`, hidden and marked partial (`.<name>.tmp-<pid>`), on the same
/// filesystem so the final rename is atomic.
pub fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// The process id a temporary of kiln's carries in its name: `.<name>.tmp-<pid>` (`temp_beside`),
/// `.<digest>.partial-<pid>` (a blob being fetched) or `stage-<pid>` (an OCI unpacking directory).
fn owner_pid(name: &str) -> Option<i32> {
    let digits = if name.starts_with('.') {
        name.rsplit_once(".tmp-")
            .or_else(|| name.rsplit_once(".partial-"))?
            .1
    } else {
        name.strip_prefix("stage-")?
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether process `pid` still exists (signal 0 checks without sending; EPERM means it exists
/// under another user).
fn alive(pid: i32) -> bool {
    if pid == std::process::id() as i32 {
        return true;
    }
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporaries in `dir` left by kiln processes that no longer run (killed builds);
/// those of running processes, and everything else, are left alone. Returns what was removed.
pub fn sweep_stale_temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid <= 0 || alive(pid) {
            continue;
        }
        let path = e.path();
        let gone = match e.file_type() {
            Ok(t) if t.is_dir() => {
                make_writable(&path);
                std::fs::remove_dir_all(&path)
            }
            _ => std::fs::remove_file(&path),
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Gives the owner write and search permission below `p`, so a tree can be deleted.
pub fn make_writable(p: &Path) {
    if let Ok(m) = p.symlink_metadata()
        && m.is_dir()
    {
        let _ = std::fs::set_permissions(
            p,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
        );
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

/// Writes `bytes` to `dest` through a temporary file and a rename.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(dest, bytes, 0o666)
}

/// `write_atomic` for a file only its owner may read (it holds secrets: a node's user-data).
pub fn write_private(dest: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(dest, bytes, 0o600)
}

fn write_atomic_mode(dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_beside(dest);
    let result = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the listed temporary files when dropped, unless disarmed: failed builds leave no
/// half-written artifacts.
#[derive(Default)]
pub struct TempGuard(Vec<PathBuf>);

impl TempGuard {
    pub fn track(&mut self, p: PathBuf) -> PathBuf {
        self.0.push(p.clone());
        p
    }
    pub fn disarm(&mut self) {
        self.0.clear();
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts writeback of a file's freshly written bytes every few dozen MiB, so the final `fsync`
/// finds little left to do: the disk writes while kiln still reads and converts, instead of all at
/// the end. A hint only (Linux `sync_file_range` without waiting); errors surface at the `fsync`.
pub struct Writeback {
    flushed: u64,
}

impl Writeback {
    /// Bytes written between two kicks: large enough to keep requests big, small enough that the
    /// page cache never holds much unwritten output.
    const STEP: u64 = 32 << 20;

    pub fn new(start: u64) -> Self {
        Writeback { flushed: start }
    }

    /// Call after writing up to byte `end` (sequentially) of `file`.
    pub fn written(&mut self, file: &std::fs::File, end: u64) {
        if end < self.flushed + Self::STEP {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on an open descriptor; no memory is passed.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    self.flushed as i64,
                    (end - self.flushed) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        self.flushed = end;
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    #[test]
    fn only_temporaries_of_dead_processes_go() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has exited: its pid is free (reuse within this test is not expected).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        for name in [
            format!(".a.raw-tmp.tmp-{dead}"),
            format!(".b.img.tmp-{mine}"),
            "keep.img".to_string(),
            ".notes.tmp-x1".to_string(),
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        std::fs::create_dir_all(dir.path().join(format!("stage-{dead}/etc"))).unwrap();
        std::fs::create_dir(dir.path().join(format!("stage-{mine}"))).unwrap();
        let mut removed: Vec<String> = sweep_stale_temporaries(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        assert_eq!(
            removed,
            vec![format!(".a.raw-tmp.tmp-{dead}"), format!("stage-{dead}")]
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                format!(".b.img.tmp-{mine}"),
                ".notes.tmp-x1".to_string(),
                "keep.img".to_string(),
                format!("stage-{mine}"),
            ]
        );
    }
}
