//! The real `FlashTarget`: a block device opened exclusively with O_DIRECT, or a plain file.
//! On Linux aligned I/O goes uncached and the rare unaligned tail through a second, buffered
//! descriptor. On macOS every byte goes through the raw node `/dev/rdiskN` (never a mix with the
//! buffered `/dev/diskN`): whole blocks, with a read-modify-write for an unaligned tail
//! (`blocks.rs`); the disk's size and block size come from the open descriptor and must match
//! what was confirmed; the sync is `fsync` plus DKIOCSYNCHRONIZECACHE (`blockdev::ioctl`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::target::FlashTarget;
use super::{blocks, buffer};
use crate::blockdev::{self, Target};

/// One target opened for writing.
pub struct OpenTarget {
    pub target: Target,
    pub path: PathBuf,
    /// O_DIRECT descriptor for aligned I/O (block devices), else the plain one.
    direct: File,
    /// Buffered descriptor for the rare unaligned tail.
    plain: File,
    pub block_size: u64,
    pub size: Option<u64>,
    is_device: bool,
    /// Every write must be whole aligned blocks (macOS's raw node): unaligned ones are
    /// read-modify-written.
    blocks_only: bool,
}

/// The buffered descriptor of a disk, for the unaligned tail and the commit's reads (Linux).
#[cfg(target_os = "linux")]
fn open_buffered(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The two descriptors of a disk: one for aligned, uncached I/O and one for the rest.
#[cfg(target_os = "linux")]
fn open_device(path: &Path, _authopen: bool) -> Result<(File, File)> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_EXCL | nix::libc::O_DIRECT)
        .open(path)
        .with_context(|| {
            format!(
                "opening {} exclusively (is it mounted or in use?)",
                path.display()
            )
        })?;
    Ok((direct, open_buffered(path)?))
}

/// macOS: the raw node (`/dev/rdiskN`) bypasses the buffer cache and is several times faster
/// than `/dev/diskN`; F_NOCACHE keeps reads for the verify off the cache too. O_EXLOCK fails
/// while another program holds the disk. Both descriptors are the raw node.
#[cfg(target_os = "macos")]
fn open_device(path: &Path, authopen: bool) -> Result<(File, File)> {
    use std::os::fd::AsRawFd;
    let raw = crate::blockdev::diskutil::raw_path(&path.to_string_lossy());
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_EXLOCK | nix::libc::O_NONBLOCK)
        .open(&raw);
    let direct = match opened {
        // Not root, and the user asked for the administrator dialog (`--authopen`).
        Err(e) if authopen && e.raw_os_error() == Some(nix::libc::EACCES) => {
            let f = crate::blockdev::authopen::open(&raw)?;
            // authopen opens without O_EXLOCK: take the same lock now.
            // SAFETY: flock on a descriptor we own.
            if unsafe { nix::libc::flock(f.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) }
                != 0
            {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("locking {raw} (another program holds it)"));
            }
            f
        }
        Err(e) => {
            let hint = e
                .raw_os_error()
                .and_then(|n| crate::blockdev::diskutil::open_refusal(&raw, n));
            return Err(match hint {
                Some(h) => anyhow::Error::new(e).context(h),
                None => anyhow::Error::new(e).context(format!("opening {raw} exclusively")),
            });
        }
        Ok(f) => f,
    };
    // SAFETY: fcntl on a descriptor we own; F_NOCACHE takes an int flag.
    unsafe { nix::libc::fcntl(direct.as_raw_fd(), nix::libc::F_NOCACHE, 1) };
    let plain = direct
        .try_clone()
        .context("duplicating the raw node's descriptor")?;
    Ok((direct, plain))
}

/// Refuses a disk whose driver reports another size or block size than the one confirmed: the
/// size shown to the user and checked against the image must be the disk's.
pub fn check_geometry(path: &Path, confirmed: (u64, u64), count: u64, block: u64) -> Result<()> {
    let (size, bs) = confirmed;
    if count.saturating_mul(block) != size || block != bs {
        anyhow::bail!(
            "{} reports {count} blocks of {block} bytes ({}), but {} in blocks of {bs} was confirmed; nothing was written",
            path.display(),
            blockdev::human_size(count.saturating_mul(block)),
            blockdev::human_size(size)
        );
    }
    Ok(())
}

