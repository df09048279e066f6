//! Overlays: `overlays/<name>/` is a file tree (`root/`, mirroring target paths) plus a manifest
//! (`overlay.toml`) with modes, owners, packages, services and a health check.
//!
//! One loaded `Overlay` is plain data — every file with its target path, mode, owner and bytes — so
//! the same value can be written into an image (cloud-init `write_files`, or the ext4 root) or copied
//! onto a live host. Overlays are found beside the cluster file, in `./overlays`, then among the
//! ones built into kiln.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use include_dir::{Dir, include_dir};
use serde::{Deserialize, Serialize};

use super::diag::SourceText;
use super::input_file::InputFile;

static BUILTIN: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/overlays");

#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverlayManifest {
    pub description: String,
    /// Per-file modes and owners; files not listed get 0644 (0755 when executable), root:root.
    #[serde(default, rename = "file")]
    pub files: Vec<FileRule>,
    #[serde(default)]
    pub packages: Packages,
    /// systemd units to enable and start.
    #[serde(default)]
    pub services: Vec<String>,
    /// A command (argv) that exits 0 when the overlay works on a live host.
    #[serde(default)]
    pub health: Vec<String>,
    /// Where `kiln install --config FILE` puts the user's configuration.
    pub config: Option<ConfigTarget>,
    /// A Python virtual environment the overlay's programs run in.
    pub venv: Option<VenvSpec>,
    /// Other names `kiln install` accepts for this overlay (`sushy` for `sushy-baremetal`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// A venv created on the target with pinned requirements (pip `name==version`), so every host
/// runs the versions the overlay was tested with.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VenvSpec {
    pub path: String,
    pub requirements: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileRule {
    pub path: String,
    pub mode: Option<String>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    #[serde(default)]
    pub debian: Vec<String>,
    #[serde(default)]
    pub alpine: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigTarget {
    pub path: String,
    #[serde(default = "default_config_mode")]
    pub mode: String,
    #[serde(default = "root")]
    pub owner: String,
    #[serde(default = "root")]
    pub group: String,
}

fn default_config_mode() -> String {
    "0600".into()
}
fn root() -> String {
    "root".into()
}

/// One file an overlay puts on a node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OverlayFile {
    /// Absolute target path, `/etc/docker/daemon.json`.
    pub target: String,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    #[serde(flatten)]
    pub content: InputFile,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Overlay {
    pub name: String,
    /// Where it was found (a directory, or `<built-in>`).
    pub origin: String,
    pub manifest: OverlayManifest,
    /// The manifest's own text, for build manifests.
    pub manifest_file: InputFile,
    pub files: Vec<OverlayFile>,
}

/// Parses an octal mode such as `"0755"`.
pub fn parse_mode(s: &str) -> Result<u32> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .with_context(|| format!("mode {s:?} is not an octal number such as \"0644\""))?;
    if m > 0o7777 {
        bail!("mode {s:?} is larger than 07777");
    }
    Ok(m)
}

/// A name usable as an overlay: a single path component.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The overlays kiln knows about, by name: those on disk first, then the built-in ones.
pub fn list(search_dirs: &[PathBuf]) -> Vec<(String, String)> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for dir in search_dirs.iter().rev() {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().join("overlay.toml").is_file() {
                    found.insert(
                        e.file_name().to_string_lossy().into(),
                        e.path().display().to_string(),
                    );
                }
            }
        }
    }
    for d in BUILTIN.dirs() {
        if d.get_file(d.path().join("overlay.toml")).is_some() {
            let name = d.path().display().to_string();
            found
                .entry(name)
                .or_insert_with(|| "<built-in>".to_string());
        }
    }
    found.into_iter().collect()
}

/// Loads overlay `name` from the first search directory that has it, else from the built-ins.
pub fn load(name: &str, search_dirs: &[PathBuf]) -> Result<Overlay> {
    if !valid_name(name) {
        bail!("{name:?} is not an overlay name (letters, digits, '-', '_', '.')");
    }
    for dir in search_dirs {
        let root = dir.join(name);
        if root.join("overlay.toml").is_file() {
            return load_from_disk(name, &root);
        }
    }
    if let Some(dir) = BUILTIN.get_dir(name) {
        return load_builtin(name, dir);
    }
    for (real, _) in list(search_dirs) {
        if real != name
            && let Ok(o) = load(&real, search_dirs)
            && o.manifest.aliases.iter().any(|a| a == name)
        {
            return Ok(o);
        }
    }
    bail!(
        "no overlay named {name:?} (looked in {} and the built-in overlays); \
         `kiln install --list` shows the known ones",
        search_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn parse_manifest(path: &Path, text: &str) -> Result<OverlayManifest> {
    let source = SourceText::new(path, text.to_string());
    toml::from_str(text).map_err(|e| source.from_toml(&e).into())
}

fn load_from_disk(name: &str, dir: &Path) -> Result<Overlay> {
    let manifest_path = dir.join("overlay.toml");
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = parse_manifest(&manifest_path, &text)?;
    let mut raw = Vec::new();
    let tree = dir.join("root");
    if tree.is_dir() {
        walk_disk(&tree, &tree, &mut raw)?;
    }
    let manifest_file = InputFile::new(manifest_path.display().to_string(), text.into_bytes());
    assemble(
        name,
        dir.display().to_string(),
        manifest,
        manifest_file,
        raw,
    )
}

fn walk_disk(
    base: &Path,
    dir: &Path,
    out: &mut Vec<(String, Vec<u8>, bool, String)>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk_disk(base, &path, out)?;
        } else if ft.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let exec = e.metadata()?.permissions().mode() & 0o111 != 0;
            let rel = path.strip_prefix(base).expect("under base");
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.push((
                format!("/{}", rel.display()),
                bytes,
                exec,
                path.display().to_string(),
            ));
        } else {
            bail!(
                "{}: overlays hold regular files only (found a symlink or device)",
                path.display()
            );
        }
    }
    Ok(())
}

