//! A CNI folder as an overlay: `conf/` goes to `/etc/cni/net.d/` (0644), `bin/` to `/opt/cni/bin/`
//! (0755), so changing a cluster's CNI is editing one directory and rebuilding.
//!
//! The folder becomes an ordinary [`Overlay`] (named `cni`), so it reaches a node every way an
//! overlay does: the image root, an OCI layer, `kiln install` to a live host. What this module adds
//! is the refusal of a folder that could not work, before anything is built, with the file named:
//! a configuration that is not JSON, not what libcni loads (`name`, `cniVersion`, a `type` per
//! plugin, `plugins` in a `.conflist`), a plugin or IPAM `type` with no binary of that name in
//! `bin/` (or among the plugins the cluster file says the image already has), a binary without its
//! executable bit. The plugins' own judgement (their VERSION/ADD/CHECK/DEL) is left to the tests,
//! which run them in a network namespace: kiln does not execute what it builds.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::input_file::InputFile;
use super::overlay::{Overlay, OverlayFile, OverlayManifest};

/// Where libcni (and so containerd, CRI-O, kubelet) reads network configurations.
pub const CONF_DIR: &str = "/etc/cni/net.d";
/// Where runtimes look for plugin binaries (`CNI_PATH`).
pub const BIN_DIR: &str = "/opt/cni/bin";
/// A plugin is one static Go binary of a few MiB; this bounds a mistake, not a plugin.
const MAX_BINARY: u64 = 256 << 20;
const MAX_CONF: u64 = 1 << 20;
/// The extensions libcni's `ConfFiles` loads; anything else in net.d is ignored by it.
const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// Loads and checks the CNI folder `dir`. `image_plugins` are plugin names the image already has
/// in `/opt/cni/bin`, so a configuration may use them without shipping them.
pub fn load(dir: &Path, image_plugins: &[String]) -> Result<Overlay> {
    let conf_dir = dir.join("conf");
    let bin_dir = dir.join("bin");
    if !conf_dir.is_dir() && !bin_dir.is_dir() {
        bail!(
            "CNI folder {} has neither conf/ nor bin/ (conf/ goes to {CONF_DIR}, bin/ to {BIN_DIR})",
            dir.display()
        );
    }
    let binaries = read_dir_files(&bin_dir, MAX_BINARY, "CNI plugin")?;
    let confs = read_dir_files(&conf_dir, MAX_CONF, "CNI configuration")?;
    let mut available: BTreeSet<String> = image_plugins.iter().cloned().collect();
    let mut files = Vec::new();
    for (name, path, bytes, mode) in binaries {
        if mode & 0o111 == 0 {
            bail!(
                "{}: a CNI plugin must be executable (mode {mode:04o}); chmod +x it",
                path.display()
            );
        }
        available.insert(name.clone());
        files.push(file(BIN_DIR, &name, 0o755, &path, bytes));
    }
    for (name, path, bytes, _) in confs {
        check_conf(&name, &bytes, &available)
            .with_context(|| format!("CNI configuration {}", path.display()))?;
        files.push(file(CONF_DIR, &name, 0o644, &path, bytes));
    }
    let manifest = OverlayManifest {
        description: format!("CNI folder {}", dir.display()),
        ..OverlayManifest::default()
    };
    let listing: String = files
        .iter()
        .map(|f| format!("{:04o} {} {}\n", f.mode, f.target, f.content.sha256))
        .collect();
    Ok(Overlay {
        name: "cni".into(),
        origin: dir.display().to_string(),
        manifest,
        // No manifest file exists; the listing (modes, targets, digests) stands in for it in the
        // build manifest, so a changed folder shows as a changed input.
        manifest_file: InputFile::new(
            format!("{}/ (CNI folder)", dir.display()),
            listing.into_bytes(),
        ),
        files,
    })
}

