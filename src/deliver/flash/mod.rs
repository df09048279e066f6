//! The write pipeline: one image, decoded once, written to one or more targets, commit last.
//!
//! Order of work on every target (coreos-installer's rule): zero the first MiB and the last MiB
//! (stale backup GPTs), write every mapped block but the first MiB, flush, verify by reading the
//! written ranges back past the page cache, and only then write the first MiB, flush, verify it and
//! ask the kernel to re-read the partition table. An interrupted or failed write leaves a disk
//! with no partition table, never one that boots half an image.
//!
//! Blocks are skipped only where a bmap says they are unused; without a bmap every block is
//! written. The decoder thread hashes the stream (the whole image against its `.sha256sum`, each
//! bmap range against the bmap) and fans chunks out to one writer thread per target; a failing
//! target does not stop the others.

pub mod buffer;
pub mod events;
pub mod image;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::blockdev::{self, Target};
use buffer::AlignedBuf;
use events::{Events, Stage};
use image::FlashImage;

/// Bytes written last: the partition table and everything before the first partition.
pub const HEAD: u64 = 1 << 20;
const CHUNK: usize = 4 << 20;
/// fdatasync this often, so a dying card fails early instead of at the end.
const SYNC_EVERY: u64 = 256 << 20;

/// One target opened for writing.
pub struct OpenTarget {
    pub target: Target,
    pub path: PathBuf,
    /// O_DIRECT descriptor for aligned I/O (block devices), else the plain one.
    direct: File,
    /// Buffered descriptor for the rare unaligned tail.
    plain: File,
    pub block_size: u64,
    pub size: Option<u64>,
    is_device: bool,
}

/// The buffered descriptor of a disk, for the unaligned tail and the commit's reads.
fn open_buffered(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The two descriptors of a disk: one for aligned, uncached I/O and one for the rest.
#[cfg(target_os = "linux")]
fn open_device(path: &Path) -> Result<(File, File)> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_EXCL | nix::libc::O_DIRECT)
        .open(path)
        .with_context(|| {
            format!(
                "opening {} exclusively (is it mounted or in use?)",
                path.display()
            )
        })?;
    Ok((direct, open_buffered(path)?))
}

/// macOS: the raw node (`/dev/rdiskN`) bypasses the buffer cache and is several times faster
/// than `/dev/diskN`; F_NOCACHE keeps reads for the verify off the cache too. O_EXLOCK fails
/// while another program holds the disk.
#[cfg(target_os = "macos")]
fn open_device(path: &Path) -> Result<(File, File)> {
    use std::os::fd::AsRawFd;
    let raw = crate::blockdev::diskutil::raw_path(&path.to_string_lossy());
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_EXLOCK | nix::libc::O_NONBLOCK)
        .open(&raw)
        .with_context(|| format!("opening {raw} exclusively (is it mounted or in use?)"))?;
    // SAFETY: fcntl on a descriptor we own; F_NOCACHE takes an int flag.
    unsafe { nix::libc::fcntl(direct.as_raw_fd(), nix::libc::F_NOCACHE, 1) };
    Ok((direct, open_buffered(path)?))
}

