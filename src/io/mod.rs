//! Stream adaptors: decompression chosen by magic bytes, hashing while reading, progress; sparse
//! files (holes for zero blocks, copies of data extents only).

pub mod decompress;
pub mod progress;
pub mod readahead;
pub mod sparse;
