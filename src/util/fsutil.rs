//! File-system helpers: atomic writes, so an interrupted kiln never leaves half a file behind.

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

/// Writes `bytes` to `dest` through a temporary file and a rename.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(dest);
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
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
