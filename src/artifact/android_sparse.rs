//! Android sparse images (the format `fastboot flash` sends and `img2simg` writes).
//!
//! A 28-byte file header, then chunks of whole blocks: RAW (the bytes follow), FILL (one 4-byte
//! value repeated), DONT_CARE (leave the target as it is). kiln writes DONT_CARE for blocks the
//! bmap leaves out, FILL for mapped blocks that repeat one 32-bit word (zeroed metadata, mostly),
//! RAW for the rest. Split output covers the whole image in every piece, with DONT_CARE where
//! another piece carries the data — what `fastboot` itself does when an image exceeds the device's
//! `max-download-size`.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::bmap::Bmap;

pub const MAGIC: u32 = 0xed26_ff3a;
const FILE_HEADER: u64 = 28;
const CHUNK_HEADER: u64 = 12;
const RAW: u16 = 0xcac1;
const FILL: u16 = 0xcac2;
const DONT_CARE: u16 = 0xcac3;
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

fn header(total_blocks: u64, chunks: &[Chunk]) -> Result<[u8; 28]> {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    h[8..10].copy_from_slice(&(FILE_HEADER as u16).to_le_bytes());
    h[10..12].copy_from_slice(&(CHUNK_HEADER as u16).to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..20].copy_from_slice(&u32::try_from(total_blocks)?.to_le_bytes());
    h[20..24].copy_from_slice(&u32::try_from(chunks.len())?.to_le_bytes());
    Ok(h)
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
        let (kind, len) = match c {
            Chunk::Raw { .. } => (RAW, c.size()),
            Chunk::Fill { .. } => (FILL, c.size()),
            Chunk::DontCare { .. } => (DONT_CARE, c.size()),
        };
        let mut ch = [0u8; 12];
        ch[0..2].copy_from_slice(&kind.to_le_bytes());
        ch[4..8].copy_from_slice(&u32::try_from(c.blocks())?.to_le_bytes());
        ch[8..12].copy_from_slice(&u32::try_from(len)?.to_le_bytes());
        w.write_all(&ch)?;
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
}
