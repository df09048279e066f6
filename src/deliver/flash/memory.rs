//! A `FlashTarget` in memory for tests, with faults to inject: short writes, an I/O error at an
//! offset, a flush that fails, a read-back that returns other bytes than were written. It logs
//! every write and read in order, so tests can check what the loop did and when.
//!
//! `MemoryTarget::mac` simulates a Mac's raw disk node (`/dev/rdiskN`): I/O that is not whole
//! aligned blocks answers EINVAL (so unaligned spans must go through `blocks.rs`, as `device.rs`
//! sends them on macOS), the flush is `device.rs`'s macOS sync over a drive that may lack the
//! cache-flush ioctl, and a volume macOS mounts again mid-write turns writes into EBUSY.

use std::io::Error;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::blocks;
use super::target::FlashTarget;
use crate::blockdev::ioctl::sync_then_flush_cache;

/// How a simulated Mac raw disk node behaves.
#[derive(Debug, Default, Clone)]
pub struct MacNode {
    /// DKIOCSYNCHRONIZECACHE answers ENOTTY (a driver without it).
    pub no_cache_flush: bool,
    /// fsync itself answers ENOTTY: what `sync_data` (F_FULLFSYNC) got on a disk node.
    pub fsync_enotty: bool,
    /// macOS mounts a volume of the disk again at this write (counting from 1): it and every
    /// later write answer EBUSY.
    pub remount_at_write: Option<usize>,
}

/// What goes wrong on a `MemoryTarget`.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Every write stores at most this many bytes (a short write); the loop must go on.
    pub short_writes: Option<usize>,
    /// A write covering this byte fails with EIO.
    pub eio_at: Option<u64>,
    /// The n-th flush (counting from 1) fails.
    pub flush_fails: Option<usize>,
    /// Reading back this byte returns it inverted (a card that loses data).
    pub corrupt_read_at: Option<u64>,
}

/// One I/O the loop did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, len: usize },
    Read { offset: u64, len: usize },
    Flush,
}

pub struct MemoryTarget {
    path: PathBuf,
    size: u64,
    faults: Faults,
    pub bytes: Mutex<Vec<u8>>,
    pub log: Mutex<Vec<Op>>,
    mac: Option<MacNode>,
    writes: AtomicUsize,
}

impl MemoryTarget {
    /// A disk of `size` bytes, all 0xEE (so a zeroed head is told apart from a never-written one).
    pub fn new(name: &str, size: u64, faults: Faults) -> MemoryTarget {
        MemoryTarget {
            path: PathBuf::from(name),
            size,
            faults,
            bytes: Mutex::new(vec![0xEE; size as usize]),
            log: Mutex::new(Vec::new()),
            mac: None,
            writes: AtomicUsize::new(0),
        }
    }

    /// A Mac's raw disk node of `size` bytes (see the module's comment).
    pub fn mac(name: &str, size: u64, faults: Faults, node: MacNode) -> MemoryTarget {
        MemoryTarget {
            mac: Some(node),
            ..MemoryTarget::new(name, size, faults)
        }
    }

    /// The raw node's rule: whole aligned blocks or EINVAL.
    fn check_raw(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.mac.is_some() && !blocks::is_aligned(512, offset, data) {
            return Err(Error::from_raw_os_error(nix::libc::EINVAL));
        }
        Ok(())
    }

    fn store(&self, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        self.check_raw(offset, data)?;
        let end = offset + data.len() as u64;
        if let Some(bad) = self.faults.eio_at
            && (offset..end).contains(&bad)
        {
            return Err(Error::from_raw_os_error(nix::libc::EIO));
        }
        let n = self
            .faults
            .short_writes
            .map_or(data.len(), |max| max.min(data.len()));
        let mut bytes = self.bytes.lock().expect("bytes lock");
        bytes[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
        self.log
            .lock()
            .expect("log lock")
            .push(Op::Write { offset, len: n });
        Ok(n)
    }

    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().expect("bytes lock").clone()
    }

    pub fn ops(&self) -> Vec<Op> {
        self.log.lock().expect("log lock").clone()
    }
}

impl FlashTarget for MemoryTarget {
    fn path(&self) -> &Path {
        &self.path
    }

    fn block_size(&self) -> u64 {
        512
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        let Some(node) = &self.mac else {
            return self.store(offset, data);
        };
        let nth = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if node.remount_at_write.is_some_and(|at| nth >= at) {
            return Err(Error::from_raw_os_error(nix::libc::EBUSY));
        }
        if blocks::is_aligned(512, offset, data) {
            return self.store(offset, data);
        }
        blocks::write_in_blocks(
            512,
            offset,
            data,
            |at, buf| self.read_at(at, buf),
            |at, buf| self.store(at, buf),
        )
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check_raw(offset, buf)?;
        let bytes = self.bytes.lock().expect("bytes lock");
        if offset >= self.size {
            return Ok(0);
        }
        let n = buf.len().min((self.size - offset) as usize);
        buf[..n].copy_from_slice(&bytes[offset as usize..offset as usize + n]);
        if let Some(bad) = self.faults.corrupt_read_at
            && (offset..offset + n as u64).contains(&bad)
        {
            buf[(bad - offset) as usize] ^= 0xFF;
        }
        self.log
            .lock()
            .expect("log lock")
            .push(Op::Read { offset, len: n });
        Ok(n)
    }

    fn flush(&self) -> std::io::Result<()> {
        let mut log = self.log.lock().expect("log lock");
        log.push(Op::Flush);
        let flushes = log.iter().filter(|o| **o == Op::Flush).count();
        if self.faults.flush_fails == Some(flushes) {
            return Err(Error::other("injected flush failure"));
        }
        let Some(node) = &self.mac else {
            return Ok(());
        };
        let enotty = || Err(Error::from_raw_os_error(nix::libc::ENOTTY));
        let fsync = || if node.fsync_enotty { enotty() } else { Ok(()) };
        let cache = || {
            if node.no_cache_flush {
                enotty()
            } else {
                Ok(())
            }
        };
        sync_then_flush_cache(fsync, cache)
    }
}
