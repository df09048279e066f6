//! Filesystems inside images: FAT edited in-process (fatfs), ext4 through e2fsprogs.
//!
//! Besides edits, this module answers one question for the bmap: which byte ranges of a partition
//! hold data the filesystem needs (`used_ranges`). Free space is left out, so writers may skip
//! it; metadata is always in, even when it reads as zeros (an empty FAT is all zeros and must
//! still be written over whatever the card held before).

pub mod ext4;
pub mod ext4_build;
pub mod ext4_write;
pub mod fat;
pub mod fat32_fixup;
pub mod tree;

use std::fs::File;
use std::path::Path;

use anyhow::Result;

use crate::disk::Partition;

/// The filesystems kiln edits; profiles name them (`fs = "vfat"`).
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Vfat,
    Ext4,
}

/// Sniffs a partition's filesystem from its superblock.
pub fn detect(image: &mut File, part: &Partition) -> Result<Option<FsKind>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut head = vec![0u8; 2048];
    image.seek(SeekFrom::Start(part.start))?;
    let n = image.read(&mut head)?;
    head.truncate(n);
    if head.len() >= 1082 && head[1080..1082] == [0x53, 0xef] {
        return Ok(Some(FsKind::Ext4));
    }
    if head.len() >= 512 && head[510..512] == [0x55, 0xaa] && fat::Bpb::parse(&head).is_ok() {
        return Ok(Some(FsKind::Vfat));
    }
    Ok(None)
}

/// Byte ranges (relative to the partition start) that the filesystem in `part` uses; the whole
/// partition when the filesystem is unknown or cannot be read.
pub fn used_ranges(
    image_path: &Path,
    image: &mut File,
    part: &Partition,
) -> Result<Vec<(u64, u64)>> {
    let whole = vec![(0, part.size)];
    Ok(match detect(image, part)? {
        Some(FsKind::Vfat) => fat::used_ranges(image, part)?,
        Some(FsKind::Ext4) => ext4::used_ranges(image_path, part).unwrap_or(whole),
        None => whole,
    })
}
