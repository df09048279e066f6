//! Android sparse images (the format `fastboot flash` sends and `img2simg` writes).
//!
//! A 28-byte file header, then chunks of whole blocks: RAW (the bytes follow), FILL (one 4-byte
//! value repeated), DONT_CARE (leave the target as it is). kiln writes DONT_CARE for blocks the
//! bmap leaves out, FILL for mapped blocks that repeat one 32-bit word (zeroed metadata, mostly),
//! RAW for the rest. Split output covers the whole image in every piece, with DONT_CARE where
//! another piece carries the data — what `fastboot` itself does when an image exceeds the device's
//! `max-download-size`.
//!
//! The file and chunk headers are the `android-sparse-image` crate's (it reads and writes them and
//! nothing more); which chunks to write, and how to split them, stays here. The crate's
//! `split_image`/`split_raw` make pieces that end after their last chunk, where kiln's (and
//! `fastboot`'s) carry a trailing DONT_CARE so every piece describes the whole image, and they
//! leave choosing FILL chunks from the data and DONT_CARE from a bmap to the caller.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use android_sparse_image::{
    CHUNK_HEADER_BYTES_LEN, ChunkHeader, ChunkType, FILE_HEADER_BYTES_LEN, FileHeader, ParseError,
};
use anyhow::{Context, Result, bail};

use super::bmap::Bmap;

const FILE_HEADER: u64 = FILE_HEADER_BYTES_LEN as u64;
const CHUNK_HEADER: u64 = CHUNK_HEADER_BYTES_LEN as u64;
pub const BLOCK: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// `blocks` blocks read from the image at block `first`.
    Raw {
        first: u64,
        blocks: u64,
    },
    Fill {
        blocks: u64,
        value: u32,
    },
    DontCare {
        blocks: u64,
    },
}

impl Chunk {
    fn blocks(&self) -> u64 {
        match self {
            Chunk::Raw { blocks, .. } | Chunk::Fill { blocks, .. } | Chunk::DontCare { blocks } => {
                *blocks
            }
        }
    }
    fn size(&self) -> u64 {
        CHUNK_HEADER
            + match self {
                Chunk::Raw { blocks, .. } => blocks * BLOCK,
                Chunk::Fill { .. } => 4,
                Chunk::DontCare { .. } => 0,
            }
    }
}

/// The word a block repeats, if it is one word repeated.
fn fill_value(block: &[u8]) -> Option<u32> {
    let w = &block[..4];
    block
        .chunks_exact(4)
        .all(|c| c == w)
        .then(|| u32::from_le_bytes(w.try_into().expect("4 bytes")))
}

