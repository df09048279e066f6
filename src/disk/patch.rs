//! A byte patch over a disk image: what stamping makes and the artifact writer applies.

/// Bytes that replace the base's at `offset`.
#[derive(Debug, Clone)]
pub struct Patch {
    pub offset: u64,
    pub bytes: Vec<u8>,
}
