//! Writing files, directories and symlinks into an existing ext4 filesystem with debugfs — no
//! mount, no root, exact owners and modes, fixed timestamps.
//!
//! debugfs exits 0 even when a command in its script fails, so kiln first asks what exists
//! (`stat` of every path), writes, and then reads everything back (`stat` and `dump`) and compares:
//! a write that did not happen is an error, never a silent no-op.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::ext4::device_spec;
use crate::util::cmd;

/// One thing to put into the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// `meta: None` keeps the mode and owner of a file that already exists (0644 root otherwise).
    File {
        path: String,
        bytes: Vec<u8>,
        meta: Option<(u32, u32, u32)>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Symlink { path, .. } => {
                path
            }
        }
    }
}

/// Mode (with type bits), uid, gid.
type Meta = (u32, u32, u32);

/// What `stat` says of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

fn check_path(p: &str) -> Result<()> {
    if !p.starts_with('/') || p.contains(['"', '\n', '\\']) || p.split('/').any(|c| c == "..") {
        bail!("{p:?} cannot be written into an image (absolute paths without quotes or ..)");
    }
    Ok(())
}

fn debugfs(image: &Path, offset: u64, script: &str, write: bool, epoch: i64) -> Result<String> {
    let f = tempfile::NamedTempFile::new()?;
    std::fs::write(f.path(), script)?;
    let mut c = Command::new("debugfs");
    c.env("E2FSPROGS_FAKE_TIME", epoch.to_string());
    if write {
        c.arg("-w");
    }
    c.arg("-f").arg(f.path()).arg(device_spec(image, offset));
    let out = cmd::run_with(&mut c, "debugfs")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `stat` of every path, in one debugfs run: debugfs echoes each command on stdout, so each
/// path's section starts with `debugfs: stat "<path>"`; a missing path has no `Inode:` line.
pub fn stat_all(image: &Path, offset: u64, paths: &[&str]) -> Result<BTreeMap<String, Stat>> {
    let mut script = String::new();
    for p in paths {
        check_path(p)?;
        script.push_str(&format!("stat \"{p}\"\n"));
    }
    let out = debugfs(image, offset, &script, false, 0)?;
    let mut found = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("debugfs: stat \"") {
            current = rest.strip_suffix('"').map(str::to_string);
            continue;
        }
        let Some(path) = &current else { continue };
        if let Some(t) = line.trim_start().strip_prefix("Inode:") {
            let kind = t
                .split("Type:")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("")
                .to_string();
            let mode = t
                .split("Mode:")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|m| u32::from_str_radix(m, 8).ok())
                .unwrap_or(0);
            found.insert(
                path.clone(),
                Stat {
                    kind,
                    mode,
                    uid: 0,
                    gid: 0,
                },
            );
        } else if line.starts_with("User:")
            && let Some(s) = found.get_mut(path)
        {
            let num = |key: &str| -> u32 {
                line.split(key)
                    .nth(1)
                    .and_then(|x| x.split_whitespace().next())
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0)
            };
            s.uid = num("User:");
            s.gid = num("Group:");
        }
    }
    Ok(found)
}

/// Reads one file (or `None`).
pub fn read(image: &Path, offset: u64, path: &str) -> Result<Option<Vec<u8>>> {
    check_path(path)?;
    let dir = tempfile::tempdir()?;
    let local = dir.path().join("f");
    debugfs(
        image,
        offset,
        &format!("dump \"{path}\" \"{}\"\n", local.display()),
        false,
        0,
    )?;
    Ok(std::fs::read(&local).ok())
}

fn parent(p: &str) -> &str {
    match p.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &p[..i],
    }
}

/// Writes `entries` (in order) into the ext4 filesystem at `offset` in `image`. Every inode
/// touched gets `epoch` as its times. Missing parent directories are made 0755 root:root.
pub fn apply(image: &Path, offset: u64, entries: &[Entry], epoch: i64) -> Result<()> {
    let paths = paths_and_parents(entries)?;
    let before = stat_all(image, offset, &paths)?;
    let staging = tempfile::tempdir()?;
    let mut script = Script {
        text: String::new(),
        made: BTreeSet::new(),
        before: &before,
        epoch,
    };
    let mut expect: Vec<(&Entry, Option<Meta>)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let p = e.path();
        script.ensure_dir(parent(p));
        let existing = before.get(p);
        match e {
            Entry::Dir { mode, uid, gid, .. } => {
                let meta = script.dir(p, existing, *mode, *uid, *gid)?;
                expect.push((e, Some(meta)));
            }
            Entry::File { bytes, meta, .. } => {
                let local = staging.path().join(format!("f{i}"));
                let meta = script.file(p, existing, bytes, *meta, &local)?;
                expect.push((e, Some(meta)));
            }
            Entry::Symlink { target, .. } => {
                script.symlink(p, existing, target)?;
                expect.push((e, None));
            }
        }
    }
    debugfs(image, offset, &script.text, true, epoch)?;
    read_back(image, offset, entries, expect)
}

