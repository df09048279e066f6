//! A reproducible ext4 filesystem from an unpacked root ([`Tree`]), as an unprivileged user.
//!
//! `mke2fs -d` copies the staging tree (it sorts directory entries, so inode numbers follow the
//! names); kiln's own mke2fs.conf fixes the features whatever the host's defaults. What mke2fs
//! cannot know or copies from the host is then set with one debugfs script addressed by inode
//! number: owners, modes and times that differ from the intended ones (all owners, for a
//! non-root build), every ctime, device nodes and FIFOs, and xattrs.
//!
//! The sample base's root is made here too, from a plain directory (`mkfs_from_tree`): the same
//! [`mke2fs`] with the host's defaults, then only the ctimes reset.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::fs::tree::{Kind, Tree};
use crate::util::cmd;

/// Features pinned here rather than taken from the host's /etc/mke2fs.conf, so the same tree
/// makes the same bytes on every machine (and boots on kernels from 4.x on: no orphan_file).
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

pub struct Ext4Options<'a> {
    pub label: &'a str,
    pub uuid: &'a str,
    pub epoch: i64,
}

/// Writes an ext4 of `size` bytes at `offset` in `image`, holding `tree`.
pub fn build(tree: &Tree, image: &Path, offset: u64, size: u64, o: &Ext4Options) -> Result<()> {
    let inodes = (tree.entries.len() as u64 * 5 / 4 + 4096).max(size / 16384);
    let target = Mke2fsTarget {
        image,
        offset,
        size,
    };
    mke2fs(&target, &tree.staging, o, Layout::Pinned { inodes })
        .context("making the root filesystem (is the root partition too small?)")?;

    let spec = super::ext4::device_spec(image, offset);
    let inodes = inode_map(&spec, o.epoch)?;
    let script = fixups(tree, &inodes, o.epoch)?;
    run_debugfs(&spec, &script.commands, o.epoch)?;
    Ok(())
}

/// Where mke2fs writes: `size` bytes at `offset` in `image`.
pub struct Mke2fsTarget<'a> {
    pub image: &'a Path,
    pub offset: u64,
    pub size: u64,
}

/// How mke2fs lays the filesystem out.
pub enum Layout {
    /// kiln's pinned features ([`MKE2FS_CONF`]), inode count and reserve: root filesystems
    /// built from images, the same on every host.
    Pinned { inodes: u64 },
    /// The host's /etc/mke2fs.conf defaults: the built-in sample base, whose published digests
    /// were made this way (pinning it would change them).
    HostDefaults,
}

/// The one place kiln runs mke2fs: an ext4 of `t.size` bytes holding a copy of `staging`
/// (`-d`), with a fixed UUID and hash seed, every time `o.epoch`, the root owned by root.
pub fn mke2fs(t: &Mke2fsTarget, staging: &Path, o: &Ext4Options, layout: Layout) -> Result<()> {
    let conf = tempfile::NamedTempFile::new()?;
    let mut mke2fs = std::process::Command::new("mke2fs");
    mke2fs.env("E2FSPROGS_FAKE_TIME", o.epoch.to_string());
    let mut extended = format!("offset={},hash_seed={},root_owner=0:0", t.offset, o.uuid);
    mke2fs.args(["-q", "-F", "-t", "ext4", "-b", "4096"]);
    match layout {
        Layout::Pinned { inodes } => {
            std::fs::write(conf.path(), MKE2FS_CONF)?;
            mke2fs.env("MKE2FS_CONFIG", conf.path());
            mke2fs.args(["-I", "256", "-m", "0", "-N", &inodes.to_string()]);
            extended.push_str(",lazy_itable_init=1,nodiscard");
        }
        Layout::HostDefaults => {}
    }
    mke2fs
        .args(["-L", o.label, "-U", o.uuid, "-E", &extended, "-d"])
        .arg(staging)
        .arg(t.image)
        .arg((t.size / 4096).to_string());
    cmd::run_with(&mut mke2fs, "mke2fs")?;
    Ok(())
}

