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

use serde_json::{Value, json};

use super::manifest::{MT_OCI_INDEX, MT_OCI_MANIFEST};

/// What the artifact is, for registries and tools that list artifacts by type.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.disk-image.v1";
/// The OCI empty descriptor's media type, and the two bytes `{}` it describes.
pub const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG: &[u8] = b"{}";
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
pub fn documents(a: &DiskArtifact) -> (Vec<u8>, Vec<u8>) {
    let empty = super::blobs::digest_of(EMPTY_CONFIG);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MT_EMPTY, "digest": empty, "size": EMPTY_CONFIG.len()},
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
        "mediaType": MT_OCI_INDEX,
        "manifests": [{
            "mediaType": MT_OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "digest": super::blobs::digest_of(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": a.architecture, "os": "linux"},
            "annotations": {"disktype": a.disktype, "org.opencontainers.image.title": a.title},
        }],
    });
    (manifest, bytes(&index))
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values serialise")
}

/// The single disk layer of a pulled index or manifest, if it is one of kiln's artifacts: for
/// telling whether a tag already names this very image.
pub fn disk_digest_of_manifest(manifest: &Value) -> Option<&str> {
    match manifest["layers"].as_array()?.as_slice() {
        [layer] if layer["mediaType"] == MT_DISK_LAYER => layer["digest"].as_str(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_what_ironic_selects() {
        let a = DiskArtifact {
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 1234,
            disktype: "raw",
            architecture: "amd64".into(),
            title: "edge-1-abababab.raw".into(),
        };
        let (m, i) = documents(&a);
        let (m2, i2) = documents(&a);
        assert_eq!((&m, &i), (&m2, &i2), "deterministic");
        let m: Value = serde_json::from_slice(&m).unwrap();
        let i: Value = serde_json::from_slice(&i).unwrap();
        assert_eq!(m["config"]["mediaType"], MT_EMPTY);
        assert_eq!(
            m["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(disk_digest_of_manifest(&m), Some(a.digest.as_str()));
        assert_eq!(i["manifests"][0]["annotations"]["disktype"], "raw");
        assert_eq!(i["manifests"][0]["platform"]["architecture"], "amd64");
    }
}
