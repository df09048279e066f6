//! Decompression of base images, chosen by the file's magic bytes (never by its name): zip (the
//! image is the archive's one `.img`, or its largest file), xz (multithreaded where the file has
//! several blocks), gzip and zstd.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zip,
    Xz,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Compression {
        match head {
            [b'P', b'K', 3, 4, ..] => Compression::Zip,
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Compression::Xz,
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }

    pub fn of_file(path: &Path) -> Result<Compression> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut head = [0u8; 8];
        let n = f.read(&mut head)?;
        Ok(Compression::sniff(&head[..n]))
    }
}

/// Calls `sink` with a reader of the decompressed image in `path`.
/// Memory the xz decoder may spend on threads: a quarter of the machine's RAM (xz's own default),
/// 512 MiB where that is unknown. Past it liblzma uses fewer threads, never more memory.
fn threading_memlimit() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(512 << 20, |kib| kib * 1024 / 4)
}

pub fn with_decompressed<T>(
    path: &Path,
    sink: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<T> {
    let kind = Compression::of_file(path)?;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let what = || {
        format!(
            "decompressing {} ({kind:?}); the file may be truncated or corrupt",
            path.display()
        )
    };
    match kind {
        Compression::None => sink(&mut BufReader::with_capacity(1 << 20, file)),
        Compression::Gzip => sink(&mut flate2::read::MultiGzDecoder::new(
            BufReader::with_capacity(1 << 20, file),
        ))
        .with_context(what),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(file).with_context(what)?;
            sink(&mut d).with_context(what)
        }
        Compression::Xz => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            let stream = liblzma::stream::MtStreamBuilder::new()
                .threads(threads)
                // liblzma decodes on one thread unless the blocks fit under this limit (0, the
                // builder's default, means never): a quarter of the RAM, as xz itself allows.
                .memlimit_threading(threading_memlimit())
                .memlimit_stop(u64::MAX)
                .decoder()
                .with_context(what)?;
            let mut d = liblzma::read::XzDecoder::new_stream(
                BufReader::with_capacity(1 << 20, file),
                stream,
            );
            sink(&mut d).with_context(what)
        }
        Compression::Zip => {
            let mut archive = zip::ZipArchive::new(file).with_context(what)?;
            let mut best: Option<(usize, bool, u64)> = None;
            for i in 0..archive.len() {
                let entry = archive.by_index(i).with_context(what)?;
                if !entry.is_file() {
                    continue;
                }
                let is_img = entry
                    .name()
                    .map(|n| n.to_ascii_lowercase().ends_with(".img"))
                    .unwrap_or(false);
                let key = (i, is_img, entry.size());
                best = match best {
                    Some(b) if (b.1, b.2) >= (key.1, key.2) => Some(b),
                    _ => Some(key),
                };
            }
            let Some((index, _, _)) = best else {
                bail!("{} is a zip archive with no files in it", path.display());
            };
            let mut entry = archive.by_index(index).with_context(what)?;
            sink(&mut entry).with_context(what)
        }
    }
}

/// The size a decompressed stream will have, when the container records it (zip does).
pub fn decompressed_size_hint(path: &Path) -> Option<u64> {
    match Compression::of_file(path).ok()? {
        Compression::None => std::fs::metadata(path).ok().map(|m| m.len()),
        Compression::Zip => {
            let mut a = zip::ZipArchive::new(File::open(path).ok()?).ok()?;
            (0..a.len())
                .filter_map(|i| a.by_index(i).ok().map(|e| e.size()))
                .max()
        }
        _ => None,
    }
}

/// Reads and discards the rest of a stream: an xz or zip stream reports corruption only when its
/// end is reached, so callers that stop early call this to surface the error.
pub fn drain(r: &mut dyn Read) -> Result<()> {
    std::io::copy(r, &mut std::io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(kind: Compression, data: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let bytes = match kind {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(data, 1).unwrap(),
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zip => {
                let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
                w.start_file("readme.txt", zip::write::SimpleFileOptions::default())
                    .unwrap();
                w.write_all(b"x").unwrap();
                w.start_file("disk.img", zip::write::SimpleFileOptions::default())
                    .unwrap();
                w.write_all(data).unwrap();
                w.finish().unwrap().into_inner()
            }
            Compression::None => data.to_vec(),
        };
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(Compression::of_file(&p).unwrap(), kind);
        with_decompressed(&p, |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            Ok(v)
        })
        .unwrap()
    }

    #[test]
    fn every_format_decompresses() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for kind in [
            Compression::None,
            Compression::Gzip,
            Compression::Zstd,
            Compression::Xz,
            Compression::Zip,
        ] {
            assert_eq!(roundtrip(kind, &data), data, "{kind:?}");
        }
    }

    #[test]
    fn truncated_xz_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.xz");
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&vec![7u8; 100_000]).unwrap();
        let mut bytes = e.finish().unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&p, bytes).unwrap();
        let r = with_decompressed(&p, |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            Ok(v)
        });
        assert!(r.is_err());
    }
}
