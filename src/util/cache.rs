//! kiln's content-addressed cache: verified downloads and decompressed images, keyed by sha256.
//!
//! Only verified bytes enter the cache (downloads land in `partial/` and are renamed into
//! `downloads/<sha256>` after their checksum matched), so a cached entry is trusted by its name.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    /// `$KILN_CACHE_DIR`, else the user's cache directory (`~/.cache/kiln` on Linux).
    pub fn open() -> Result<Cache> {
        let root = Self::location().context("no cache directory; set KILN_CACHE_DIR")?;
        for sub in ["downloads", "partial", "images"] {
            std::fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        // What killed runs left (their pid is gone); resumable downloads in partial/ stay.
        for sub in ["downloads", "images", "oci", "oci/blobs/sha256"] {
            crate::util::fsutil::sweep_stale_temporaries(&root.join(sub));
        }
        Ok(Cache { root })
    }

    /// Where the cache is (or would be), without creating it. While a build runs as the user
    /// behind sudo (`util::sudo`), their cache, not root's.
    pub fn location() -> Option<PathBuf> {
        match std::env::var_os("KILN_CACHE_DIR") {
            Some(d) => Some(PathBuf::from(d)),
            None => match crate::util::sudo::switched_home() {
                Some(home) => Some(user_cache_dir(&home).join("kiln")),
                None => dirs::cache_dir().map(|d| d.join("kiln")),
            },
        }
    }

    pub fn download(&self, sha256: &str) -> PathBuf {
        self.root.join("downloads").join(sha256)
    }

    pub fn partial(&self, url: &str) -> PathBuf {
        self.root.join("partial").join(format!(
            "{}.part",
            &hex::encode(Sha256::digest(url.as_bytes()))[..32]
        ))
    }

    /// The decompressed raw image made from the source whose sha256 is `sha256`.
    pub fn image(&self, sha256: &str) -> PathBuf {
        self.root.join("images").join(format!("{sha256}.img"))
    }

    /// sha256 of a local file, remembered by device, inode, size and mtime so a 1.3 GB base is
    /// hashed once, not on every build.
    pub fn file_digest(&self, path: &Path) -> Result<String> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let key = format!(
            "{}:{}:{}:{}.{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        let memo_path = self.root.join("digests.json");
        let mut memo: BTreeMap<String, String> = std::fs::read(&memo_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(d) = memo.get(&key) {
            return Ok(d.clone());
        }
        let digest = sha256_file(path)?;
        memo.insert(key, digest.clone());
        crate::util::fsutil::write_atomic(&memo_path, &serde_json::to_vec_pretty(&memo)?)?;
        Ok(digest)
    }
}

/// The platform's cache directory in `home`, as `dirs::cache_dir` finds it from `$HOME`.
fn user_cache_dir(home: &Path) -> PathBuf {
    if cfg!(target_os = "macos") {
        home.join("Library/Caches")
    } else {
        home.join(".cache")
    }
}

/// sha256 of a whole file.
pub fn sha256_file(path: &Path) -> Result<String> {
    digest_file::<Sha256>(path)
}

/// The hex digest of a file with any of the sha2 digests.
pub fn digest_file<D: Digest>(path: &Path) -> Result<String> {
    let mut f = crate::util::input::open_regular(path)?;
    let mut h = D::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