impl OpenTarget {
    /// Opens `target` exclusively (O_EXCL on a block device fails while anything has it open or
    /// mounted) and, for devices, with O_DIRECT. `authopen`: on macOS, a raw node this user may
    /// not open is opened through the administrator dialog (`blockdev::authopen`).
    pub fn open(target: Target, authopen: bool) -> Result<OpenTarget> {
        let path = target.path();
        match &target {
            Target::Device(dev) => {
                let (direct, plain) = open_device(&path, authopen)?;
                #[cfg(target_os = "macos")]
                {
                    let (count, block) = blockdev::ioctl::geometry(&direct)?;
                    check_geometry(&path, (dev.size, dev.logical_block_size), count, block)?;
                }
                Ok(OpenTarget {
                    block_size: dev.logical_block_size.max(512),
                    size: Some(dev.size),
                    target: target.clone(),
                    path,
                    direct,
                    plain,
                    is_device: true,
                    blocks_only: cfg!(target_os = "macos"),
                })
            }
            Target::File(_) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Ok(OpenTarget {
                    plain: f.try_clone()?,
                    direct: f,
                    block_size: 512,
                    size: None,
                    target: target.clone(),
                    path,
                    is_device: false,
                    blocks_only: false,
                })
            }
        }
    }
}

impl FlashTarget for OpenTarget {
    fn path(&self) -> &Path {
        &self.path
    }

    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn size(&self) -> Option<u64> {
        self.size
    }

    /// Aligned whole blocks through O_DIRECT, the rest (or everything, for a file) buffered.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        let bs = self.block_size as usize;
        let aligned_len = data.len() / bs * bs;
        let ptr_ok = (data.as_ptr() as usize).is_multiple_of(buffer::ALIGN);
        if self.is_device && offset.is_multiple_of(bs as u64) && ptr_ok && aligned_len > 0 {
            self.direct.write_at(&data[..aligned_len], offset)
        } else if self.blocks_only {
            // The raw node takes whole blocks only: the unaligned rest goes read-modify-write.
            blocks::write_in_blocks(
                bs as u64,
                offset,
                data,
                |at, buf| self.direct.read_at(buf, at),
                |at, buf| self.direct.write_at(buf, at),
            )
        } else {
            self.plain.write_at(data, offset)
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.is_device {
            self.direct.read_at(buf, offset)
        } else {
            self.plain.read_at(buf, offset)
        }
    }

    fn flush(&self) -> std::io::Result<()> {
        // Both descriptors are the one raw node; `sync_data` would be F_FULLFSYNC (ENOTTY).
        #[cfg(target_os = "macos")]
        if self.is_device {
            return blockdev::ioctl::sync_disk(&self.direct);
        }
        self.plain.sync_data()?;
        self.direct.sync_data()
    }

    fn fit_to(&self, image_size: Option<u64>) -> Result<()> {
        if !self.is_device
            && let Some(s) = image_size
        {
            self.plain
                .set_len(s)
                .with_context(|| format!("sizing {}", self.path.display()))?;
        }
        Ok(())
    }

    fn drop_cache(&self) {
        if self.is_device {
            let _ = blockdev::ioctl::flush_buffers(&self.plain);
        }
    }

    fn reread_partitions(&self) -> Result<()> {
        if self.is_device {
            blockdev::ioctl::reread_partitions(&self.plain)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_whose_driver_disagrees_with_what_was_confirmed_is_refused() {
        let p = Path::new("/dev/rdisk2");
        // The recorded stick: 30629376 blocks of 512 bytes = 15682240512 bytes.
        assert!(check_geometry(p, (15_682_240_512, 512), 30_629_376, 512).is_ok());
        // Its FAT volume's TotalSize, as kiln once took it: not the disk.
        let e = check_geometry(p, (15_665_463_296, 512), 30_629_376, 512).unwrap_err();
        assert!(e.to_string().contains("nothing was written"), "{e}");
        // Same bytes, other block size (a 4Kn disk shown as 512e).
        assert!(check_geometry(p, (15_682_240_512, 512), 3_828_672, 4096).is_err());
    }
}
