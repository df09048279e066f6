//! QCOW2 (version 3) output, written in one pass over the raw image: no backing file, no external
//! data file, no compression — the shape Ironic's image inspection accepts — with clusters that
//! hold only zeros (and everything a bmap leaves out) left unallocated.
//!
//! Layout: header, L1 table, refcount table, refcount blocks, L2 tables, then data clusters in
//! guest order. Metadata is sized up front for the most data the image could have (every mapped
//! cluster), so data can stream straight to its place; the tables are written at the end. Every
//! allocated cluster is referenced and has refcount 1, so `qemu-img check` finds no leaks.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};

use super::bmap::Bmap;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// 64-bit entries per L2 table, so one table maps 512 MiB of guest.
const L2_ENTRIES: u64 = CLUSTER / 8;
/// 16-bit refcounts (refcount_order 4), so one refcount block covers 32768 host clusters.
const REFS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;

fn clusters_for(bytes: u64) -> u64 {
    bytes.div_ceil(CLUSTER)
}

/// Guest clusters that may hold data: those touching a byte span `[start, end)` that holds data
/// (the bmap's mapped ranges, or without a bmap the file's data extents).
fn candidate_clusters(spans: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in spans {
        let (a, z) = (s / CLUSTER, e.div_ceil(CLUSTER));
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(z),
            _ => out.push((a, z)),
        }
    }
    out
}

/// Where everything sits in the output, sized up front for the most data the image could have.
struct Layout {
    /// Entries in the L1 table, one per 512 MiB of guest.
    l1_entries: u64,
    l1_clusters: u64,
    /// The 512 MiB regions of guest that get an L2 table, ascending.
    l2_regions: Vec<u64>,
    /// Clusters of the refcount table, and refcount blocks.
    rt_clusters: u64,
    rb: u64,
    l1_off: u64,
    rt_off: u64,
    rb_off: u64,
    l2_off: u64,
    data_off: u64,
}

impl Layout {
    /// The layout for a guest of `size` bytes whose data lies in `candidates` (guest clusters).
    fn new(size: u64, candidates: &[(u64, u64)]) -> Layout {
        let max_data: u64 = candidates.iter().map(|(a, b)| b - a).sum();
        let l1_entries = clusters_for(size).div_ceil(L2_ENTRIES).max(1);
        let l1_clusters = clusters_for(l1_entries * 8);
        // L2 tables for every 512 MiB region a candidate touches.
        let mut l2_regions: Vec<u64> = Vec::new();
        for (a, b) in candidates {
            for r in a / L2_ENTRIES..=(b.saturating_sub(1)) / L2_ENTRIES {
                if l2_regions.last() != Some(&r) && *b > *a {
                    l2_regions.push(r);
                }
            }
        }
        // Refcount structures must cover themselves: iterate until the sizes settle.
        let fixed = 1 + l1_clusters + l2_regions.len() as u64 + max_data;
        let (mut rt_clusters, mut rb) = (1u64, 1u64);
        loop {
            let host = fixed + rt_clusters + rb;
            let need_rb = host.div_ceil(REFS_PER_BLOCK);
            let need_rt = clusters_for(need_rb * 8);
            if need_rb == rb && need_rt == rt_clusters {
                break;
            }
            (rb, rt_clusters) = (need_rb, need_rt);
        }
        let l1_off = CLUSTER;
        let rt_off = l1_off + l1_clusters * CLUSTER;
        let rb_off = rt_off + rt_clusters * CLUSTER;
        let l2_off = rb_off + rb * CLUSTER;
        let data_off = l2_off + l2_regions.len() as u64 * CLUSTER;
        Layout {
            l1_entries,
            l1_clusters,
            l2_regions,
            rt_clusters,
            rb,
            l1_off,
            rt_off,
            rb_off,
            l2_off,
            data_off,
        }
    }
}

