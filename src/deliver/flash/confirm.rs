//! The one question kiln asks before it overwrites anything, and the unmounting a yes allows.
//! Disks and phones both come through here; only the list and the noun differ.

use std::io::{BufRead, Write};

use anyhow::{Result, bail};

/// Lists what will be overwritten (and the partitions to unmount first), asks, and on yes (or
/// with `yes` set) unmounts `mounted`. `noun` is what loses its contents: "disks", "partitions".
pub fn confirm(
    yes: bool,
    lines: &[String],
    mounted: &[(String, String)],
    noun: &str,
) -> Result<()> {
    if !yes {
        eprintln!("kiln will overwrite:");
        for l in lines {
            eprintln!("{l}");
        }
        if !mounted.is_empty() {
            eprintln!("and first unmount:");
            for (p, m) in mounted {
                eprintln!("  {p} on {m}");
            }
        }
        eprint!("Everything on these {noun} will be lost. Continue? [y/N] ");
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        // Piped answers work too (scripts, tests); end of input means no.
        std::io::stdin().lock().read_line(&mut answer).ok();
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            if !mounted.is_empty() {
                bail!(
                    "not confirmed; nothing was written. Mounted partitions: {}",
                    mounted
                        .iter()
                        .map(|(p, m)| format!("{p} on {m}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            bail!("not confirmed; nothing was written");
        }
    }
    unmount(mounted)
}

#[cfg(target_os = "linux")]
fn unmount(mounted: &[(String, String)]) -> Result<()> {
    use anyhow::Context;
    for (p, m) in mounted {
        nix::mount::umount(m.as_str())
            .with_context(|| format!("unmounting {p} from {m} (a program may be using it)"))?;
        eprintln!("unmounted {p} from {m}");
    }
    Ok(())
}

/// macOS: `diskutil unmountDisk force` once per disk, which takes every volume of it, retried
/// until nothing of it is mounted (`blockdev::volumes`).
#[cfg(target_os = "macos")]
fn unmount(mounted: &[(String, String)]) -> Result<()> {
    use crate::blockdev::{diskutil, volumes};
    for d in diskutil::unmount_plan(mounted) {
        volumes::unmount_until_clear(&diskutil::Diskutil, &d)?;
        eprintln!("unmounted every volume of {d}");
    }
    Ok(())
}
