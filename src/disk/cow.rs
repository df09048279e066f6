//! A copy-on-write view of a partition: reads come from the base, writes stay in memory.
//!
//! Stamping edits a few KiB of a boot partition that can be gigabytes (an 8 GiB FAT is legal). The
//! filesystem code sees one `Read + Write + Seek` device; only the pages it writes are held, and
//! they come back as the patches that the artifact writer lays over the base.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// Pages are the unit of copy-on-write; 4 KiB covers a FAT sector or cluster in one or two.
const PAGE: u64 = 4096;

/// `inner` (a partition of the base) with writes kept in memory, page by page.
pub struct CowDevice<T> {
    inner: T,
    len: u64,
    pos: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl<T: Read + Seek> CowDevice<T> {
    /// A device of `len` bytes over `inner`, which is read from its own offset 0.
    pub fn new(inner: T, len: u64) -> Self {
        CowDevice {
            inner,
            len,
            pos: 0,
            pages: BTreeMap::new(),
        }
    }

    /// The written bytes as `(offset, bytes)` runs, adjacent pages merged, in order. Pages are
    /// whole (the last one cut at `len`), so a run may repeat base bytes around a small write.
    pub fn into_runs(self) -> Vec<(u64, Vec<u8>)> {
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (page, bytes) in self.pages {
            let offset = page * PAGE;
            match runs.last_mut() {
                Some((start, run)) if *start + run.len() as u64 == offset => {
                    run.extend_from_slice(&bytes)
                }
                _ => runs.push((offset, bytes.into_vec())),
            }
        }
        runs
    }

    fn page_len(&self, page: u64) -> usize {
        (self.len - page * PAGE).min(PAGE) as usize
    }

    /// The page, read from the base the first time it is written.
    fn page_mut(&mut self, page: u64) -> io::Result<&mut Box<[u8]>> {
        if !self.pages.contains_key(&page) {
            let mut bytes = vec![0u8; self.page_len(page)].into_boxed_slice();
            self.inner.seek(SeekFrom::Start(page * PAGE))?;
            self.inner.read_exact(&mut bytes)?;
            self.pages.insert(page, bytes);
        }
        Ok(self.pages.get_mut(&page).expect("inserted above"))
    }
}

impl<T: Read + Seek> Read for CowDevice<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.len.saturating_sub(self.pos);
        if buf.is_empty() || remaining == 0 {
            return Ok(0);
        }
        let page = self.pos / PAGE;
        let within = (self.pos % PAGE) as usize;
        // One page at most per call: a written page comes from memory, any other from the base.
        let n = (buf.len() as u64).min(remaining).min(PAGE - within as u64) as usize;
        match self.pages.get(&page) {
            Some(bytes) => buf[..n].copy_from_slice(&bytes[within..within + n]),
            None => {
                self.inner.seek(SeekFrom::Start(self.pos))?;
                self.inner.read_exact(&mut buf[..n])?;
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl<T: Read + Seek> Write for CowDevice<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let remaining = self.len.saturating_sub(self.pos);
        if remaining == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        let page = self.pos / PAGE;
        let within = (self.pos % PAGE) as usize;
        let n = (buf.len() as u64).min(remaining).min(PAGE - within as u64) as usize;
        self.page_mut(page)?[within..within + n].copy_from_slice(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<T> Seek for CowDevice<T> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let p = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the partition",
            )
        })?;
        self.pos = p;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn writes_stay_in_memory_and_come_back_as_runs() {
        let base: Vec<u8> = (0..3 * PAGE + 100).map(|i| i as u8).collect();
        let mut dev = CowDevice::new(Cursor::new(base.clone()), base.len() as u64);
        dev.seek(SeekFrom::Start(PAGE - 2)).unwrap();
        dev.write_all(&[0xAA; 4]).unwrap();
        dev.seek(SeekFrom::Start(3 * PAGE + 99)).unwrap();
        dev.write_all(&[0xBB]).unwrap();
        assert!(dev.write(&[0xCC]).is_err(), "no write past the end");

        // Reads see the writes, across page boundaries.
        let mut all = Vec::new();
        dev.seek(SeekFrom::Start(0)).unwrap();
        dev.read_to_end(&mut all).unwrap();
        let mut expected = base.clone();
        expected[PAGE as usize - 2..PAGE as usize + 2].fill(0xAA);
        expected[3 * PAGE as usize + 99] = 0xBB;
        assert_eq!(all, expected);

        // Pages 0 and 1 merge into one run; the short last page is its own.
        let runs = dev.into_runs();
        assert_eq!(
            runs.iter().map(|(o, b)| (*o, b.len())).collect::<Vec<_>>(),
            vec![(0, 2 * PAGE as usize), (3 * PAGE, 100)]
        );
        let mut patched = base;
        for (o, b) in runs {
            patched[o as usize..o as usize + b.len()].copy_from_slice(&b);
        }
        assert_eq!(patched, expected);
    }
}