fn load_builtin(name: &str, dir: &Dir<'_>) -> Result<Overlay> {
    let manifest_path = dir.path().join("overlay.toml");
    let file = dir
        .get_file(&manifest_path)
        .with_context(|| format!("built-in overlay {name} has no overlay.toml"))?;
    let text = file.contents_utf8().context("overlay.toml is not UTF-8")?;
    let shown = PathBuf::from("<built-in>/overlays").join(&manifest_path);
    let manifest = parse_manifest(&shown, text)?;
    let mut raw = Vec::new();
    if let Some(tree) = dir.get_dir(dir.path().join("root")) {
        walk_builtin(tree, &dir.path().join("root"), &mut raw);
    }
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    let manifest_file = InputFile::new(shown.display().to_string(), text.as_bytes().to_vec());
    assemble(name, "<built-in>".into(), manifest, manifest_file, raw)
}

fn walk_builtin(dir: &Dir<'_>, base: &Path, out: &mut Vec<(String, Vec<u8>, bool, String)>) {
    for f in dir.files() {
        let rel = f.path().strip_prefix(base).expect("under base");
        // include_dir does not keep modes; executables are named in the manifest instead, and
        // scripts get 0755 when they start with a shebang.
        let exec = f.contents().starts_with(b"#!");
        out.push((
            format!("/{}", rel.display()),
            f.contents().to_vec(),
            exec,
            format!("<built-in>/overlays/{}", f.path().display()),
        ));
    }
    for d in dir.dirs() {
        walk_builtin(d, base, out);
    }
}

fn assemble(
    name: &str,
    origin: String,
    manifest: OverlayManifest,
    manifest_file: InputFile,
    raw: Vec<(String, Vec<u8>, bool, String)>,
) -> Result<Overlay> {
    let mut files = Vec::new();
    for (target, bytes, exec, shown) in raw {
        let rule = manifest.files.iter().find(|r| r.path == target);
        let mode = match rule.and_then(|r| r.mode.as_deref()) {
            Some(m) => parse_mode(m).with_context(|| format!("overlay {name}, file {target}"))?,
            None if exec => 0o755,
            None => 0o644,
        };
        files.push(OverlayFile {
            target,
            mode,
            owner: rule.and_then(|r| r.owner.clone()).unwrap_or_else(root),
            group: rule.and_then(|r| r.group.clone()).unwrap_or_else(root),
            content: InputFile::new(shown, bytes),
        });
    }
    for rule in &manifest.files {
        if !files.iter().any(|f| f.target == rule.path) {
            bail!(
                "overlay {name}: overlay.toml names {} but root{} does not exist",
                rule.path,
                rule.path
            );
        }
    }
    Ok(Overlay {
        name: name.to_string(),
        origin,
        manifest,
        manifest_file,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert!(parse_mode("0999").is_err());
    }

    #[test]
    fn disk_overlay_files_get_modes_from_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let o = dir.path().join("demo");
        std::fs::create_dir_all(o.join("root/etc/demo")).unwrap();
        std::fs::write(o.join("root/etc/demo/a.conf"), "a").unwrap();
        std::fs::write(o.join("root/etc/demo/secret"), "s").unwrap();
        std::fs::write(
            o.join("overlay.toml"),
            "description = \"d\"\n[[file]]\npath = \"/etc/demo/secret\"\nmode = \"0600\"\n",
        )
        .unwrap();
        let ov = load("demo", &[dir.path().to_path_buf()]).unwrap();
        let modes: Vec<_> = ov
            .files
            .iter()
            .map(|f| (f.target.as_str(), f.mode))
            .collect();
        assert_eq!(
            modes,
            vec![("/etc/demo/a.conf", 0o644), ("/etc/demo/secret", 0o600)]
        );
    }

    #[test]
    fn missing_overlay_is_an_error() {
        assert!(load("no-such-overlay", &[]).is_err());
        assert!(load("../etc", &[]).is_err());
    }
}
