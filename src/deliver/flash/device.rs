//! The real `FlashTarget`: a block device opened exclusively with O_DIRECT (the raw node with
//! F_NOCACHE on macOS), or a plain file. Aligned I/O goes uncached; the rare unaligned tail goes
//! through a second, buffered descriptor.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::buffer;
use super::target::FlashTarget;
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
}

/// The buffered descriptor of a disk, for the unaligned tail and the commit's reads.
fn open_buffered(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The two descriptors of a disk: one for aligned, uncached I/O and one for the rest.
#[cfg(target_os = "linux")]
fn open_device(path: &Path) -> Result<(File, File)> {
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
/// while another program holds the disk.
#[cfg(target_os = "macos")]
fn open_device(path: &Path) -> Result<(File, File)> {
    use std::os::fd::AsRawFd;
    let raw = crate::blockdev::diskutil::raw_path(&path.to_string_lossy());
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_EXLOCK | nix::libc::O_NONBLOCK)
        .open(&raw)
        .with_context(|| format!("opening {raw} exclusively (is it mounted or in use?)"))?;
    // SAFETY: fcntl on a descriptor we own; F_NOCACHE takes an int flag.
    unsafe { nix::libc::fcntl(direct.as_raw_fd(), nix::libc::F_NOCACHE, 1) };
    Ok((direct, open_buffered(path)?))
}

impl OpenTarget {
    /// Opens `target` exclusively (O_EXCL on a block device fails while anything has it open or
    /// mounted) and, for devices, with O_DIRECT.
    pub fn open(target: Target) -> Result<OpenTarget> {
        let path = target.path();
        match &target {
            Target::Device(dev) => {
                let (direct, plain) = open_device(&path)?;
                Ok(OpenTarget {
                    block_size: dev.logical_block_size.max(512),
                    size: Some(dev.size),
                    target: target.clone(),
                    path,
                    direct,
                    plain,
                    is_device: true,
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

    fn eject(&self, no_eject: bool) -> Option<String> {
        match &self.target {
            Target::Device(dev) if blockdev::eject::wanted(dev, no_eject) => {
                Some(blockdev::eject::eject(&self.path))
            }
            _ => None,
        }
    }
}
