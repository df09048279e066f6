//! ext4 partitions, through e2fsprogs (the reference implementation) on `image?offset=N`, so
//! nothing is mounted and no loop device is needed.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::disk::Partition;
use crate::util::cmd;

/// How e2fsprogs tools address a filesystem that starts `offset` bytes into a file.
pub fn device_spec(image: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", image.display())
}

/// Used blocks as byte ranges relative to the partition: every block not listed as free by
/// `dumpe2fs` (which computes the bitmaps of uninitialised groups the way the kernel does).
pub fn used_ranges(image: &Path, part: &Partition) -> Result<Vec<(u64, u64)>> {
    let out = cmd::run("dumpe2fs", [device_spec(image, part.start)])?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_used(&text, part.size)
}

fn field(text: &str, name: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(str::trim))
        .with_context(|| format!("dumpe2fs printed no {name}"))?
        .parse()
        .with_context(|| format!("dumpe2fs {name} is not a number"))
}

fn parse_used(text: &str, part_size: u64) -> Result<Vec<(u64, u64)>> {
    let block = field(text, "Block size:")?;
    let count = field(text, "Block count:")?;
    let mut free: Vec<(u64, u64)> = Vec::new();
    // Per-group lines are indented ("  Free blocks: 1172-8192, 9000"); the summary line is not.
    for line in text.lines().filter(|l| l.starts_with(' ')) {
        let Some(list) = line.trim_start().strip_prefix("Free blocks:") else {
            continue;
        };
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (a.parse::<u64>()?, b.parse::<u64>()?),
                None => {
                    let v = item.parse::<u64>()?;
                    (v, v)
                }
            };
            if b < a {
                bail!("dumpe2fs printed a reversed free range {item}");
            }
            free.push((a, b + 1));
        }
    }
    free.sort_unstable();
    let mut used = Vec::new();
    let mut next = 0u64;
    for (a, b) in free {
        if a > next {
            used.push((next * block, (a - next) * block));
        }
        next = next.max(b);
    }
    if count > next {
        used.push((next * block, (count - next) * block));
    }
    for r in &mut used {
        r.1 = r.1.min(part_size.saturating_sub(r.0));
    }
    used.retain(|r| r.1 > 0);
    Ok(used)
}

/// Reads one file from the ext4 filesystem in `part` with `debugfs -R cat`; `None` when absent.
pub fn read_file(image: &Path, part: &Partition, path: &str) -> Result<Option<Vec<u8>>> {
    if path.contains(['"', '\n']) {
        bail!("{path:?} cannot be passed to debugfs");
    }
    let out = cmd::run(
        "debugfs",
        [
            "-R".to_string(),
            format!("cat \"{path}\""),
            device_spec(image, part.start),
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.stdout.is_empty() && stderr.contains("not found") {
        return Ok(None);
    }
    Ok(Some(out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_lists_become_used_ranges() {
        let text = "Block count:              100\nBlock size:               1024\nFree blocks:              80\n\
                    Group 0: (Blocks 1-50)\n  Free blocks: 10-49\nGroup 1: (Blocks 51-99)\n  Free blocks: 51, 60-99\n";
        let used = parse_used(text, 100 * 1024).unwrap();
        assert_eq!(
            used,
            vec![(0, 10 * 1024), (50 * 1024, 1024), (52 * 1024, 8 * 1024)]
        );
    }
}
