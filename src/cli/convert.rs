//! `kiln convert`: a built image in another container format (Android sparse for fastboot, QCOW2
//! for Ironic and QEMU).

use std::path::Path;

use anyhow::{Context, Result, bail};

use kiln::artifact::{android_sparse, bmap::Bmap};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Target {
    /// Android sparse image (`fastboot flash`, `simg2img`).
    AndroidSparse,
    /// QCOW2 v3 without backing or data file (what Ironic accepts); zero clusters unallocated.
    Qcow2,
}

/// `512M`, `1G`, `4096`: bytes with an optional binary suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size (bytes, or a number with K, M or G)"))?;
    n.checked_mul(mult)
        .with_context(|| format!("{s:?} is too large"))
}

pub fn run(
    image: &Path,
    to: Target,
    output: &Path,
    max_size: Option<&str>,
    bmap: Option<&Path>,
) -> Result<()> {
    let max = max_size.map(parse_size).transpose()?;
    let bmap_path = match bmap {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let p = image.with_file_name(format!(
                "{}.bmap",
                image
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            p.is_file().then_some(p)
        }
    };
    let map = match &bmap_path {
        Some(p) => Some(
            Bmap::parse(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
        ),
        None => None,
    };
    if image == output {
        bail!("the output would overwrite the image");
    }
    let files = match to {
        Target::AndroidSparse => android_sparse::convert(image, map.as_ref(), output, max)?,
        Target::Qcow2 => {
            if max.is_some() {
                bail!("--max-size splits Android sparse images only");
            }
            kiln::artifact::qcow2::convert(image, map.as_ref(), output)?;
            vec![output.to_path_buf()]
        }
    };
    for f in &files {
        let size = std::fs::metadata(f)?.len();
        println!("{}  {} bytes", f.display(), size);
    }
    // QCOW2 reads the file's data extents instead (SEEK_DATA), so the note is Android sparse's.
    if map.is_none() && matches!(to, Target::AndroidSparse) {
        eprintln!(
            "note: no bmap for {}; every block was mapped (zero blocks become FILL chunks)",
            image.display()
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The raw image (its `.bmap` beside it is used when present).
    pub image: std::path::PathBuf,
    /// The output format.
    #[arg(long, value_enum)]
    pub to: Target,
    /// Where to write it.
    pub output: std::path::PathBuf,
    /// Split into pieces of at most this size (bytes, or with K/M/G), e.g. a device's
    /// max-download-size; pieces are named OUTPUT-stem.1.simg, .2.simg, …
    #[arg(long)]
    pub max_size: Option<String>,
    /// The image's block map (default: IMAGE.bmap if present).
    #[arg(long)]
    pub bmap: Option<std::path::PathBuf>,
}
