//! Opening the files kiln is handed (blobs, secrets, user-data, layouts): regular files only, and
//! bounded reads for what is read whole.
//!
//! A path in a cluster file or an image layout may name a FIFO (an `open` that never returns), a
//! device (`/dev/zero`: a read that never ends) or a directory. Opening with `O_NONBLOCK` and
//! checking the descriptor itself (`fstat`, not the path, which could change between the check
//! and the open) makes each of those a clear error instead of a hang or an OOM kill.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// What kind of thing a non-regular file is, for messages.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (after following symlinks), without ever
/// blocking on a FIFO.
pub fn open_regular(path: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let ft = f
        .metadata()
        .with_context(|| format!("reading the metadata of {}", path.display()))?
        .file_type();
    if !ft.is_file() {
        bail!(
            "{} is {}; kiln reads only regular files here",
            path.display(),
            kind_of(ft)
        );
    }
    Ok(f)
}

/// Reads a regular file of at most `cap` bytes whole; `what` names it in errors (a cluster-file
/// key, "the image manifest").
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let f = open_regular(path).with_context(|| format!("reading {what}"))?;
    let len = f.metadata()?.len();
    let too_big = || {
        anyhow::anyhow!(
            "{what} ({}) is {len} bytes, more than the {} kiln accepts for it",
            path.display(),
            super::diskfull::human(cap)
        )
    };
    if len > cap {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows while it is read.
    f.take(cap + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what} ({})", path.display()))?;
    if bytes.len() as u64 > cap {
        return Err(too_big());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        let e = read_capped(Path::new("/dev/zero"), 1 << 20, "user_data")
            .unwrap_err()
            .to_string();
        assert!(e.contains("user_data"), "{e}");
        let e = format!("{:#}", open_regular(dir.path()).unwrap_err());
        assert!(e.contains("a directory"), "{e}");
    }

    #[test]
    fn reads_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'x'; 2048]).unwrap();
        assert_eq!(read_capped(&p, 2048, "it").unwrap().len(), 2048);
        let e = read_capped(&p, 1024, "the secret").unwrap_err().to_string();
        assert!(e.contains("the secret") && e.contains("2048 bytes"), "{e}");
    }
}
