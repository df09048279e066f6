//! The network a Raspberry Pi OS or Ubuntu node gets, judged by the programs that read it on the
//! card: cloud-init 25's own `net-convert` (the NetworkManager renderer Raspberry Pi OS trixie
//! runs on first boot) and NetworkManager 1.52's keyfile parser (`nmcli --offline`) for
//! raspios; netplan's `generate` for Ubuntu's network-config, which cloud-init hands it as it is. They run in a Debian trixie root
//! made once by tests/fixtures/make-trixie-netjudge.sh (debootstrap; needs root and a Debian
//! mirror) and cached in target/kiln-test-cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The trixie root with cloud-init, NetworkManager and netplan; None (skipped) without root or
/// debootstrap.
fn judge_root() -> Option<PathBuf> {
    let cache = repo().join("target/kiln-test-cache");
    let root = cache.join("trixie-netjudge");
    if root.join("usr/sbin/netplan").exists() && root.join("usr/bin/nmcli").exists() {
        return Some(root);
    }
    if !is_root() {
        skip("the trixie judge root needs root to debootstrap (and to chroot)");
        return None;
    }
    if !have_tools(&["debootstrap", "chroot", "flock"]) {
        return None;
    }
    std::fs::create_dir_all(&cache).unwrap();
    // Both tests of this file want the root and run in parallel: one makes it, under a lock,
    // while the other waits (two debootstraps into one directory break each other).
    let script = format!(
        "[ -x {root}/usr/bin/nmcli ] && [ -x {root}/usr/sbin/netplan ] && exit 0; \
         rm -rf {tmp} {root} && bash {make} {tmp} && mv {tmp} {root}",
        root = root.display(),
        tmp = cache.join("trixie-netjudge.partial").display(),
        make = repo()
            .join("tests/fixtures/make-trixie-netjudge.sh")
            .display(),
    );
    run(Command::new("flock")
        .arg(cache.join("trixie-netjudge.lock"))
        .args(["bash", "-c", &script]));
    Some(root)
}

/// Runs `sh -c script` in the judge root with `stdin`, returning stdout; fails the test with the
/// judge's own words otherwise.
fn judge(root: &Path, script: &str, stdin: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("chroot")
        .arg(root)
        .args(["sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{script}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Builds ceil-one of the ceil example on `profile` from the sample and returns (network-config,
/// user-data) as they are on its boot FAT.
fn seed_of(profile: &str, dir: &Path) -> (String, String) {
    let cluster = example_cluster("ceil", dir);
    let text = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(
        &cluster,
        text.replace("image = \"hypriot-rpi\"", &format!("image = \"{profile}\"")),
    )
    .unwrap();
    let out = dir.join("out");
    build(
        &dir.join("cache"),
        &cluster,
        "ceil-one",
        "sample".as_ref(),
        &out,
    );
    let img = out.join("ceil-one.img");
    let start = sfdisk_json(&img)["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512;
    let read = |name| String::from_utf8(mtype(&img, start, name)).unwrap();
    (read("network-config"), read("user-data"))
}

/// A file of user-data's `write_files`, by path.
fn written_file(user_data: &str, path: &str) -> String {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(user_data).unwrap();
    let f = doc["write_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("{path} is not in write_files"));
    assert_eq!(f["permissions"].as_str(), Some("0600"));
    assert_eq!(f["owner"].as_str(), Some("root:root"));
    f["content"].as_str().unwrap().to_string()
}

#[test]
fn raspios_network_is_what_trixie_cloud_init_and_networkmanager_read() {
    if !have_tools(&["sfdisk", "mtype"]) {
        return;
    }
    let Some(root) = judge_root() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (network_config, user_data) = seed_of("raspios-arm64", dir.path());

    // cloud-init's own renderer, for Debian and NetworkManager, as on the card's first boot.
    let eth0 = judge(
        &root,
        "d=$(mktemp -d) && cat > $d/network-config && \
         cloud-init devel net-convert -p $d/network-config -k yaml -D debian -O network-manager -d $d/out >&2 && \
         cat $d/out/etc/NetworkManager/system-connections/cloud-init-eth0.nmconnection",
        network_config.as_bytes(),
    );
    // NetworkManager's own parser takes it, and says what it understood.
    let parsed = judge(
        &root,
        "nmcli --offline connection modify connection.autoconnect yes",
        eth0.as_bytes(),
    );
    for want in [
        "interface-name=eth0",
        "method=manual",
        "address1=11.0.0.101/25",
        "route1=0.0.0.0/0,11.0.0.1",
        "dns=11.0.0.1;",
    ] {
        assert!(parsed.contains(want), "{want} not in\n{parsed}");
    }

    // The wifi connection cloud-init writes, read by NetworkManager's parser.
    let wifi = written_file(
        &user_data,
        "/etc/NetworkManager/system-connections/kiln-wlan0.nmconnection",
    );
    let parsed = judge(
        &root,
        "nmcli --offline connection modify connection.autoconnect yes",
        wifi.as_bytes(),
    );
    for want in [
        "type=wifi",
        "interface-name=wlan0",
        "ssid=ceil",
        "key-mgmt=wpa-psk",
        "method=auto",
    ] {
        assert!(parsed.contains(want), "{want} not in\n{parsed}");
    }
    let psk_line = parsed.lines().find(|l| l.starts_with("psk=")).unwrap();
    assert_eq!(
        psk_line.len(),
        4 + 64,
        "the derived key, not the passphrase: {psk_line}"
    );
}

#[test]
fn ubuntu_network_is_what_netplan_generates_from() {
    if !have_tools(&["sfdisk", "mtype"]) {
        return;
    }
    let Some(root) = judge_root() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (network_config, _) = seed_of("ubuntu-rpi", dir.path());

    // cloud-init on Ubuntu hands a v2 network-config to netplan as it is (its netplan renderer
    // passes v2 through to /etc/netplan/50-cloud-init.yaml); netplan generates what the card runs.
    // (trixie's cloud-init writes that file to the judge's own /etc, whatever the target, so the
    // hand-over is done here as cloud-init does it.)
    let out = judge(
        &root,
        "d=$(mktemp -d) && mkdir -p $d/etc/netplan && \
         cat > $d/etc/netplan/50-cloud-init.yaml && chmod 600 $d/etc/netplan/50-cloud-init.yaml && \
         netplan generate --root-dir $d >&2 && \
         cat $d/run/systemd/network/10-netplan-eth0.network && echo ---- && \
         cat $d/run/netplan/wpa-wlan0.conf",
        network_config.as_bytes(),
    );
    let (eth0, wpa) = out.split_once("----\n").unwrap();
    for want in [
        "Name=eth0",
        "Address=11.0.0.101/25",
        "Gateway=11.0.0.1",
        "DNS=11.0.0.1",
    ] {
        assert!(eth0.contains(want), "{want} not in\n{eth0}");
    }
    assert!(wpa.contains("ssid=P\"ceil\""), "{wpa}");
    // A 64-hex-digit password is the raw key to wpa_supplicant (unquoted), not a passphrase.
    let psk = wpa
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("psk="))
        .unwrap();
    assert!(
        psk.len() == 4 + 64 && !psk.contains('"'),
        "netplan passed the key as a passphrase: {psk}\n{wpa}"
    );
    assert!(wpa.contains("country=DE"), "{wpa}");
}