/// The chunk list of `image` under `bmap` (every block mapped when there is none).
fn chunks(image: &mut File, size: u64, bmap: Option<&Bmap>) -> Result<Vec<Chunk>> {
    let total = size.div_ceil(BLOCK);
    let mapped: Vec<(u64, u64)> = match bmap {
        Some(b) => {
            if b.block_size != BLOCK {
                bail!("the bmap's block size is {}, not {BLOCK}", b.block_size);
            }
            b.ranges.iter().map(|r| (r.first, r.last + 1)).collect()
        }
        None => vec![(0, total)],
    };
    let mut out: Vec<Chunk> = Vec::new();
    let push = |c: Chunk, out: &mut Vec<Chunk>| {
        // Merge neighbours of the same kind, as img2simg does.
        match (out.last_mut(), &c) {
            (
                Some(Chunk::Raw { first, blocks }),
                Chunk::Raw {
                    first: f2,
                    blocks: b2,
                },
            ) if *first + *blocks == *f2 => *blocks += b2,
            (
                Some(Chunk::Fill { blocks, value }),
                Chunk::Fill {
                    blocks: b2,
                    value: v2,
                },
            ) if value == v2 => *blocks += b2,
            (Some(Chunk::DontCare { blocks }), Chunk::DontCare { blocks: b2 }) => *blocks += b2,
            _ => out.push(c),
        }
    };
    let mut next = 0;
    let mut buf = vec![0u8; (BLOCK * 256) as usize];
    for (a, b) in mapped {
        if a > next {
            push(Chunk::DontCare { blocks: a - next }, &mut out);
        }
        let mut blk = a;
        image.seek(SeekFrom::Start(a * BLOCK))?;
        while blk < b {
            let n = (b - blk).min(256);
            let want = ((n * BLOCK).min(size - blk * BLOCK)) as usize;
            buf[..want].fill(0);
            image
                .read_exact(&mut buf[..want])
                .context("reading the image (shorter than its bmap?)")?;
            // A last partial block reads as zero-padded, as fastboot pads it.
            buf[want..(n * BLOCK) as usize].fill(0);
            for i in 0..n {
                let block = &buf[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
                let c = match fill_value(block) {
                    Some(value) => Chunk::Fill { blocks: 1, value },
                    None => Chunk::Raw {
                        first: blk + i,
                        blocks: 1,
                    },
                };
                push(c, &mut out);
            }
            blk += n;
        }
        next = b;
    }
    if total > next {
        push(
            Chunk::DontCare {
                blocks: total - next,
            },
            &mut out,
        );
    }
    Ok(out)
}

fn header(total_blocks: u64, chunks: &[Chunk]) -> Result<[u8; FILE_HEADER_BYTES_LEN]> {
    let header = FileHeader {
        block_size: BLOCK as u32,
        blocks: u32::try_from(total_blocks)?,
        chunks: u32::try_from(chunks.len())?,
        checksum: 0,
    };
    Ok(header.to_bytes())
}

/// The size of the raw image an Android sparse file expands to, if `path` is one (`None` when it
/// does not start with the sparse magic).
pub fn expanded_size(path: &Path) -> Result<Option<u64>> {
    let mut h = [0u8; FILE_HEADER_BYTES_LEN];
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut got = 0;
    while got < h.len() {
        match f.read(&mut h[got..])? {
            0 => return Ok(None),
            n => got += n,
        }
    }
    match FileHeader::from_bytes(&h) {
        Ok(header) => Ok(Some(
            u64::from(header.block_size) * u64::from(header.blocks),
        )),
        Err(ParseError::UnknownMagic) => Ok(None),
        Err(e) => bail!(
            "{} has the Android sparse magic but a header kiln cannot read: {e} (libsparse writes version 1.0 with 28- and 12-byte headers)",
            path.display()
        ),
    }
}

fn write_file(
    image: &mut File,
    size: u64,
    total: u64,
    chunks: &[Chunk],
    dest: &Path,
) -> Result<()> {
    // Written beside `dest` and renamed into place: a failure leaves no half-written file.
    let mut guard = crate::util::fsutil::TempGuard::default();
    let tmp = guard.track(crate::util::fsutil::temp_beside(dest));
    let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(4 << 20, f);
    w.write_all(&header(total, chunks)?)?;
    let mut buf = vec![0u8; (BLOCK * 256) as usize];
    for c in chunks {
        let chunk_type = match c {
            Chunk::Raw { .. } => ChunkType::Raw,
            Chunk::Fill { .. } => ChunkType::Fill,
            Chunk::DontCare { .. } => ChunkType::DontCare,
        };
        let ch = ChunkHeader {
            chunk_type,
            chunk_size: u32::try_from(c.blocks())?,
            total_size: u32::try_from(c.size())?,
        };
        w.write_all(&ch.to_bytes())?;
        match c {
            Chunk::Raw { first, blocks } => {
                image.seek(SeekFrom::Start(first * BLOCK))?;
                let mut left = blocks * BLOCK;
                let mut pos = first * BLOCK;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    let avail = (size.saturating_sub(pos)).min(n as u64) as usize;
                    image.read_exact(&mut buf[..avail])?;
                    buf[avail..n].fill(0);
                    w.write_all(&buf[..n])?;
                    left -= n as u64;
                    pos += n as u64;
                }
            }
            Chunk::Fill { value, .. } => w.write_all(&value.to_le_bytes())?,
            Chunk::DontCare { .. } => {}
        }
    }
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("writing {}", dest.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
    guard.disarm();
    Ok(())
}

/// Splits the chunk list into pieces of at most `max` bytes each (every piece a whole sparse
/// image: what it does not carry is DONT_CARE). A RAW chunk larger than a piece is cut.
fn split(chunks: Vec<Chunk>, total: u64, max: u64) -> Result<Vec<Vec<Chunk>>> {
    // Room for the header, a leading and a trailing DONT_CARE, and one chunk header.
    let overhead = FILE_HEADER + 3 * CHUNK_HEADER;
    if max < overhead + BLOCK {
        bail!("a maximum size of {max} bytes cannot hold even one block");
    }
    let mut pieces: Vec<Vec<Chunk>> = Vec::new();
    let mut cur: Vec<Chunk> = Vec::new();
    let mut cur_size = overhead;
    let mut cur_start = 0u64; // first block this piece carries
    let mut pos = 0u64; // block position of the next chunk
    let close = |cur: &mut Vec<Chunk>, start: u64, end: u64, pieces: &mut Vec<Vec<Chunk>>| {
        let mut p = Vec::new();
        if start > 0 {
            p.push(Chunk::DontCare { blocks: start });
        }
        p.append(cur);
        if total > end {
            p.push(Chunk::DontCare {
                blocks: total - end,
            });
        }
        pieces.push(p);
    };
    let mut queue: std::collections::VecDeque<Chunk> = chunks.into();
    while let Some(c) = queue.pop_front() {
        if cur_size + c.size() <= max {
            cur_size += c.size();
            pos += c.blocks();
            cur.push(c);
            continue;
        }
        if let Chunk::Raw { first, blocks } = c {
            let fit = (max - cur_size).saturating_sub(CHUNK_HEADER) / BLOCK;
            if fit > 0 {
                cur.push(Chunk::Raw { first, blocks: fit });
                pos += fit;
                queue.push_front(Chunk::Raw {
                    first: first + fit,
                    blocks: blocks - fit,
                });
                close(&mut cur, cur_start, pos, &mut pieces);
                cur_start = pos;
                cur_size = overhead;
                continue;
            }
        }
        if cur.is_empty() {
            bail!("a chunk of {} bytes does not fit in {max}", c.size());
        }
        close(&mut cur, cur_start, pos, &mut pieces);
        cur_start = pos;
        cur_size = overhead;
        queue.push_front(c);
    }
    if !cur.is_empty() || pieces.is_empty() {
        close(&mut cur, cur_start, pos, &mut pieces);
    }
    Ok(pieces)
}

/// Converts `image` into `dest` (or `dest` split as `<stem>.1.simg`, `<stem>.2.simg`, … when a
/// `max_size` forces more than one piece). Returns the files written.
pub fn convert(
    image: &Path,
    bmap: Option<&Bmap>,
    dest: &Path,
    max_size: Option<u64>,
) -> Result<Vec<PathBuf>> {
    let mut f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = f.metadata()?.len();
    if let Some(b) = bmap {
        b.check_image_size(size, image)?;
    }
    let total = size.div_ceil(BLOCK);
    let list = chunks(&mut f, size, bmap)?;
    let pieces = match max_size {
        Some(max) => split(list, total, max)?,
        None => vec![list],
    };
    let mut out = Vec::new();
    if pieces.len() == 1 {
        write_file(&mut f, size, total, &pieces[0], dest)?;
        out.push(dest.to_path_buf());
    } else {
        let stem = dest.with_extension("");
        for (i, p) in pieces.iter().enumerate() {
            let d = PathBuf::from(format!("{}.{}.simg", stem.display(), i + 1));
            write_file(&mut f, size, total, p, &d)?;
            out.push(d);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(list: &[Chunk]) -> u64 {
        list.iter().map(Chunk::blocks).sum()
    }

    #[test]
    fn fill_detection() {
        assert_eq!(fill_value(&[0u8; 4096]), Some(0));
        let mut b = vec![0xabu8; 4096];
        assert_eq!(fill_value(&b), Some(0xabababab));
        b[100] = 0;
        assert_eq!(fill_value(&b), None);
    }

    #[test]
    fn split_pieces_cover_the_image_and_respect_the_limit() {
        let list = vec![
            Chunk::Raw {
                first: 0,
                blocks: 10,
            },
            Chunk::DontCare { blocks: 5 },
            Chunk::Fill {
                blocks: 3,
                value: 0,
            },
            Chunk::Raw {
                first: 18,
                blocks: 7,
            },
        ];
        let max = FILE_HEADER + 3 * CHUNK_HEADER + 4 * BLOCK + 40;
        let pieces = split(list, 25, max).unwrap();
        assert!(pieces.len() > 2);
        for p in &pieces {
            assert_eq!(blocks(p), 25);
            let size: u64 = FILE_HEADER + p.iter().map(Chunk::size).sum::<u64>();
            assert!(size <= max, "{size} > {max}");
        }
        let raw: u64 = pieces
            .iter()
            .flatten()
            .filter_map(|c| match c {
                Chunk::Raw { blocks, .. } => Some(*blocks),
                _ => None,
            })
            .sum();
        assert_eq!(raw, 17);
    }

    #[test]
    fn headers_are_libsparse_bytes_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let mut image = vec![0u8; 3 * BLOCK as usize + 100];
        image[BLOCK as usize..2 * BLOCK as usize].fill(7);
        image[2 * BLOCK as usize + 1] = 1;
        image[3 * BLOCK as usize + 99] = 9;
        std::fs::write(&raw, &image).unwrap();
        let simg = dir.path().join("out.simg");
        convert(&raw, None, &simg, None).unwrap();
        let bytes = std::fs::read(&simg).unwrap();
        // What libsparse writes: magic, version 1.0, 28- and 12-byte headers, 4096-byte blocks,
        // 4 blocks, 3 chunks (FILL 0, FILL 0x07070707, RAW 2 blocks), no checksum.
        let mut want =
            hex::decode("3aff26ed010000001c000c0000100000040000000300000000000000").unwrap();
        want.extend(hex::decode("c2ca0000010000001000000000000000").unwrap());
        want.extend(hex::decode("c2ca0000010000001000000007070707").unwrap());
        want.extend(hex::decode("c1ca0000020000000c200000").unwrap());
        assert_eq!(bytes[..want.len()], want[..]);
        assert_eq!(bytes.len(), want.len() + 2 * BLOCK as usize);
        assert_eq!(expanded_size(&simg).unwrap(), Some(4 * BLOCK));
        assert_eq!(expanded_size(&raw).unwrap(), None);
        let mut v2 = bytes.clone();
        v2[4] = 2;
        std::fs::write(&simg, &v2).unwrap();
        let e = expanded_size(&simg).unwrap_err().to_string();
        assert!(e.contains("Android sparse magic"), "{e}");
    }
}
