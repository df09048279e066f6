//! Disk images as OCI artifacts, in the form Ironic deploys `oci://` URLs from.
//!
//! Ironic (29.0+, `ironic/common/image_service.py`, `OciImageService.identify_specific_image`)
//! reads the tag, accepts an index or a single manifest, keeps the entries whose `disktype`
//! annotation it knows (`raw`, `qcow2`, …) and whose `platform.architecture` matches the node,
//! and wants exactly one layer, which the agent streams to the disk as it is: so the layer is the
//! image uncompressed (`application/octet-stream`; IPA cannot decompress). An `artifactType` and
//! the empty config mark it as an artifact, not a container image (a manifest without `disktype`
//! that is not an artifact is taken for a bootc container). BMO passes the URL through
//! (`spec.image.url`, v0.12+). The tag must be used, not `@sha256:`: with a digest URL Ironic
//! cannot see `disktype` and downloads into RAM instead of streaming.

use std::collections::HashMap;

use anyhow::Result;
use oci_spec::image::{Arch, ImageIndexBuilder, Os, PlatformBuilder};

use super::blobs::digest_of;
use super::manifest::{Descriptor, ImageManifest, MediaType, descriptor, oci_manifest, to_bytes};

/// What the artifact is, for registries and tools that list artifacts by type.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.disk-image.v1";
/// The two bytes `{}` the OCI empty descriptor (`MediaType::EmptyJSON`) describes.
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// The file name a pull gives the layer.
const TITLE: &str = "org.opencontainers.image.title";
/// The layer: bytes as they go to the disk.
pub const MT_DISK_LAYER: &str = "application/octet-stream";

/// One disk image to publish.
#[derive(Debug, Clone)]
pub struct DiskArtifact {
    /// `sha256:<hex>` of the image file.
    pub digest: String,
    pub size: u64,
    /// `raw` or `qcow2`: the `disktype` annotation Ironic selects by.
    pub disktype: &'static str,
    /// The OCI architecture (`amd64`, `arm64`).
    pub architecture: String,
    /// The file name a pull would give it (`org.opencontainers.image.title`).
    pub title: String,
}

/// The manifest and the index (what the tag names), as the bytes to push. Deterministic: the
/// same image gives the same digests, so publishing twice is a no-op.
pub fn documents(a: &DiskArtifact) -> Result<(Vec<u8>, Vec<u8>)> {
    let title = |d: &mut Descriptor, more: &[(&str, &str)]| {
        let mut notes: HashMap<String, String> = more
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        notes.insert(TITLE.to_string(), a.title.clone());
        d.set_annotations(Some(notes));
    };
    let config = descriptor(
        MediaType::EmptyJSON,
        &digest_of(EMPTY_CONFIG),
        EMPTY_CONFIG.len() as u64,
    )?;
    let mut layer = descriptor(MediaType::Other(MT_DISK_LAYER.into()), &a.digest, a.size)?;
    title(&mut layer, &[]);
    let mut manifest = oci_manifest(
        config,
        vec![layer],
        Some([("disktype".to_string(), a.disktype.to_string())].into()),
    );
    manifest.set_artifact_type(Some(MediaType::Other(ARTIFACT_TYPE.into())));
    let manifest = to_bytes(&manifest)?;

    let mut entry = descriptor(
        MediaType::ImageManifest,
        &digest_of(&manifest),
        manifest.len() as u64,
    )?;
    entry.set_artifact_type(Some(MediaType::Other(ARTIFACT_TYPE.into())));
    entry.set_platform(Some(
        PlatformBuilder::default()
            .architecture(Arch::from(a.architecture.as_str()))
            .os(Os::Linux)
            .build()?,
    ));
    title(&mut entry, &[("disktype", a.disktype)]);
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![entry])
        .build()?;
    Ok((manifest, to_bytes(&index)?))
}

/// The single disk layer of a pulled manifest, if it is one of kiln's artifacts: for telling
/// whether a tag already names this very image.
pub fn disk_digest_of_manifest(manifest: &ImageManifest) -> Option<String> {
    match manifest.layers().as_slice() {
        [layer] if layer.media_type().as_ref() == MT_DISK_LAYER => Some(layer.digest().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The documents as kiln wrote them before oci-spec (`json!` values, keys sorted): published
    /// tags name these bytes, so the oci-spec ones must equal them.
    fn documents_as_before(a: &DiskArtifact) -> (Vec<u8>, Vec<u8>) {
        let empty = digest_of(EMPTY_CONFIG);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": EMPTY_CONFIG.len()},
            "layers": [{
                "mediaType": MT_DISK_LAYER,
                "digest": a.digest,
                "size": a.size,
                "annotations": {"org.opencontainers.image.title": a.title},
            }],
            "annotations": {"disktype": a.disktype},
        });
        let manifest = bytes(&manifest);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": ARTIFACT_TYPE,
                "digest": digest_of(&manifest),
                "size": manifest.len(),
                "platform": {"architecture": a.architecture, "os": "linux"},
                "annotations": {"disktype": a.disktype, "org.opencontainers.image.title": a.title},
            }],
        });
        (manifest, bytes(&index))
    }

    fn bytes(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).expect("JSON values serialise")
    }

    #[test]
    fn documents_are_what_ironic_selects() {
        let a = DiskArtifact {
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 1234,
            disktype: "raw",
            architecture: "amd64".into(),
            title: "edge-1-abababab.raw".into(),
        };
        let (m, i) = documents(&a).unwrap();
        let (m2, i2) = documents(&a).unwrap();
        assert_eq!((&m, &i), (&m2, &i2), "deterministic");
        let (m0, i0) = documents_as_before(&a);
        assert_eq!(
            (
                String::from_utf8(m.clone()).unwrap(),
                String::from_utf8(i.clone()).unwrap()
            ),
            (
                String::from_utf8(m0).unwrap(),
                String::from_utf8(i0).unwrap()
            ),
            "the bytes kiln has always published"
        );
        let typed: ImageManifest = serde_json::from_slice(&m).unwrap();
        assert_eq!(disk_digest_of_manifest(&typed), Some(a.digest.clone()));
        let m: Value = serde_json::from_slice(&m).unwrap();
        let i: Value = serde_json::from_slice(&i).unwrap();
        assert_eq!(
            m["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(
            m["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(i["manifests"][0]["annotations"]["disktype"], "raw");
        assert_eq!(i["manifests"][0]["platform"]["architecture"], "amd64");
    }
}
