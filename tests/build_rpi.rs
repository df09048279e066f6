//! `kiln build` for today's Raspberry Pi images — Raspberry Pi OS (trixie) and Ubuntu Server
//! 24.04 — from kiln's sample bases and from images made by sfdisk + mkfs.vfat + mkfs.ext4
//! (tests/fixtures/make-rpi-layout.sh), checked with independent tools: sfdisk, mtools,
//! fsck.vfat, e2fsck.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const TOOLS: &[&str] = &[
    "sfdisk",
    "mkfs.vfat",
    "mkfs.ext4",
    "mcopy",
    "mtype",
    "mdir",
    "fsck.vfat",
    "e2fsck",
];

/// The ceil example on another profile (its wifi, static addresses, docker and swarm as they are).
fn ceil_on(profile: &str, dir: &Path) -> PathBuf {
    let cluster = example_cluster("ceil", dir);
    let text = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(
        &cluster,
        text.replace("image = \"hypriot-rpi\"", &format!("image = \"{profile}\"")),
    )
    .unwrap();
    cluster
}

/// The layout facts read back with sfdisk: (start sector, size, type) of each partition.
fn partitions(img: &Path) -> Vec<(u64, u64, String)> {
    sfdisk_json(img)["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The FAT's volume label as mtools' `mdir` reports it.
fn fat_label(img: &Path, offset: u64) -> String {
    let out = stdout(
        Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!("{}@@{offset}", img.display()))
            .arg("::"),
    );
    out.lines()
        .find_map(|l| l.strip_prefix(" Volume in drive : is "))
        .unwrap_or_else(|| panic!("no volume label in mdir's output:\n{out}"))
        .trim()
        .to_string()
}

/// Checks a built node: its seed on the boot FAT and, with `fsck`, both filesystems clean by
/// their own checkers (once per profile is enough: every node of it is stamped alike).
fn check_node(img: &Path, boot_label: &str, node: &str, work: &Path, fsck: bool) -> String {
    let parts = partitions(img);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!((parts[0].2.as_str(), parts[1].2.as_str()), ("c", "83"));
    let (boot_start, boot_size) = (parts[0].0 * 512, parts[0].1 * 512);
    assert_eq!(fat_label(img, boot_start), boot_label);

    let meta = String::from_utf8(mtype(img, boot_start, "meta-data")).unwrap();
    let meta: serde_yaml_ng::Value = serde_yaml_ng::from_str(&meta).unwrap();
    let id = meta["instance-id"]
        .as_str()
        .expect("instance-id")
        .to_string();
    assert!(id.starts_with(&format!("{node}-")), "{id}");
    assert!(
        meta.get("instance_id").is_none(),
        "the stock misspelling is gone"
    );
    assert_eq!(meta["local-hostname"].as_str(), Some(node));

    let net = String::from_utf8(mtype(img, boot_start, "network-config")).unwrap();
    let net: serde_yaml_ng::Value = serde_yaml_ng::from_str(&net).unwrap();
    assert_eq!(net["network"]["version"].as_u64(), Some(2), "{net:?}");
    let user_data = String::from_utf8(mtype(img, boot_start, "user-data")).unwrap();
    assert!(user_data.starts_with("#cloud-config\n"));
    assert!(user_data.contains(&format!("hostname: {node}\n")));

    if !fsck {
        return id;
    }
    let boot = work.join(format!("{node}.fat"));
    extract(img, boot_start, boot_size, &boot);
    assert_fsck_clean("fsck.vfat", &boot);
    assert_fsck_clean(
        "e2fsck",
        format!("{}?offset={}", img.display(), parts[1].0 * 512),
    );
    id
}

#[test]
fn every_rpi_profile_builds_from_its_sample() {
    if !have_tools(TOOLS) {
        return;
    }
    for (profile, boot_label, first_sector) in [
        ("raspios-arm64", "bootfs", 16384),
        ("raspios-armhf", "bootfs", 16384),
        ("ubuntu-rpi", "system-boot", 2048),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ceil_on(profile, dir.path());
        let (cache, out) = (dir.path().join("cache"), dir.path().join("out"));
        let mut ids = Vec::new();
        for node in ["ceil-one", "ceil-two"] {
            build(&cache, &cluster, node, "sample".as_ref(), &out);
            let img = out.join(format!("{node}.img"));
            let parts = partitions(&img);
            assert_eq!(parts[0].0, first_sector, "{profile}");
            assert_eq!(parts[0].1, 512 * 2048, "{profile}: a 512 MiB boot FAT");
            ids.push(check_node(
                &img,
                boot_label,
                node,
                dir.path(),
                node == "ceil-one",
            ));
        }
        assert_ne!(ids[0], ids[1], "{profile}: each node its own instance-id");
        let net = String::from_utf8(mtype(
            &out.join("ceil-one.img"),
            first_sector * 512,
            "network-config",
        ))
        .unwrap();
        assert!(net.contains("11.0.0.101/25"), "{net}");
        let user_data = String::from_utf8(mtype(
            &out.join("ceil-one.img"),
            first_sector * 512,
            "user-data",
        ))
        .unwrap();
        if profile == "ubuntu-rpi" {
            // netplan joins the wifi from network-config; nothing else writes it.
            assert!(net.contains("wifis:") && net.contains("regulatory-domain: DE"));
            assert!(!user_data.contains("wpa_supplicant"));
        } else {
            // NetworkManager's connection, root's and 0600, written by cloud-init.
            assert!(!net.contains("wifis:") && !net.contains("wlan0"), "{net}");
            assert!(user_data.contains("kiln-wlan0.nmconnection"), "{user_data}");
            assert!(!user_data.contains("wpa_supplicant@wlan0"));
        }
    }
}

/// Images in each layout made by independent tools are accepted by their profile, and refused by
/// the other's with the mismatch named.
#[test]
fn independent_fixtures_are_accepted_and_mismatches_refused() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let fixture = |layout: &str| {
        let img = work.join(format!("{layout}-layout.img"));
        run(Command::new("bash")
            .arg(repo().join("tests/fixtures/make-rpi-layout.sh"))
            .arg(layout)
            .arg(&img));
        img
    };
    let (raspios, ubuntu) = (fixture("raspios"), fixture("ubuntu"));
    let cache = work.join("cache");
    for (profile, base, label) in [
        ("raspios-arm64", &raspios, "bootfs"),
        ("ubuntu-rpi", &ubuntu, "system-boot"),
    ] {
        let sub = work.join(profile);
        std::fs::create_dir_all(&sub).unwrap();
        let cluster = ceil_on(profile, &sub);
        let out = sub.join("out");
        build(&cache, &cluster, "ceil-one", base.as_os_str(), &out);
        let img = out.join("ceil-one.img");
        assert_eq!(partitions(&img), partitions(base), "the layout is kept");
        check_node(&img, label, "ceil-one", &sub, true);
        let sig = sfdisk_json(&img)["partitiontable"]["id"].clone();
        if profile == "raspios-arm64" {
            // Its fstab and cmdline.txt name partitions by PARTUUID: the signature stays.
            assert_eq!(sig, "0x5452574f");
        } else {
            assert_ne!(sig, "0x5452574f", "ubuntu finds its root by label");
        }
    }

    let refused = |profile: &str, base: &Path| {
        let sub = work.join(format!("refuse-{profile}"));
        std::fs::create_dir_all(&sub).unwrap();
        let cluster = ceil_on(profile, &sub);
        let o = build_command(
            &cache,
            &cluster,
            "ceil-one",
            base.as_os_str(),
            &sub.join("out"),
        )
        .output()
        .unwrap();
        assert!(!o.status.success(), "{profile} accepted {}", base.display());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = refused("raspios-arm64", &ubuntu);
    assert!(
        e.contains("starts at sector 2048, the profile expects sector 16384"),
        "{e}"
    );
    let e = refused("ubuntu-rpi", &raspios);
    assert!(
        e.contains("labelled \"rootfs\", expected \"writable\""),
        "{e}"
    );
}
