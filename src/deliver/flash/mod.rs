//! The write pipeline: one stream, decoded once, written to one or more targets, commit last.
//!
//! Order of work on every target (coreos-installer's rule): zero the first MiB and the last MiB
//! (stale backup GPTs), write every mapped block but the first MiB, flush, verify by reading the
//! written ranges back past the page cache, and only then write the first MiB, flush, verify it and
//! ask the kernel to re-read the partition table. An interrupted or failed write leaves a disk
//! with no partition table, never one that boots half an image.
//!
//! Blocks are skipped only where a bmap says they are unused; without a bmap every block is
//! written. The decoder thread reads the stream once and fans chunks out: to a hash thread that
//! checks the file as it is (the whole image against its `.sha256sum`, each bmap range against
//! the bmap), to one writer thread per target, and to one hash thread per variant. A variant is
//! what a target makes of the stream — its patches and its map: several nodes streamed from one
//! cached base (`flash_shared`) are one stream and one variant each; a plain image is one of each.
//! Patches are laid over a copy of only the chunks they touch. A failing target does not stop the
//! others.
//!
//! The loop is generic over `target::FlashTarget` (a device or file in `device.rs`, memory with
//! injected faults in tests). A `kiln flash` as a whole — refusals, the one question, the writes —
//! goes through `delivery::Delivery`: disks in `jobs.rs`, phones (fastboot) in `phones.rs`.

pub mod blocks;
pub mod buffer;
mod confirm;
pub mod delivery;
pub mod device;
pub mod image;
mod jobs;
#[cfg(test)]
mod memory;
mod phones;
pub mod request;
pub mod target;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::artifact::bmap::{Bmap, RangeHasher};
use crate::artifact::hash_pipeline::{self, Feed};
use crate::blockdev;
use crate::disk::patch::Patch;
use crate::io::progress::{Events, Stage};
use buffer::AlignedBuf;
pub use device::OpenTarget;
use image::FlashImage;
pub use jobs::run;
pub use request::Request;
use target::{FlashTarget, flush, read_hash, write_all_at};

/// Bytes written last: the partition table and everything before the first partition.
pub const HEAD: u64 = 1 << 20;
const CHUNK: usize = 4 << 20;
/// fdatasync this often, so a dying card fails early instead of at the end.
const SYNC_EVERY: u64 = 256 << 20;

/// What happened to one target.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub path: PathBuf,
    pub result: std::result::Result<Done, String>,
}

#[derive(Debug, Clone)]
pub struct Done {
    pub written: u64,
    pub verified: bool,
    pub seconds: f64,
    /// What the summary says instead of verified / not verified (a phone: why it cannot be).
    pub detail: Option<String>,
}

pub struct FlashOptions {
    pub verify: bool,
}

/// A segment of the image to write: [start, end), never inside the head.
type Segment = (u64, u64);

/// The segments to write after the head, from the bmap or the whole image.
fn body_segments(img: &FlashImage, size: Option<u64>) -> Vec<Segment> {
    let raw: Vec<Segment> = match (&img.bmap, size) {
        (Some(b), _) => b
            .ranges
            .iter()
            .map(|r| r.byte_span(b.block_size, b.image_size))
            .collect(),
        (None, Some(s)) => vec![(0, s)],
        (None, None) => vec![(0, u64::MAX)],
    };
    raw.into_iter()
        .filter_map(|(a, b)| (b > HEAD).then_some((a.max(HEAD), b)))
        .collect()
}

/// What one target makes of the shared stream: the patches laid over it and the segments it
/// writes (several nodes streamed from one base differ only in these).
struct Variant<'a> {
    patches: &'a [Patch],
    segments: Vec<Segment>,
}

/// `data` (at stream offset `pos`) with `patches` laid over it: the shared buffer itself when no
/// patch touches it, else a copy in `scratch` (aligned, as O_DIRECT writes need).
fn patched<'a>(
    data: &'a [u8],
    pos: u64,
    patches: &[Patch],
    scratch: &'a mut Option<AlignedBuf>,
) -> &'a [u8] {
    let end = pos + data.len() as u64;
    if !patches
        .iter()
        .any(|p| p.offset < end && p.offset + p.bytes.len() as u64 > pos)
    {
        return data;
    }
    let buf = scratch.get_or_insert_with(|| AlignedBuf::new(CHUNK));
    let copy = buf.slice_mut(data.len());
    copy.copy_from_slice(data);
    crate::artifact::writer::apply_patches(copy, pos, patches);
    copy
}