/// Every entry's path and all its ancestors (but `/`), sorted, each once.
fn paths_and_parents(entries: &[Entry]) -> Result<Vec<&str>> {
    let mut paths: Vec<&str> = Vec::new();
    for e in entries {
        check_path(e.path())?;
        let mut p = e.path();
        while p != "/" {
            paths.push(p);
            p = parent(p);
        }
    }
    paths.sort_unstable();
    paths.dedup();
    Ok(paths)
}

/// The debugfs script being written, with what it knows of the filesystem: the paths that
/// existed `before` and the directories the script `made` so far.
struct Script<'a> {
    text: String,
    made: BTreeSet<String>,
    before: &'a BTreeMap<String, Stat>,
    epoch: i64,
}

impl Script<'_> {
    /// Sets every time of `p` to the epoch.
    fn times(&mut self, p: &str) {
        let epoch = self.epoch;
        let times = ["atime", "mtime", "ctime", "crtime"]
            .iter()
            .map(|f| format!("sif \"{p}\" {f} @{epoch}\n"))
            .collect::<String>();
        self.text.push_str(&times);
    }

    /// Makes `p` and its missing parents, 0755 root:root.
    fn ensure_dir(&mut self, p: &str) {
        // Parents first; an existing directory is left as it is.
        let mut chain = Vec::new();
        let mut q = p;
        while q != "/" {
            chain.push(q.to_string());
            q = parent(q);
        }
        for d in chain.into_iter().rev() {
            if self.before.contains_key(&d) || self.made.contains(&d) {
                continue;
            }
            self.text
                .push_str(&format!("mkdir \"{d}\"\nsif \"{d}\" mode 040755\n"));
            self.times(&d);
            self.made.insert(d);
        }
    }

    /// A directory at `p` (made unless it exists) with this mode and owner; returns the meta to
    /// expect.
    fn dir(
        &mut self,
        p: &str,
        existing: Option<&Stat>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Meta> {
        match existing {
            Some(s) if s.kind != "directory" => {
                bail!("{p} exists in the image as a {}, not a directory", s.kind)
            }
            Some(_) => {}
            None if self.made.contains(p) => {}
            None => {
                self.text.push_str(&format!("mkdir \"{p}\"\n"));
                self.made.insert(p.to_string());
            }
        }
        self.text.push_str(&format!(
            "sif \"{p}\" mode 0{:o}\nsif \"{p}\" uid {uid}\nsif \"{p}\" gid {gid}\n",
            0o040000 | mode
        ));
        self.times(p);
        Ok((0o040000 | mode, uid, gid))
    }

    /// A file at `p` with `bytes` (staged at `local`), replacing what is there; returns the
    /// meta to expect.
    fn file(
        &mut self,
        p: &str,
        existing: Option<&Stat>,
        bytes: &[u8],
        meta: Option<Meta>,
        local: &Path,
    ) -> Result<Meta> {
        let (mode, uid, gid) = match (meta, existing) {
            (Some(m), _) => m,
            (None, Some(s)) if s.kind == "regular" => (s.mode & 0o7777, s.uid, s.gid),
            (None, _) => (0o644, 0, 0),
        };
        if let Some(s) = existing {
            if s.kind == "directory" {
                bail!("{p} exists in the image as a directory, not a file");
            }
            self.text.push_str(&format!("rm \"{p}\"\n"));
        }
        std::fs::write(local, bytes)?;
        let name = &p[p.rfind('/').expect("absolute") + 1..];
        self.text.push_str(&format!(
            "cd \"{}\"\nwrite \"{}\" \"{name}\"\ncd /\n",
            parent(p),
            local.display()
        ));
        self.text.push_str(&format!(
            "sif \"{p}\" mode 0{:o}\nsif \"{p}\" uid {uid}\nsif \"{p}\" gid {gid}\n",
            0o100000 | mode
        ));
        self.times(p);
        Ok((0o100000 | mode, uid, gid))
    }

    /// A symlink at `p` to `target`, replacing what is there.
    fn symlink(&mut self, p: &str, existing: Option<&Stat>, target: &str) -> Result<()> {
        if target.contains(['"', '\n']) {
            bail!("symlink target {target:?} cannot be written");
        }
        if let Some(s) = existing {
            if s.kind == "directory" {
                bail!("{p} exists in the image as a directory, not a symlink");
            }
            self.text.push_str(&format!("rm \"{p}\"\n"));
        }
        self.text
            .push_str(&format!("symlink \"{p}\" \"{target}\"\n"));
        self.times(p);
        Ok(())
    }
}

