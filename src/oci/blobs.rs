//! The blob cache: OCI blobs stored by digest under `<cache>/oci/blobs/sha256/`, admitted only
//! after their sha256 matched, so a cached blob is trusted by its name.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::util::cache::Cache;

pub struct BlobStore {
    dir: PathBuf,
}

/// `sha256:<hex>` → `<hex>`, refusing other algorithms and malformed digests.
pub fn hex_of(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest:?} (kiln verifies sha256 only)"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("malformed digest {digest:?}");
    }
    Ok(hex)
}

pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl BlobStore {
    pub fn open() -> Result<BlobStore> {
        let dir = Cache::open()?.root.join("oci/blobs/sha256");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(BlobStore { dir })
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join(hex_of(digest)?))
    }

    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// A temporary file in the store for a blob being fetched.
    pub fn temp(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join(format!(
            ".{}.partial-{}",
            hex_of(digest)?,
            std::process::id()
        )))
    }

    /// Admits `tmp` as `digest` if its content hashes to it; otherwise deletes it and fails.
    pub fn admit(&self, tmp: &Path, digest: &str, what: &str) -> Result<PathBuf> {
        let got = format!("sha256:{}", crate::util::cache::sha256_file(tmp)?);
        if got != digest {
            let _ = std::fs::remove_file(tmp);
            bail!(
                "{what}: the blob's content does not match its digest (expected {digest}, got \
                 {got}); the source is corrupt or was changed — nothing was cached"
            );
        }
        let dest = self.path(digest)?;
        std::fs::rename(tmp, &dest).with_context(|| format!("storing {}", dest.display()))?;
        Ok(dest)
    }

    /// Copies a blob from `reader` into the store, verifying `digest`.
    pub fn put_reader(&self, reader: &mut dyn Read, digest: &str, what: &str) -> Result<PathBuf> {
        if self.has(digest) {
            return self.path(digest);
        }
        let tmp = self.temp(digest)?;
        let copied = (|| -> Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::copy(reader, &mut f)?;
            f.flush()?;
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("reading {what}"));
        }
        self.admit(&tmp, digest, what)
    }

    /// Stores bytes under their own digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<(String, PathBuf)> {
        let digest = digest_of(bytes);
        let path = self.put_reader(&mut &bytes[..], &digest, "a generated blob")?;
        Ok((digest, path))
    }
}