/// Where one target stands while the image is written.
enum TargetState<T> {
    /// Nothing has gone wrong so far.
    Writing(T),
    /// A step failed; later steps skip the target, and its head stays zeroed.
    Failed { path: PathBuf, error: String },
}

impl<T: FlashTarget> TargetState<T> {
    fn failed(t: &T, e: &anyhow::Error) -> TargetState<T> {
        TargetState::Failed {
            path: t.path().to_path_buf(),
            error: format!("{e:#}"),
        }
    }

    /// The outcome of a target that failed, or of a live one that `e` stopped.
    fn stopped_by(&self, e: &anyhow::Error) -> Outcome {
        match self {
            TargetState::Writing(t) => Outcome {
                path: t.path().to_path_buf(),
                result: Err(format!("{e:#}")),
            },
            TargetState::Failed { path, error } => Outcome {
                path: path.clone(),
                result: Err(error.clone()),
            },
        }
    }
}

/// Writes `img` to every target; one outcome per target, in order.
pub fn flash<T: FlashTarget>(
    img: &FlashImage,
    targets: Vec<T>,
    opts: &FlashOptions,
    events: &Events,
) -> Vec<Outcome> {
    let targets = targets.into_iter().map(|t| (0, t)).collect();
    flash_shared(&[img], targets, opts, events)
}

/// Writes images that share one stream — nodes streamed from one base file, which is read once —
/// each to its own targets: a target `(i, t)` gets `images[i]`, with that image's patches and
/// map. `images[0]` says how the stream is read and checked (its file, size, checksum file and
/// bmap checksums); every image must be of the same file. One outcome per target, in order.
pub fn flash_shared<T: FlashTarget>(
    images: &[&FlashImage],
    targets: Vec<(usize, T)>,
    opts: &FlashOptions,
    events: &Events,
) -> Vec<Outcome> {
    let started = Instant::now();
    let Some(img) = shared_stream(images) else {
        let e = anyhow!("images flashed together must share one file (a kiln bug)");
        return targets
            .iter()
            .map(|(_, t)| TargetState::Writing(t).stopped_by(&e))
            .collect();
    };
    // 1. Zero the head (and the tail of devices, where a stale backup GPT would live).
    let mut states: Vec<(usize, TargetState<T>)> = targets
        .into_iter()
        .map(|(v, t)| {
            events.emit(Stage::Prepare, t.path(), 0, None);
            match zero_head_and_tail(&t, img.size) {
                Ok(()) => (v, TargetState::Writing(t)),
                Err(e) => (v, TargetState::failed(&t, &e)),
            }
        })
        .collect();

    // 2. Decode once, write the body everywhere.
    let variants: Vec<Variant> = images
        .iter()
        .map(|i| Variant {
            patches: &i.patches,
            segments: body_segments(i, img.size),
        })
        .collect();
    let (ends, total) = match fan_out(img, &variants, opts.verify, &mut states, events) {
        Ok(v) => v,
        // The image itself failed (truncated, checksum): every target still writing fails.
        Err(e) => return states.iter().map(|(_, s)| s.stopped_by(&e)).collect(),
    };

    // 3. Verify, 4. commit the head — per target, in parallel.
    std::thread::scope(|scope| {
        let pending: Vec<_> = states
            .iter()
            .map(|(v, s)| match s {
                TargetState::Writing(t) => {
                    let (head, digests) = &ends[*v];
                    Ok((
                        t.path(),
                        scope.spawn(move || {
                            finish_target(t, head, digests, total, opts, events, started)
                        }),
                    ))
                }
                TargetState::Failed { path, error } => Err(Outcome {
                    path: path.clone(),
                    result: Err(error.clone()),
                }),
            })
            .collect();
        pending
            .into_iter()
            .map(|p| match p {
                Ok((path, h)) => Outcome {
                    path: path.to_path_buf(),
                    result: h
                        .join()
                        .expect("target thread panicked")
                        .map_err(|e| format!("{e:#}")),
                },
                Err(failed) => failed,
            })
            .collect()
    })
}

/// The stream `images` share: the first, when every one is of its file and size.
fn shared_stream<'a>(images: &[&'a FlashImage]) -> Option<&'a FlashImage> {
    let first = *images.first()?;
    images
        .iter()
        .all(|i| i.path == first.path && i.size == first.size)
        .then_some(first)
}

