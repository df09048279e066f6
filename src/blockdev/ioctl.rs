//! The few block-device ioctls a writer needs, in one small private corner.

use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};

// BLKRRPART = _IO(0x12, 95): re-read the partition table.
nix::ioctl_none!(blkrrpart, 0x12, 95);
// BLKFLSBUF = _IO(0x12, 97): flush the buffer cache of the device.
nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Asks the kernel to re-read the partition table, so /dev/sdb1… match what was written.
pub fn reread_partitions(dev: &File) -> Result<()> {
    // SAFETY: the descriptor is an open block device; BLKRRPART takes no argument.
    unsafe { blkrrpart(dev.as_raw_fd()) }.context("re-reading the partition table (BLKRRPART)")?;
    Ok(())
}

/// Drops the device's cached pages so a verify reads the medium, not memory.
pub fn flush_buffers(dev: &File) -> Result<()> {
    // SAFETY: as above; BLKFLSBUF takes no argument.
    unsafe { blkflsbuf(dev.as_raw_fd()) }
        .context("flushing the device's buffer cache (BLKFLSBUF)")?;
    Ok(())
}
