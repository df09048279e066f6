//! Layers applied in order into a staging directory plus a record of what each path should be.
//!
//! Unprivileged users cannot chown, mknod or set `security.*` xattrs, so the staging tree holds
//! only contents (files, directories, symlinks, hard links); owners, modes, times, device nodes
//! and xattrs are recorded in [`Tree`] and applied to the filesystem image afterwards
//! (`fs::ext4_build`). Whiteouts (`.wh.<name>`, opaque `.wh..wh..opq`) remove what lower layers
//! put there. A layer that writes through a symlink or outside the root is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub use crate::fs::tree::{Kind, Meta, Tree};

impl Tree {
    /// Applies one layer (a tar, gzip- or zstd-compressed or plain).
    pub fn apply_layer(&mut self, blob: &Path) -> Result<()> {
        // Decompression on its own thread, overlapping with the file writes below.
        let reader =
            crate::io::readahead::ReadAhead::new(crate::oci::layer::open_decompressed(blob)?);
        let mut archive = tar::Archive::new(reader);
        let mut added: BTreeSet<String> = BTreeSet::new();
        for entry in archive
            .entries()
            .with_context(|| format!("reading layer {}", blob.display()))?
        {
            let mut entry = entry.with_context(|| format!("reading layer {}", blob.display()))?;
            let raw_path = entry.path()?.to_string_lossy().into_owned();
            let Some(rel) = clean(&raw_path)? else {
                // The root itself: take its metadata.
                if entry.header().entry_type().is_dir() {
                    let meta = meta_of(&mut entry, Kind::Dir)?;
                    self.entries.insert(String::new(), meta);
                }
                continue;
            };
            let (dir, name) = match rel.rsplit_once('/') {
                Some((d, n)) => (d.to_string(), n.to_string()),
                None => (String::new(), rel.clone()),
            };
            if name == ".wh..wh..opq" {
                self.remove_opaque(&dir, &added)?;
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                self.remove_whiteout(&dir, hidden, &raw_path)?;
                continue;
            }
            let Some(kind) = kind_of(&mut entry, &raw_path)? else {
                continue;
            };
            let meta = meta_of(&mut entry, kind.clone())?;
            self.prepare(&rel, &kind)?;
            self.place(&mut entry, rel, kind, meta, &mut added)?;
        }
        Ok(())
    }

    /// Opaque directory `dir`: what lower layers put below it goes (not what this layer `added`).
    fn remove_opaque(&mut self, dir: &str, added: &BTreeSet<String>) -> Result<()> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let lower: Vec<String> = self
            .entries
            .keys()
            .filter(|k| !k.is_empty() && k.starts_with(&prefix) && *k != dir)
            .filter(|k| !k[prefix.len()..].contains('/'))
            .filter(|k| !added.contains(*k))
            .cloned()
            .collect();
        for k in lower {
            self.remove(&k)?;
        }
        Ok(())
    }

    /// A whiteout `.wh.<hidden>` in `dir`: the lower layers' `hidden` goes.
    fn remove_whiteout(&mut self, dir: &str, hidden: &str, raw_path: &str) -> Result<()> {
        // `.wh.` alone would name the directory itself (at the top: the whole root).
        if matches!(hidden, "" | "." | "..") {
            bail!("the layer has a whiteout {raw_path:?} that names no file; refused");
        }
        let target = if dir.is_empty() {
            hidden.to_string()
        } else {
            format!("{dir}/{hidden}")
        };
        self.remove(&target)
    }

    /// Puts the member `rel` into the staging tree (its contents, for a file) and records its
    /// metadata; a hard link takes its target's.
    fn place<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        rel: String,
        kind: Kind,
        meta: Meta,
        added: &mut BTreeSet<String>,
    ) -> Result<()> {
        let host = self.host_path(&rel);
        match &kind {
            Kind::Dir => {
                if !host.exists() {
                    std::fs::create_dir(&host)
                        .with_context(|| format!("creating {}", host.display()))?;
                }
            }
            Kind::File => {
                let mut out = std::fs::File::create(&host)
                    .with_context(|| format!("creating {}", host.display()))?;
                std::io::copy(entry, &mut out)
                    .with_context(|| format!("writing {}", host.display()))?;
            }
            Kind::Symlink(t) => std::os::unix::fs::symlink(t, &host)
                .with_context(|| format!("creating {}", host.display()))?,
            Kind::Hardlink(target) => {
                let (resolved, tmeta) = match self.entries.get(target) {
                    Some(m) if matches!(m.kind, Kind::File | Kind::Hardlink(_)) => {
                        (target.clone(), m.clone())
                    }
                    _ => bail!(
                        "{rel:?} is a hard link to {target:?}, which is not a file in the image"
                    ),
                };
                std::fs::hard_link(self.host_path(&resolved), &host)
                    .with_context(|| format!("linking {}", host.display()))?;
                // One inode: the link carries the target's metadata.
                let mut m = tmeta;
                m.kind = Kind::Hardlink(resolved);
                self.entries.insert(rel.clone(), m);
                added.insert(rel);
                return Ok(());
            }
            // Device nodes and FIFOs exist only in the record; the filesystem writer makes them.
            Kind::Char(..) | Kind::Block(..) | Kind::Fifo => {}
        }
        self.entries.insert(rel.clone(), meta);
        added.insert(rel);
        Ok(())
    }
}

