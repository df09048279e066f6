//! artifact — the fourth stage. Artifact formats: sparse raw files, block maps, checksums and the build manifest.

pub mod android_sparse;
pub mod bmap;
pub mod hash_pipeline;
pub mod inspect;
pub mod manifest;
pub mod qcow2;
pub mod sparse;
pub mod writer;
