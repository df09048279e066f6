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
