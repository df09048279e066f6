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

/// `<hex>  <basename>\n`, the format of `sha256sum` and of Ironic's checksum files.
pub fn sha256sum_line(hex: &str, basename: &str) -> String {
    format!("{hex}  {basename}\n")
}
