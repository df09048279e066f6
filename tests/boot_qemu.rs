//! The proof by booting: an x86 Debian image with cloud-init, laid out like a HypriotOS card (boot
//! FAT labelled HypriotOS as partition 1, ext4 root as partition 2), is stamped by `kiln build`
//! with the `hypriot-rpi` profile and booted with `kiln run` (QEMU, OVMF, TCG). The serial console
//! must show the hostname, the user with its ssh key, the static address and the runcmd marker;
//! then the boot FAT must hold none of the seed's secrets, and a second boot must change nothing.
//!
//! The Debian image is made by tests/fixtures/make-debian-hypriot-layout.sh (debootstrap; needs
//! root and the Debian package mirror) and kept in target/kiln-test-cache between runs.
//!
//! The same proof for Raspberry Pi OS (trixie): a Debian trixie twin with its card layout, its
//! cloud-init (25.1, seed from /boot/firmware as pi-gen sets it) and its network stack
//! (NetworkManager), made by tests/fixtures/make-debian-raspios-layout.sh, is stamped with the
//! `raspios-arm64` profile and booted the same way.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

// What `kiln run` boots with (it looks for them itself; the test checks they are there).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

fn prerequisites() -> bool {
    let files_ok = [OVMF_CODE, OVMF_VARS, SYSTEMD_BOOT]
        .iter()
        .all(|f| Path::new(f).exists());
    let root = is_root();
    if have_tools(BOOT_TOOLS) && files_ok && root {
        return true;
    }
    skip(&format!(
        "boot test: OVMF/systemd-boot present: {files_ok}, running as root: {root}"
    ))
}

/// The Debian HypriotOS-layout image, built once per target directory.
fn debian_image() -> PathBuf {
    cached_image("debian-hypriot-layout", "make-debian-hypriot-layout.sh")
}

/// The boot FAT starts at sector 2048 (tests/fixtures/make-debian-hypriot-layout.sh).
const BOOT_OFFSET: u64 = 2048 * 512;
const BOOT_LEN: u64 = 256 << 20;

/// The secrets pirate-probe's seed carries, read from the stamped image before it boots: the
/// wifi PSK as wpa_supplicant gets it, the swarm join token, the password hash.
fn secrets_on_the_seed(user_data: &str) -> Vec<String> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(user_data).unwrap();
    let files = doc["write_files"].as_sequence().unwrap();
    let content = |path: &str| -> String {
        files
            .iter()
            .find(|f| f["path"].as_str() == Some(path))
            .and_then(|f| f["content"].as_str())
            .unwrap_or_else(|| panic!("no {path} in user-data:\n{user_data}"))
            .to_string()
    };
    let wpa = content("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf");
    let psk = wpa
        .lines()
        .find_map(|l| l.trim().strip_prefix("psk="))
        .unwrap()
        .to_string();
    let token = content("/etc/kiln/swarm.token").trim().to_string();
    let hash = doc["users"][0]["passwd"].as_str().unwrap().to_string();
    let secrets = vec![psk, token, hash];
    for s in &secrets {
        assert!(s.len() > 20 && user_data.contains(s.as_str()), "{s}");
    }
    secrets
}

/// The `KILN-BOOT`/`KILN-REPORT` `key=value` line of a console log. The marker may follow other
/// output on its line: the serial console is shared with getty, whose `login:` prompt ends
/// without a newline (a CI run read `pirate-probe login: KILN-REPORT status=…`).
fn console_value(log: &str, prefix: &str, key: &str) -> String {
    let tail = last_lines(log, 40);
    let marker = format!("{prefix} {key}=");
    log.lines()
        .find_map(|l| {
            let l = l.trim_end_matches('\r');
            l.find(&marker).map(|i| l[i + marker.len()..].to_string())
        })
        .unwrap_or_else(|| panic!("no {prefix} {key}= line; last lines:\n{tail}"))
}

