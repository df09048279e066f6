//! The few block-device ioctls a writer needs, in one small private corner. Linux only: on macOS
//! kiln writes the raw node (no buffer cache to flush) and `diskutil eject` ends the write.

use std::fs::File;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;

#[cfg(target_os = "linux")]
use anyhow::Context;
use anyhow::Result;

// BLKRRPART = _IO(0x12, 95): re-read the partition table.
#[cfg(target_os = "linux")]
nix::ioctl_none!(blkrrpart, 0x12, 95);
// BLKFLSBUF = _IO(0x12, 97): flush the buffer cache of the device.
#[cfg(target_os = "linux")]
nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Asks the kernel to re-read the partition table, so /dev/sdb1… match what was written.
#[cfg(target_os = "linux")]
pub fn reread_partitions(dev: &File) -> Result<()> {
    // SAFETY: the descriptor is an open block device; BLKRRPART takes no argument.
    unsafe { blkrrpart(dev.as_raw_fd()) }.context("re-reading the partition table (BLKRRPART)")?;
    Ok(())
}

/// Drops the device's cached pages so a verify reads the medium, not memory.
#[cfg(target_os = "linux")]
pub fn flush_buffers(dev: &File) -> Result<()> {
    // SAFETY: as above; BLKFLSBUF takes no argument.
    unsafe { blkflsbuf(dev.as_raw_fd()) }
        .context("flushing the device's buffer cache (BLKFLSBUF)")?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn reread_partitions(_dev: &File) -> Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn flush_buffers(_dev: &File) -> Result<()> {
    Ok(())
}