/// Read back: kinds, modes, owners, contents, link targets.
fn read_back(
    image: &Path,
    offset: u64,
    entries: &[Entry],
    expect: Vec<(&Entry, Option<Meta>)>,
) -> Result<()> {
    let check: Vec<&str> = entries.iter().map(Entry::path).collect();
    let after = stat_all(image, offset, &check)?;
    for (e, meta) in expect {
        let p = e.path();
        let s = after
            .get(p)
            .with_context(|| format!("debugfs did not create {p}"))?;
        if let Some((mode, uid, gid)) = meta
            && (s.mode != mode & 0o7777 || s.uid != uid || s.gid != gid)
        {
            bail!(
                "{p} has mode {:o} {}:{} after writing, expected {:o} {uid}:{gid}",
                s.mode,
                s.uid,
                s.gid,
                mode & 0o7777
            );
        }
        match e {
            Entry::File { bytes, .. } => {
                let got = read(image, offset, p)?.unwrap_or_default();
                if &got != bytes {
                    bail!("{p} does not read back as written");
                }
            }
            Entry::Symlink { target, .. } if s.kind != "symlink" => {
                bail!(
                    "{p} is a {} after writing, not a symlink to {target}",
                    s.kind
                )
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_with_owners_modes_and_links() {
        if !cmd::available("mke2fs") || !cmd::available("debugfs") {
            eprintln!("SKIPPED: e2fsprogs missing");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "old\n").unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        super::super::ext4_build::mkfs_from_tree(
            &img,
            0,
            8 << 20,
            &tree,
            "t",
            "4b1d0c2e-5a6f-4e7d-8c9b-0a1b2c3d4e5f",
            0,
        )
        .unwrap();
        let entries = vec![
            Entry::File {
                path: "/etc/hostname".into(),
                bytes: b"new\n".to_vec(),
                meta: None,
            },
            Entry::Dir {
                path: "/home/user/.ssh".into(),
                mode: 0o700,
                uid: 10000,
                gid: 10000,
            },
            Entry::File {
                path: "/home/user/.ssh/authorized_keys".into(),
                bytes: b"ssh-ed25519 AAAA k\n".to_vec(),
                meta: Some((0o600, 10000, 10000)),
            },
            Entry::Symlink {
                path: "/etc/runlevels/default/docker".into(),
                target: "/etc/init.d/docker".into(),
            },
        ];
        let twin = dir.path().join("twin.img");
        std::fs::copy(&img, &twin).unwrap();
        apply(&img, 0, &entries, 1_600_000_000).unwrap();
        assert_eq!(read(&img, 0, "/etc/hostname").unwrap().unwrap(), b"new\n");
        let s = stat_all(
            &img,
            0,
            &[
                "/home/user/.ssh/authorized_keys",
                "/home",
                "/etc/runlevels/default/docker",
            ],
        )
        .unwrap();
        assert_eq!(s["/home/user/.ssh/authorized_keys"].mode, 0o600);
        assert_eq!(s["/home/user/.ssh/authorized_keys"].uid, 10000);
        assert_eq!(s["/home"].mode, 0o755);
        assert_eq!(s["/etc/runlevels/default/docker"].kind, "symlink");
        // The same writes on a copy of the same filesystem give the same bytes (reproducible).
        apply(&twin, 0, &entries, 1_600_000_000).unwrap();
        assert!(std::fs::read(&img).unwrap() == std::fs::read(&twin).unwrap());
        // Replacing what is there works, and e2fsck finds nothing wrong.
        apply(&img, 0, &entries, 1_600_000_000).unwrap();
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
}
