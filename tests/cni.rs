//! Issue 22's CNI folder: examples/cni-dev's `cni/` (conf from git, plugins copied from Debian's
//! containernetworking-plugins as its fill-cni-bin.sh does) built into a HypriotOS-layout image
//! made by sfdisk/mkfs; the files and modes read back with debugfs and checked with e2fsck; a
//! broken folder refused before anything is built; and the built conf judged by the plugins
//! themselves — VERSION, then ADD, CHECK and DEL of the whole chain in network namespaces made
//! here, the plugins and conf being the ones dumped from the image.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const TOOLS: &[&str] = &[
    "sfdisk",
    "mkfs.vfat",
    "mcopy",
    "mkfs.ext4",
    "debugfs",
    "e2fsck",
];
/// Where Debian's containernetworking-plugins puts the plugins.
const DEBIAN_PLUGINS: &str = "/usr/lib/cni";
/// Partition 2 of tests/fixtures/make-hypriot-layout.sh: sector 133120.
const ROOT_OFFSET: u64 = 68_157_440;

/// examples/cni-dev copied into `dir`, its cni/bin filled by the example's own script.
fn cni_dev(dir: &Path) -> Option<PathBuf> {
    if !Path::new(DEBIAN_PLUGINS).join("bridge").exists() {
        skip("no /usr/lib/cni/bridge (apt-get install containernetworking-plugins)");
        return None;
    }
    let cluster = example_cluster("cni-dev", dir);
    let example = cluster.parent().unwrap();
    run(Command::new("sh").arg(example.join("fill-cni-bin.sh")));
    Some(cluster)
}

fn debugfs(img: &Path, request: &str) -> String {
    stdout(
        Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(format!("{}?offset={ROOT_OFFSET}", img.display())),
    )
}

/// The mode debugfs prints for `path` in the image's root.
fn mode_in_root(img: &Path, path: &str) -> String {
    let out = debugfs(img, &format!("stat {path}"));
    let at = out
        .find("Mode:")
        .unwrap_or_else(|| panic!("{path} not in the root: {out}"));
    out[at + 5..].split_whitespace().next().unwrap().to_string()
}

/// Builds cni-master1 of the example and returns the image.
fn built_master(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    if !have_tools(TOOLS) {
        return None;
    }
    let cluster = cni_dev(dir)?;
    let base = hypriot_fixture(dir);
    let out = dir.join("out");
    build(
        &dir.join("cache"),
        &cluster,
        "cni-master1",
        base.as_os_str(),
        &out,
    );
    Some((out.join("cni-master1.img"), cluster))
}

