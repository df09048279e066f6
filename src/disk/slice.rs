//! A window onto one partition of a disk image, seen as a device of its own.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// `[start, start + len)` of `inner`, with its own position. Reads stop at the end of the
/// partition and writes past it fail, so a filesystem bug cannot spill into the next partition.
pub struct PartitionSlice<T> {
    inner: T,
    start: u64,
    len: u64,
    pos: u64,
}

impl<T: Seek> PartitionSlice<T> {
    pub fn new(inner: T, start: u64, len: u64) -> Self {
        PartitionSlice {
            inner,
            start,
            len,
            pos: 0,
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Where the current position lies in `inner`; only called with bytes remaining, so the sum
    /// is at most `start + len`, which the caller's layout checked.
    fn inner_pos(&self) -> io::Result<u64> {
        self.start.checked_add(self.pos).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "partition offset overflows")
        })
    }
}

impl<T: Read + Seek> Read for PartitionSlice<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.remaining() as usize);
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.inner_pos()?))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<T: Write + Seek> Write for PartitionSlice<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(self.remaining() as usize);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.inner.seek(SeekFrom::Start(self.inner_pos()?))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Seek> Seek for PartitionSlice<T> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the partition",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_and_writes_stay_inside() {
        let mut s = PartitionSlice::new(Cursor::new(vec![0u8; 100]), 10, 20);
        s.write_all(&[1u8; 20]).unwrap();
        assert!(s.write(&[2]).is_err());
        s.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert_eq!(all, vec![1u8; 20]);
        let inner = s.into_inner().into_inner();
        assert_eq!(&inner[..10], &[0u8; 10]);
        assert_eq!(&inner[30..], &[0u8; 70][..]);
    }
}