/// Makes an ext4 filesystem of `size` bytes at `offset` in `image` from the directory `tree`,
/// reproducibly: a fixed UUID and hash seed, every timestamp `epoch` (mke2fs copies ctimes from the
/// host, so they are reset with debugfs afterwards), root-owned files.
pub fn mkfs_from_tree(
    image: &Path,
    offset: u64,
    size: u64,
    tree: &Path,
    label: &str,
    uuid: &str,
    epoch: i64,
) -> Result<()> {
    let target = Mke2fsTarget {
        image,
        offset,
        size,
    };
    let o = Ext4Options { label, uuid, epoch };
    mke2fs(&target, tree, &o, Layout::HostDefaults)?;
    let mut script = String::new();
    let mut paths = vec!["/".to_string()];
    collect_paths(tree, tree, &mut paths)?;
    for p in &paths {
        if p.contains(['"', '\n']) {
            bail!("{p:?} cannot be passed to debugfs");
        }
        script.push_str(&format!("sif \"{p}\" ctime @{epoch}\n"));
    }
    let cmd_file = tempfile::NamedTempFile::new()?;
    std::fs::write(cmd_file.path(), script)?;
    let mut debugfs = std::process::Command::new("debugfs");
    debugfs
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .arg("-w")
        .arg("-f")
        .arg(cmd_file.path())
        .arg(super::ext4::device_spec(image, offset));
    cmd::run_with(&mut debugfs, "debugfs")?;
    Ok(())
}

fn collect_paths(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        out.push(format!(
            "/{}",
            p.strip_prefix(base).expect("under base").display()
        ));
        if e.file_type()?.is_dir() {
            collect_paths(base, &p, out)?;
        }
    }
    Ok(())
}

