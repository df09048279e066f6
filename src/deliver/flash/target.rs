//! Where a flash's bytes go: the small trait the write / verify / commit-last loop is generic
//! over, and the loops over it that every target shares (whole writes, read-back hashing).
//!
//! The block device (or plain file) in `device.rs` is the real implementation; `memory.rs` is an
//! in-memory one for tests that injects faults. Like caligula's `WriteOp<S: Read, D: Write>`, the
//! loop only asks for positioned writes, a flush and positioned reads; the device-only steps
//! (dropping the buffer cache, re-reading the partition table) have no-op defaults. Ejecting is
//! not here: it must wait until every descriptor is closed (`request.rs`).
//!
//! A phone is not a `FlashTarget`: fastboot has no positioned write, no read-back and no first
//! MiB to hold back. Phones and disks meet one level up, in `delivery.rs`, where a whole flash
//! (refusals, the question, the writes) is generic over `Delivery`.

use std::io::ErrorKind;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::buffer::AlignedBuf;
use crate::blockdev;

/// A destination for a flash: positioned writes and reads, a flush, and the device's extras.
///
/// Writer threads share one target by reference, hence `&self` and `Sync`.
pub trait FlashTarget: Sync {
    /// The name in events, errors and the summary (`/dev/sdb`, a file, a test's label).
    fn path(&self) -> &Path;
    /// The logical block size: the verify reads whole blocks.
    fn block_size(&self) -> u64;
    /// The capacity, when the target has a fixed one (a disk; not a file that grows).
    fn size(&self) -> Option<u64>;
    /// Writes some of `data` at `offset`; returns how many bytes were written, like `pwrite`.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<usize>;
    /// Reads some bytes at `offset` into `buf` from the medium, like `pread`; 0 at the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Makes every write so far durable (fdatasync).
    fn flush(&self) -> std::io::Result<()>;
    /// Called once before the body is written, with the image's size when it is known: a plain
    /// file is sized to it; a disk keeps its size.
    fn fit_to(&self, _image_size: Option<u64>) -> Result<()> {
        Ok(())
    }
    /// Drops cached pages so the next reads come from the medium (a device's buffer cache).
    fn drop_cache(&self) {}
    /// Asks the kernel to re-read the partition table after the commit.
    fn reread_partitions(&self) -> Result<()> {
        Ok(())
    }
}

/// A borrowed target is a target: a fleet can be flashed from targets it does not own.
impl<T: FlashTarget + ?Sized> FlashTarget for &T {
    fn path(&self) -> &Path {
        (**self).path()
    }
    fn block_size(&self) -> u64 {
        (**self).block_size()
    }
    fn size(&self) -> Option<u64> {
        (**self).size()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        (**self).write_at(offset, data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        (**self).read_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        (**self).flush()
    }
    fn fit_to(&self, image_size: Option<u64>) -> Result<()> {
        (**self).fit_to(image_size)
    }
    fn drop_cache(&self) {
        (**self).drop_cache()
    }
    fn reread_partitions(&self) -> Result<()> {
        (**self).reread_partitions()
    }
}

/// Writes all of `data` at `offset`, across short writes; refuses bytes past the target's end.
pub fn write_all_at(t: &impl FlashTarget, offset: u64, data: &[u8]) -> Result<()> {
    let end = offset + data.len() as u64;
    if let Some(size) = t.size()
        && end > size
    {
        bail!(
            "the image does not fit: writing byte {end} of a {} disk",
            blockdev::human_size(size)
        );
    }
    let mut done = 0;
    while done < data.len() {
        let at = offset + done as u64;
        match t.write_at(at, &data[done..]) {
            Ok(0) => {
                return Err(std::io::Error::from(ErrorKind::WriteZero))
                    .with_context(|| format!("writing {} at byte {at}", t.path().display()));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // EBUSY mid-write on a Mac: a volume of the disk was mounted again.
                let busy = if e.raw_os_error() == Some(nix::libc::EBUSY) {
                    " (the disk is busy: a volume of it was mounted again, or a program opened it)"
                } else {
                    ""
                };
                return Err(e)
                    .with_context(|| format!("writing {} at byte {at}{busy}", t.path().display()));
            }
        }
    }
    Ok(())
}

/// Flushes `t`, saying which target failed.
pub fn flush(t: &impl FlashTarget) -> Result<()> {
    t.flush()
        .with_context(|| format!("flushing {}", t.path().display()))
}

/// Reads until `buf` is full or the target ends; returns the bytes read.
fn read_full(t: &impl FlashTarget, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match t.read_at(offset + got as u64, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads `len` bytes at `offset` back from the medium in whole blocks, hashing them.
pub fn read_hash(
    t: &impl FlashTarget,
    offset: u64,
    len: u64,
    buf: &mut AlignedBuf,
) -> Result<String> {
    let mut h = Sha256::new();
    let mut pos = offset;
    let end = offset + len;
    let bs = t.block_size();
    while pos < end {
        // Read whole aligned blocks and hash the part inside [pos, end).
        let start = pos / bs * bs;
        let want = ((end - start).min(buf.capacity() as u64)).div_ceil(bs) * bs;
        let slice = buf.slice_mut(want as usize);
        let got = read_full(t, slice, start)
            .with_context(|| format!("reading back {} at byte {start}", t.path().display()))?;
        let from = (pos - start) as usize;
        let to = ((end - start) as usize).min(got);
        if to <= from {
            bail!(
                "{} ended at byte {} while verifying",
                t.path().display(),
                start + got as u64
            );
        }
        h.update(&slice[from..to]);
        pos = start + to as u64;
    }
    Ok(hex::encode(h.finalize()))
}