impl OpenTarget {
    /// Opens `target` exclusively (O_EXCL on a block device fails while anything has it open or
    /// mounted) and, for devices, with O_DIRECT.
    pub fn open(target: Target) -> Result<OpenTarget> {
        let path = target.path();
        match &target {
            Target::Device(dev) => {
                let (direct, plain) = open_device(&path)?;
                Ok(OpenTarget {
                    block_size: dev.logical_block_size.max(512),
                    size: Some(dev.size),
                    target: target.clone(),
                    path,
                    direct,
                    plain,
                    is_device: true,
                })
            }
            Target::File(_) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Ok(OpenTarget {
                    plain: f.try_clone()?,
                    direct: f,
                    block_size: 512,
                    size: None,
                    target: target.clone(),
                    path,
                    is_device: false,
                })
            }
        }
    }

    /// Writes `data` at `offset`: aligned parts through O_DIRECT, the rest buffered.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if let Some(size) = self.size
            && offset + data.len() as u64 > size
        {
            bail!(
                "the image does not fit: writing byte {} of a {} disk",
                offset + data.len() as u64,
                blockdev::human_size(size)
            );
        }
        let bs = self.block_size as usize;
        let aligned_len = data.len() / bs * bs;
        let ptr_ok = (data.as_ptr() as usize).is_multiple_of(buffer::ALIGN);
        if self.is_device && offset.is_multiple_of(bs as u64) && ptr_ok && aligned_len > 0 {
            self.direct
                .write_all_at(&data[..aligned_len], offset)
                .with_context(|| format!("writing {} at byte {offset}", self.path.display()))?;
            if aligned_len < data.len() {
                self.plain
                    .write_all_at(&data[aligned_len..], offset + aligned_len as u64)
                    .with_context(|| {
                        format!(
                            "writing {} at byte {}",
                            self.path.display(),
                            offset + aligned_len as u64
                        )
                    })?;
            }
        } else {
            self.plain
                .write_all_at(data, offset)
                .with_context(|| format!("writing {} at byte {offset}", self.path.display()))?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.plain
            .sync_data()
            .with_context(|| format!("flushing {}", self.path.display()))?;
        self.direct
            .sync_data()
            .with_context(|| format!("flushing {}", self.path.display()))?;
        Ok(())
    }

    /// Reads `len` bytes at `offset` from the medium (O_DIRECT for devices, after dropping the
    /// device's buffer cache), hashing them.
    fn read_hash(&self, offset: u64, len: u64, buf: &mut AlignedBuf) -> Result<String> {
        let mut h = Sha256::new();
        let mut pos = offset;
        let end = offset + len;
        let bs = self.block_size;
        while pos < end {
            // Read whole aligned blocks and hash the part inside [pos, end).
            let start = pos / bs * bs;
            let want = ((end - start).min(buf.capacity() as u64)).div_ceil(bs) * bs;
            let slice = buf.slice_mut(want as usize);
            let got = if self.is_device {
                read_full(&self.direct, slice, start)
            } else {
                read_full(&self.plain, slice, start)
            }
            .with_context(|| format!("reading back {} at byte {start}", self.path.display()))?;
            let from = (pos - start) as usize;
            let to = ((end - start) as usize).min(got);
            if to <= from {
                bail!(
                    "{} ended at byte {} while verifying",
                    self.path.display(),
                    start + got as u64
                );
            }
            h.update(&slice[from..to]);
            pos = start + to as u64;
        }
        Ok(hex::encode(h.finalize()))
    }
}

fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

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
}