/// What debugfs reports for one name: inode number, mode, uid, gid.
#[derive(Debug, Clone, Copy)]
struct Listed {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Every path of the filesystem with its inode, read level by level with `ls -p <ino>` (inode
/// numbers, so no quoting of names and no path lookups).
fn inode_map(spec: &str, epoch: i64) -> Result<BTreeMap<String, Listed>> {
    let mut map = BTreeMap::new();
    map.insert(
        String::new(),
        Listed {
            ino: 2,
            mode: 0o40755,
            uid: 0,
            gid: 0,
        },
    );
    let mut level: Vec<(String, u64)> = vec![(String::new(), 2)];
    while !level.is_empty() {
        let mut script = String::new();
        for (_, ino) in &level {
            script.push_str(&format!("ls -p <{ino}>\n"));
        }
        let out = debugfs_output(spec, &script, epoch, false)?;
        let mut next = Vec::new();
        let mut current: Option<usize> = None;
        let mut index = 0;
        for line in out.lines() {
            if line.starts_with("debugfs: ls -p") {
                current = Some(index);
                index += 1;
                continue;
            }
            let Some(i) = current else { continue };
            let Some(fields) = line.strip_prefix('/') else {
                continue;
            };
            let f: Vec<&str> = fields.splitn(6, '/').collect();
            if f.len() < 5 {
                continue;
            }
            let name = f[4];
            if name == "." || name == ".." {
                continue;
            }
            let parent = &level[i].0;
            let path = if parent.is_empty() {
                name.to_string()
            } else {
                format!("{parent}/{name}")
            };
            let l = Listed {
                ino: f[0].parse().context("debugfs ls: inode")?,
                mode: u32::from_str_radix(f[1], 8).context("debugfs ls: mode")?,
                uid: f[2].parse().context("debugfs ls: uid")?,
                gid: f[3].parse().context("debugfs ls: gid")?,
            };
            if l.mode & 0o170000 == 0o040000 {
                next.push((path.clone(), l.ino));
            }
            map.insert(path, l);
        }
        if index != level.len() {
            bail!("debugfs listed {index} of {} directories", level.len());
        }
        level = next;
    }
    Ok(map)
}

struct Script {
    commands: String,
    /// xattr values, in files debugfs reads while the script runs.
    _values: Vec<tempfile::NamedTempFile>,
}

fn fixups(tree: &Tree, fs: &BTreeMap<String, Listed>, epoch: i64) -> Result<Script> {
    let mut c = String::new();
    let mut xattr_files = Vec::new();
    for (path, want) in &tree.entries {
        if matches!(want.kind, Kind::Hardlink(_)) {
            continue; // the target's inode carries the metadata
        }
        if matches!(want.kind, Kind::Char(..) | Kind::Block(..) | Kind::Fifo) {
            let (dir, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            let parent = fs
                .get(dir)
                .with_context(|| format!("{dir:?} is missing from the filesystem"))?;
            if name.contains([' ', '"', '\n', '\t']) {
                bail!("device node {path:?}: its name cannot be passed to debugfs");
            }
            let how = match want.kind {
                Kind::Char(ma, mi) => format!("c {ma} {mi}"),
                Kind::Block(ma, mi) => format!("b {ma} {mi}"),
                _ => "p".into(),
            };
            c.push_str(&format!("cd <{}>\nmknod {name} {how}\n", parent.ino));
            for (field, v) in [
                ("mode", format!("0{:o}", want.st_mode())),
                ("uid", want.uid.to_string()),
                ("gid", want.gid.to_string()),
                ("mtime", format!("@{}", want.mtime)),
                ("atime", format!("@{}", want.mtime)),
                ("ctime", format!("@{epoch}")),
                ("crtime", format!("@{epoch}")),
            ] {
                c.push_str(&format!("sif {name} {field} {v}\n"));
            }
            c.push_str("cd <2>\n");
            continue;
        }
        let have = fs
            .get(path)
            .with_context(|| format!("{path:?} is missing from the filesystem mke2fs made"))?;
        let ino = have.ino;
        if have.mode != want.st_mode() {
            c.push_str(&format!("sif <{ino}> mode 0{:o}\n", want.st_mode()));
        }
        if have.uid != want.uid {
            c.push_str(&format!("sif <{ino}> uid {}\n", want.uid));
        }
        if have.gid != want.gid {
            c.push_str(&format!("sif <{ino}> gid {}\n", want.gid));
        }
        // mke2fs copied the host's atime, which reading the file (even kiln's own reads of the
        // kernel) may have moved; the image's atime is its mtime.
        c.push_str(&format!("sif <{ino}> atime @{}\n", want.mtime));
        for (name, value) in &want.xattrs {
            let mut f = tempfile::NamedTempFile::new()?;
            f.write_all(value)?;
            if name.contains([' ', '"', '\n']) {
                bail!("xattr {name:?} on {path:?} cannot be passed to debugfs");
            }
            c.push_str(&format!(
                "ea_set -f {} <{ino}> {name}\n",
                f.path().display()
            ));
            xattr_files.push(f);
        }
    }
    // mke2fs copied each file's ctime from the staging tree (the time kiln unpacked it).
    for l in fs.values() {
        c.push_str(&format!("sif <{}> ctime @{epoch}\n", l.ino));
    }
    Ok(Script {
        commands: c,
        _values: xattr_files,
    })
}

fn debugfs_output(spec: &str, script: &str, epoch: i64, write: bool) -> Result<String> {
    let mut f = tempfile::NamedTempFile::new()?;
    f.write_all(script.as_bytes())?;
    let mut d = std::process::Command::new("debugfs");
    d.env("E2FSPROGS_FAKE_TIME", epoch.to_string());
    if write {
        d.arg("-w");
    }
    d.arg("-f").arg(f.path()).arg(spec);
    let out = cmd::run_with(&mut d, "debugfs")?;
    // debugfs reports command failures on stderr and still exits 0.
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if !errors.is_empty() {
        bail!(
            "debugfs reported: {}",
            errors
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_debugfs(spec: &str, script: &str, epoch: i64) -> Result<()> {
    if script.is_empty() {
        return Ok(());
    }
    debugfs_output(spec, script, epoch, true).map(|_| ())
}