#[test]
fn the_cni_folder_lands_in_net_d_and_opt_cni_bin_with_its_modes() {
    let dir = tempfile::tempdir().unwrap();
    let Some((img, cluster)) = built_master(dir.path()) else {
        return;
    };
    let example = cluster.parent().unwrap().join("cni");
    let dev = format!("{}?offset={ROOT_OFFSET}", img.display());
    assert_fsck_clean(&dev);
    for (sub, target, mode) in [
        ("conf", "/etc/cni/net.d", "0644"),
        ("bin", "/opt/cni/bin", "0755"),
    ] {
        let mut names: Vec<String> = std::fs::read_dir(example.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        assert!(!names.is_empty(), "{sub} is empty");
        let listed = debugfs(&img, &format!("ls -l {target}"));
        for name in names {
            assert!(listed.contains(&name), "{name} not in {target}:\n{listed}");
            let path = format!("{target}/{name}");
            assert_eq!(mode_in_root(&img, &path), mode, "{path}");
            let dumped = dir.path().join("dumped");
            debugfs(&img, &format!("dump {path} {}", dumped.display()));
            assert_eq!(
                sha256_hex(&std::fs::read(&dumped).unwrap()),
                sha256_hex(&std::fs::read(example.join(sub).join(&name)).unwrap()),
                "{path} differs from the folder's file"
            );
        }
    }
    // Not through cloud-init: the plugins are megabytes, the user-data stays small.
    let ud = String::from_utf8(mtype(&img, 1 << 20, "user-data")).unwrap();
    assert!(
        !ud.contains("path: /opt/cni/bin/") && !ud.contains("path: /etc/cni/net.d/"),
        "{ud}"
    );
    assert!(ud.len() < 64 << 10, "user-data of {} bytes", ud.len());
}

fn assert_fsck_clean(dev: &str) {
    let out = Command::new("e2fsck").args(["-fn", dev]).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {dev}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each way a folder can be broken is refused by `kiln check` and `kiln build`, with the file
/// named, and the build leaves no image.
#[test]
fn a_broken_cni_folder_is_refused_before_anything_is_built() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = cni_dev(dir.path()) else {
        return;
    };
    let cni = cluster.parent().unwrap().join("cni");
    let base = hypriot_fixture(dir.path());
    let conflist = cni.join("conf/10-cni-dev.conflist");
    let good = std::fs::read(&conflist).unwrap();
    let bridge = cni.join("bin/bridge");
    type Break = Box<dyn Fn()>;
    let (c, b) = (conflist.clone(), bridge.clone());
    let cases: Vec<(&str, Break, Break, &str)> = vec![
        (
            "not executable",
            Box::new(move || set_mode(&b, 0o644)),
            Box::new({
                let b = bridge.clone();
                move || set_mode(&b, 0o755)
            }),
            "bin/bridge",
        ),
        (
            "not JSON",
            Box::new({
                let c = c.clone();
                move || std::fs::write(&c, b"{\"cniVersion\": \"1.0.0\",").unwrap()
            }),
            Box::new({
                let (c, g) = (c.clone(), good.clone());
                move || std::fs::write(&c, &g).unwrap()
            }),
            "10-cni-dev.conflist",
        ),
        (
            "type without a binary",
            Box::new({
                let b = bridge.clone();
                move || std::fs::rename(&b, b.with_file_name("bridge.moved")).unwrap()
            }),
            Box::new({
                let b = bridge.clone();
                move || std::fs::rename(b.with_file_name("bridge.moved"), &b).unwrap()
            }),
            "10-cni-dev.conflist",
        ),
    ];
    let out = dir.path().join("out");
    for (what, break_it, mend, file) in cases {
        break_it();
        let check = kiln(&dir.path().join("cache"))
            .args(["check", "--cluster"])
            .arg(&cluster)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&check.stderr);
        assert!(!check.status.success(), "{what}: kiln check passed");
        assert!(err.contains(file), "{what}: {err}");
        let built = build_command(
            &dir.path().join("cache"),
            &cluster,
            "cni-worker1",
            base.as_os_str(),
            &out,
        )
        .output()
        .unwrap();
        assert!(!built.status.success(), "{what}: the build passed");
        assert!(
            !out.join("cni-worker1.img").exists(),
            "{what}: an image was written"
        );
        mend();
    }
    run(kiln(&dir.path().join("cache"))
        .args(["check", "--cluster"])
        .arg(&cluster));
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A network namespace made for this test, removed when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let name = format!("{name}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        Netns(name)
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs plugin `bin` with `CNI_COMMAND=command` inside namespace `host` (so a bridge it makes is
/// that namespace's, never this machine's), the container being `ctr`.
fn plugin(
    bin: &Path,
    command: &str,
    conf: &serde_json::Value,
    host: &Netns,
    ctr: &Netns,
) -> String {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &host.0])
        .arg(bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "kiln-cni-test")
        .env("CNI_NETNS", ctr.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {command} failed: {text}{}\nconf: {conf}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The built conf list, run as a runtime runs it (libcni's ADD/CHECK/DEL of a list: each plugin
/// gets the list's name and cniVersion, and the previous result), by the plugins dumped from the
/// image, in two namespaces made here. host-local keeps its leases in a directory of the test.
#[test]
fn the_built_conf_passes_the_plugins_own_add_check_and_del() {
    if !is_root() && !skip("the plugins' ADD needs root (network namespaces)") {
        return;
    }
    if !have_tools(&["ip"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((img, _)) = built_master(dir.path()) else {
        return;
    };
    let bin = dir.path().join("opt-cni-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for p in ["bridge", "host-local", "loopback"] {
        let to = bin.join(p);
        debugfs(&img, &format!("dump /opt/cni/bin/{p} {}", to.display()));
        set_mode(&to, 0o755);
        let v = plugin_version(&to);
        assert!(
            v.contains("supportedVersions") && v.contains("1.0.0"),
            "{p} VERSION: {v}"
        );
    }
    let conf_path = dir.path().join("10-cni-dev.conflist");
    debugfs(
        &img,
        &format!(
            "dump /etc/cni/net.d/10-cni-dev.conflist {}",
            conf_path.display()
        ),
    );
    let mut list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conf_path).unwrap()).unwrap();
    let leases = dir.path().join("host-local");
    for p in list["plugins"].as_array_mut().unwrap() {
        if p.get("ipam").is_some() {
            p["ipam"]["dataDir"] = serde_json::json!(leases);
        }
    }
    let host = Netns::new("kiln-cni-host");
    let ctr = Netns::new("kiln-cni-ctr");
    let mut prev: Option<serde_json::Value> = None;
    for command in ["ADD", "CHECK", "DEL"] {
        let mut plugins: Vec<serde_json::Value> = list["plugins"].as_array().unwrap().clone();
        if command == "DEL" {
            plugins.reverse();
        }
        for p in plugins {
            let mut conf = p.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            if let Some(prev) = &prev
                && command != "DEL"
            {
                conf["prevResult"] = prev.clone();
            }
            let out = plugin(
                &bin.join(p["type"].as_str().unwrap()),
                command,
                &conf,
                &host,
                &ctr,
            );
            if command == "ADD" {
                prev = Some(serde_json::from_str(&out).unwrap());
            }
        }
        if command == "ADD" {
            let got = prev.as_ref().unwrap().to_string();
            assert!(
                got.contains("10.88."),
                "no address from the conf's subnet: {got}"
            );
            let addr =
                stdout(Command::new("ip").args(["-n", &ctr.0, "-4", "addr", "show", "eth0"]));
            assert!(addr.contains("inet 10.88."), "{addr}");
        }
    }
    let gone = Command::new("ip")
        .args(["-n", &ctr.0, "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "DEL left eth0 in the container");
}

fn plugin_version(bin: &Path) -> String {
    let out = Command::new(bin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} VERSION failed", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Plugins the cluster file says the image has (`image_plugins`) must be in the image: the build
/// looks in the base's root and refuses, naming the missing plugin, before it writes an image.
#[test]
fn image_plugins_the_image_lacks_are_refused_by_the_build() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = cni_dev(dir.path()) else {
        return;
    };
    let text = std::fs::read_to_string(&cluster).unwrap();
    let with = text.replace(
        "cni = { dir = \"cni\" }",
        "cni = { dir = \"cni\", image_plugins = [\"portmap\"] }",
    );
    assert_ne!(text, with);
    std::fs::write(&cluster, with).unwrap();
    let base = hypriot_fixture(dir.path());
    let out = dir.path().join("out");
    let built = build_command(
        &dir.path().join("cache"),
        &cluster,
        "cni-worker1",
        base.as_os_str(),
        &out,
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&built.stderr);
    assert!(!built.status.success(), "the build passed");
    assert!(err.contains("/opt/cni/bin/portmap"), "{err}");
    assert!(!out.join("cni-worker1.img").exists());
}
