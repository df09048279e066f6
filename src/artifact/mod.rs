//! artifact — the fourth stage. Artifact formats: sparse raw files, block maps, checksums and the build manifest.

pub mod android_sparse;
pub mod bmap;
pub mod hash_pipeline;
pub mod inspect;
pub mod manifest;
pub mod qcow2;
// Moved down to io (oci layouts copy sparse files too); the old path stays for callers.
pub use crate::io::sparse;
pub mod writer;