/// Boots the image, keeping what the guest writes, until the report unit has run.
fn boot_until_report(cache: &Path, image: &Path, log: &Path) -> String {
    let args = [
        "--persist",
        "--until",
        "KILN-REPORT-END",
        "--timeout",
        "600",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    boot(cache, image, &args, log)
}

/// The proof of issue 18's "no secrets left on the card": booted once, the seed on the FAT holds
/// none of the secrets it came with (not as a file, not in free clusters); booted again, nothing
/// runs twice and the node is the same.
#[test]
fn stamped_hypriot_layout_boots_with_cloud_init_and_leaves_no_secret_on_the_fat() {
    if !prerequisites() || !have_tools(&["mtype"]) {
        return;
    }
    let base = debian_image();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    run(kiln(&cache)
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
    let image = out.join("pirate-probe.img");
    let seed = String::from_utf8(mtype(&image, BOOT_OFFSET, "user-data")).unwrap();
    let secrets = secrets_on_the_seed(&seed);
    let meta_data = mtype(&image, BOOT_OFFSET, "meta-data");

    // First boot: OVMF, TCG here, a NIC on an empty hub, the console in a log; it ends when the
    // report unit (after cloud-final and kiln's seed scrub) has printed its lines.
    let log = boot_until_report(&cache, &image, &dir.path().join("serial-1.log"));
    let tail = last_lines(&log, 40);
    assert!(
        log.contains("KILN-BOOT-MARKER-DONE"),
        "no runcmd marker on the serial console; last lines:\n{tail}"
    );
    let line = |key: &str| console_value(&log, "KILN-BOOT", key);
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
    let first = |key: &str| console_value(&log, "KILN-REPORT", key);
    assert_eq!(first("boot"), "1");
    assert_eq!(
        first("token-in").trim(),
        "",
        "the join token outlived its use"
    );

    // The FAT, read by mtools and as raw bytes: the seed is still a seed, without the secrets.
    let after = String::from_utf8(mtype(&image, BOOT_OFFSET, "user-data")).unwrap();
    assert!(after.starts_with("#cloud-config\n"), "{after}");
    assert!(after.contains("hostname: pirate-probe"), "{after}");
    assert_eq!(mtype(&image, BOOT_OFFSET, "meta-data"), meta_data);
    let fat = dir.path().join("boot.fat");
    extract(&image, BOOT_OFFSET, BOOT_LEN, &fat);
    for s in &secrets {
        assert!(
            !after.contains(s.as_str()),
            "{s} still in /boot/user-data:\n{after}"
        );
        let found = Command::new("grep")
            .args(["-caF", s])
            .arg(&fat)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&found.stdout).trim(),
            "0",
            "{s} still in the boot FAT's bytes"
        );
    }

    // Second boot: same instance, nothing per-instance again, cloud-init clean.
    let log2 = boot_until_report(&cache, &image, &dir.path().join("serial-2.log"));
    let tail2 = last_lines(&log2, 40);
    assert!(
        !log2.contains("KILN-BOOT-MARKER-DONE"),
        "runcmd ran again on the second boot:\n{tail2}"
    );
    let second = |key: &str| console_value(&log2, "KILN-REPORT", key);
    assert_eq!(second("boot"), "2");
    for key in ["hostname", "user", "instance", "runcmd-runs"] {
        assert_eq!(second(key), first(key), "{key} changed on the second boot");
    }
    assert_eq!(second("runcmd-runs"), "1");
    let status = second("status");
    assert!(
        status.contains("done") && !status.contains("error"),
        "cloud-init status on the second boot: {status}\n{tail2}"
    );
    assert_eq!(second("token-in").trim(), "", "{tail2}");
    assert_eq!(
        String::from_utf8(mtype(&image, BOOT_OFFSET, "user-data")).unwrap(),
        after,
        "the second boot changed the seed"
    );
}

/// Raspberry Pi OS's bootfs starts at sector 16384 (tests/fixtures/make-debian-raspios-layout.sh).
const BOOTFS_OFFSET: u64 = 16384 * 512;

/// Issue 18's proof for Raspberry Pi OS, on its trixie twin: one boot applies the hostname, the
/// static address (through cloud-init's NetworkManager renderer), the user and key, the wifi
/// keyfile, docker and the swarm unit, and leaves no join token on bootfs.
#[test]
fn stamped_raspios_twin_boots_with_cloud_init_and_networkmanager() {
    if !prerequisites() || !have_tools(&["mtype"]) {
        return;
    }
    let base = cached_image("debian-raspios-layout", "make-debian-raspios-layout.sh");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    run(kiln(&cache)
        .args(["build", "--node", "pi-probe", "--cluster"])
        .arg(repo().join("tests/boot/raspios-cluster.toml"))
        .arg("--base")
        .arg(&base)
        .arg("--out")
        .arg(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pi-probe.manifest.json")).unwrap())
            .unwrap();
    let instance_id = manifest["instance_id"].as_str().unwrap().to_string();
    let image = out.join("pi-probe.img");
    let meta = String::from_utf8(mtype(&image, BOOTFS_OFFSET, "meta-data")).unwrap();
    assert!(
        meta.contains(&format!("instance-id: {instance_id}")),
        "{meta}"
    );

    let log = boot_until_report(&cache, &image, &dir.path().join("serial.log"));
    let tail = last_lines(&log, 60);
    let line = |key: &str| console_value(&log, "KILN-REPORT", key);
    assert_eq!(line("hostname"), "pi-probe");
    assert!(line("user").starts_with("ops:x:"), "{}", line("user"));
    assert_eq!(
        line("key"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnBootTestKeyBootTestKeyBootTest0 kiln-boot-test"
    );
    assert_eq!(line("addr").trim(), "10.77.0.31/24", "{tail}");
    assert!(line("route").contains("via 10.77.0.1"), "{tail}");
    // eth0 is cloud-init's NetworkManager connection, rendered from network-config v2.
    assert_eq!(line("nm-eth0").trim(), "cloud-init eth0", "{tail}");
    assert_eq!(line("wifi-file"), "600 root:root", "{tail}");
    assert!(
        line("wifi-connection").contains("kiln-boot-test:802-11-wireless"),
        "{tail}"
    );
    assert_eq!(line("instance"), instance_id);
    assert!(line("datasource").contains("nocloud"), "{tail}");
    // cloud-init 25 lists its errors (`errors: []` when there are none).
    let status = line("status");
    assert!(
        status.contains("status: done") && status.contains("errors: [] recoverable_errors: {}"),
        "cloud-init status: {status}\n{tail}"
    );
    assert_eq!(line("docker"), "enabled active", "{tail}");
    assert_eq!(line("swarm-unit"), "enabled", "{tail}");
    assert!(line("swarm-env").contains("ROLE=join"), "{tail}");
    assert_eq!(
        line("token-in").trim(),
        "",
        "the join token stayed on bootfs"
    );
    let after = String::from_utf8(mtype(&image, BOOTFS_OFFSET, "user-data")).unwrap();
    assert!(
        after.contains("Written by kiln after first boot"),
        "the seed scrub did not reach /boot/firmware/user-data:\n{after}"
    );
}
