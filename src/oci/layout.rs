//! Images on disk: OCI image layouts (`oci:`), their tarballs (`oci-archive:`) and `docker save`
//! tarballs (`docker-archive:`). Every blob is checked against its digest before use.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::blobs::{BlobStore, digest_of, hex_of};
use super::image::{Image, PullOptions};
use super::manifest::{
    Descriptor, MAX_DOCUMENT, MediaType, REF_NAME, descriptor, is_index, oci_manifest, parse_index,
    pick_platform, to_bytes,
};
use crate::util::input::read_capped;
use oci_spec::image::ImageIndexBuilder;

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
    let index = parse_index(index, "index.json")?;
    let manifests = index.manifests();
    let chosen = match tag {
        Some(t) => manifests
            .iter()
            .find(|m| ref_name(m) == Some(t))
            .with_context(|| format!("no image tagged {t:?} in the layout"))?,
        None if manifests.len() == 1 => &manifests[0],
        None => bail!(
            "the layout holds {} images; name one (oci:DIR:TAG)",
            manifests.len()
        ),
    };
    let mut digest = chosen.digest().to_string();
    let mut media_type = chosen.media_type().clone();
    // Nested indexes (an index pointing at a multi-arch index) are resolved level by level.
    for _ in 0..4 {
        if !is_index(&media_type) {
            break;
        }
        let inner = read_capped(&blob(&digest)?, MAX_DOCUMENT, "an image index")?;
        (digest, media_type) = pick_platform(&parse_index(&inner, "an image index")?, &opts.arch)?;
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
        layers.push(descriptor(MediaType::ImageLayer, digest, *size)?);
    }
    let config = descriptor(
        MediaType::ImageConfig,
        &config_digest,
        config_bytes.len() as u64,
    )?;
    let bytes = to_bytes(&oci_manifest(config, layers, None))?;
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
    // An index.json that is not JSON is replaced; one that is JSON but not an index is refused
    // (it may list images this write would lose).
    let mut index = match std::fs::read(dir.join("index.json"))
        .ok()
        .filter(|b| serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok())
    {
        Some(b) => parse_index(&b, "the layout's index.json")?,
        None => ImageIndexBuilder::default()
            .schema_version(2u32)
            .manifests(Vec::new())
            .build()?,
    };
    let mut entry = descriptor(MediaType::ImageManifest, &digest, manifest.len() as u64)?;
    if let Some(t) = tag {
        entry.set_annotations(Some([(REF_NAME.to_string(), t.to_string())].into()));
    }
    let mut list = index.manifests().clone();
    list.retain(|m| tag.is_none() || ref_name(m) != tag);
    list.push(entry);
    index.set_manifests(list);
    crate::util::fsutil::write_atomic(&dir.join("index.json"), &to_bytes(&index)?)?;
    Ok(digest)
}

/// The tag an index entry carries in a layout (`org.opencontainers.image.ref.name`).
fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::blobs::digest_of;

    /// index.json as kiln wrote it before oci-spec: keys sorted, one entry per tag, a retag
    /// replaces the entry (and moves it last).
    #[test]
    fn layout_index_bytes_are_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let lay = dir.path().join("lay");
        let (m1, m2) = (br#"{"a":1}"#.as_slice(), br#"{"b":2}"#.as_slice());
        write_layout(&lay, Some("one"), m1, &[]).unwrap();
        write_layout(&lay, Some("two"), m2, &[]).unwrap();
        write_layout(&lay, Some("one"), m2, &[]).unwrap();
        let entry = |m: &[u8], tag: &str| {
            format!(
                r#"{{"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}},"digest":"{}","mediaType":"application/vnd.oci.image.manifest.v1+json","size":{}}}"#,
                digest_of(m),
                m.len()
            )
        };
        assert_eq!(
            std::fs::read_to_string(lay.join("index.json")).unwrap(),
            format!(
                r#"{{"manifests":[{},{}],"schemaVersion":2}}"#,
                entry(m2, "two"),
                entry(m2, "one")
            )
        );
        assert_eq!(
            std::fs::read_to_string(lay.join("oci-layout")).unwrap(),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );
    }
}
