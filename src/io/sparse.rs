//! Sparse raw images: zero blocks become holes on disk, copies move only data extents.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};

/// The granularity of hole detection: one filesystem block.
pub const BLOCK: usize = 4096;

/// Copies `src` to `dst` as a sparse file: a reflink where the filesystem can share extents;
/// otherwise the data extents that SEEK_DATA/SEEK_HOLE report are read and their non-zero blocks
/// written, so both the source's holes and its zero-filled blocks end up as holes.
pub fn copy(src: &Path, dst: &Path) -> Result<()> {
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = input.metadata()?.len();
    let mut output = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    // FICLONE: _IOW(0x94, 9, int). Shares extents on btrfs/xfs; fails harmlessly elsewhere.
    const FICLONE: u64 = 0x4004_9409;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads only the int.
    let cloned =
        unsafe { nix::libc::ioctl(output.as_raw_fd(), FICLONE as _, input.as_raw_fd()) } == 0;
    if cloned {
        return Ok(());
    }
    output.set_len(len)?;
    for (data, hole) in data_ranges(&input, len) {
        input.seek(SeekFrom::Start(data))?;
        output.seek(SeekFrom::Start(data))?;
        write_sparse(&mut (&mut input).take(hole - data), &mut output)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    }
    Ok(())
}

/// The byte ranges `[start, end)` of `file` (of length `len`) that hold data, from
/// SEEK_DATA/SEEK_HOLE: holes are zeros nobody needs to read. Where the filesystem cannot say
/// (no SEEK_DATA), the rest of the file is one range.
pub fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match nix::unistd::lseek(file, pos as i64, nix::unistd::Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
            Err(_) => pos,                          // no SEEK_DATA: treat the rest as data
        };
        let hole = nix::unistd::lseek(file, data as i64, nix::unistd::Whence::SeekHole)
            .map(|h| h as u64)
            .unwrap_or(len)
            .min(len);
        if hole > data {
            ranges.push((data, hole));
        }
        pos = hole.max(pos + 1);
    }
    ranges
}

fn is_zero(b: &[u8]) -> bool {
    // Compare in u64 words: this runs over every byte of a decompressed image.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// Streams `reader` into `out` from its current position, seeking over all-zero blocks so they
/// stay holes; returns the number of bytes consumed. The caller sets the final length.
pub fn write_sparse<R: Read + ?Sized, W: Write + Seek>(reader: &mut R, out: &mut W) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut pending_skip = 0i64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the image stream"),
            }
        }
        if filled == 0 {
            break;
        }
        for block in buf[..filled].chunks(BLOCK) {
            if is_zero(block) {
                pending_skip += block.len() as i64;
            } else {
                if pending_skip > 0 {
                    out.seek(SeekFrom::Current(pending_skip))?;
                    pending_skip = 0;
                }
                out.write_all(block)?;
            }
        }
        total += filled as u64;
    }
    if pending_skip > 0 {
        out.seek(SeekFrom::Current(pending_skip))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_turns_zero_blocks_into_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 4 << 20];
        data[1 << 20] = 9;
        std::fs::write(&src, &data).unwrap();
        let dst = dir.path().join("dst");
        copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20,
            "zero blocks were written"
        );
    }

    #[test]
    fn copy_keeps_bytes_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"kiln").unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20,
            "copy is not sparse"
        );
    }

    #[test]
    fn write_sparse_skips_zero_blocks() {
        let mut data = vec![0u8; 5 * BLOCK + 100];
        data[2 * BLOCK] = 1;
        data[5 * BLOCK + 50] = 2;
        let mut out = std::io::Cursor::new(Vec::new());
        let n = write_sparse(&mut &data[..], &mut out).unwrap();
        assert_eq!(n, data.len() as u64);
        let mut got = out.into_inner();
        got.resize(data.len(), 0);
        assert_eq!(got, data);
    }
}
