//! Layer tarballs: opened whatever their compression, and made deterministically from a
//! directory (sorted entries, fixed owners and times, no host metadata) so the same overlay gives
//! the same layer digest on any machine, any day.

use std::io::{BufReader, Read, Write};
use std::path::Path;

use anyhow::Result;
use sha2::{Digest, Sha256};

/// Opens a layer blob, decompressing gzip or zstd by their magic bytes.
pub fn open_decompressed(blob: &Path) -> Result<Box<dyn Read + Send>> {
    let mut f = crate::util::input::open_regular(blob)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))?;
    let f = BufReader::with_capacity(1 << 20, f);
    Ok(if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::Decoder::with_buffer(f)?)
    } else {
        Box::new(f)
    })
}

/// A layer made by [`from_dir`]: the compressed blob and its digests.
pub struct NewLayer {
    pub blob: Vec<u8>,
    /// sha256 of the compressed blob (the manifest's layer digest).
    pub digest: String,
    /// sha256 of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
}

/// Where files land and who owns them, for [`from_dir`].
pub struct LayerFile {
    /// Root-relative path in the image (`etc/kiln/x.conf`).
    pub path: String,
    pub mode: u32,
    pub contents: Option<Vec<u8>>,
    /// Symlink target, for symlinks.
    pub link: Option<String>,
}

/// Builds a gzip layer from `files` (directories are added for every parent), owned by root,
/// every time `epoch`, in sorted order.
pub fn build(files: &[LayerFile], epoch: i64) -> Result<NewLayer> {
    build_owned(files, &Default::default(), epoch)
}

/// As [`build`], with owners (uid, gid) for some paths.
pub fn build_owned(
    files: &[LayerFile],
    owners: &std::collections::BTreeMap<String, (u32, u32)>,
    epoch: i64,
) -> Result<NewLayer> {
    let mut all: std::collections::BTreeMap<String, &LayerFile> = Default::default();
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let mut p = f.path.as_str();
        while let Some((d, _)) = p.rsplit_once('/') {
            dirs.insert(d.to_string());
            p = d;
        }
        all.insert(f.path.clone(), f);
    }
    let mut tar_bytes = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar_bytes);
        b.mode(tar::HeaderMode::Deterministic);
        let mut names: Vec<(String, bool)> = dirs.into_iter().map(|d| (d, true)).collect();
        names.extend(all.keys().map(|k| (k.clone(), false)));
        names.sort();
        for (name, is_dir) in names {
            let mut h = tar::Header::new_ustar();
            let (uid, gid) = owners.get(&name).copied().unwrap_or((0, 0));
            h.set_uid(uid.into());
            h.set_gid(gid.into());
            h.set_mtime(epoch.max(0) as u64);
            if is_dir {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, format!("{name}/"), std::io::empty())?;
                continue;
            }
            let f = all[&name];
            if let Some(target) = &f.link {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, &name, target)?;
            } else {
                let data = f.contents.as_deref().unwrap_or_default();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(f.mode & 0o7777);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &name, data)?;
            }
        }
        b.finish()?;
    }
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar_bytes)));
    // gzip with no name and a zero mtime in its header: the bytes depend on the tar only.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&tar_bytes)?;
    let blob = gz.finish()?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
    Ok(NewLayer {
        blob,
        digest,
        diff_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_files_same_digest_and_readable_back() {
        let files = vec![
            LayerFile {
                path: "etc/kiln/b.conf".into(),
                mode: 0o644,
                contents: Some(b"b".to_vec()),
                link: None,
            },
            LayerFile {
                path: "etc/kiln/a.sh".into(),
                mode: 0o755,
                contents: Some(b"#!/bin/sh\n".to_vec()),
                link: None,
            },
        ];
        let a = build(&files, 1_700_000_000).unwrap();
        let b = build(&files, 1_700_000_000).unwrap();
        assert_eq!(a.digest, b.digest);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.tgz");
        std::fs::write(&p, &a.blob).unwrap();
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(open_decompressed(&p).unwrap());
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().display().to_string(),
                e.header().uid().unwrap(),
            ));
        }
        assert_eq!(
            names,
            vec![
                ("etc/".into(), 0),
                ("etc/kiln/".into(), 0),
                ("etc/kiln/a.sh".into(), 0),
                ("etc/kiln/b.conf".into(), 0)
            ]
        );
    }
}
