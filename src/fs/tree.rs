//! A root tree staged for a filesystem image: contents in a staging directory plus a record of
//! what each path should be (owner, mode, times, device numbers, xattrs), which an unprivileged
//! user cannot set on the staging files. Filled by `base::unpack` (OCI layers) and by stamps;
//! written into ext4 by `fs::ext4_build`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink(String),
    /// Another name for the file at this root-relative path (same inode).
    Hardlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// The metadata a path must end up with in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Meta {
    fn dir(mtime: i64) -> Meta {
        Meta {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime,
            xattrs: BTreeMap::new(),
        }
    }

    /// The full `st_mode`: file type bits and permissions.
    pub fn st_mode(&self) -> u32 {
        let ty = match self.kind {
            Kind::File | Kind::Hardlink(_) => 0o100000,
            Kind::Dir => 0o040000,
            Kind::Symlink(_) => 0o120000,
            Kind::Char(..) => 0o020000,
            Kind::Block(..) => 0o060000,
            Kind::Fifo => 0o010000,
        };
        ty | (self.mode & 0o7777)
    }
}

/// The unpacked root: contents under `staging`, intended metadata per root-relative path
/// (`""` is the root itself).
#[derive(Debug)]
pub struct Tree {
    pub staging: PathBuf,
    pub entries: BTreeMap<String, Meta>,
}

impl Tree {
    pub fn new(staging: &Path, epoch: i64) -> Result<Tree> {
        std::fs::create_dir_all(staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let mut entries = BTreeMap::new();
        entries.insert(String::new(), Meta::dir(epoch));
        Ok(Tree {
            staging: staging.to_path_buf(),
            entries,
        })
    }

    pub fn host_path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.staging.clone()
        } else {
            self.staging.join(rel)
        }
    }

    /// Bytes used by regular files (each rounded up to 4 KiB) and directories, for sizing.
    pub fn data_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for (rel, m) in &self.entries {
            total += match m.kind {
                Kind::File => {
                    std::fs::symlink_metadata(self.host_path(rel))?
                        .len()
                        .div_ceil(4096)
                        * 4096
                }
                Kind::Dir => 4096,
                _ => 0,
            };
        }
        Ok(total)
    }

    /// Resolves symlinks inside the tree (never outside it) to find what `rel` names.
    pub fn resolve(&self, rel: &str) -> Option<(String, &Meta)> {
        let mut path = rel.trim_matches('/').to_string();
        for _ in 0..40 {
            let mut out: Vec<String> = Vec::new();
            let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
            let mut redirected = None;
            for (i, part) in parts.iter().enumerate() {
                match *part {
                    "." => continue,
                    ".." => {
                        out.pop();
                        continue;
                    }
                    _ => out.push(part.to_string()),
                }
                let cur = out.join("/");
                if let Some(Meta {
                    kind: Kind::Symlink(target),
                    ..
                }) = self.entries.get(&cur)
                {
                    let base = if target.starts_with('/') {
                        String::new()
                    } else {
                        out[..out.len() - 1].join("/")
                    };
                    let rest = parts[i + 1..].join("/");
                    redirected = Some(format!("{base}/{target}/{rest}"));
                    break;
                }
            }
            match redirected {
                Some(p) => path = p,
                None => {
                    let cur = out.join("/");
                    return self.entries.get(&cur).map(|m| (cur, m));
                }
            }
        }
        None
    }

    /// Adds a regular file (creating missing parents as root-owned directories).
    pub fn add_file(&mut self, rel: &str, bytes: &[u8], meta: Meta) -> Result<()> {
        self.prepare(rel, &meta.kind)?;
        let host = self.host_path(rel);
        std::fs::write(&host, bytes).with_context(|| format!("writing {}", host.display()))?;
        self.entries.insert(rel.to_string(), meta);
        Ok(())
    }

    /// Makes `rel` ready to be (re)created as `kind`: parents exist and are directories (not
    /// symlinks), and an existing entry of another kind (or any non-directory) is removed.
    pub(crate) fn prepare(&mut self, rel: &str, kind: &Kind) -> Result<()> {
        let parts: Vec<&str> = rel.split('/').collect();
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            match self.entries.get(&parent).map(|m| &m.kind) {
                Some(Kind::Dir) => {}
                None => {
                    let host = self.host_path(&parent);
                    std::fs::create_dir(&host)
                        .with_context(|| format!("creating {}", host.display()))?;
                    let epoch = self.entries[""].mtime;
                    self.entries.insert(parent, Meta::dir(epoch));
                }
                Some(Kind::Symlink(_)) => {
                    bail!("the layer writes {rel:?} through the symlink {parent:?}; refused")
                }
                Some(_) => {
                    bail!("the layer puts {rel:?} under {parent:?}, which is not a directory")
                }
            }
        }
        if let Some(existing) = self.entries.get(rel) {
            if existing.kind == Kind::Dir && *kind == Kind::Dir {
                return Ok(());
            }
            self.remove(rel)?;
        }
        Ok(())
    }

    /// Removes `rel` and everything below it.
    pub(crate) fn remove(&mut self, rel: &str) -> Result<()> {
        let Some(meta) = self.entries.remove(rel) else {
            return Ok(());
        };
        let host = self.host_path(rel);
        if meta.kind == Kind::Dir {
            let prefix = format!("{rel}/");
            let below: Vec<String> = self
                .entries
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for k in below {
                self.entries.remove(&k);
            }
            crate::util::fsutil::make_writable(&host);
            std::fs::remove_dir_all(&host)
                .with_context(|| format!("removing {}", host.display()))?;
        } else if host.symlink_metadata().is_ok() {
            std::fs::remove_file(&host).with_context(|| format!("removing {}", host.display()))?;
        }
        Ok(())
    }

    /// Gives the staging tree its final modes and times (as far as an unprivileged user can), so
    /// `mke2fs -d` copies them; owners are set too when running as root.
    pub fn finish(&self) -> Result<()> {
        let root = nix::unistd::geteuid().is_root();
        for (rel, m) in self.entries.iter().rev() {
            let host = self.host_path(rel);
            match m.kind {
                Kind::File | Kind::Dir => {
                    if root {
                        std::os::unix::fs::chown(&host, Some(m.uid), Some(m.gid))
                            .with_context(|| format!("chown {}", host.display()))?;
                    }
                    // mke2fs must be able to read files and enter directories.
                    let readable = if m.kind == Kind::Dir { 0o500 } else { 0o400 };
                    let mode = if root { m.mode } else { m.mode | readable };
                    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode & 0o7777))
                        .with_context(|| format!("chmod {}", host.display()))?;
                }
                Kind::Symlink(_) if root => {
                    std::os::unix::fs::lchown(&host, Some(m.uid), Some(m.gid))
                        .with_context(|| format!("chown {}", host.display()))?;
                }
                _ => {}
            }
        }
        for (rel, m) in &self.entries {
            if matches!(
                m.kind,
                Kind::Char(..) | Kind::Block(..) | Kind::Fifo | Kind::Hardlink(_)
            ) {
                continue;
            }
            let t = TimeSpec::new(m.mtime, 0);
            utimensat(
                nix::fcntl::AT_FDCWD,
                &self.host_path(rel),
                &t,
                &t,
                UtimensatFlags::NoFollowSymlink,
            )
            .with_context(|| format!("setting the times of {rel:?}"))?;
        }
        Ok(())
    }
}
