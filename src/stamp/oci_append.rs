//! `kiln oci append`: overlays added to an image as one new layer, the bootc way to customise an
//! image, with no container engine. The layer is deterministic (sorted, root-owned unless the
//! overlay says otherwise, fixed times), so appending the same overlay twice gives the same digest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::oci::blobs::BlobStore;
use crate::oci::image::{Image, PullOptions};
use crate::oci::layer::{self, LayerFile};
use crate::oci::manifest::{Descriptor, MediaType, descriptor, oci_manifest, to_bytes};
use crate::oci::reference::ImageRef;
use crate::oci::{layout, registry};

pub struct AppendOptions {
    pub from: String,
    pub to: String,
    pub overlays: Vec<String>,
    pub overlay_dirs: Vec<PathBuf>,
    pub insecure: bool,
    pub arch: String,
}

pub struct Appended {
    pub manifest_digest: String,
    pub layer_digest: String,
    pub files: usize,
}

pub fn append(opts: &AppendOptions) -> Result<Appended> {
    let to = ImageRef::parse(&opts.to)?;
    if !matches!(to, ImageRef::Registry(_) | ImageRef::Layout { .. }) {
        bail!("--to must be a registry (docker://…) or an image layout (oci:DIR[:TAG])");
    }
    let from = ImageRef::parse(&opts.from)?;
    let base = crate::oci::pull(
        &from,
        &PullOptions {
            insecure: opts.insecure,
            arch: opts.arch.clone(),
        },
    )?;
    // Times come from SOURCE_DATE_EPOCH, else the base image's own creation time.
    let epoch = match crate::util::epoch::source_date_epoch()? {
        Some(e) => e,
        None => base.created()?.unwrap_or(0),
    };
    let (files, owners) = overlay_files(opts, &base)?;
    if files.is_empty() {
        bail!("the overlays add no files");
    }
    let list: Vec<LayerFile> = files.into_values().collect();
    let new = layer::build_owned(&list, &owners, epoch)?;
    let store = BlobStore::open()?;
    let (layer_digest, layer_path) = store.put_bytes(&new.blob)?;

    let config = appended_config(&base, &new.diff_id, epoch, &opts.overlays)?;
    let config_bytes = serde_json::to_vec(&config)?;
    let (config_digest, config_path) = store.put_bytes(&config_bytes)?;

    let config = descriptor(
        MediaType::ImageConfig,
        &config_digest,
        config_bytes.len() as u64,
    )?;
    let manifest_bytes = appended_manifest(&base, config, &layer_digest, new.blob.len() as u64)?;
    let mut blobs: Vec<(String, PathBuf)> = vec![(config_digest, config_path)];
    for l in &base.layers {
        blobs.push((l.digest.clone(), l.path.clone()));
    }
    blobs.push((layer_digest.clone(), layer_path));
    let manifest_digest = publish(&to, opts.insecure, &blobs, &manifest_bytes)?;
    Ok(Appended {
        manifest_digest,
        layer_digest,
        files: list.len(),
    })
}

/// The uid and gid of each path in the new layer.
type Owners = BTreeMap<String, (u32, u32)>;

/// Every file of the overlays (and the links that enable their services) as a layer member by
/// path, and the owners the base image's passwd and group give them.
fn overlay_files(
    opts: &AppendOptions,
    base: &Image,
) -> Result<(BTreeMap<String, LayerFile>, Owners)> {
    let passwd = file_in_layers(base, "etc/passwd")?.unwrap_or_default();
    let group = file_in_layers(base, "etc/group")?.unwrap_or_default();
    let mut files: BTreeMap<String, LayerFile> = BTreeMap::new();
    let mut owners: Owners = BTreeMap::new();
    for name in &opts.overlays {
        let o = crate::plan::cni::overlay_or_folder(name, &opts.overlay_dirs)?;
        for f in &o.files {
            let path = f.target.trim_start_matches('/').to_string();
            let uid = id_in(&passwd, &f.owner)
                .with_context(|| format!("overlay {name}: the image has no user {}", f.owner))?;
            let gid = id_in(&group, &f.group)
                .with_context(|| format!("overlay {name}: the image has no group {}", f.group))?;
            owners.insert(path.clone(), (uid, gid));
            files.insert(
                path.clone(),
                LayerFile {
                    path,
                    mode: f.mode,
                    contents: Some(f.content.bytes.clone()),
                    link: None,
                },
            );
        }
        // Services are enabled as `systemctl enable` would: a link in multi-user.target.wants.
        for svc in &o.manifest.services {
            let shipped = format!("etc/systemd/system/{svc}");
            let target = if files.contains_key(&shipped) {
                format!("/{shipped}")
            } else {
                format!("/usr/lib/systemd/system/{svc}")
            };
            let link = format!("etc/systemd/system/multi-user.target.wants/{svc}");
            files.insert(
                link.clone(),
                LayerFile {
                    path: link,
                    mode: 0o777,
                    contents: None,
                    link: Some(target),
                },
            );
        }
    }
    Ok((files, owners))
}

/// The base image's config with the new layer's `diff_id`, a creation time of `epoch` and a
/// history entry naming the overlays.
fn appended_config(
    base: &Image,
    diff_id: &str,
    epoch: i64,
    overlays: &[String],
) -> Result<serde_json::Value> {
    let mut config = base.config.clone();
    if !config["rootfs"]["diff_ids"].is_array() {
        bail!("the base image's config has no rootfs.diff_ids");
    }
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("checked")
        .push(json!(diff_id));
    let created = rfc3339(epoch);
    config["created"] = json!(created);
    let history = json!({
        "created": created,
        "created_by": format!("kiln oci append --overlay {}", overlays.join(" --overlay ")),
        "comment": format!("kiln {}", env!("CARGO_PKG_VERSION")),
    });
    match config["history"].as_array_mut() {
        Some(h) => h.push(history),
        None => config["history"] = json!([history]),
    }
    Ok(config)
}

