//! Writes to a medium that only takes whole, aligned blocks (macOS's raw node `/dev/rdiskN`, which
//! fails any other write with EINVAL): a span that starts or ends inside a block becomes a
//! read-modify-write of the blocks it touches. The device (`device.rs`) and the simulated Mac disk
//! (`memory.rs`) share this, so the tests exercise the code the Mac runs.

use std::io::{Error, ErrorKind, Result};

use super::buffer::{self, AlignedBuf};

/// Whether `data` at `offset` can go to the medium as it is: whole blocks, from an aligned buffer.
pub fn is_aligned(block_size: u64, offset: u64, data: &[u8]) -> bool {
    offset.is_multiple_of(block_size)
        && (data.len() as u64).is_multiple_of(block_size)
        && (data.as_ptr() as usize).is_multiple_of(buffer::ALIGN)
}

/// Writes all of `data` at `offset` through `write` in whole blocks: the first and last block
/// the span touches are read with `read` first when it covers them only in part. Returns
/// `data.len()`.
pub fn write_in_blocks(
    block_size: u64,
    offset: u64,
    data: &[u8],
    read: impl Fn(u64, &mut [u8]) -> Result<usize>,
    write: impl Fn(u64, &[u8]) -> Result<usize>,
) -> Result<usize> {
    let bs = block_size;
    let start = offset / bs * bs;
    let end = (offset + data.len() as u64).div_ceil(bs) * bs;
    let mut buf = AlignedBuf::new((end - start) as usize);
    let span = buf.slice_mut((end - start) as usize);
    let first_partial = offset != start;
    let last_partial = offset + data.len() as u64 != end;
    // Partial blocks are read into an aligned block of their own: the raw node wants aligned
    // buffers for reads too.
    let mut block = AlignedBuf::new(bs as usize);
    if first_partial {
        read_exact(&read, start, block.slice_mut(bs as usize))?;
        span[..bs as usize].copy_from_slice(block.as_slice());
    }
    if last_partial && (end - bs > start || !first_partial) {
        read_exact(&read, end - bs, block.slice_mut(bs as usize))?;
        span[(end - bs - start) as usize..].copy_from_slice(block.as_slice());
    }
    let from = (offset - start) as usize;
    span[from..from + data.len()].copy_from_slice(data);
    let mut done = 0;
    while done < span.len() {
        match write(start + done as u64, &span[done..]) {
            Ok(0) => return Err(Error::from(ErrorKind::WriteZero)),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(data.len())
}

fn read_exact(
    read: &impl Fn(u64, &mut [u8]) -> Result<usize>,
    at: u64,
    buf: &mut [u8],
) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match read(at + got as u64, &mut buf[got..]) {
            Ok(0) => return Err(Error::from(ErrorKind::UnexpectedEof)),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A 4 KiB medium of 512-byte blocks that refuses unaligned I/O, as the raw node does.
    fn medium() -> Mutex<Vec<u8>> {
        Mutex::new((0..4096).map(|i| (i % 7) as u8).collect())
    }

    fn rmw(disk: &Mutex<Vec<u8>>, offset: u64, data: &[u8]) -> Result<usize> {
        let read = |at: u64, buf: &mut [u8]| {
            assert!(
                is_aligned(512, at, buf),
                "unaligned read at {at}+{}",
                buf.len()
            );
            let d = disk.lock().unwrap();
            buf.copy_from_slice(&d[at as usize..at as usize + buf.len()]);
            Ok(buf.len())
        };
        let write = |at: u64, data: &[u8]| {
            assert!(
                is_aligned(512, at, data),
                "unaligned write at {at}+{}",
                data.len()
            );
            let mut d = disk.lock().unwrap();
            d[at as usize..at as usize + data.len()].copy_from_slice(data);
            Ok(data.len())
        };
        write_in_blocks(512, offset, data, read, write)
    }

    #[test]
    fn unaligned_spans_keep_the_bytes_around_them() {
        for (offset, len) in [
            (0, 100),
            (100, 50),
            (500, 30),
            (1000, 2000),
            (3584, 512),
            (3000, 1096),
        ] {
            let disk = medium();
            let mut want = disk.lock().unwrap().clone();
            let data: Vec<u8> = (0..len).map(|i| 200 + (i % 50) as u8).collect();
            assert_eq!(rmw(&disk, offset, &data).unwrap(), len);
            want[offset as usize..offset as usize + len].copy_from_slice(&data);
            assert_eq!(*disk.lock().unwrap(), want, "span {offset}+{len}");
        }
    }

    #[test]
    fn alignment_is_blocks_and_buffer() {
        let mut b = AlignedBuf::new(1024);
        assert!(is_aligned(512, 512, b.slice_mut(1024)));
        assert!(!is_aligned(512, 100, b.slice_mut(1024)));
        assert!(!is_aligned(512, 512, b.slice_mut(1000)));
        assert!(!is_aligned(512, 512, &b.slice_mut(1024)[1..513]));
    }
}
