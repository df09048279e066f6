//! "No space left on device", explained: which of kiln's directories is short, how much is free
//! there, and where to point kiln instead.

use std::path::Path;

/// The hint for an error whose cause is a full disk or an exhausted quota, `None` otherwise.
/// `dirs` are the places kiln was writing, with what they are ("cache", "output"). `cleaned_up`
/// says the caller's temporaries are known to be gone (true of `kiln build`, whose writers all go
/// through a temporary name and remove it on error, and whose tests check it).
pub fn hint(e: &anyhow::Error, dirs: &[(&str, &Path)], cleaned_up: bool) -> Option<String> {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        })
    });
    if !full {
        return None;
    }
    let mut text = String::from(if cleaned_up {
        "a disk filled up; kiln removed what it had half written."
    } else {
        "a disk filled up."
    });
    for (what, dir) in dirs {
        if let Some(free) = free_bytes(dir) {
            text.push_str(&format!(
                "\n  {what}: {} has {} free",
                dir.display(),
                human(free)
            ));
        }
    }
    text.push_str(
        "\n  Free some space there, or build elsewhere: --out DIR for the images, KILN_CACHE_DIR \
         for downloads and unpacked bases (an OCI base needs a few GiB while it is assembled).",
    );
    Some(text)
}

/// Free bytes for an unprivileged user on the filesystem holding `dir` (or its nearest existing
/// parent, as the directory may not have been made yet).
fn free_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// A size as `df -h` would say it.
pub fn human(bytes: u64) -> String {
    if bytes >= 10 << 30 {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn only_a_full_disk_gets_the_hint() {
        let full: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull)).context("writing out/x.img");
        let e = full.unwrap_err();
        let text = hint(&e, &[("output", Path::new("/"))], true).unwrap();
        assert!(text.contains("output: / has "), "{text}");
        assert!(text.contains("KILN_CACHE_DIR"), "{text}");

        let other: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)).context("reading x");
        assert!(hint(&other.unwrap_err(), &[], true).is_none());
        assert!(hint(&anyhow::anyhow!("no space in the name only"), &[], true).is_none());
    }

    #[test]
    fn sizes_read_like_df() {
        assert_eq!(human(512 << 10), "512 KiB");
        assert_eq!(human(300 << 20), "300 MiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(53 << 30), "53 GiB");
    }
}
