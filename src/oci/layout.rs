//! Images on disk: OCI image layouts (`oci:`), their tarballs (`oci-archive:`) and `docker save`
//! tarballs (`docker-archive:`). Every blob is checked against its digest before use.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::blobs::{BlobStore, digest_of, hex_of};
use super::image::{Image, PullOptions};
use super::manifest::{
    MAX_DOCUMENT, MT_DOCKER_LIST, MT_LAYER_TAR, MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_MANIFEST,
    pick_platform,
};
use crate::util::input::read_capped;

/// Reads an OCI image layout directory, verifying each blob it uses in place.
pub fn read_layout(dir: &Path, tag: Option<&str>, opts: &PullOptions) -> Result<Image> {
    let index_path = dir.join("index.json");
    if !index_path.exists() {
        bail!(
            "{} is not an OCI image layout (no index.json)",
            dir.display()
        );
    }
    let index = read_capped(&index_path, MAX_DOCUMENT, "the layout's index.json")?;
    let mut blob = |digest: &str| -> Result<PathBuf> {
        let p = dir.join("blobs/sha256").join(hex_of(digest)?);
        let got = format!("sha256:{}", crate::util::cache::sha256_file(&p)?);
        if got != digest {
            bail!(
                "{}: content does not match its digest {digest}; the layout is corrupt",
                p.display()
            );
        }
        Ok(p)
    };
    resolve(&index, tag, opts, &mut blob)
}

/// Reads a tar of an OCI image layout: blobs go into the cache (verified), then as a layout.
pub fn read_oci_archive(
    file: &Path,
    tag: Option<&str>,
    opts: &PullOptions,
    store: &BlobStore,
) -> Result<Image> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut archive = tar::Archive::new(f);
    let mut index = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if path == "index.json" {
            index = Some(read_document(&mut entry, &path)?);
        } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let digest = format!("sha256:{hex}");
            store.put_reader(&mut entry, &digest, &path)?;
        }
    }
    let index = index.with_context(|| format!("{} holds no index.json", file.display()))?;
    let mut blob = |digest: &str| -> Result<PathBuf> {
        if !store.has(digest) {
            bail!("the archive lacks blob {digest}");
        }
        store.path(digest)
    };
    resolve(&index, tag, opts, &mut blob)
}

/// Picks the manifest named by `tag` (or the only one) from an index, resolving a multi-arch
/// index to the wanted platform.
fn resolve(
    index: &[u8],
    tag: Option<&str>,
    opts: &PullOptions,
    blob: &mut dyn FnMut(&str) -> Result<PathBuf>,
) -> Result<Image> {
    let index: Value = serde_json::from_slice(index).context("parsing index.json")?;
    let manifests = index["manifests"]
        .as_array()
        .context("index.json lists no manifests")?;
    let chosen = match tag {
        Some(t) => manifests
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(t))
            .with_context(|| format!("no image tagged {t:?} in the layout"))?,
        None if manifests.len() == 1 => &manifests[0],
        None => bail!(
            "the layout holds {} images; name one (oci:DIR:TAG)",
            manifests.len()
        ),
    };
    let mut digest = chosen["digest"]
        .as_str()
        .context("no digest in index.json")?
        .to_string();
    let mut media_type = chosen["mediaType"]
        .as_str()
        .unwrap_or(MT_OCI_MANIFEST)
        .to_string();
    // Nested indexes (an index pointing at a multi-arch index) are resolved level by level.
    for _ in 0..4 {
        if media_type != MT_OCI_INDEX && media_type != MT_DOCKER_LIST {
            break;
        }
        let inner: Value = serde_json::from_slice(&read_capped(
            &blob(&digest)?,
            MAX_DOCUMENT,
            "an image index",
        )?)?;
        (digest, media_type) = pick_platform(&inner, &opts.arch)?;
    }
    let manifest = read_capped(&blob(&digest)?, MAX_DOCUMENT, "the image manifest")?;
    Image::from_manifest(&manifest, digest, blob)
}

