//! `kiln publish`: a build's image copied into a served directory under an immutable name,
//! `<node>-<first 8 hex of sha256>.raw`, with its checksum file — a new build is a new URL, so
//! Ironic's image cache never serves a stale image under an old name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::format::manifest::{Manifest, sha256sum_line};
use crate::format::sparse;
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
    let format = super::check::sniff_format(&src).map_or("raw", |f| f.name());
    Ok(BuiltImage {
        path: src,
        sha256: image.sha256.clone(),
        size,
        format,
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
