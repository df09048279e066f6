//! Stream adaptors: decompression chosen by magic bytes, hashing while reading, progress.

pub mod decompress;
pub mod progress;
pub mod readahead;
pub mod sparse;