pub struct FlashOptions {
    pub verify: bool,
    /// Keep cards attached after the write (`--no-eject`).
    pub no_eject: bool,
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

/// Writes `img` to every target; one outcome per target, in order.
pub fn flash(
    img: &FlashImage,
    targets: Vec<OpenTarget>,
    opts: &FlashOptions,
    events: &Events,
) -> Vec<Outcome> {
    let started = Instant::now();
    let mut live: Vec<Option<OpenTarget>> = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    // 1. Zero the head (and the tail of devices, where a stale backup GPT would live).
    for t in targets {
        events.emit(Stage::Prepare, &t.path, 0, None);
        match zero_head_and_tail(&t, img.size) {
            Ok(()) => {
                outcomes.push(Outcome {
                    path: t.path.clone(),
                    result: Err("not finished".into()),
                });
                live.push(Some(t));
            }
            Err(e) => {
                outcomes.push(Outcome {
                    path: t.path.clone(),
                    result: Err(format!("{e:#}")),
                });
                live.push(None);
            }
        }
    }

    // 2. Decode once, write the body everywhere.
    let segments = body_segments(img, img.size);
    let written_body = fan_out(
        img,
        &segments,
        opts.verify,
        &mut live,
        &mut outcomes,
        events,
    );
    let (head, digests, total) = match written_body {
        Ok(v) => v,
        Err(e) => {
            for o in outcomes.iter_mut().filter(|o| o.result.is_err()) {
                o.result = Err(match &o.result {
                    Err(prev) if prev != "not finished" => prev.clone(),
                    _ => format!("{e:#}"),
                });
            }
            return outcomes;
        }
    };

    // 3. Verify, 4. commit the head — per target, in parallel.
    std::thread::scope(|scope| {
        let handles: Vec<_> = live
            .iter()
            .map(|t| {
                let head = &head;
                let digests = &digests;
                scope.spawn(move || -> Option<Result<Done>> {
                    let t = t.as_ref()?;
                    Some(finish_target(
                        t, head, digests, total, opts, events, started,
                    ))
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            if let Some(r) = h.join().expect("target thread panicked")
                && outcomes[i].result.as_ref().err().map(String::as_str) == Some("not finished")
            {
                outcomes[i].result = r.map_err(|e| format!("{e:#}"));
            }
        }
    });
    outcomes
}

fn zero_head_and_tail(t: &OpenTarget, image_size: Option<u64>) -> Result<()> {
    let mut zeros = AlignedBuf::new(HEAD as usize);
    let z = zeros.slice_mut(HEAD as usize);
    z.fill(0);
    t.write_at(0, z).context("zeroing the first MiB")?;
    if let Some(size) = t.size
        && size >= 4 * HEAD
    {
        t.write_at(size - HEAD, z).context("zeroing the last MiB")?;
    }
    if !t.is_device
        && let Some(s) = image_size
    {
        t.plain
            .set_len(s)
            .with_context(|| format!("sizing {}", t.path.display()))?;
    }
    t.sync()
}

/// A decoded chunk on its way to a writer: image offset, buffer, valid length.
type Chunk = (u64, Arc<AlignedBuf>, usize);

/// Per-segment sha256 of the bytes written (computed from the stream), for verification.
type Digests = Vec<(Segment, String)>;

fn fan_out(
    img: &FlashImage,
    segments: &[Segment],
    hash_segments: bool,
    live: &mut [Option<OpenTarget>],
    outcomes: &mut [Outcome],
    events: &Events,
) -> Result<(Vec<u8>, Digests, u64)> {
    let n = live.len();
    let mut senders = Vec::new();
    let mut receivers: Vec<Option<Receiver<Chunk>>> = Vec::new();
    for _ in 0..n {
        let (tx, rx) = sync_channel(4);
        senders.push(tx);
        receivers.push(Some(rx));
    }
    let (decoded, failures) = std::thread::scope(|scope| {
        let mut writers = Vec::new();
        for (i, slot) in live.iter().enumerate() {
            let rx = receivers[i].take().expect("one receiver per target");
            let Some(t) = slot.as_ref() else {
                drop(rx);
                continue;
            };
            writers.push((
                i,
                scope.spawn(move || -> Result<u64> {
                    let mut failed: Option<anyhow::Error> = None;
                    let mut written = 0u64;
                    let mut since_sync = 0u64;
                    for (pos, buf, len) in rx {
                        if failed.is_some() {
                            continue; // keep draining so the decoder never blocks on us
                        }
                        let data = &buf.as_slice()[..len];
                        let r = write_segments(t, pos, data, segments).and_then(|w| {
                            written += w;
                            since_sync += w;
                            events.emit(Stage::Write, &t.path, written, None);
                            if since_sync >= SYNC_EVERY {
                                since_sync = 0;
                                t.sync()?;
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
                            t.sync()?;
                            Ok(written)
                        }
                    }
                }),
            ));
        }

        // The decoder runs here, on this thread.
        let decoded = decode(img, segments, hash_segments, &senders, events);
        drop(senders);
        let mut failures = Vec::new();
        for (i, w) in writers {
            if let Err(e) = w.join().expect("writer thread panicked") {
                failures.push((i, format!("{e:#}")));
            }
        }
        (decoded, failures)
    });
    for (i, e) in failures {
        outcomes[i].result = Err(e);
        live[i] = None;
    }
    decoded
}

/// Writes the parts of `data` (at image offset `pos`) that fall in `segments`; returns bytes written.
fn write_segments(t: &OpenTarget, pos: u64, data: &[u8], segments: &[Segment]) -> Result<u64> {
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
        t.write_at(s, &data[(s - pos) as usize..(e - pos) as usize])?;
        written += e - s;
    }
    Ok(written)
}

/// Streams the decompressed image: checks it against its sha256 and bmap, keeps the head,
/// digests every segment (for the read-back; only its extent without one), and sends each chunk
/// to every writer.
fn decode(
    img: &FlashImage,
    segments: &[Segment],
    hash_segments: bool,
    senders: &[std::sync::mpsc::SyncSender<Chunk>],
    events: &Events,
) -> Result<(Vec<u8>, Digests, u64)> {
    let mut head = Vec::with_capacity(HEAD as usize);
    let mut pos = 0u64;
    // The whole-image digest costs a full pass of SHA-256: only when a checksum file is there to
    // compare with. It is of the file as it is, so patched images are hashed before patching.
    let check_whole = img.sha256.is_some();
    let patched = !img.patches.is_empty();
    // Unpatched: the hash thread takes the whole-image digest. Patched: this thread does, first.
    let hasher_whole = (check_whole && !patched).then(Sha256::new);
    let mut whole = (check_whole && patched).then(Sha256::new);
    let (hash_tx, hash_rx) = sync_channel::<Chunk>(4);
    let hashed = std::thread::scope(
        |scope| -> Result<(Option<String>, Digests, Option<crate::artifact::bmap::Bmap>)> {
            // Hashing runs beside decompression: the whole image (unpatched ones), the bmap's
            // ranges (to check the bmap) and the segments to write (for the read-back).
            let hasher = scope.spawn(move || {
                let mut whole_here = hasher_whole;
                let mut seg_hashers: Vec<Option<Sha256>> = vec![None; segments.len()];
                let mut bmap_check = img.bmap.as_ref().map(|b| {
                    (
                        b.clone(),
                        crate::artifact::bmap::RangeHasher::new(b, &Default::default()),
                    )
                });
                let mut end_pos = 0u64;
                for (pos, buf, n) in hash_rx {
                    let data = &buf.as_slice()[..n];
                    if let Some(w) = whole_here.as_mut() {
                        w.update(data);
                    }
                    if let Some((_, rh)) = bmap_check.as_mut() {
                        rh.feed(pos, data);
                    }
                    let end = pos + n as u64;
                    // A full SHA-256 pass over the written data: skipped when nothing reads back.
                    for (i, &(a, b)) in segments.iter().enumerate().filter(|_| hash_segments) {
                        let (s, e) = (a.max(pos), b.min(end));
                        if e > s {
                            seg_hashers[i]
                                .get_or_insert_with(Sha256::new)
                                .update(&data[(s - pos) as usize..(e - pos) as usize]);
                        }
                    }
                    end_pos = end;
                }
                let mut digests: Digests = Vec::new();
                for (i, h) in seg_hashers.into_iter().enumerate() {
                    let (a, b) = segments[i];
                    let b = b.min(end_pos);
                    if b > a {
                        let digest = h.map(|h| hex::encode(h.finalize())).unwrap_or_default();
                        digests.push(((a, b), digest));
                    }
                }
                let checked = bmap_check.map(|(mut b, rh)| {
                    rh.finish(&mut b);
                    b
                });
                (
                    whole_here.map(|w| hex::encode(w.finalize())),
                    digests,
                    checked,
                )
            });
            let decoded = img.with_reader(|r: &mut dyn Read| {
                loop {
                    let mut buf = AlignedBuf::new(CHUNK);
                    let n = fill(r, buf.slice_mut(CHUNK)).context("reading the image stream")?;
                    if n == 0 {
                        break;
                    }
                    if patched {
                        if let Some(w) = whole.as_mut() {
                            w.update(&buf.as_slice()[..n]);
                        }
                        crate::artifact::writer::apply_patches(buf.slice_mut(n), pos, &img.patches);
                    }
                    if pos < HEAD {
                        let take = ((HEAD - pos) as usize).min(n);
                        head.extend_from_slice(&buf.as_slice()[..take]);
                    }
                    let buf = Arc::new(buf);
                    for tx in senders {
                        // A writer that failed early has dropped its receiver; the others carry on.
                        let _ = tx.send((pos, buf.clone(), n));
                    }
                    let _ = hash_tx.send((pos, buf, n));
                    pos += n as u64;
                    events.emit(Stage::Decode, Path::new("-"), pos, img.size);
                }
                Ok(())
            });
            drop(hash_tx);
            let (whole_sha, digests, checked) = hasher.join().expect("hash thread panicked");
            decoded?;
            let whole_sha = whole_sha.or_else(|| whole.take().map(|w| hex::encode(w.finalize())));
            Ok((whole_sha, digests, checked))
        },
    );
    let (whole_sha, digests, checked) = hashed?;
    if let Some(expected) = img.size
        && pos != expected
    {
        bail!(
            "the image stream ended at byte {pos}, but the image is {expected} bytes (truncated?)"
        );
    }
    if let (Some(expected), Some(sha)) = (&img.sha256, &whole_sha)
        && !expected.eq_ignore_ascii_case(sha)
    {
        bail!("checksum mismatch: the image's sha256 is {sha}, its checksum file says {expected}");
    }
    if let (Some(got), Some(want)) = (&checked, &img.bmap) {
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
    Ok((head, digests, pos))
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

fn finish_target(
    t: &OpenTarget,
    head: &[u8],
    digests: &Digests,
    total: u64,
    opts: &FlashOptions,
    events: &Events,
    started: Instant,
) -> Result<Done> {
    let mut buf = AlignedBuf::new(CHUNK);
    if t.is_device {
        let _ = blockdev::ioctl::flush_buffers(&t.plain);
    }
    if opts.verify {
        let mut checked = 0u64;
        for ((a, b), want) in digests {
            let got = t.read_hash(*a, b - a, &mut buf)?;
            if &got != want {
                bail!(
                    "verification failed: {} bytes at offset {a} on {} differ from the image (a failing card?)",
                    b - a,
                    t.path.display()
                );
            }
            checked += b - a;
            events.emit(Stage::Verify, &t.path, checked, None);
        }
    }
    // Commit: the head goes last.
    let mut hb = AlignedBuf::new(HEAD as usize);
    let hs = hb.slice_mut(HEAD as usize);
    hs.fill(0);
    hs[..head.len()].copy_from_slice(head);
    let head_len = (head.len() as u64).min(total).min(HEAD);
    let head_write = head_len.div_ceil(t.block_size) * t.block_size;
    t.write_at(0, &hs[..head_write.min(HEAD) as usize])
        .context("writing the first MiB (the commit)")?;
    t.sync()?;
    if t.is_device {
        let _ = blockdev::ioctl::flush_buffers(&t.plain);
    }
    let got = t.read_hash(0, head.len() as u64, &mut buf)?;
    if got != hex::encode(Sha256::digest(head)) {
        bail!(
            "verification of the first MiB failed on {}",
            t.path.display()
        );
    }
    if t.is_device
        && let Err(e) = blockdev::ioctl::reread_partitions(&t.plain)
    {
        // Loop devices without partition scanning answer EINVAL; the write itself is complete.
        events.note(&t.path, &format!("note: {e:#}"));
    }
    if let Target::Device(dev) = &t.target
        && blockdev::eject::wanted(dev, opts.no_eject)
    {
        events.note(&t.path, &blockdev::eject::eject(&t.path));
    }
    events.emit(Stage::Done, &t.path, total, Some(total));
    let written = digests.iter().map(|((a, b), _)| b - a).sum::<u64>() + head.len() as u64;
    Ok(Done {
        written,
        verified: opts.verify,
        seconds: started.elapsed().as_secs_f64(),
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
                if d.verified {
                    "verified"
                } else {
                    "not verified (--no-verify)"
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
            "{failed} of {} targets failed; a failed target holds no partition table",
            outcomes.len()
        ));
    }
    Ok(())
}
