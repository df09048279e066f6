//! The proof by booting: an x86 Debian image with cloud-init, laid out like a HypriotOS card (boot
//! FAT labelled HypriotOS as partition 1, ext4 root as partition 2), is stamped by `kiln build`
//! with the `hypriot-rpi` profile and booted with `kiln run` (QEMU, OVMF, TCG). The serial console
//! must show the hostname, the user with its ssh key, the static address and the runcmd marker.
//!
//! The Debian image is made by tests/fixtures/make-debian-hypriot-layout.sh (debootstrap; needs
//! root and the Debian package mirror) and kept in target/kiln-test-cache between runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const TOOLS: &[&str] = &[
    "debootstrap",
    "qemu-system-x86_64",
    "sfdisk",
    "mkfs.vfat",
    "mcopy",
    "mkfs.ext4",
    "dumpe2fs",
    "debugfs",
];
// What `kiln run` boots with (it looks for them itself; the test checks they are there).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

fn prerequisites() -> bool {
    let files_ok = [OVMF_CODE, OVMF_VARS, SYSTEMD_BOOT]
        .iter()
        .all(|f| Path::new(f).exists());
    let root = is_root();
    if have_tools(TOOLS) && files_ok && root {
        return true;
    }
    skip(&format!(
        "boot test: OVMF/systemd-boot present: {files_ok}, running as root: {root}"
    ))
}

/// The Debian HypriotOS-layout image, built once per target directory.
fn debian_image() -> PathBuf {
    let cache = repo().join("target/kiln-test-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let img = cache.join("debian-hypriot-layout.img");
    if !img.exists() {
        let tmp = cache.join("debian-hypriot-layout.img.partial");
        run(Command::new("bash")
            .arg(repo().join("tests/fixtures/make-debian-hypriot-layout.sh"))
            .arg(&tmp)
            .arg(cache.join("debian-work")));
        std::fs::rename(&tmp, &img).unwrap();
    }
    img
}

#[test]
fn stamped_hypriot_layout_boots_with_cloud_init() {
    if !prerequisites() {
        return;
    }
    let base = debian_image();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(kiln(&dir.path().join("cache"))
        .args(["build", "--node", "pirate-probe", "--cluster"])
        .arg(repo().join("tests/boot/cluster.toml"))
        .arg("--base")
        .arg(&base)
        .arg("--out")
        .arg(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pirate-probe.manifest.json")).unwrap())
            .unwrap();
    let instance_id = manifest["instance_id"].as_str().unwrap().to_string();

    // `kiln run` boots it: OVMF, TCG here, a NIC on an empty hub, the console in a log; it ends
    // when cloud-init's closing line ("… finished at …", after runcmd's marker) appears.
    let args = ["--until", "finished at", "--timeout", "600"];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let log = boot(
        &dir.path().join("cache"),
        &out.join("pirate-probe.img"),
        &args,
        &dir.path().join("serial.log"),
    );
    let tail = last_lines(&log, 40);
    assert!(
        log.contains("KILN-BOOT-MARKER-DONE"),
        "no runcmd marker on the serial console; last lines:\n{tail}"
    );
    let line = |key: &str| -> String {
        log.lines()
            .find_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix(&format!("KILN-BOOT {key}="))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no KILN-BOOT {key}= line; last lines:\n{tail}"))
    };
    assert_eq!(line("hostname"), "pirate-probe");
    assert!(line("user").starts_with("ops:x:"), "{}", line("user"));
    assert_eq!(
        line("key"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnBootTestKeyBootTestKeyBootTest0 kiln-boot-test"
    );
    assert_eq!(line("addr"), "10.77.0.21/24");
    assert_eq!(line("instance"), instance_id);
    assert!(
        log.contains("DataSourceNoCloud"),
        "cloud-init did not use the NoCloud seed:\n{tail}"
    );
}