/// An overlay by name, or a CNI folder by path (`./cni`: a name with a `/` whose directory has
/// `conf/` or `bin/` and no `overlay.toml`), so `kiln install` and `kiln oci append` take a CNI
/// folder where they take an overlay.
pub fn overlay_or_folder(name: &str, search_dirs: &[std::path::PathBuf]) -> Result<Overlay> {
    let as_path = Path::new(name);
    if name.contains('/') && is_folder(as_path) {
        return load(as_path, &[]);
    }
    super::overlay::load(name, search_dirs)
}

/// Whether `dir` looks like a CNI folder (`conf/` or `bin/`, no `overlay.toml`).
pub fn is_folder(dir: &Path) -> bool {
    !dir.join("overlay.toml").exists() && (dir.join("conf").is_dir() || dir.join("bin").is_dir())
}

fn file(target_dir: &str, name: &str, mode: u32, path: &Path, bytes: Vec<u8>) -> OverlayFile {
    OverlayFile {
        target: format!("{target_dir}/{name}"),
        mode,
        owner: "root".into(),
        group: "root".into(),
        content: InputFile::new(path.display().to_string(), bytes),
    }
}

type FolderFile = (String, std::path::PathBuf, Vec<u8>, u32);

/// The regular files directly in `dir` (sorted by name), with their bytes and modes; nothing when
/// `dir` does not exist. Sub-directories, links and devices are refused: libcni reads neither.
fn read_dir_files(dir: &Path, cap: u64, what: &str) -> Result<Vec<FolderFile>> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    let mut out = Vec::new();
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // Editors' swap files and `.gitkeep` are not part of the CNI.
            continue;
        }
        if !e.file_type()?.is_file() {
            bail!(
                "{}: a CNI folder holds regular files only (found a directory, link or device)",
                path.display()
            );
        }
        let mode = e.metadata()?.permissions().mode() & 0o7777;
        let bytes = crate::util::input::read_capped(&path, cap, what)?;
        out.push((name, path, bytes, mode));
    }
    Ok(out)
}

/// Checks one configuration as libcni would load it, and that every `type` it names has a binary.
pub fn check_conf(name: &str, bytes: &[u8], available: &BTreeSet<String>) -> Result<()> {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    if !CONF_EXTENSIONS.contains(&ext) {
        bail!(
            "libcni loads only .conf, .conflist and .json files from {CONF_DIR}; rename it or move \
             it out of conf/"
        );
    }
    let doc: Value = serde_json::from_slice(bytes).context("not valid JSON")?;
    let Some(obj) = doc.as_object() else {
        bail!("a network configuration is a JSON object");
    };
    string_field(&doc, "name", "")?;
    string_field(&doc, "cniVersion", "")?;
    let is_list = ext == "conflist" || obj.contains_key("plugins");
    if !is_list {
        return check_plugin(&doc, "", available);
    }
    let Some(plugins) = doc.get("plugins").and_then(Value::as_array) else {
        bail!("a .conflist needs `plugins`, a list of plugin configurations");
    };
    if plugins.is_empty() {
        bail!("`plugins` is empty");
    }
    for (i, p) in plugins.iter().enumerate() {
        check_plugin(p, &format!("plugins[{i}]."), available)?;
    }
    Ok(())
}

fn string_field<'a>(doc: &'a Value, key: &str, at: &str) -> Result<&'a str> {
    match doc.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => bail!("`{at}{key}` must be a non-empty string"),
        None => bail!("`{at}{key}` is missing"),
    }
}

