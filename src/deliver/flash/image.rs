//! The image to flash: a raw or compressed file, its size when it can be known before writing,
//! its bmap (given, or found beside it), and the sha256 its checksum file promises — or a node's
//! cached base with the node's patches and map, streamed without an image file.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::artifact::bmap::Bmap;
use crate::disk::patch::Patch;
use crate::io::decompress::{self, Compression};

pub struct FlashImage {
    pub path: PathBuf,
    pub compression: Compression,
    pub size: Option<u64>,
    pub bmap: Option<Bmap>,
    pub bmap_path: Option<PathBuf>,
    pub sha256: Option<String>,
    /// Bytes replaced on the way to the disk (hypriot-style boot customisation).
    pub patches: Vec<Patch>,
}

/// `foo.img.xz` → `foo.img`: the name of the raw image inside a compressed file.
fn raw_name(path: &Path) -> PathBuf {
    let s = path.display().to_string();
    for ext in [".xz", ".gz", ".zst", ".zip", ".bz2"] {
        if let Some(stripped) = s.strip_suffix(ext) {
            return PathBuf::from(stripped);
        }
    }
    path.to_path_buf()
}

impl FlashImage {
    /// Opens `path`, with `bmap` if given, else `<image>.bmap` beside it (also for the raw name of a
    /// compressed image, as bmaptool looks for it).
    pub fn open(path: &Path, bmap: Option<&Path>) -> Result<FlashImage> {
        if !path.is_file() {
            bail!("image {} does not exist", path.display());
        }
        let compression = Compression::of_file(path)?;
        let raw = raw_name(path);
        let bmap_path = match bmap {
            Some(b) => Some(b.to_path_buf()),
            None => [
                PathBuf::from(format!("{}.bmap", path.display())),
                PathBuf::from(format!("{}.bmap", raw.display())),
            ]
            .into_iter()
            .find(|p| p.is_file()),
        };
        let bmap = match &bmap_path {
            Some(p) => Some(
                Bmap::parse(
                    &std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )
                .with_context(|| format!("parsing the bmap {}", p.display()))?,
            ),
            None => None,
        };
        let size = match compression {
            Compression::None => Some(std::fs::metadata(path)?.len()),
            _ => decompress::decompressed_size_hint(path).or(bmap.as_ref().map(|b| b.image_size)),
        };
        if let (Some(b), Some(s)) = (&bmap, size)
            && b.image_size != s
        {
            bail!(
                "the bmap {} describes a {}-byte image, but {} is {s} bytes: they do not belong together",
                bmap_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                b.image_size,
                path.display()
            );
        }
        // kiln's own checksum file: `<raw image>.sha256sum` holding `<hex>  <basename>`.
        let sum_path = PathBuf::from(format!("{}.sha256sum", raw.display()));
        let sha256 = match std::fs::read_to_string(&sum_path) {
            Ok(text) => {
                let base = raw
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                text.lines().find_map(|l| {
                    let (hash, name) = l.split_once(char::is_whitespace)?;
                    (name.trim().trim_start_matches('*') == base).then(|| hash.to_string())
                })
            }
            Err(_) => None,
        };
        Ok(FlashImage {
            path: path.to_path_buf(),
            compression,
            size,
            bmap,
            bmap_path,
            sha256,
            patches: Vec::new(),
        })
    }

    /// A node streamed from its base (`build::stream_node`): the raw file read as it is, the node's
    /// patches laid over it on the way and the node's map. There is no checksum file to hold it
    /// to: the read-back is compared with digests of the patched stream itself.
    pub fn streamed(path: &Path, size: u64, bmap: Bmap, patches: Vec<Patch>) -> FlashImage {
        FlashImage {
            path: path.to_path_buf(),
            compression: Compression::None,
            size: Some(size),
            bmap: Some(bmap),
            bmap_path: None,
            sha256: None,
            patches,
        }
    }

    /// Adds patches and the ranges they make used: the bmap gains those ranges, and ranges a patch
    /// touches lose their checksums (the patched bytes are checked by the read-back instead).
    pub fn with_patches(mut self, patches: Vec<Patch>, used: &[(u64, u64)]) -> FlashImage {
        if let Some(b) = &self.bmap {
            let mut ranges: Vec<(u64, u64)> = b
                .ranges
                .iter()
                .map(|r| {
                    let (a, e) = r.byte_span(b.block_size, b.image_size);
                    (a, e - a)
                })
                .collect();
            ranges.extend_from_slice(used);
            let mut merged = Bmap::from_byte_ranges(b.image_size, &ranges);
            for r in &mut merged.ranges {
                let (a, e) = r.byte_span(b.block_size, b.image_size);
                let touched = patches
                    .iter()
                    .any(|p| p.offset < e && p.offset + p.bytes.len() as u64 > a);
                if !touched {
                    r.sha256 = b
                        .ranges
                        .iter()
                        .find(|o| o.first == r.first && o.last == r.last)
                        .and_then(|o| o.sha256.clone());
                }
            }
            self.bmap = Some(merged);
        }
        self.patches = patches;
        self
    }

    /// Calls `f` with the decompressed image stream.
    pub fn with_reader(&self, f: impl FnOnce(&mut dyn Read) -> Result<()>) -> Result<()> {
        decompress::with_decompressed(&self.path, f)
    }
}
