//! The one pass that turns a base image and a node's patches into the node's artifact.
//!
//! The base is read once, front to back; the patched regions (the stamped boot partition, the
//! first sector) replace its bytes on the way; only non-zero blocks are written, so the output is
//! sparse; and the same buffers feed two hashing threads — the whole-image sha256 and the bmap's
//! per-range sha256 — so a 1.3 GB node costs one read, one write and hashing spread over two cores.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::bmap::{Bmap, RangeHasher};
use super::sparse::BLOCK;

const CHUNK: usize = 4 << 20;

/// Bytes that replace the base's at `offset`.
#[derive(Debug, Clone)]
pub struct Patch {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Writes `base` with `patches` applied to `out`, mapping `used` (absolute byte ranges) in the
/// bmap; returns the bmap with checksums and the image's sha256.
pub fn write_image(
    base: &Path,
    patches: &[Patch],
    out: &Path,
    used: &[(u64, u64)],
) -> Result<(Bmap, String)> {
    let mut input = File::open(base).with_context(|| format!("opening {}", base.display()))?;
    let len = input.metadata()?.len();
    let output = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    output
        .set_len(len)
        .with_context(|| format!("sizing {} (is the disk full?)", out.display()))?;
    let mut bmap = Bmap::from_byte_ranges(len, used);
    let mut ranges = RangeHasher::new(&bmap);

    let (whole_tx, whole_rx) = sync_channel::<Arc<Vec<u8>>>(3);
    let (range_tx, range_rx) = sync_channel::<(u64, Arc<Vec<u8>>)>(3);
    let sha = std::thread::scope(|scope| -> Result<String> {
        let whole = scope.spawn(move || {
            let mut h = Sha256::new();
            for buf in whole_rx {
                h.update(&buf[..]);
            }
            hex::encode(h.finalize())
        });
        let ranges_done = scope.spawn(move || {
            for (start, buf) in range_rx {
                ranges.feed(start, &buf);
            }
            ranges
        });
        let mut pos = 0u64;
        while pos < len {
            let n = (CHUNK as u64).min(len - pos) as usize;
            let mut buf = vec![0u8; n];
            input.read_exact(&mut buf).with_context(|| {
                format!("reading {} at byte {pos} (truncated?)", base.display())
            })?;
            for p in patches {
                let (a, b) = (
                    p.offset.max(pos),
                    (p.offset + p.bytes.len() as u64).min(pos + n as u64),
                );
                if b > a {
                    buf[(a - pos) as usize..(b - pos) as usize].copy_from_slice(
                        &p.bytes[(a - p.offset) as usize..(b - p.offset) as usize],
                    );
                }
            }
            write_nonzero(&output, pos, &buf)
                .with_context(|| format!("writing {} (is the disk full?)", out.display()))?;
            let buf = Arc::new(buf);
            if whole_tx.send(buf.clone()).is_err() || range_tx.send((pos, buf)).is_err() {
                break;
            }
            pos += n as u64;
        }
        drop(whole_tx);
        drop(range_tx);
        let sha = whole.join().expect("hash thread panicked");
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
        let (bmap, sha) = write_image(
            &base,
            std::slice::from_ref(&patch),
            &out,
            &[(0, 4096), (4 << 20, 8192)],
        )
        .unwrap();
        data[(4 << 20) - 3..(4 << 20) + 7].fill(0xaa);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got, data);
        assert_eq!(sha, hex::encode(Sha256::digest(&data)));
        assert_eq!(bmap.ranges.len(), 2);
        assert_eq!(
            bmap.ranges[1].sha256.as_deref().unwrap(),
            hex::encode(Sha256::digest(&data[4 << 20..(4 << 20) + 8192]))
        );
    }
}
