//! The one pass that turns a base image and a node's patches into the node's artifact.
//!
//! The base is read once, front to back; the patched regions (the stamped boot partition, the
//! first sector) replace its bytes on the way; only non-zero blocks are written, so the output is
//! sparse; and the same buffers feed two hashing threads — the whole-image sha256 and the bmap's
//! per-range sha256 — so a 1.3 GB node costs one read, one write and hashing spread over two cores.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::bmap::{Bmap, RangeHasher};
use super::hash_pipeline;
use super::sparse::BLOCK;

const CHUNK: usize = 4 << 20;
/// Buffers in flight between the reader and the two hashing threads.
const POOL: usize = hash_pipeline::DEPTH;

pub use crate::disk::patch::Patch;

/// Writes `base` with `patches` applied to `out`, mapping `used` (absolute byte ranges) in the
/// bmap; returns the bmap with checksums and the image's sha256.
/// Partition starts and ends in `boundaries` keep bmap ranges from spanning partitions; `known`
/// holds range checksums from earlier builds on the same base (see `reusable_sums`).
pub fn write_image(
    base: &Path,
    patches: &[Patch],
    out: &Path,
    used: &[(u64, u64)],
    boundaries: &[u64],
    known: &BTreeMap<(u64, u64), String>,
) -> Result<(Bmap, String)> {
    let mut input = File::open(base).with_context(|| format!("opening {}", base.display()))?;
    let len = input.metadata()?.len();
    let output = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    output
        .set_len(len)
        .with_context(|| format!("sizing {}", out.display()))?;
    let mut bmap = Bmap::from_byte_ranges_split(len, used, boundaries);
    let known: BTreeMap<(u64, u64), String> = known
        .iter()
        .filter(|(r, _)| !touches_patch(&bmap, **r, patches))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let ranges = RangeHasher::new(&bmap, &known);

    // Buffers come back from the hashing threads and are reused: fresh 4 MiB allocations would
    // cost a page fault per 4 KiB on every chunk.
    let (back_tx, back_rx) = sync_channel::<Arc<Vec<u8>>>(2 * POOL);
    let sha = std::thread::scope(|scope| -> Result<String> {
        let (whole_tx, whole) = hash_pipeline::spawn(scope, Sha256::new(), Some(back_tx.clone()));
        let (range_tx, ranges_done) = hash_pipeline::spawn(scope, ranges, Some(back_tx));
        let mut free: Vec<Vec<u8>> = (0..POOL).map(|_| vec![0u8; CHUNK]).collect();
        let mut pos = 0u64;
        while pos < len {
            let mut buf = loop {
                if let Some(b) = free.pop() {
                    break b;
                }
                // The second thread to hand a buffer back leaves it unshared.
                let back = back_rx.recv().context("hash thread stopped")?;
                if let Ok(b) = Arc::try_unwrap(back) {
                    free.push(b);
                }
            };
            let n = (CHUNK as u64).min(len - pos) as usize;
            buf.resize(n, 0);
            input.read_exact(&mut buf).with_context(|| {
                format!("reading {} at byte {pos} (truncated?)", base.display())
            })?;
            apply_patches(&mut buf, pos, patches);
            write_nonzero(&output, pos, &buf).with_context(|| format!("at byte {pos}"))?;
            let buf = Arc::new(buf);
            let chunk = |buf| hash_pipeline::Chunk { pos, buf, len: n };
            if whole_tx.send(chunk(buf.clone())).is_err() || range_tx.send(chunk(buf)).is_err() {
                break;
            }
            pos += n as u64;
        }
        drop(whole_tx);
        drop(range_tx);
        let sha = hex::encode(whole.join().expect("hash thread panicked").finalize());
        ranges_done
            .join()
            .expect("hash thread panicked")
            .finish(&mut bmap);
        Ok(sha)
    })?;
    output
        .sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    Ok((bmap, sha))
}

/// Replaces the bytes of `buf` (which starts at image offset `pos`) that `patches` cover.
pub fn apply_patches(buf: &mut [u8], pos: u64, patches: &[Patch]) {
    let end = pos + buf.len() as u64;
    for p in patches {
        let (a, b) = (
            p.offset.max(pos),
            (p.offset + p.bytes.len() as u64).min(end),
        );
        if b > a {
            buf[(a - pos) as usize..(b - pos) as usize]
                .copy_from_slice(&p.bytes[(a - p.offset) as usize..(b - p.offset) as usize]);
        }
    }
}

fn touches_patch(bmap: &Bmap, (first, last): (u64, u64), patches: &[Patch]) -> bool {
    let (a, b) = (first * bmap.block_size, (last + 1) * bmap.block_size);
    patches
        .iter()
        .any(|p| p.offset < b && p.offset + p.bytes.len() as u64 > a)
}

/// The range checksums of `bmap` that do not depend on `patches`: valid for any later build on
/// the same base, whatever its patches.
pub fn reusable_sums(bmap: &Bmap, patches: &[Patch]) -> BTreeMap<(u64, u64), String> {
    bmap.ranges
        .iter()
        .filter(|r| !touches_patch(bmap, (r.first, r.last), patches))
        .filter_map(|r| Some(((r.first, r.last), r.sha256.clone()?)))
        .collect()
}

/// Writes the non-zero blocks of `buf` (at image offset `pos`), coalescing runs into one write.
fn write_nonzero(out: &File, pos: u64, buf: &[u8]) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    for (i, block) in buf.chunks(BLOCK).enumerate() {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * BLOCK),
            (true, Some(s)) => {
                out.write_all_at(&buf[s..i * BLOCK], pos + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        out.write_all_at(&buf[s..], pos + s as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_apply_and_hashes_match_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let mut data: Vec<u8> = (0..(9 << 20)).map(|i| (i % 7) as u8).collect();
        data[(5 << 20)..(6 << 20)].fill(0);
        std::fs::write(&base, &data).unwrap();
        let patch = Patch {
            offset: (4 << 20) - 3,
            bytes: vec![0xaa; 10],
        };
        let out = dir.path().join("out");
        let used = [(0, 4096), (4 << 20, 8192)];
        let none = BTreeMap::new();
        let (bmap, sha) =
            write_image(&base, std::slice::from_ref(&patch), &out, &used, &[], &none).unwrap();
        data[(4 << 20) - 3..(4 << 20) + 7].fill(0xaa);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got, data);
        assert_eq!(sha, hex::encode(Sha256::digest(&data)));
        assert_eq!(bmap.ranges.len(), 2);
        assert_eq!(
            bmap.ranges[1].sha256.as_deref().unwrap(),
            hex::encode(Sha256::digest(&data[4 << 20..(4 << 20) + 8192]))
        );
        // Range 0 is untouched by the patch: reusable, and reused (a planted value shows it).
        let reusable = reusable_sums(&bmap, std::slice::from_ref(&patch));
        assert_eq!(reusable.len(), 1);
        let planted: BTreeMap<_, _> = reusable
            .keys()
            .map(|k| (*k, "planted".to_string()))
            .collect();
        let (again, _) = write_image(&base, &[patch], &out, &used, &[], &planted).unwrap();
        assert_eq!(again.ranges[0].sha256.as_deref(), Some("planted"));
    }
}
