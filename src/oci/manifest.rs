//! The OCI documents kiln reads and writes: media types, the limits on what it reads, and the
//! choice of a platform's manifest from an index. Shared by every way an image arrives (registry,
//! layout, archive) and by what kiln writes (`oci append`, layouts, disk artifacts).

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The largest index, manifest or config kiln reads: distribution and containerd refuse manifests
/// over 4 MiB too, and real ones are a few KiB.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// The most layers an image may have: overlay-based engines stop near 128; a manifest listing
/// thousands is an attack on the unpacker, not an image.
pub const MAX_LAYERS: usize = 1000;

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Picks the manifest for `arch` (linux) from an image index; the error lists what is there.
pub fn pick_platform(index: &Value, arch: &str) -> Result<(String, String)> {
    let manifests = index["manifests"]
        .as_array()
        .context("the index lists no manifests")?;
    let mut seen = Vec::new();
    for m in manifests {
        let os = m["platform"]["os"].as_str().unwrap_or("");
        let a = m["platform"]["architecture"].as_str().unwrap_or("");
        seen.push(format!("{os}/{a}"));
        if os == "linux" && a == arch {
            return Ok((
                m["digest"].as_str().context("no digest")?.to_string(),
                m["mediaType"]
                    .as_str()
                    .unwrap_or(MT_OCI_MANIFEST)
                    .to_string(),
            ));
        }
    }
    bail!(
        "the image has no linux/{arch} variant (it has: {}); pick another with --arch",
        seen.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_choice_names_what_exists() {
        let index = serde_json::json!({"manifests": [
            {"digest": "sha256:aa", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:bb", "platform": {"os": "linux", "architecture": "amd64"}}
        ]});
        assert_eq!(pick_platform(&index, "amd64").unwrap().0, "sha256:bb");
        let e = pick_platform(&index, "riscv64").unwrap_err().to_string();
        assert!(e.contains("linux/arm64, linux/amd64"), "{e}");
    }
}
