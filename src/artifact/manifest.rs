//! The build manifest: every input with its sha256, every output with its sha256, and kiln's
//! version — the record that makes a build reproducible and checkable.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub kiln_version: String,
    pub node: String,
    pub profile: String,
    /// SOURCE_DATE_EPOCH when set; otherwise timestamps came from the base image.
    pub source_date_epoch: Option<i64>,
    pub fat_timestamp: String,
    pub disk_signature: Option<String>,
    pub instance_id: String,
    pub inputs: Vec<Entry>,
    pub outputs: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// What the file is: `base-image`, `cluster-file`, `profile`, `overlay`, `image`, `bmap`, …
    pub role: String,
    pub path: String,
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// The digests kiln gives images by: Ironic and IPA take both (IPA tells them apart by length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumType {
    Sha256,
    Sha512,
}

impl ChecksumType {
    pub const ALL: [ChecksumType; 2] = [ChecksumType::Sha256, ChecksumType::Sha512];

    /// The name a BareMetalHost's `image.checksumType` and the tools (`sha512sum`) use.
    pub fn name(self) -> &'static str {
        match self {
            ChecksumType::Sha256 => "sha256",
            ChecksumType::Sha512 => "sha512",
        }
    }

    /// The hex digest of a file.
    pub fn digest_file(self, path: &std::path::Path) -> anyhow::Result<String> {
        match self {
            ChecksumType::Sha256 => crate::base::cache::digest_file::<sha2::Sha256>(path),
            ChecksumType::Sha512 => crate::base::cache::digest_file::<sha2::Sha512>(path),
        }
    }
}

/// `<hex>  <basename>\n`, the format of `sha256sum` and of Ironic's checksum files.
pub fn sha256sum_line(hex: &str, basename: &str) -> String {
    format!("{hex}  {basename}\n")
}