/// Copies the non-zero clusters of `candidates` from `src` to `out` from `layout.data_off` on, in
/// guest order; returns the L2 contents per region (guest cluster index within the region -> host
/// offset) and the host offset after the last data cluster.
fn copy_data(
    src: File,
    image: &Path,
    size: u64,
    candidates: &[(u64, u64)],
    layout: &Layout,
    out: &File,
) -> Result<(Vec<Vec<u64>>, u64)> {
    let (l2_regions, data_off) = (&layout.l2_regions, layout.data_off);
    let mut w = out.try_clone()?;
    w.seek(SeekFrom::Start(data_off))?;
    let mut l2: Vec<Vec<u64>> = vec![vec![0u64; L2_ENTRIES as usize]; l2_regions.len()];
    let mut next_host = data_off;
    let mut writeback = crate::util::fsutil::Writeback::new(data_off);
    // Big reads on one thread, zero checks and writes on this one, so reading overlaps writing;
    // runs of non-zero clusters go out in one write, straight from the read buffer.
    let zero = vec![0u8; CLUSTER as usize];
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Chunk>>(2);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..3 {
        empty_tx.send(vec![0u8; (CHUNK * CLUSTER) as usize])?;
    }
    std::thread::scope(|scope| -> Result<()> {
        // Owned by this closure, so an early error drops it and the reader stops waiting.
        let empty_tx = empty_tx;
        scope.spawn(move || read_chunks(src, image, size, candidates, full_tx, empty_rx));
        for item in full_rx {
            let (g0, n, buf) = item?;
            let mut run_start: Option<u64> = None;
            for i in 0..=n {
                let data = i < n && {
                    let c = &buf[(i * CLUSTER) as usize..((i + 1) * CLUSTER) as usize];
                    c != &zero[..]
                };
                match (data, run_start) {
                    (true, None) => run_start = Some(i),
                    (false, Some(r)) => {
                        w.write_all(&buf[(r * CLUSTER) as usize..(i * CLUSTER) as usize])?;
                        for k in r..i {
                            let g = g0 + k;
                            let region = l2_regions
                                .binary_search(&(g / L2_ENTRIES))
                                .expect("every candidate's region has an L2 table");
                            l2[region][(g % L2_ENTRIES) as usize] = next_host | COPIED;
                            next_host += CLUSTER;
                        }
                        writeback.written(&w, next_host);
                        run_start = None;
                    }
                    _ => {}
                }
            }
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })?;
    Ok((l2, next_host))
}

/// Clusters per read on the reader thread.
const CHUNK: u64 = 128;

/// Clusters read from the image: the first guest cluster, how many, and their bytes.
type Chunk = (u64, u64, Vec<u8>);

/// The reader thread: reads the candidate clusters of `src` in chunks into the buffers that come
/// back on `empty_rx` and sends them on `full_tx`; stops at the first error, which it sends on.
fn read_chunks(
    mut src: File,
    image: &Path,
    size: u64,
    candidates: &[(u64, u64)],
    full_tx: std::sync::mpsc::SyncSender<Result<Chunk>>,
    empty_rx: std::sync::mpsc::Receiver<Vec<u8>>,
) {
    for (a, b) in candidates {
        if let Err(e) = src.seek(SeekFrom::Start(a * CLUSTER)) {
            let _ = full_tx.send(Err(e.into()));
            return;
        }
        let mut g0 = *a;
        while g0 < *b {
            let Ok(mut buf) = empty_rx.recv() else { return };
            let n = (b - g0).min(CHUNK);
            let bytes = (n * CLUSTER).min(size - g0 * CLUSTER) as usize;
            buf[bytes..(n * CLUSTER) as usize].fill(0);
            let r = src
                .read_exact(&mut buf[..bytes])
                .with_context(|| format!("reading {} at byte {}", image.display(), g0 * CLUSTER));
            let failed = r.is_err();
            if full_tx.send(r.map(|()| (g0, n, buf))).is_err() || failed {
                return;
            }
            g0 += n;
        }
    }
}

/// Writes the header, L1 table, refcount table, refcount blocks (refcount 1 for the first
/// `host_clusters`) and the L2 tables `l2`.
fn write_metadata(
    w: &mut BufWriter<File>,
    size: u64,
    layout: &Layout,
    l2: &[Vec<u64>],
    host_clusters: u64,
) -> Result<()> {
    let Layout {
        l1_entries,
        l1_clusters,
        ref l2_regions,
        rt_clusters,
        rb,
        l1_off,
        rt_off,
        rb_off,
        l2_off,
        ..
    } = *layout;
    // Header (v3, 104 bytes) and the end of header extensions.
    let mut h = vec![0u8; 112];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
    // QEMU counts disks in 512-byte sectors: a raw file's last partial sector reads as zeros, and
    // `qemu-img convert` rounds the virtual size up the same way.
    h[24..32].copy_from_slice(&size.next_multiple_of(512).to_be_bytes());
    h[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
    h[40..48].copy_from_slice(&l1_off.to_be_bytes());
    h[48..56].copy_from_slice(&rt_off.to_be_bytes());
    h[56..60].copy_from_slice(&(rt_clusters as u32).to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    h[100..104].copy_from_slice(&104u32.to_be_bytes()); // header_length
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&h)?;

    let mut l1 = vec![0u8; (l1_clusters * CLUSTER) as usize];
    for (i, r) in l2_regions.iter().enumerate() {
        let off = (l2_off + i as u64 * CLUSTER) | COPIED;
        l1[(*r * 8) as usize..(*r * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    w.seek(SeekFrom::Start(l1_off))?;
    w.write_all(&l1)?;

    let mut rt = vec![0u8; (rt_clusters * CLUSTER) as usize];
    for i in 0..rb {
        let off = rb_off + i * CLUSTER;
        rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    w.seek(SeekFrom::Start(rt_off))?;
    w.write_all(&rt)?;

    // Refcount 1 for every host cluster up to the last data cluster (metadata included).
    let mut blocks = vec![0u8; (rb * CLUSTER) as usize];
    for c in 0..host_clusters {
        blocks[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }
    w.seek(SeekFrom::Start(rb_off))?;
    w.write_all(&blocks)?;

    w.seek(SeekFrom::Start(l2_off))?;
    for table in l2 {
        for e in table {
            w.write_all(&e.to_be_bytes())?;
        }
    }
    Ok(())
}

/// Writes `image` as QCOW2 to `dest`; returns the number of data clusters allocated.
pub fn convert(image: &Path, bmap: Option<&Bmap>, dest: &Path) -> Result<u64> {
    let src = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = src.metadata()?.len();
    if let Some(b) = bmap {
        b.check_image_size(size, image)?;
    }
    // Without a bmap, the file's holes are zeros: only its data extents are read.
    let candidates = match bmap {
        Some(b) => candidate_clusters(b.ranges.iter().map(|r| r.byte_span(b.block_size, size))),
        None => candidate_clusters(super::sparse::data_ranges(&src, size)),
    };
    let layout = Layout::new(size, &candidates);

    // Written beside `dest` and renamed into place: a failure leaves no half-written file.
    let mut guard = crate::util::fsutil::TempGuard::default();
    let tmp = guard.track(crate::util::fsutil::temp_beside(dest));
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let (l2, next_host) = copy_data(src, image, size, &candidates, &layout, &out)?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let data_clusters = (next_host - layout.data_off) / CLUSTER;
    let host_clusters = next_host / CLUSTER;

    write_metadata(&mut w, size, &layout, &l2, host_clusters)?;
    let out = w.into_inner().map_err(|e| e.into_error())?;
    // Metadata is sized for the most data possible; the file ends after the last data cluster.
    out.set_len(next_host)?;
    out.sync_all()?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
    guard.disarm();
    Ok(data_clusters)
}