/// What a tar member is; `None` for one that holds nothing of the tree (PAX global headers).
/// Member types kiln cannot unpack faithfully are refused.
fn kind_of<R: Read>(entry: &mut tar::Entry<R>, raw_path: &str) -> Result<Option<Kind>> {
    let ty = entry.header().entry_type();
    refuse_pax_sparse(entry, raw_path)?;
    let kind = if ty.is_dir() {
        Kind::Dir
    } else if ty.is_symlink() {
        let t = entry
            .link_name()?
            .context("a symlink without a target")?
            .to_string_lossy()
            .into_owned();
        Kind::Symlink(t)
    } else if ty.is_hard_link() {
        let t = entry
            .link_name()?
            .context("a hard link without a target")?
            .to_string_lossy()
            .into_owned();
        Kind::Hardlink(clean(&t)?.context("a hard link to the root")?)
    } else if ty.is_character_special() || ty.is_block_special() {
        let major = entry.header().device_major().ok().flatten().unwrap_or(0);
        let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
        if ty.is_character_special() {
            Kind::Char(major, minor)
        } else {
            Kind::Block(major, minor)
        }
    } else if ty.is_fifo() {
        Kind::Fifo
    } else if ty.is_file() || ty.is_contiguous() || ty.is_gnu_sparse() {
        // The tar reader expands a GNU sparse member: its holes read as zeros.
        Kind::File
    } else if ty.is_pax_global_extensions() {
        // Archive-wide comments (git archive writes one); nothing of the tree.
        return Ok(None);
    } else {
        // PAX and GNU long-name headers are consumed by the tar reader; what is left
        // (volume labels, multi-volume continuations, vendor types) would be lost.
        bail!(
            "{raw_path:?} is a tar member of type {:?} ({:?}), which kiln does not unpack; rebuild the layer with plain members",
            ty,
            ty.as_byte() as char
        );
    };
    Ok(Some(kind))
}

/// A root-relative path without `./`, leading or trailing slashes; `None` for the root itself.
/// `..` components are refused: a layer never writes outside the root.
fn clean(raw: &str) -> Result<Option<String>> {
    let mut parts = Vec::new();
    for p in raw.split('/') {
        match p {
            "" | "." => {}
            ".." => bail!("the layer names {raw:?}, which climbs out of the root; refused"),
            p => parts.push(p),
        }
    }
    Ok(if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    })
}

/// A POSIX (PAX) sparse member stores a map and the data without holes under a made-up name
/// (`GNUSparseFile.N/…`); unpacked as is, the image would hold the wrong file under the wrong
/// name. GNU's own sparse type is expanded by the tar reader; this form is refused.
fn refuse_pax_sparse<R: Read>(entry: &mut tar::Entry<R>, raw_path: &str) -> Result<()> {
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(());
    };
    let mut sparse = false;
    let mut real_name = None;
    for ext in exts {
        let ext = ext?;
        let Ok(key) = ext.key() else { continue };
        if key.starts_with("GNU.sparse.") {
            sparse = true;
            if key == "GNU.sparse.name" {
                real_name = ext.value().ok().map(str::to_string);
            }
        }
    }
    if sparse {
        bail!(
            "{} is a POSIX sparse tar member (GNU.sparse.* headers, stored as {raw_path:?}), which kiln does not expand; rebuild the layer without --sparse or with --format=gnu",
            real_name.as_deref().unwrap_or(raw_path)
        );
    }
    Ok(())
}

