//! The checksum files `kiln serve` makes for images: `<image>.sha256sum` and `.sha512sum`, computed once per
//! version of an image and shared by every request for it.
//!
//! A version is the opened file's identity (device, inode, size, modification time): concurrent
//! requests for one version wait for one computation instead of each hashing the image (16
//! requests were 14 CPUs' worth of hashing), and later ones get the remembered result. The result
//! is also cached on disk in a hidden file beside the image (`.<image>.sha256`), so a restarted
//! server does not hash again; when that file cannot be written (a read-only directory) the
//! in-memory result still serves. The algorithm is a type parameter: another checksum file is an
//! [`Algorithm`] impl and a route.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use sha2::Digest;
use tokio::sync::OnceCell;

/// A hash a checksum file can be made with.
pub trait Algorithm: Digest + Send + 'static {
    /// Its name: the checksum file is `<image>.<NAME>sum`, the disk cache `.<image>.<NAME>`.
    const NAME: &'static str;
}

impl Algorithm for sha2::Sha256 {
    const NAME: &'static str = "sha256";
}

impl Algorithm for sha2::Sha512 {
    const NAME: &'static str = "sha512";
}

/// One version of one file: what a checksum is valid for.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Version {
    fn of(meta: &std::fs::Metadata) -> Version {
        Version {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }

    /// The key written in the disk cache (size and mtime only: a copy with `cp -p` keeps it).
    fn cache_key(&self) -> String {
        format!("{} {}.{}", self.size, self.mtime, self.mtime_nsec)
    }
}

/// The checksums computed or being computed, by file version and algorithm. Entries are kept for
/// the server's life: one per image version served, a few dozen bytes each.
#[derive(Default)]
pub struct Checksums {
    by_version: Mutex<HashMap<(Version, &'static str), Computation>>,
}

/// One checksum: being computed, or computed (hex).
type Computation = Arc<OnceCell<String>>;

impl Checksums {
    /// The hex checksum of `file` (opened from `path`, `meta` its fstat), computed at most once
    /// per version however many requests ask at the same time. A failed computation is not
    /// remembered: the next request tries again.
    pub async fn of<A: Algorithm>(
        &self,
        path: &Path,
        file: File,
        meta: &std::fs::Metadata,
    ) -> Result<String> {
        let version = Version::of(meta);
        let cell = self
            .by_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((version, A::NAME))
            .or_default()
            .clone();
        let path = path.to_path_buf();
        let hex = cell
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || cached_or_hashed::<A>(&path, file, version))
                    .await
                    .context("hashing task")?
            })
            .await?;
        Ok(hex.clone())
    }
}

/// The checksum from the disk cache beside `path` when it was made for this version, else
/// hashed from the opened `file` and written to the cache (best effort).
fn cached_or_hashed<A: Algorithm>(path: &Path, file: File, version: Version) -> Result<String> {
    let cache = cache_path::<A>(path)?;
    let key = version.cache_key();
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Some((k, hex)) = text.trim().rsplit_once(' ')
        && k == key
    {
        return Ok(hex.to_string());
    }
    let hex = hex_digest::<A>(file).with_context(|| format!("hashing {}", path.display()))?;
    // Best effort: a read-only directory only costs a restarted server a rehash.
    let _ = crate::util::fsutil::write_atomic(&cache, format!("{key} {hex}\n").as_bytes());
    Ok(hex)
}

fn cache_path<A: Algorithm>(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    Ok(path.with_file_name(format!(".{name}.{}", A::NAME)))
}

/// The hex digest of everything `r` reads.
fn hex_digest<A: Algorithm>(mut r: impl Read) -> std::io::Result<String> {
    let mut h = A::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_computation_per_version_and_the_cache_beside() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.raw");
        std::fs::write(&img, b"abc").unwrap();
        let sums = Checksums::default();
        let open = || {
            let f = File::open(&img).unwrap();
            let m = f.metadata().unwrap();
            (f, m)
        };
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let (f, m) = open();
        assert_eq!(sums.of::<sha2::Sha256>(&img, f, &m).await.unwrap(), want);
        assert_eq!(sums.by_version.lock().unwrap().len(), 1);
        let cached = std::fs::read_to_string(dir.path().join(".a.raw.sha256")).unwrap();
        assert!(cached.ends_with(&format!(" {want}\n")), "{cached}");
        // The same version again: the remembered result, no new entry.
        let (f, m) = open();
        assert_eq!(sums.of::<sha2::Sha256>(&img, f, &m).await.unwrap(), want);
        assert_eq!(sums.by_version.lock().unwrap().len(), 1);
        // A new version is a new computation.
        std::fs::write(&img, b"abcd").unwrap();
        let (f, m) = open();
        let new = sums.of::<sha2::Sha256>(&img, f, &m).await.unwrap();
        assert_eq!(
            new,
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
    }
}
