//! The few block-device ioctls a writer needs, in one small private corner. Linux: re-read the
//! partition table, drop the buffer cache. macOS (the raw node has no buffer cache, and
//! `diskutil` re-reads the table on eject): the disk's geometry, and the sync that works on a disk
//! node — Rust's `sync_data` on Apple is `fcntl(F_FULLFSYNC)`, which a disk node answers ENOTTY.

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

// <sys/disk.h>: DKIOCSYNCHRONIZECACHE = _IO('d', 22), DKIOCGETBLOCKSIZE = _IOR('d', 24, uint32_t),
// DKIOCGETBLOCKCOUNT = _IOR('d', 25, uint64_t).
#[cfg(target_os = "macos")]
nix::ioctl_none!(dkiocsynchronizecache, b'd', 22);
#[cfg(target_os = "macos")]
nix::ioctl_read!(dkiocgetblocksize, b'd', 24, u32);
#[cfg(target_os = "macos")]
nix::ioctl_read!(dkiocgetblockcount, b'd', 25, u64);

/// macOS: (block count, block size) as the disk's driver reports them on the open descriptor.
#[cfg(target_os = "macos")]
pub fn geometry(dev: &File) -> Result<(u64, u64)> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;
    let (mut count, mut size) = (0u64, 0u32);
    // SAFETY: the descriptor is an open disk node; each ioctl writes the one integer it points at.
    unsafe { dkiocgetblockcount(dev.as_raw_fd(), &mut count) }
        .context("asking the disk its block count (DKIOCGETBLOCKCOUNT)")?;
    // SAFETY: as above.
    unsafe { dkiocgetblocksize(dev.as_raw_fd(), &mut size) }
        .context("asking the disk its block size (DKIOCGETBLOCKSIZE)")?;
    Ok((count, u64::from(size)))
}

/// macOS: makes the writes so far durable on a disk node: `fsync`, then the drive's own cache.
#[cfg(target_os = "macos")]
pub fn sync_disk(dev: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    sync_then_flush_cache(
        || nix::unistd::fsync(dev).map_err(std::io::Error::from),
        // SAFETY: the descriptor is an open disk node; the ioctl takes no argument.
        || {
            unsafe { dkiocsynchronizecache(dev.as_raw_fd()) }
                .map(drop)
                .map_err(std::io::Error::from)
        },
    )
}

/// The macOS sync as plain logic, so the simulated Mac disk runs it too: `fsync` must succeed;
/// a driver without the cache-flush ioctl answers ENOTTY, which is not a failure (Raspberry Pi
/// Imager and etcher tolerate it the same way).
pub fn sync_then_flush_cache(
    fsync: impl FnOnce() -> std::io::Result<()>,
    flush_cache: impl FnOnce() -> std::io::Result<()>,
) -> std::io::Result<()> {
    fsync()?;
    match flush_cache() {
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTTY) => Ok(()),
        r => r,
    }
}

#[cfg(not(target_os = "linux"))]
pub fn reread_partitions(_dev: &File) -> Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn flush_buffers(_dev: &File) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Error;

    #[test]
    fn enotty_from_the_cache_flush_is_tolerated_other_errors_are_not() {
        let errno = |e| move || Err(Error::from_raw_os_error(e));
        assert!(sync_then_flush_cache(|| Ok(()), || Ok(())).is_ok());
        assert!(sync_then_flush_cache(|| Ok(()), errno(nix::libc::ENOTTY)).is_ok());
        let eio = sync_then_flush_cache(|| Ok(()), errno(nix::libc::EIO)).unwrap_err();
        assert_eq!(eio.raw_os_error(), Some(nix::libc::EIO));
        // fsync's own failure is never excused, ENOTTY or not.
        assert!(sync_then_flush_cache(errno(nix::libc::ENOTTY), || Ok(())).is_err());
    }
}
