//! A file the cluster file names (a secret, a fragment, an overlay file): its bytes, read once
//! during resolution, and their digest for the manifest.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// A file the configuration refers to, read once during resolution.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InputFile {
    pub path: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl InputFile {
    pub fn new(path: String, bytes: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        InputFile {
            path,
            bytes,
            sha256,
        }
    }
}