fn zero_head_and_tail(t: &impl FlashTarget, image_size: Option<u64>) -> Result<()> {
    let mut zeros = AlignedBuf::new(HEAD as usize);
    let z = zeros.slice_mut(HEAD as usize);
    z.fill(0);
    write_all_at(t, 0, z).context("zeroing the first MiB")?;
    if let Some(size) = t.size()
        && size >= 4 * HEAD
    {
        write_all_at(t, size - HEAD, z).context("zeroing the last MiB")?;
    }
    t.fit_to(image_size)?;
    flush(t)
}

/// A decoded chunk on its way to the writers and the hash threads.
type Chunk = hash_pipeline::Chunk<AlignedBuf>;

/// Per-segment sha256 of the bytes written (computed from the stream), for verification.
type Digests = Vec<(Segment, String)>;

/// Each variant's first MiB (written last) and segment digests, by variant.
type VariantEnds = Vec<(Vec<u8>, Digests)>;

/// Writes the body to every live target while `decode` streams the image; a target whose write
/// fails is marked failed and the others go on. Returns what each variant needs to finish, and
/// the stream's length.
fn fan_out<T: FlashTarget>(
    img: &FlashImage,
    variants: &[Variant],
    hash_segments: bool,
    states: &mut [(usize, TargetState<T>)],
    events: &Events,
) -> Result<(VariantEnds, u64)> {
    let (decoded, failures) = std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut writers = Vec::new();
        for (i, (v, state)) in states.iter().enumerate() {
            // A target that already failed gets no writer; its sender finds no receiver.
            let (tx, rx) = sync_channel::<Chunk>(hash_pipeline::DEPTH);
            senders.push(tx);
            if let TargetState::Writing(t) = state {
                let variant = &variants[*v];
                writers.push((i, scope.spawn(move || write_body(t, rx, variant, events))));
            }
        }
        // The decoder runs here, on this thread.
        let decoded = decode(img, variants, hash_segments, &senders, events);
        drop(senders);
        let mut failures = Vec::new();
        for (i, w) in writers {
            if let Err(e) = w.join().expect("writer thread panicked") {
                failures.push((i, e));
            }
        }
        (decoded, failures)
    });
    for (i, e) in failures {
        if let TargetState::Writing(t) = &states[i].1 {
            states[i].1 = TargetState::failed(t, &e);
        }
    }
    decoded
}

