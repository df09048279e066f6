//! `kiln publish`: a build's image copied into a served directory under an immutable name,
//! `<node>-<first 8 hex of sha256>.raw`, with its checksum file — a new build is a new URL, so
//! Ironic's image cache never serves a stale image under an old name — or pushed to an OCI
//! registry as an artifact under the immutable tag `<node>-<sha8>` (`oci::artifact`), the
//! engine that scales past one `kiln serve`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::artifact::manifest::{Manifest, sha256sum_line};
use crate::io::sparse;
use crate::util::fsutil::{temp_beside, write_atomic};

/// The published name of a node's build: `<node>-<sha8>.<raw|qcow2>`.
pub fn published_name(node: &str, sha256: &str, format: &str) -> String {
    format!("{node}-{}.{format}", &sha256[..8])
}

/// A node's image as its build left it in `out/`, checked against the build manifest.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// `raw` or `qcow2`, from the file's first bytes.
    pub format: &'static str,
    /// The image profile it was built with.
    pub profile: String,
}

impl BuiltImage {
    pub fn published_name(&self, node: &str) -> String {
        published_name(node, &self.sha256, self.format)
    }
}

/// Finds the build of `node` in `out`; a missing or changed build is an error that names the node.
pub fn built_image(node: &str, out: &Path) -> Result<BuiltImage> {
    let manifest_path = out.join(format!("{node}.manifest.json"));
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).with_context(|| {
            format!("node {node} is not built: no {}", manifest_path.display())
        })?)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let image = manifest
        .outputs
        .iter()
        .find(|o| o.role == "image")
        .context("the manifest lists no image")?;
    let src = out.join(&image.path);
    let size = std::fs::metadata(&src)
        .with_context(|| format!("reading {}", src.display()))?
        .len();
    if Some(size) != image.size {
        bail!(
            "{} changed since it was built (size differs from its manifest); rebuild it",
            src.display()
        );
    }
    let format = super::serve::check::sniff_format(&src).map_or("raw", |f| f.name());
    Ok(BuiltImage {
        path: src,
        sha256: image.sha256.clone(),
        size,
        format,
        profile: manifest.profile.clone(),
    })
}

/// Copies `out/<node>.img` into `to`; returns the published path (already there: left alone).
pub fn publish(node: &str, out: &Path, to: &Path) -> Result<(PathBuf, bool)> {
    let image = built_image(node, out)?;
    let src = &image.path;
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let name = image.published_name(node);
    let dest = to.join(&name);
    let sum = to.join(format!("{name}.sha256sum"));
    let fresh = !dest.exists();
    if fresh {
        let tmp = temp_beside(&dest);
        let copied = sparse::copy(src, &tmp);
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        copied?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("publishing {}", dest.display()))?;
    }
    write_atomic(&sum, sha256sum_line(&image.sha256, &name).as_bytes())?;
    Ok((dest, fresh))
}

/// `oci://REGISTRY/REPO[:TAG]` as the repository (`REGISTRY/REPO`) and the tag, if one is given.
pub fn parse_oci_target(to: &str) -> Result<(String, Option<String>)> {
    let rest = to
        .strip_prefix("oci://")
        .with_context(|| format!("{to:?} is not an oci://REGISTRY/REPO[:TAG] URL"))?;
    let (registry, path) = rest
        .split_once('/')
        .with_context(|| format!("{to:?} names no repository (oci://REGISTRY/REPO[:TAG])"))?;
    let (repo, tag) = match path.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_string())),
        _ => (path, None),
    };
    if registry.is_empty() || repo.is_empty() || path.contains('@') {
        bail!("{to:?} is not an oci://REGISTRY/REPO[:TAG] URL (a digest cannot be published to)");
    }
    Ok((format!("{registry}/{repo}"), tag))
}

/// The tag kiln publishes a node's build under: immutable, like the file names above.
pub fn published_tag(node: &str, sha256: &str) -> String {
    format!("{node}-{}", &sha256[..8])
}

/// Where a node's image went in a registry.
pub struct OciPublished {
    /// `oci://REGISTRY/REPO:TAG`, the URL Ironic and BMO take.
    pub url: String,
    /// False when the tag already named this very image.
    pub fresh: bool,
}

/// Pushes `out/<node>`'s image to `repo` as a disk-image artifact under `tag` (default
/// `<node>-<sha8>`). A tag that names another image is refused: a published URL never changes
/// what it deploys.
pub fn publish_oci(
    node: &str,
    out: &Path,
    repo: &str,
    tag: Option<&str>,
    insecure: bool,
    architecture: &str,
) -> Result<OciPublished> {
    let image = built_image(node, out)?;
    let tag = tag.map_or_else(|| published_tag(node, &image.sha256), str::to_string);
    let valid = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if tag.is_empty() || tag.len() > 128 || tag.starts_with(['.', '-']) || !tag.chars().all(valid) {
        bail!("{tag:?} is not an OCI tag ([A-Za-z0-9_][A-Za-z0-9._-], at most 128)");
    }
    let artifact = crate::oci::artifact::DiskArtifact {
        digest: format!("sha256:{}", image.sha256),
        size: image.size,
        disktype: image.format,
        architecture: architecture.to_string(),
        title: image.published_name(node),
    };
    let (manifest, index) = crate::oci::artifact::documents(&artifact)?;
    let reference = format!("{repo}:{tag}");
    let url = format!("oci://{reference}");
    match crate::oci::registry::fetch_tag(&reference, insecure)? {
        Some(existing) if existing == index => return Ok(OciPublished { url, fresh: false }),
        Some(_) => bail!(
            "{url} already names another image; published tags are never moved (publish under another tag, or delete it in the registry)"
        ),
        None => {}
    }
    crate::oci::registry::push_disk(
        &reference,
        insecure,
        &image.path,
        &artifact,
        &manifest,
        &index,
    )?;
    Ok(OciPublished { url, fresh: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_targets() {
        let t = |s: &str| parse_oci_target(s).map_err(|e| e.to_string());
        assert_eq!(
            t("oci://127.0.0.1:5000/lab/images").unwrap(),
            ("127.0.0.1:5000/lab/images".into(), None)
        );
        assert_eq!(
            t("oci://quay.io/lab/images:v1").unwrap(),
            ("quay.io/lab/images".into(), Some("v1".into()))
        );
        assert!(t("oci://quay.io").is_err());
        assert!(t("oci://quay.io/lab@sha256:00").is_err());
        assert!(t("/srv/images").is_err());
    }
}