/// Sends the blobs and the manifest to `to` (a registry or an image layout); returns the
/// manifest's digest.
fn publish(
    to: &ImageRef,
    insecure: bool,
    blobs: &[(String, PathBuf)],
    manifest_bytes: &[u8],
) -> Result<String> {
    Ok(match to {
        ImageRef::Registry(r) => registry::push(r, insecure, blobs, manifest_bytes)?,
        ImageRef::Layout { dir, tag } => {
            let refs: Vec<(&str, &Path)> = blobs
                .iter()
                .map(|(d, p)| (d.as_str(), p.as_path()))
                .collect();
            layout::write_layout(dir, tag.as_deref(), manifest_bytes, &refs)?
        }
        _ => unreachable!("append checked --to"),
    })
}

/// The new image's manifest: the base's layers (sizes as stored), then the new gzip layer, and
/// the base manifest's annotations.
fn appended_manifest(
    base: &Image,
    config: Descriptor,
    layer_digest: &str,
    layer_size: u64,
) -> Result<Vec<u8>> {
    let mut layers = Vec::new();
    for l in &base.layers {
        let size = std::fs::metadata(&l.path)
            .map(|m| m.len())
            .unwrap_or(l.size);
        layers.push(descriptor(oci_layer_type(&l.media_type), &l.digest, size)?);
    }
    layers.push(descriptor(
        MediaType::ImageLayerGzip,
        layer_digest,
        layer_size,
    )?);
    let annotations = base.manifest.annotations().clone();
    to_bytes(&oci_manifest(config, layers, annotations))
}

/// Docker media types of layers mapped to their OCI names (the new manifest is OCI).
fn oci_layer_type(mt: &MediaType) -> MediaType {
    match mt.as_ref() {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => MediaType::ImageLayerGzip,
        "application/vnd.docker.image.rootfs.diff.tar" => MediaType::ImageLayer,
        _ => mt.clone(),
    }
}

/// The last version of `path` the layers write (whiteouts respected for the file itself).
pub fn file_in_layers(image: &Image, path: &str) -> Result<Option<Vec<u8>>> {
    let mut found = None;
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let whiteout = if dir.is_empty() {
        format!(".wh.{name}")
    } else {
        format!("{dir}/.wh.{name}")
    };
    for l in &image.layers {
        let mut ar = tar::Archive::new(layer::open_decompressed(&l.path)?);
        for e in ar.entries()? {
            let mut e = e?;
            let p = e
                .path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            if p == path && e.header().entry_type().is_file() {
                let mut b = Vec::new();
                e.read_to_end(&mut b)?;
                found = Some(b);
            } else if p == whiteout {
                found = None;
            }
        }
    }
    Ok(found)
}

/// A user's or group's id from passwd/group text; numbers are taken as they are.
fn id_in(db: &[u8], name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    if name == "root" {
        return Some(0);
    }
    String::from_utf8_lossy(db).lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
    })
}

/// `1970-01-01T00:00:00Z` for an epoch.
pub fn rfc3339(epoch: i64) -> String {
    let d = crate::fs::fat::fat_datetime(epoch.max(315_532_800));
    if epoch < 315_532_800 {
        return "1970-01-01T00:00:00Z".into();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.date.year, d.date.month, d.date.day, d.time.hour, d.time.min, d.time.sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::image::LayerBlob;
    use serde_json::Value;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    /// The manifest as kiln wrote it before oci-spec (`json!`, keys sorted): `oci append` of the
    /// same overlay must keep giving the same digest.
    fn manifest_as_before(base: &Image, base_manifest: &Value, config_len: usize) -> Vec<u8> {
        let mut layers: Vec<Value> = base
            .layers
            .iter()
            .map(|l| {
                json!({
                    "mediaType": oci_layer_type(&l.media_type).to_string(),
                    "digest": l.digest,
                    "size": l.size,
                })
            })
            .collect();
        layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('c'), "size": 99}));
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('f'), "size": config_len},
            "layers": layers,
        });
        if let Some(a) = base_manifest.get("annotations") {
            manifest["annotations"] = a.clone();
        }
        serde_json::to_vec(&manifest).unwrap()
    }

    #[test]
    fn appended_manifest_bytes_are_as_before() {
        for annotations in [None, Some(json!({"z": "1", "a": "2"}))] {
            let mut base_manifest = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": d('e'), "size": 7},
                "layers": [
                    {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d('a'), "size": 10},
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": d('b'), "size": 20},
                ],
            });
            if let Some(a) = &annotations {
                base_manifest["annotations"] = a.clone();
            }
            let bytes = serde_json::to_vec(&base_manifest).unwrap();
            let manifest = crate::oci::manifest::parse_manifest(&bytes, "m").unwrap();
            let layers = manifest
                .layers()
                .iter()
                .map(|l| LayerBlob {
                    digest: l.digest().to_string(),
                    media_type: l.media_type().clone(),
                    size: l.size(),
                    path: "/nonexistent/kiln-layer".into(),
                })
                .collect();
            let base = Image {
                reference: String::new(),
                manifest_digest: d('0'),
                manifest,
                config_digest: d('e'),
                config_bytes: Vec::new(),
                config: Value::Null,
                layers,
            };
            let config = descriptor(MediaType::ImageConfig, &d('f'), 321).unwrap();
            let got = appended_manifest(&base, config, &d('c'), 99).unwrap();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(manifest_as_before(&base, &base_manifest, 321)).unwrap()
            );
        }
    }
}