/// A plugin's `type` and its IPAM plugin's `type` must each name a binary.
fn check_plugin(p: &Value, at: &str, available: &BTreeSet<String>) -> Result<()> {
    if !p.is_object() {
        bail!("`{}` must be an object", at.trim_end_matches('.'));
    }
    let mut types = vec![(format!("{at}type"), string_field(p, "type", at)?)];
    if let Some(ipam) = p
        .get("ipam")
        .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
    {
        types.push((
            format!("{at}ipam.type"),
            string_field(ipam, "type", &format!("{at}ipam."))?,
        ));
    }
    for (key, ty) in types {
        if ty.contains('/') || ty.starts_with('.') {
            bail!("`{key}` {ty:?} is not a plugin name");
        }
        if !available.contains(ty) {
            bail!(
                "`{key}` is {ty:?}, but there is no {ty} in bin/{}",
                if available.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (plugins: {})",
                        available.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn folder(confs: &[(&str, &str)], bins: &[(&str, u32)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("conf")).unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        for (n, text) in confs {
            std::fs::write(d.path().join("conf").join(n), text).unwrap();
        }
        for (n, mode) in bins {
            let p = d.path().join("bin").join(n);
            std::fs::write(&p, b"\x7fELF").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        d
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"dev","plugins":[
        {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.88.0.0/16"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn err(d: &tempfile::TempDir, image: &[&str]) -> String {
        let image: Vec<String> = image.iter().map(|s| s.to_string()).collect();
        format!("{:#}", load(d.path(), &image).unwrap_err())
    }

    #[test]
    fn files_land_in_net_d_and_bin_with_their_modes() {
        let d = folder(
            &[("10-dev.conflist", BRIDGE)],
            &[("bridge", 0o700), ("host-local", 0o755), ("portmap", 0o755)],
        );
        let o = load(d.path(), &[]).unwrap();
        let got: Vec<_> = o
            .files
            .iter()
            .map(|f| (f.target.as_str(), f.mode))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/opt/cni/bin/bridge", 0o755),
                ("/opt/cni/bin/host-local", 0o755),
                ("/opt/cni/bin/portmap", 0o755),
                ("/etc/cni/net.d/10-dev.conflist", 0o644),
            ]
        );
        assert_eq!(o.name, "cni");
    }

    #[test]
    fn a_type_without_a_binary_is_refused_with_the_file_named() {
        let d = folder(&[("10-dev.conflist", BRIDGE)], &[("bridge", 0o755)]);
        let e = err(&d, &[]);
        assert!(e.contains("10-dev.conflist"), "{e}");
        assert!(e.contains("plugins[0].ipam.type"), "{e}");
        assert!(e.contains("no host-local in bin/"), "{e}");
        // The image's own plugins count.
        load(d.path(), &["host-local".into(), "portmap".into()]).unwrap();
    }

    #[test]
    fn a_binary_that_is_not_executable_is_refused() {
        let d = folder(&[], &[("bridge", 0o644)]);
        let e = err(&d, &[]);
        assert!(e.contains("bin/bridge") && e.contains("executable"), "{e}");
    }

    #[test]
    fn invalid_json_and_shapes_are_refused() {
        for (name, text, want) in [
            ("a.conf", "{\"name\": ", "not valid JSON"),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "plugins",
            ),
            (
                "a.conf",
                r#"{"cniVersion":"1.0.0","type":"bridge"}"#,
                "`name` is missing",
            ),
            ("a.conf", r#"{"name":"n","type":"bridge"}"#, "cniVersion"),
            (
                "a.conf",
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "`type` is missing",
            ),
            (
                "a.conf",
                r#"{"cniVersion":"1.0.0","name":"n","type":"../x"}"#,
                "not a plugin",
            ),
            ("README.md", "hello", "only .conf"),
        ] {
            let d = folder(&[(name, text)], &[("bridge", 0o755)]);
            let e = err(&d, &[]);
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
    }

    #[test]
    fn a_single_conf_is_checked_too() {
        let d = folder(
            &[(
                "99-loopback.conf",
                r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
            )],
            &[],
        );
        assert!(err(&d, &[]).contains("no loopback"));
        load(d.path(), &["loopback".into()]).unwrap();
    }

    #[test]
    fn an_empty_directory_is_not_a_cni_folder() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_folder(d.path()));
        assert!(err(&d, &[]).contains("neither conf/ nor bin/"));
    }
}