/// One target's writer thread: writes the segments of every chunk it receives, its variant's
/// patches laid over, flushing every `SYNC_EVERY` bytes and at the end; returns the bytes written.
fn write_body(
    t: &impl FlashTarget,
    rx: Receiver<Chunk>,
    variant: &Variant,
    events: &Events,
) -> Result<u64> {
    let mut failed: Option<anyhow::Error> = None;
    let mut written = 0u64;
    let mut since_sync = 0u64;
    let mut scratch = None;
    for chunk in rx {
        if failed.is_some() {
            continue; // keep draining so the decoder never blocks on us
        }
        let data = patched(chunk.data(), chunk.pos, variant.patches, &mut scratch);
        let r = write_segments(t, chunk.pos, data, &variant.segments).and_then(|w| {
            written += w;
            since_sync += w;
            events.emit(Stage::Write, t.path(), written, None);
            if since_sync >= SYNC_EVERY {
                since_sync = 0;
                flush(t)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            failed = Some(e);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => {
            flush(t)?;
            Ok(written)
        }
    }
}

/// Writes the parts of `data` (at image offset `pos`) that fall in `segments`; returns bytes written.
fn write_segments(
    t: &impl FlashTarget,
    pos: u64,
    data: &[u8],
    segments: &[Segment],
) -> Result<u64> {
    let end = pos + data.len() as u64;
    let mut written = 0;
    for &(a, b) in segments {
        if b <= pos {
            continue;
        }
        if a >= end {
            break;
        }
        let (s, e) = (a.max(pos), b.min(end));
        write_all_at(t, s, &data[(s - pos) as usize..(e - pos) as usize])?;
        written += e - s;
    }
    Ok(written)
}

/// What the stream's hash thread learns from the bytes as they are read: the whole image's
/// sha256 (for the checksum file) and the bmap's range digests (to check the bmap).
struct StreamChecks {
    whole: Option<Sha256>,
    bmap: Option<(Bmap, RangeHasher)>,
}

impl StreamChecks {
    /// The whole-image digest costs a full pass of SHA-256: only when a checksum file is there to
    /// compare with. Both are of the file as it is, before any patch.
    fn new(img: &FlashImage) -> Self {
        StreamChecks {
            whole: img.sha256.is_some().then(Sha256::new),
            // A map without checksums (a streamed node's) has nothing to check the stream against.
            bmap: img
                .bmap
                .as_ref()
                .filter(|b| b.ranges.iter().any(|r| r.sha256.is_some()))
                .map(|b| (b.clone(), RangeHasher::new(b, &Default::default()))),
        }
    }

    /// The whole image's sha256 (if taken) and the bmap as the stream hashes it.
    fn finish(self) -> (Option<String>, Option<Bmap>) {
        let checked = self.bmap.map(|(mut b, rh)| {
            rh.finish(&mut b);
            b
        });
        (self.whole.map(|w| hex::encode(w.finalize())), checked)
    }
}

impl Feed for StreamChecks {
    fn feed(&mut self, pos: u64, data: &[u8]) {
        if let Some(w) = self.whole.as_mut() {
            w.update(data);
        }
        if let Some((_, rh)) = self.bmap.as_mut() {
            rh.feed(pos, data);
        }
    }
}

/// What a variant's hash thread learns from the patched stream: the first MiB, written last, and
/// each segment's digest for the read-back.
struct VariantChecks<'a> {
    patches: &'a [Patch],
    segments: &'a [Segment],
    /// A full SHA-256 pass over the written data: skipped when nothing reads back.
    hash_segments: bool,
    per_segment: Vec<Option<Sha256>>,
    head: Vec<u8>,
    scratch: Option<AlignedBuf>,
    end: u64,
}

impl<'a> VariantChecks<'a> {
    fn new(variant: &'a Variant, hash_segments: bool) -> Self {
        VariantChecks {
            patches: variant.patches,
            segments: &variant.segments,
            hash_segments,
            per_segment: vec![None; variant.segments.len()],
            head: Vec::with_capacity(HEAD as usize),
            scratch: None,
            end: 0,
        }
    }

    /// The head and each segment's digest (only its extent without the read-back).
    fn finish(self) -> (Vec<u8>, Digests) {
        let mut digests: Digests = Vec::new();
        for (i, h) in self.per_segment.into_iter().enumerate() {
            let (a, b) = self.segments[i];
            let b = b.min(self.end);
            if b > a {
                let digest = h.map(|h| hex::encode(h.finalize())).unwrap_or_default();
                digests.push(((a, b), digest));
            }
        }
        (self.head, digests)
    }
}

impl Feed for VariantChecks<'_> {
    fn feed(&mut self, pos: u64, data: &[u8]) {
        let data = patched(data, pos, self.patches, &mut self.scratch);
        if pos < HEAD {
            let take = ((HEAD - pos) as usize).min(data.len());
            self.head.extend_from_slice(&data[..take]);
        }
        let end = pos + data.len() as u64;
        if self.hash_segments {
            for (i, &(a, b)) in self.segments.iter().enumerate() {
                let (s, e) = (a.max(pos), b.min(end));
                if e > s {
                    self.per_segment[i]
                        .get_or_insert_with(Sha256::new)
                        .update(&data[(s - pos) as usize..(e - pos) as usize]);
                }
            }
        }
        self.end = end;
    }
}

/// Streams the decompressed image once: checks it against its sha256 and bmap on one hash
/// thread, gives each variant's hash thread the chunks to patch, keep the head of and digest, and
/// sends each chunk to every writer.
fn decode(
    img: &FlashImage,
    variants: &[Variant],
    hash_segments: bool,
    senders: &[SyncSender<Chunk>],
    events: &Events,
) -> Result<(VariantEnds, u64)> {
    let mut pos = 0u64;
    std::thread::scope(|scope| -> Result<_> {
        let (hash_tx, hasher) = hash_pipeline::spawn(scope, StreamChecks::new(img), None);
        let (variant_txs, variant_threads): (Vec<_>, Vec<_>) = variants
            .iter()
            .map(|v| hash_pipeline::spawn(scope, VariantChecks::new(v, hash_segments), None))
            .unzip();
        let decoded = img.with_reader(|r: &mut dyn Read| {
            loop {
                let mut buf = AlignedBuf::new(CHUNK);
                let n = fill(r, buf.slice_mut(CHUNK)).context("reading the image stream")?;
                if n == 0 {
                    break;
                }
                let buf = Arc::new(buf);
                let to_all = senders
                    .iter()
                    .chain(&variant_txs)
                    .chain(std::iter::once(&hash_tx));
                for tx in to_all {
                    // A writer that failed early has dropped its receiver; the others carry on.
                    let _ = tx.send(Chunk {
                        pos,
                        buf: buf.clone(),
                        len: n,
                    });
                }
                pos += n as u64;
                events.emit(Stage::Decode, Path::new("-"), pos, img.size);
            }
            Ok(())
        });
        drop(hash_tx);
        drop(variant_txs);
        let (whole_sha, checked) = hasher.join().expect("hash thread panicked").finish();
        let ends = variant_threads
            .into_iter()
            .map(|h| h.join().expect("hash thread panicked").finish())
            .collect();
        decoded?;
        check_stream(img, pos, whole_sha.as_deref(), checked.as_ref())?;
        Ok((ends, pos))
    })
}

/// Refuses a stream that is not the image it claims to be: short, another checksum, or ranges
/// that do not match its bmap.
fn check_stream(
    img: &FlashImage,
    pos: u64,
    sha: Option<&str>,
    checked: Option<&Bmap>,
) -> Result<()> {
    if let Some(expected) = img.size
        && pos != expected
    {
        bail!(
            "the image stream ended at byte {pos}, but the image is {expected} bytes (truncated?)"
        );
    }
    if let (Some(expected), Some(sha)) = (&img.sha256, sha)
        && !expected.eq_ignore_ascii_case(sha)
    {
        bail!("checksum mismatch: the image's sha256 is {sha}, its checksum file says {expected}");
    }
    if let (Some(got), Some(want)) = (checked, &img.bmap) {
        for (g, e) in got.ranges.iter().zip(&want.ranges) {
            if let (Some(gs), Some(es)) = (&g.sha256, &e.sha256)
                && gs != es
            {
                bail!(
                    "the bmap does not match the image: blocks {}-{} (byte {}) hash to {gs}, the bmap says {es}",
                    e.first,
                    e.last,
                    e.first * want.block_size
                );
            }
        }
    }
    Ok(())
}

fn fill(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Verifies the body read back from `t`, then commits: writes the head, flushes, verifies it and
/// has the kernel re-read the partition table.
fn finish_target(
    t: &impl FlashTarget,
    head: &[u8],
    digests: &Digests,
    total: u64,
    opts: &FlashOptions,
    events: &Events,
    started: Instant,
) -> Result<Done> {
    let mut buf = AlignedBuf::new(CHUNK);
    t.drop_cache();
    if opts.verify {
        let mut checked = 0u64;
        for ((a, b), want) in digests {
            let got = read_hash(t, *a, b - a, &mut buf)?;
            if &got != want {
                bail!(
                    "verification failed: {} bytes at offset {a} on {} differ from the image (a failing card?)",
                    b - a,
                    t.path().display()
                );
            }
            checked += b - a;
            events.emit(Stage::Verify, t.path(), checked, None);
        }
    }
    // Commit: the head goes last.
    let mut hb = AlignedBuf::new(HEAD as usize);
    let hs = hb.slice_mut(HEAD as usize);
    hs.fill(0);
    hs[..head.len()].copy_from_slice(head);
    let head_len = (head.len() as u64).min(total).min(HEAD);
    let bs = t.block_size();
    let head_write = head_len.div_ceil(bs) * bs;
    write_all_at(t, 0, &hs[..head_write.min(HEAD) as usize])
        .context("writing the first MiB (the commit)")?;
    flush(t)?;
    t.drop_cache();
    let got = read_hash(t, 0, head.len() as u64, &mut buf)?;
    if got != hex::encode(Sha256::digest(head)) {
        bail!(
            "verification of the first MiB failed on {}",
            t.path().display()
        );
    }
    if let Err(e) = t.reread_partitions() {
        // Loop devices without partition scanning answer EINVAL; the write itself is complete.
        events.note(t.path(), &format!("note: {e:#}"));
    }
    events.emit(Stage::Done, t.path(), total, Some(total));
    let written = digests.iter().map(|((a, b), _)| b - a).sum::<u64>() + head.len() as u64;
    Ok(Done {
        written,
        verified: opts.verify,
        seconds: started.elapsed().as_secs_f64(),
        detail: None,
    })
}

/// Prints the end-of-run table; returns an error when any target failed.
pub fn summary(outcomes: &[Outcome]) -> Result<()> {
    eprintln!(
        "\n{:<24} {:<8} {:>10} {:>8}  detail",
        "target", "result", "written", "seconds"
    );
    let mut failed = 0;
    for o in outcomes {
        match &o.result {
            Ok(d) => eprintln!(
                "{:<24} {:<8} {:>10} {:>8.1}  {}",
                o.path.display(),
                "ok",
                blockdev::human_size(d.written),
                d.seconds,
                match (&d.detail, d.verified) {
                    (Some(detail), _) => detail.as_str(),
                    (None, true) => "verified",
                    (None, false) => "not verified (--no-verify)",
                }
            ),
            Err(e) => {
                failed += 1;
                eprintln!(
                    "{:<24} {:<8} {:>10} {:>8}  {e}",
                    o.path.display(),
                    "FAILED",
                    "-",
                    "-"
                );
            }
        }
    }
    if failed > 0 {
        return Err(anyhow!(
            "{failed} of {} targets failed; a failed disk is left with no partition table",
            outcomes.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::memory::{Faults, MacNode, MemoryTarget, Op};
    use super::*;
    use crate::io::progress::ProgressMode;

    const MIB: u64 = 1 << 20;

    /// A 3 MiB + 4 KiB image with no zero byte in it, on disk (FlashImage reads a file).
    fn image(dir: &Path) -> (FlashImage, Vec<u8>) {
        image_of(dir, 3 * MIB as usize + 4096)
    }

    /// An image of `len` bytes with no zero byte in it.
    fn image_of(dir: &Path, len: usize) -> (FlashImage, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        let path = dir.join("test.img");
        std::fs::write(&path, &data).unwrap();
        (FlashImage::open(&path, None).unwrap(), data)
    }

    /// Flashes `disks` in memory; returns one outcome per disk and the image.
    fn flash_to(disks: &[MemoryTarget], verify: bool) -> (Vec<Outcome>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let (img, data) = image(dir.path());
        let opts = FlashOptions { verify };
        let events = Events::new(ProgressMode::None, None);
        (flash(&img, disks.iter().collect(), &opts, &events), data)
    }

    /// Flashes one in-memory disk of 8 MiB; returns the outcome, the disk and the image.
    fn flash_one(faults: Faults, verify: bool) -> (Outcome, MemoryTarget, Vec<u8>) {
        let disk = MemoryTarget::new("mem", 8 * MIB, faults);
        let (mut out, data) = flash_to(std::slice::from_ref(&disk), verify);
        (out.remove(0), disk, data)
    }

    fn error(o: &Outcome) -> &str {
        o.result.as_ref().err().map(String::as_str).unwrap_or("")
    }

    fn head_is_zeroed(disk: &MemoryTarget) -> bool {
        disk.contents()[..HEAD as usize].iter().all(|&b| b == 0)
    }

    #[test]
    fn the_image_lands_whole_and_the_head_is_written_last() {
        let (out, disk, data) = flash_one(Faults::default(), true);
        assert!(out.result.is_ok(), "{}", error(&out));
        let got = disk.contents();
        assert_eq!(&got[..data.len()], &data[..]);
        assert!(
            got[7 * MIB as usize..].iter().all(|&b| b == 0),
            "the last MiB is zeroed"
        );
        let ops = disk.ops();
        let in_head = |o: &Op| matches!(o, Op::Write { offset, .. } if *offset < HEAD);
        // The first write zeroes the head; the only other one into it is the commit.
        assert!(in_head(&ops[0]));
        let commit = ops.iter().rposition(in_head).unwrap();
        assert_eq!(ops.iter().filter(|o| in_head(o)).count(), 2);
        for (i, op) in ops.iter().enumerate() {
            if let Op::Write { offset, .. } | Op::Read { offset, .. } = op
                && *offset >= HEAD
                && *offset < 7 * MIB
            {
                assert!(i < commit, "{op:?} after the commit (op {commit})");
            }
        }
        // The commit is flushed and read back.
        assert_eq!(ops[commit + 1], Op::Flush);
        assert!(matches!(ops[commit + 2], Op::Read { offset: 0, .. }));
    }

    #[test]
    fn short_writes_are_continued() {
        let faults = Faults {
            short_writes: Some(1000),
            ..Faults::default()
        };
        let (out, disk, data) = flash_one(faults, true);
        assert!(out.result.is_ok(), "{}", error(&out));
        assert_eq!(&disk.contents()[..data.len()], &data[..]);
    }

    #[test]
    fn an_io_error_in_the_body_leaves_no_partition_table() {
        let faults = Faults {
            eio_at: Some(2 * MIB + 100),
            ..Faults::default()
        };
        let (out, disk, _) = flash_one(faults, true);
        assert!(
            error(&out).contains("writing mem at byte"),
            "{}",
            error(&out)
        );
        assert!(head_is_zeroed(&disk));
    }

    #[test]
    fn a_failed_flush_fails_the_target_before_the_commit() {
        // Flush 1 ends the zeroing; flush 2 ends the body.
        let faults = Faults {
            flush_fails: Some(2),
            ..Faults::default()
        };
        let (out, disk, _) = flash_one(faults, true);
        assert!(error(&out).starts_with("flushing mem"), "{}", error(&out));
        assert!(head_is_zeroed(&disk));
    }

    #[test]
    fn a_read_back_that_differs_is_a_failure_and_nothing_is_committed() {
        let faults = Faults {
            corrupt_read_at: Some(2 * MIB + 5),
            ..Faults::default()
        };
        let (out, disk, _) = flash_one(faults.clone(), true);
        assert!(
            error(&out).starts_with("verification failed"),
            "{}",
            error(&out)
        );
        assert!(head_is_zeroed(&disk));
        // Without the read-back the same disk "succeeds": the verify is what caught it.
        let (out, _, _) = flash_one(faults, false);
        assert!(out.result.is_ok(), "{}", error(&out));
    }

    #[test]
    fn a_head_that_reads_back_wrong_fails() {
        let faults = Faults {
            corrupt_read_at: Some(100),
            ..Faults::default()
        };
        let (out, _, _) = flash_one(faults, true);
        assert!(
            error(&out).starts_with("verification of the first MiB failed on mem"),
            "{}",
            error(&out)
        );
    }

    #[test]
    fn an_image_larger_than_the_disk_is_refused_before_the_commit() {
        let disk = MemoryTarget::new("small", 2 * MIB, Faults::default());
        let (out, _) = flash_to(&[disk], true);
        assert!(
            error(&out[0]).contains("does not fit"),
            "{}",
            error(&out[0])
        );
    }

    #[test]
    fn an_image_that_fails_its_checksum_fails_every_disk_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let (_, data) = image(dir.path());
        let wrong = hex::encode(Sha256::digest(b"another image"));
        std::fs::write(
            dir.path().join("test.img.sha256sum"),
            format!("{wrong}  test.img\n"),
        )
        .unwrap();
        let img = FlashImage::open(&dir.path().join("test.img"), None).unwrap();
        assert_eq!(img.size, Some(data.len() as u64));
        let disks = [
            MemoryTarget::new("a", 8 * MIB, Faults::default()),
            MemoryTarget::new("b", 8 * MIB, Faults::default()),
        ];
        let opts = FlashOptions { verify: true };
        let events = Events::new(ProgressMode::None, None);
        let out = flash(&img, disks.iter().collect(), &opts, &events);
        for (o, disk) in out.iter().zip(&disks) {
            assert!(error(o).starts_with("checksum mismatch"), "{}", error(o));
            assert!(head_is_zeroed(disk));
        }
    }

    #[test]
    fn one_failing_disk_in_a_fleet_does_not_stop_the_others() {
        let bad = Faults {
            eio_at: Some(3 * MIB),
            ..Faults::default()
        };
        let disks = vec![
            MemoryTarget::new("a", 8 * MIB, Faults::default()),
            MemoryTarget::new("b", 8 * MIB, bad),
            MemoryTarget::new("c", 8 * MIB, Faults::default()),
        ];
        let (out, data) = flash_to(&disks, true);
        let names: Vec<_> = out.iter().map(|o| o.path.display().to_string()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        for i in [0, 2] {
            assert!(out[i].result.is_ok(), "{}", error(&out[i]));
            assert_eq!(&disks[i].contents()[..data.len()], &data[..]);
        }
        assert!(
            error(&out[1]).contains("writing b at byte"),
            "{}",
            error(&out[1])
        );
        assert!(head_is_zeroed(&disks[1]));
    }

    #[test]
    fn variants_of_one_stream_each_get_their_patches_and_map() {
        // Two nodes over one base: each patches the head and the body, and maps its own ranges.
        let dir = tempfile::tempdir().unwrap();
        let (base, data) = image(dir.path());
        let size = data.len() as u64;
        let variant = |byte: u8, extra: u64| {
            let patches = vec![
                Patch {
                    offset: 440,
                    bytes: vec![byte; 4],
                },
                Patch {
                    offset: 2 * MIB + 10,
                    bytes: vec![byte; 5000],
                },
            ];
            let bmap = Bmap::from_byte_ranges(size, &[(0, 2 * MIB + 8192), (extra, 4096)]);
            FlashImage::streamed(&base.path, size, bmap, patches)
        };
        let (one, two) = (variant(0xA1, 3 * MIB), variant(0xB2, 2 * MIB + 65536));
        let disks = [
            MemoryTarget::new("one", 8 * MIB, Faults::default()),
            MemoryTarget::new("two-a", 8 * MIB, Faults::default()),
            MemoryTarget::new("two-b", 8 * MIB, Faults::default()),
        ];
        let targets = vec![(0, &disks[0]), (1, &disks[1]), (1, &disks[2])];
        let events = Events::new(ProgressMode::None, None);
        let opts = FlashOptions { verify: true };
        let out = flash_shared(&[&one, &two], targets, &opts, &events);
        for o in &out {
            assert!(o.result.is_ok(), "{}", error(o));
        }
        for (disk, img) in [(&disks[0], &one), (&disks[1], &two), (&disks[2], &two)] {
            // What a never-written block of the memory disk holds; head and tail are zeroed.
            let mut want = vec![0xEEu8; 8 * MIB as usize];
            want[7 * MIB as usize..].fill(0);
            for r in &img.bmap.as_ref().unwrap().ranges {
                let (a, b) = r.byte_span(4096, size);
                want[a as usize..b as usize].copy_from_slice(&data[a as usize..b as usize]);
            }
            crate::artifact::writer::apply_patches(&mut want[..size as usize], 0, &img.patches);
            let got = disk.contents();
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(
                first.is_none(),
                "{} differs at {first:?}",
                disk.path().display()
            );
        }
    }

    /// Flashes an image of `len` bytes to a simulated Mac raw node of 8 MiB.
    fn flash_mac(node: MacNode, len: usize) -> (Outcome, MemoryTarget, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let (img, data) = image_of(dir.path(), len);
        let disk = MemoryTarget::mac("rdisk4", 8 * MIB, Faults::default(), node);
        let opts = FlashOptions { verify: true };
        let events = Events::new(ProgressMode::None, None);
        let mut out = flash(&img, vec![&disk], &opts, &events);
        (out.remove(0), disk, data)
    }

    #[test]
    fn a_mac_raw_node_takes_an_unaligned_image_from_a_drive_without_cache_flush() {
        // 300 bytes into a block: the node refuses that write, so it must be read-modify-written.
        let len = 3 * MIB as usize + 4096 + 300;
        let node = MacNode {
            no_cache_flush: true,
            ..MacNode::default()
        };
        let (out, disk, data) = flash_mac(node, len);
        assert!(out.result.is_ok(), "{}", error(&out));
        let got = disk.contents();
        assert_eq!(&got[..len], &data[..]);
        // The rest of the last block is what was on the disk, not zeros or garbage.
        assert!(got[len..len.div_ceil(512) * 512].iter().all(|&b| b == 0xEE));
        assert!(got[7 * MIB as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_full_fsync_answering_enotty_fails_the_mac_disk_before_the_commit() {
        // What Rust's sync_data (F_FULLFSYNC) got on a disk node: kiln must not use it there.
        let node = MacNode {
            fsync_enotty: true,
            ..MacNode::default()
        };
        let (out, disk, _) = flash_mac(node, 3 * MIB as usize);
        assert!(
            error(&out).starts_with("flushing rdisk4"),
            "{}",
            error(&out)
        );
        assert!(head_is_zeroed(&disk));
    }

    #[test]
    fn a_volume_mounted_again_mid_write_is_a_clear_error_and_nothing_is_committed() {
        // Writes 1 and 2 zero the head and the tail; macOS mounts the card again at the body.
        let node = MacNode {
            remount_at_write: Some(3),
            ..MacNode::default()
        };
        let (out, disk, _) = flash_mac(node, 3 * MIB as usize + 100);
        assert!(
            error(&out).contains("busy: a volume of it was mounted again"),
            "{}",
            error(&out)
        );
        assert!(head_is_zeroed(&disk));
    }
}
