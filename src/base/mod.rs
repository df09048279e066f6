//! base — the second stage. Where base bytes come from: a profile's URL (downloaded once, verified, cached), a local file,
//! or kiln's built-in sample; compressed sources are decompressed once into the cache as sparse
//! raw images.

pub mod assemble;
pub mod bootloader;
// Moved down to util (the OCI blob store lives in it too); the old path stays for callers.
pub use crate::util::cache;
pub mod http;
pub mod oci_base;
pub mod sample;
pub mod unpack;

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::io::decompress::{self, Compression};
use crate::io::progress::{Progress, ProgressReader, Stage};
use crate::io::sparse;
use crate::plan::profile::Profile;
use cache::Cache;

/// What `--base` (or the profile) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseRef {
    /// The profile's own source.
    Profile,
    /// kiln's built-in sample with the profile's layout.
    Sample,
    Url(String),
    Path(PathBuf),
    /// An OCI image (`docker://…`, `oci:…`, `oci-archive:…`, `docker-archive:…`).
    Oci(String),
}

impl BaseRef {
    pub fn parse(s: Option<&str>) -> BaseRef {
        match s {
            None => BaseRef::Profile,
            Some("sample") => BaseRef::Sample,
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                BaseRef::Url(u.to_string())
            }
            Some(r) if crate::oci::ImageRef::is_oci(r) => BaseRef::Oci(r.to_string()),
            Some(p) => BaseRef::Path(PathBuf::from(p)),
        }
    }

    /// The OCI image the base is made from, if it is one: `--base docker://…`, or the profile's
    /// `source.oci` when the profile's own source is used and it has no download URL (a URL wins).
    pub fn oci_image<'a>(&'a self, profile: &'a Profile) -> Option<&'a str> {
        match self {
            BaseRef::Oci(r) => Some(r),
            BaseRef::Profile if profile.source.url.is_none() => profile.source.oci.as_deref(),
            _ => None,
        }
    }
}

/// A raw base image ready to be copied, and where it came from.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub raw: PathBuf,
    /// sha256 of the source as given (the archive for a download, the file for a path).
    pub source_sha256: String,
    pub description: String,
}

/// Resolves `base` for `profile` to a raw image file, downloading and decompressing as needed
/// (an OCI image is pulled, over plain HTTP when `insecure`, and assembled into a disk).
pub fn prepare(
    base: &BaseRef,
    profile: &Profile,
    expected_sha256: Option<&str>,
    insecure: bool,
) -> Result<BaseImage> {
    if let Some(reference) = base.oci_image(profile) {
        return oci_base::prepare(reference, profile, insecure);
    }
    let cache = Cache::open()?;
    match base {
        BaseRef::Sample => {
            let dest = cache.root.join("images").join(format!(
                "sample-{}-v{}.img",
                profile.name,
                env!("CARGO_PKG_VERSION")
            ));
            if !dest.is_file() {
                let tmp = crate::util::fsutil::temp_beside(&dest);
                let made = sample::make(profile, &tmp);
                if made.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                made?;
                std::fs::rename(&tmp, &dest)?;
            }
            let sha = cache.file_digest(&dest)?;
            Ok(BaseImage {
                raw: dest,
                source_sha256: sha,
                description: format!("kiln sample with the {} layout", profile.name),
            })
        }
        BaseRef::Profile => {
            let Some(url) = &profile.source.url else {
                bail!(
                    "profile {} has no download URL; give the base image with --base{}",
                    profile.name,
                    profile
                        .source
                        .obtain
                        .as_ref()
                        .map(|o| format!(" ({o})"))
                        .unwrap_or_default()
                );
            };
            let expected = profile.source.sha256.as_deref().or(expected_sha256);
            if expected.is_none() {
                // A profile may know where an image is but not its published digest.
                eprintln!(
                    "warning: profile {} records no sha256 for {url}; give --base-sha256 to verify it",
                    profile.name
                );
            }
            from_url(&cache, url, expected)
        }
        // Taken by `oci_image` above; kept so the match needs no panic.
        BaseRef::Oci(r) => oci_base::prepare(r, profile, insecure),
        BaseRef::Url(url) => {
            let expected = expected_sha256.or(if Some(url) == profile.source.url.as_ref() {
                profile.source.sha256.as_deref()
            } else {
                None
            });
            if expected.is_none() {
                eprintln!("warning: no sha256 for {url}; give --base-sha256 to verify it");
            }
            from_url(&cache, url, expected)
        }
        BaseRef::Path(path) => from_path(&cache, path, expected_sha256),
    }
}

/// The raw image of a local file: itself when uncompressed, else its decompressed copy in the cache.
pub fn prepare_raw(path: &Path) -> Result<PathBuf> {
    let cache = Cache::open()?;
    Ok(from_path(&cache, path, None)?.raw)
}

fn from_url(cache: &Cache, url: &str, expected: Option<&str>) -> Result<BaseImage> {
    let (archive, sha) = http::download(cache, url, expected)?;
    let raw = decompressed(cache, &archive, &sha)?;
    Ok(BaseImage {
        raw,
        source_sha256: sha,
        description: url.to_string(),
    })
}

fn from_path(cache: &Cache, path: &Path, expected: Option<&str>) -> Result<BaseImage> {
    if !path.is_file() {
        bail!(
            "base image {} does not exist or is not a file",
            path.display()
        );
    }
    let sha = cache.file_digest(path)?;
    if let Some(e) = expected
        && !e.eq_ignore_ascii_case(&sha)
    {
        bail!(
            "checksum mismatch for {}: expected sha256 {e}, got {sha}",
            path.display()
        );
    }
    let raw = match Compression::of_file(path)? {
        Compression::None => path.to_path_buf(),
        _ => decompressed(cache, path, &sha)?,
    };
    Ok(BaseImage {
        raw,
        source_sha256: sha,
        description: path.display().to_string(),
    })
}

/// The raw image inside `archive`, decompressed once into the cache (sparse).
fn decompressed(cache: &Cache, archive: &Path, sha: &str) -> Result<PathBuf> {
    let dest = cache.image(sha);
    if dest.is_file() {
        return Ok(dest);
    }
    if Compression::of_file(archive)? == Compression::None {
        // A download that is already raw: share its bytes as the image.
        sparse::copy(archive, &dest)?;
        return Ok(dest);
    }
    let tmp = crate::util::fsutil::temp_beside(&dest);
    let result = (|| -> Result<()> {
        let mut out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let name = archive.file_name().unwrap_or_default().to_string_lossy();
        let mut progress = Progress::new(
            Stage::Decompress,
            &name,
            decompress::decompressed_size_hint(archive),
        );
        let len = decompress::with_decompressed(archive, |r| {
            let mut pr = ProgressReader {
                inner: r,
                progress: &mut progress,
            };
            sparse::write_sparse(&mut pr, &mut out)
        })?;
        progress.finish();
        out.set_len(len)?;
        out.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}