/// Reads a JSON document out of an archive, refusing one larger than any real manifest.
fn read_document(entry: &mut impl Read, path: &str) -> Result<Vec<u8>> {
    let mut b = Vec::new();
    entry.take(MAX_DOCUMENT + 1).read_to_end(&mut b)?;
    if b.len() as u64 > MAX_DOCUMENT {
        bail!(
            "{path} in the archive is larger than {} MiB; not an image's document",
            MAX_DOCUMENT >> 20
        );
    }
    Ok(b)
}

/// Reads a `docker save` tarball (its first image): layers are hashed into the cache and an OCI
/// manifest is made for them.
pub fn read_docker_archive(file: &Path, store: &BlobStore) -> Result<Image> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut archive = tar::Archive::new(f);
    let mut small: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut stored: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if path.ends_with(".json") {
            let b = read_document(&mut entry, &path)?;
            small.insert(path, b);
        } else {
            // Layer tarballs: hash while storing, admit under their own digest.
            let tmp = store.temp(&format!("sha256:{}", "0".repeat(64)))?;
            let size = {
                let mut out = std::fs::File::create(&tmp)?;
                std::io::copy(&mut entry, &mut out)?
            };
            let digest = format!("sha256:{}", crate::util::cache::sha256_file(&tmp)?);
            store.admit(&tmp, &digest, &path)?;
            stored.insert(path, (digest, size));
        }
    }
    let manifest: Value = serde_json::from_slice(
        small
            .get("manifest.json")
            .context("not a docker-archive: no manifest.json")?,
    )?;
    let first = manifest
        .as_array()
        .and_then(|a| a.first())
        .context("the archive's manifest.json lists no image")?;
    let config_name = first["Config"].as_str().context("no Config")?;
    let config_bytes = small
        .get(config_name)
        .with_context(|| format!("the archive lacks {config_name}"))?;
    let (config_digest, _) = store.put_bytes(config_bytes)?;
    let mut layers = Vec::new();
    for l in first["Layers"].as_array().context("no Layers")? {
        let name = l.as_str().context("a layer name")?;
        let (digest, size) = stored
            .get(name)
            .with_context(|| format!("the archive lacks layer {name}"))?;
        layers.push(json!({"mediaType": MT_LAYER_TAR, "digest": digest, "size": size}));
    }
    let oci_manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": config_bytes.len()},
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&oci_manifest)?;
    let (digest, _) = store.put_bytes(&bytes)?;
    Image::from_manifest(&bytes, digest, &mut |d| store.path(d))
}

/// Writes an image (manifest, config and layers from the cache) as an OCI image layout at `dir`,
/// tagged `tag`; an existing layout keeps its other images.
pub fn write_layout(
    dir: &Path,
    tag: Option<&str>,
    manifest: &[u8],
    blobs: &[(&str, &Path)],
) -> Result<String> {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).with_context(|| format!("creating {}", dir.display()))?;
    for (digest, path) in blobs {
        let dest = blob_dir.join(hex_of(digest)?);
        if !dest.exists() {
            crate::io::sparse::copy(path, &dest)?;
        }
    }
    let digest = digest_of(manifest);
    std::fs::write(blob_dir.join(hex_of(&digest)?), manifest)?;
    crate::util::fsutil::write_atomic(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut index: Value = std::fs::read(dir.join("index.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({"schemaVersion": 2, "manifests": []}));
    let mut entry = json!({"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": manifest.len()});
    if let Some(t) = tag {
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": t});
    }
    let list = index["manifests"]
        .as_array_mut()
        .context("index.json lists no manifests")?;
    list.retain(|m| {
        tag.is_none() || m["annotations"]["org.opencontainers.image.ref.name"].as_str() != tag
    });
    list.push(entry);
    crate::util::fsutil::write_atomic(&dir.join("index.json"), &serde_json::to_vec(&index)?)?;
    Ok(digest)
}
