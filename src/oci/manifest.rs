//! The OCI documents kiln reads and writes: media types, the limits on what it reads, and the
//! choice of a platform's manifest from an index. Shared by every way an image arrives (registry,
//! layout, archive) and by what kiln writes (`oci append`, layouts, disk artifacts).

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use oci_spec::image::ImageManifestBuilder;
pub use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest, MediaType};

/// The largest index, manifest or config kiln reads: distribution and containerd refuse manifests
/// over 4 MiB too, and real ones are a few KiB.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// The most layers an image may have: overlay-based engines stop near 128; a manifest listing
/// thousands is an attack on the unpacker, not an image.
pub const MAX_LAYERS: usize = 1000;

/// Docker's names for an image manifest and a manifest list: oci-spec has no variants for them
/// (they arrive as `MediaType::Other`), and registries still serve them.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The annotation that names an image in a layout's index (`oci:DIR:TAG`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The manifest kinds kiln asks registries for, most wanted first.
pub fn accept() -> [String; 4] {
    [
        MediaType::ImageManifest.to_string(),
        MT_DOCKER_MANIFEST.to_string(),
        MediaType::ImageIndex.to_string(),
        MT_DOCKER_LIST.to_string(),
    ]
}

/// Whether `mt` names an index (OCI) or a manifest list (Docker).
pub fn is_index(mt: &MediaType) -> bool {
    matches!(mt, MediaType::ImageIndex) || mt.as_ref() == MT_DOCKER_LIST
}

/// Whether `mt` names a single image's manifest (OCI or Docker).
fn is_image_manifest(mt: &MediaType) -> bool {
    matches!(mt, MediaType::ImageManifest) || mt.as_ref() == MT_DOCKER_MANIFEST
}

/// What a document says it is, read before it is parsed as one kind: an index and a manifest
/// have different required fields, and the error should say which kind arrived.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(rename = "mediaType")]
    media_type: Option<MediaType>,
    manifests: Option<serde::de::IgnoredAny>,
}

/// Whether a manifest-or-index document (as a registry returns for a tag) is an index.
pub fn is_index_document(bytes: &[u8]) -> Result<bool> {
    let head: Head = serde_json::from_slice(bytes).context("parsing the manifest")?;
    Ok(head.media_type.as_ref().is_some_and(is_index) || head.manifests.is_some())
}

/// Parses an image manifest (OCI or Docker schema 2); `digest` names it in errors.
pub fn parse_manifest(bytes: &[u8], digest: &str) -> Result<ImageManifest> {
    let head: Head = serde_json::from_slice(bytes).context("parsing the image manifest")?;
    let mt = head.media_type.unwrap_or(MediaType::ImageManifest);
    if !is_image_manifest(&mt) {
        bail!("{digest} is a {mt}, not an image manifest");
    }
    serde_json::from_slice(bytes).context("parsing the image manifest")
}

/// Parses an image index (OCI) or manifest list (Docker); `what` names it in errors.
pub fn parse_index(bytes: &[u8], what: &str) -> Result<ImageIndex> {
    serde_json::from_slice(bytes).with_context(|| format!("parsing {what}"))
}

/// A descriptor of `size` bytes with digest `digest` (`sha256:<hex>`).
pub fn descriptor(media_type: MediaType, digest: &str, size: u64) -> Result<Descriptor> {
    let digest =
        Digest::from_str(digest).with_context(|| format!("malformed digest {digest:?}"))?;
    Ok(Descriptor::new(media_type, size, digest))
}

/// An OCI image manifest (schema 2) of `config` and `layers`.
pub fn oci_manifest(
    config: Descriptor,
    layers: Vec<Descriptor>,
    annotations: Option<HashMap<String, String>>,
) -> ImageManifest {
    let mut m = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(layers)
        .build()
        .expect("every required field is set");
    m.set_annotations(annotations);
    m
}

/// The bytes of a document kiln writes. Keys go out sorted, as kiln has always written them
/// (serde_json's map without `preserve_order`), not in oci-spec's field order: a manifest's
/// digest is the hash of these bytes, and published digests and tags must not change.
pub fn to_bytes<T: serde::Serialize>(doc: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(doc)?)?)
}

/// Picks the manifest for `arch` (linux) from an image index; the error lists what is there.
pub fn pick_platform(index: &ImageIndex, arch: &str) -> Result<(String, MediaType)> {
    let mut seen = Vec::new();
    for m in index.manifests() {
        let (os, a) = m
            .platform()
            .as_ref()
            .map_or((String::new(), String::new()), |p| {
                (p.os().to_string(), p.architecture().to_string())
            });
        if os == "linux" && a == arch {
            return Ok((m.digest().to_string(), m.media_type().clone()));
        }
        seen.push(format!("{os}/{a}"));
    }
    bail!(
        "the image has no linux/{arch} variant (it has: {}); pick another with --arch",
        seen.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MT_OCI: &str = "application/vnd.oci.image.manifest.v1+json";

    #[test]
    fn platform_choice_names_what_exists() {
        let (aa, bb) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": MT_OCI, "digest": aa, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": MT_OCI, "digest": bb, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}}
        ]});
        let index = parse_index(&serde_json::to_vec(&index).unwrap(), "an index").unwrap();
        assert_eq!(pick_platform(&index, "amd64").unwrap().0, bb);
        let e = pick_platform(&index, "riscv64").unwrap_err().to_string();
        assert!(e.contains("linux/arm64, linux/amd64"), "{e}");
    }

    /// A docker-archive's OCI manifest as kiln made it before oci-spec (`json!`, keys sorted):
    /// its digest names the image in build manifests.
    #[test]
    fn manifest_bytes_are_as_before() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let before = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('c'), "size": 5},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d('a'), "size": 1},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d('b'), "size": 2},
            ],
        });
        let config = descriptor(MediaType::ImageConfig, &d('c'), 5).unwrap();
        let layers = vec![
            descriptor(MediaType::ImageLayer, &d('a'), 1).unwrap(),
            descriptor(MediaType::ImageLayer, &d('b'), 2).unwrap(),
        ];
        assert_eq!(
            String::from_utf8(to_bytes(&oci_manifest(config, layers, None)).unwrap()).unwrap(),
            serde_json::to_string(&before).unwrap()
        );
    }

    #[test]
    fn an_index_is_not_taken_for_a_manifest() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(is_index_document(index).unwrap());
        let e = parse_manifest(index, "sha256:x").unwrap_err().to_string();
        assert!(e.contains("not an image manifest"), "{e}");
    }
}