fn meta_of<R: Read>(entry: &mut tar::Entry<R>, kind: Kind) -> Result<Meta> {
    let mut xattrs = BTreeMap::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix("SCHILY.xattr.")
            {
                xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
            }
        }
    }
    let h = entry.header();
    Ok(Meta {
        kind,
        mode: h.mode()? & 0o7777,
        uid: u32::try_from(h.uid()?).context("uid out of range")?,
        gid: u32::try_from(h.gid()?).context("gid out of range")?,
        mtime: i64::try_from(h.mtime()?).unwrap_or(0),
        xattrs,
    })
}

/// Unpacks the image's layers, in order, into `staging`.
pub fn unpack(layers: &[PathBuf], staging: &Path, epoch: i64) -> Result<Tree> {
    let mut tree = Tree::new(staging, epoch)?;
    for (i, l) in layers.iter().enumerate() {
        tree.apply_layer(l)
            .with_context(|| format!("applying layer {} of {}", i + 1, layers.len()))?;
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// path, type, contents, mode, link target
    type Spec<'a> = (&'a str, tar::EntryType, &'a [u8], u32, Option<&'a str>);

    fn layer(entries: &[Spec]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(std::fs::File::create(f.path()).unwrap());
        for (path, ty, data, mode, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_mode(*mode);
            h.set_uid(0);
            h.set_gid(42);
            h.set_mtime(1_000_000);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn whiteouts_opaque_dirs_links_and_devices() {
        use tar::EntryType as T;
        let dir = tempfile::tempdir().unwrap();
        let l1 = layer(&[
            ("etc/", T::Directory, b"", 0o755, None),
            ("etc/a", T::Regular, b"a", 0o644, None),
            ("etc/b", T::Regular, b"b", 0o600, None),
            ("opt/x/old", T::Regular, b"old", 0o644, None),
            ("usr/bin/su", T::Regular, b"su", 0o4755, None),
            ("usr/bin/su2", T::Link, b"", 0o4755, Some("usr/bin/su")),
            ("bin", T::Symlink, b"", 0o777, Some("usr/bin")),
            ("dev/null", T::Char, b"", 0o666, None),
        ]);
        let l2 = layer(&[
            ("etc/.wh.a", T::Regular, b"", 0o644, None),
            ("opt/x/.wh..wh..opq", T::Regular, b"", 0o644, None),
            ("opt/x/new", T::Regular, b"new", 0o644, None),
        ]);
        let mut tree = Tree::new(&dir.path().join("s"), 0).unwrap();
        tree.apply_layer(l1.path()).unwrap();
        tree.apply_layer(l2.path()).unwrap();
        let keys: Vec<&str> = tree.entries.keys().map(String::as_str).collect();
        assert!(
            !keys.contains(&"etc/a") && keys.contains(&"etc/b"),
            "{keys:?}"
        );
        assert!(
            !keys.contains(&"opt/x/old") && keys.contains(&"opt/x/new"),
            "{keys:?}"
        );
        assert!(!dir.path().join("s/etc/a").exists());
        assert_eq!(tree.entries["usr/bin/su"].mode, 0o4755);
        assert_eq!(tree.entries["usr/bin/su"].gid, 42);
        assert_eq!(
            tree.entries["usr/bin/su2"].kind,
            Kind::Hardlink("usr/bin/su".into())
        );
        assert_eq!(tree.entries["dev/null"].kind, Kind::Char(0, 0));
        assert_eq!(tree.resolve("bin/su").unwrap().0, "usr/bin/su");
        tree.finish().unwrap();
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(dir.path().join("s/usr/bin/su")).unwrap();
        let b = std::fs::metadata(dir.path().join("s/usr/bin/su2")).unwrap();
        assert_eq!(a.ino(), b.ino());
    }

    #[test]
    fn escapes_are_refused() {
        use tar::EntryType as T;
        let dir = tempfile::tempdir().unwrap();
        let l = layer(&[
            ("link", T::Symlink, b"", 0o777, Some("/")),
            ("link/etc/passwd", T::Regular, b"x", 0o644, None),
        ]);
        let mut tree = Tree::new(&dir.path().join("s"), 0).unwrap();
        let e = tree.apply_layer(l.path()).unwrap_err();
        assert!(format!("{e:#}").contains("through the symlink"), "{e:#}");
        assert!(clean("../etc").is_err());
    }
}
