//! `kiln build` on a HypriotOS-layout image made by sfdisk + mkfs.vfat + mkfs.ext4, checked with
//! independent tools: sfdisk, fsck.vfat, e2fsck, mtools, sha256sum, cloud-init.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const TOOLS: &[&str] = &[
    "sfdisk",
    "mkfs.vfat",
    "mkfs.ext4",
    "mcopy",
    "mtype",
    "fsck.vfat",
    "e2fsck",
    "dumpe2fs",
    "debugfs",
];

struct Built {
    _dir: tempfile::TempDir,
    cluster: std::path::PathBuf,
    base: std::path::PathBuf,
    out: std::path::PathBuf,
    cache: std::path::PathBuf,
}

fn build_ceil_one() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    build(&cache, &cluster, "ceil-one", base.as_os_str(), &out);
    Built {
        _dir: dir,
        cluster,
        base,
        out,
        cache,
    }
}

fn manifest(out: &Path, node: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join(format!("{node}.manifest.json"))).unwrap())
        .unwrap()
}

#[test]
fn stamped_image_passes_independent_checks() {
    if !have_tools(TOOLS) {
        return;
    }
    let b = build_ceil_one();
    let img = b.out.join("ceil-one.img");

    // The partition table: same partitions; the disk id is the node's own, as the manifest says.
    let before = sfdisk_json(&b.base);
    let after = sfdisk_json(&img);
    assert_eq!(
        before["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    for (p, q) in before["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["partitiontable"]["partitions"].as_array().unwrap())
    {
        assert_eq!(
            (&p["start"], &p["size"], &p["type"]),
            (&q["start"], &q["size"], &q["type"])
        );
    }
    let m = manifest(&b.out, "ceil-one");
    let sig = m["disk_signature"].as_str().unwrap();
    assert_eq!(before["partitiontable"]["id"], "0x5452574f");
    assert_eq!(
        after["partitiontable"]["id"].as_str().unwrap(),
        format!("0x{sig}")
    );

    // The boot FAT is clean by dosfstools' own checker, and the root ext4 by e2fsck.
    let boot = b.out.join("boot.fat");
    extract(&img, 1 << 20, 64 << 20, &boot);
    assert_fsck_clean("fsck.vfat", &boot);
    assert_fsck_clean(
        "e2fsck",
        format!("{}?offset={}", img.display(), 65u64 << 20),
    );

    // The seed files read back with mtools are exactly what `kiln plan` said.
    let plan: serde_json::Value = serde_json::from_str(&stdout(
        kiln(&b.cache)
            .args(["plan", "--json", "--node", "ceil-one", "--cluster"])
            .arg(&b.cluster),
    ))
    .unwrap();
    let files = plan["partition_files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    for f in files {
        let name = f["path"].as_str().unwrap();
        let got = mtype(&img, 1 << 20, name);
        assert_eq!(
            sha256_hex(&got),
            f["sha256"].as_str().unwrap(),
            "{name} differs from the plan"
        );
    }
    let user_data = String::from_utf8(mtype(&img, 1 << 20, "user-data")).unwrap();
    assert!(user_data.starts_with("#cloud-config\n"));
    assert!(user_data.contains("hostname: ceil-one"));
    let meta = String::from_utf8(mtype(&img, 1 << 20, "meta-data")).unwrap();
    assert!(
        meta.contains(&format!(
            "instance-id: {}",
            m["instance_id"].as_str().unwrap()
        )),
        "{meta}"
    );
    // config.txt is untouched; cmdline.txt's PARTUUID follows the new disk signature.
    assert_eq!(
        mtype(&img, 1 << 20, "config.txt"),
        mtype(&b.base, 1 << 20, "config.txt")
    );
    let cmdline = String::from_utf8(mtype(&img, 1 << 20, "cmdline.txt")).unwrap();
    assert!(
        cmdline.contains(&format!("root=PARTUUID={sig}-02")),
        "{cmdline}"
    );

    // Everything outside the boot partition is byte-for-byte the base, except the 4-byte signature.
    let a = std::fs::read(&b.base).unwrap();
    let z = std::fs::read(&img).unwrap();
    assert_eq!(a.len(), z.len());
    let boot_range = (1usize << 20)..(65usize << 20);
    let differing: Vec<usize> = (0..a.len())
        .filter(|&i| !boot_range.contains(&i) && a[i] != z[i])
        .take(10)
        .collect();
    assert_eq!(differing, vec![440, 441, 442, 443]);

    // The checksum file agrees with coreutils' sha256sum.
    let sum = std::fs::read_to_string(b.out.join("ceil-one.img.sha256sum")).unwrap();
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("ceil-one.img.sha256sum")
        .current_dir(&b.out)
        .output()
        .unwrap();
    assert!(check.status.success(), "sha256sum -c: {sum}");
    assert!(sum.ends_with("  ceil-one.img\n"));

    // The manifest names the inputs and outputs with their digests.
    let roles: Vec<&str> = m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["role"].as_str().unwrap())
        .collect();
    for r in ["base-image", "cluster-file", "profile", "file"] {
        assert!(roles.contains(&r), "manifest inputs lack {r}: {roles:?}");
    }
    assert_eq!(m["inputs"][0]["sha256"].as_str().unwrap(), sha256_hex(&a));
    assert_eq!(
        m["outputs"][0]["sha256"].as_str().unwrap(),
        sum.split_whitespace().next().unwrap()
    );
}

#[test]
fn output_image_is_sparse_and_bmap_covers_the_filesystems() {
    if !have_tools(TOOLS) {
        return;
    }
    let b = build_ceil_one();
    let img = b.out.join("ceil-one.img");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&img).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "the image is not sparse"
    );
    let bmap = std::fs::read_to_string(b.out.join("ceil-one.img.bmap")).unwrap();
    assert!(bmap.contains("<bmap version=\"2.0\">"));
    // Every block e2fsprogs calls used lies in a mapped range.
    let used =
        stdout(Command::new("dumpe2fs").arg(format!("{}?offset={}", img.display(), 65u64 << 20)));
    assert!(used.contains("Free blocks:"));
    let ranges: Vec<(u64, u64)> = bmap
        .lines()
        .filter_map(|l| {
            l.split('>')
                .nth(1)?
                .split('<')
                .next()
                .map(str::trim)
                .map(str::to_string)
        })
        .filter(|s| s.chars().next().is_some_and(|c| c.is_ascii_digit()) && !s.contains(' '))
        .filter_map(|s| {
            let (a, b) = s.split_once('-').unwrap_or((&s, &s));
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    // The first MiB (MBR and gap) is mapped, and so is the FAT's metadata at 1 MiB (block 256):
    // an empty FAT reads as zeros and must still reach the card.
    assert!(
        ranges.iter().any(|&(a, b)| a == 0 && b == 255),
        "{ranges:?}"
    );
    assert!(
        ranges.iter().any(|&(a, b)| a == 256 && b > 256),
        "{ranges:?}"
    );
    // Ranges do not span the partition boundary at 65 MiB (block 16640).
    assert!(
        ranges.iter().all(|&(a, b)| b < 16640 || a >= 16640),
        "{ranges:?}"
    );
}

#[test]
fn builds_are_reproducible_and_nodes_differ() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    let cache = dir.path().join("cache");
    let build = |out: &str, epoch: Option<&str>| {
        let mut c = kiln(&cache);
        c.args(["build", "--all", "--cluster"])
            .arg(&cluster)
            .arg("--base")
            .arg(&base)
            .arg("--out")
            .arg(dir.path().join(out));
        if let Some(e) = epoch {
            c.env("SOURCE_DATE_EPOCH", e);
        }
        run(&mut c);
    };
    let sums = |out: &str| -> Vec<String> {
        [
            "ceil-router",
            "ceil-one",
            "ceil-two",
            "ceil-three",
            "ceil-four",
        ]
        .iter()
        .map(|n| {
            std::fs::read_to_string(dir.path().join(out).join(format!("{n}.img.sha256sum")))
                .unwrap()
        })
        .collect()
    };
    build("a", None);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    build("b", None);
    assert_eq!(
        sums("a"),
        sums("b"),
        "two builds without SOURCE_DATE_EPOCH differ"
    );
    build("c", Some("1700000000"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    build("d", Some("1700000000"));
    assert_eq!(
        sums("c"),
        sums("d"),
        "two builds with SOURCE_DATE_EPOCH differ"
    );
    assert_ne!(
        sums("a"),
        sums("c"),
        "SOURCE_DATE_EPOCH had no effect on FAT timestamps"
    );
    // Every node is its own instance.
    let ids: std::collections::BTreeSet<String> = [
        "ceil-router",
        "ceil-one",
        "ceil-two",
        "ceil-three",
        "ceil-four",
    ]
    .iter()
    .map(|n| {
        manifest(&dir.path().join("a"), n)["instance_id"]
            .as_str()
            .unwrap()
            .to_string()
    })
    .collect();
    assert_eq!(ids.len(), 5);
}

#[test]
fn changed_configuration_changes_the_instance_id() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = example_cluster("ceil", dir.path());
    let cache = dir.path().join("cache");
    let id = |c: &Path| -> String {
        let plan: serde_json::Value = serde_json::from_str(&stdout(
            kiln(&cache)
                .args(["plan", "--json", "--node", "ceil-two", "--cluster"])
                .arg(c),
        ))
        .unwrap();
        plan["instance_id"].as_str().unwrap().to_string()
    };
    let first = id(&cluster);
    assert_eq!(
        first,
        id(&cluster),
        "an unchanged configuration must keep its instance-id"
    );
    let text = std::fs::read_to_string(&cluster)
        .unwrap()
        .replace("Europe/Berlin", "UTC");
    std::fs::write(&cluster, text).unwrap();
    assert_ne!(
        first,
        id(&cluster),
        "a changed configuration must get a new instance-id"
    );
}

#[test]
fn cloud_init_accepts_the_seed() {
    if !have_tools(&["cloud-init"]) || !have_tools(TOOLS) {
        return;
    }
    let b = build_ceil_one();
    let img = b.out.join("ceil-one.img");
    let ud = b.out.join("user-data");
    std::fs::write(&ud, mtype(&img, 1 << 20, "user-data")).unwrap();
    let schema = stdout(
        Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&ud),
    );
    assert!(schema.contains("Valid cloud-config"), "{schema}");
    // The same validator rejects a broken document, so the check above can fail.
    let bad = b.out.join("bad-user-data");
    std::fs::write(&bad, "#cloud-config\nusers: 5\nwrite_files: [{path: 1}]\n").unwrap();
    assert!(
        !Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&bad)
            .status()
            .unwrap()
            .success()
    );

    let nc = b.out.join("network-config");
    std::fs::write(&nc, mtype(&img, 1 << 20, "network-config")).unwrap();
    let eni = b.out.join("eni");
    run(Command::new("cloud-init")
        .args([
            "devel",
            "net-convert",
            "--kind",
            "yaml",
            "--output-kind",
            "eni",
            "--distro",
            "debian",
            "--network-data",
        ])
        .arg(&nc)
        .arg("--directory")
        .arg(&eni));
    let rendered =
        std::fs::read_to_string(eni.join("etc/network/interfaces.d/50-cloud-init")).unwrap();
    assert!(rendered.contains("iface eth0 inet static"), "{rendered}");
    assert!(rendered.contains("address 11.0.0.101/25"), "{rendered}");
    assert!(rendered.contains("gateway 11.0.0.1"), "{rendered}");
    assert!(rendered.contains("iface wlan0 inet dhcp"), "{rendered}");
}

#[test]
fn quick_start_sample_builds_offline() {
    if !have_tools(&["mke2fs", "debugfs", "dumpe2fs", "fsck.vfat", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = example_cluster("ceil", dir.path());
    let cache = dir.path().join("cache");
    let out = dir.path().join("out");
    build(&cache, &cluster, "ceil-one", "sample".as_ref(), &out);
    let img = out.join("ceil-one.img");
    let boot = dir.path().join("boot.fat");
    extract(&img, 1 << 20, 64 << 20, &boot);
    assert_fsck_clean("fsck.vfat", &boot);
    assert_fsck_clean(
        "e2fsck",
        format!("{}?offset={}", img.display(), 65u64 << 20),
    );
    // The sample itself is reproducible: a second cache makes the same bytes.
    let s1 = dir.path().join("s1.img");
    let s2 = dir.path().join("s2.img");
    run(kiln(&cache).arg("sample").arg(&s1));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    run(kiln(&cache).arg("sample").arg(&s2));
    assert_eq!(
        sha256_hex(&std::fs::read(&s1).unwrap()),
        sha256_hex(&std::fs::read(&s2).unwrap())
    );
}

/// A profile may put overlays into the ext4 root at build time (the writer the phones use)
/// instead of cloud-init's write_files: here a copy of hypriot-rpi with `overlays_into = "root"`,
/// placed in the cluster's images/, checked with debugfs and e2fsck.
#[test]
fn overlays_can_go_into_the_ext4_root() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    let images = cluster.parent().unwrap().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let profile = std::fs::read_to_string(repo().join("images/hypriot-rpi.toml")).unwrap();
    std::fs::write(
        images.join("hypriot-rpi.toml"),
        profile.replace("[deliver]", "overlays_into = \"root\"\n\n[deliver]"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    build(&cache, &cluster, "ceil-router", base.as_os_str(), &out);
    let img = out.join("ceil-router.img");
    let root = 68_157_440u64; // partition 2 of the fixture: sector 133120
    let dev = format!("{}?offset={root}", img.display());
    assert_fsck_clean("e2fsck", &dev);
    let cat = |p: &str| {
        stdout(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("cat {p}"))
                .arg(&dev),
        )
    };
    let stat = |p: &str| {
        stdout(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat {p}"))
                .arg(&dev),
        )
    };
    assert_eq!(
        cat("/etc/docker/daemon.json"),
        std::fs::read_to_string(repo().join("overlays/docker-daemon/root/etc/docker/daemon.json"))
            .unwrap()
    );
    let handler = "/usr/local/lib/kiln/dash-handler/dash_handler.py";
    assert!(stat(handler).contains("Mode:  0755"), "{}", stat(handler));
    assert!(stat("/etc/docker/daemon.json").contains("Mode:  0644"));
    // The user-data no longer carries them; it still enables the overlay's service.
    let ud = String::from_utf8(mtype(&img, 1 << 20, "user-data")).unwrap();
    assert!(!ud.contains("/etc/docker/daemon.json"), "{ud}");
    assert!(ud.contains("kiln-dash-handler.service"), "{ud}");
}

/// Issue 18: the secrets a seed carries (wifi passphrase and its PSK, swarm token, password and
/// its hash) reach the image's user-data and nothing else kiln prints or keeps: not `kiln check`,
/// not `kiln plan` (text or JSON), not the build's output, not the manifest.
#[test]
fn secrets_stay_out_of_plan_output_logs_and_manifest() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = repo().join("tests/boot/cluster.toml");
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    let node = "pirate-probe";
    let built = run(&mut build_command(
        &cache,
        &cluster,
        node,
        base.as_os_str(),
        &out,
    ));
    let img = out.join(format!("{node}.img"));
    let user_data = String::from_utf8(mtype(&img, 1 << 20, "user-data")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&user_data).unwrap();
    let secret_file = |name: &str| {
        std::fs::read_to_string(repo().join("tests/boot/secrets").join(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let psk_hex = user_data
        .lines()
        .find_map(|l| l.trim().strip_prefix("psk="))
        .expect("a psk= line in user-data")
        .to_string();
    let secrets = [
        secret_file("wifi.psk"),
        psk_hex,
        secret_file("swarm-worker.token"),
        secret_file("ops.password"),
        doc["users"][0]["passwd"].as_str().unwrap().to_string(),
    ];
    // The card does carry them (until first boot), so their absence below means something.
    for s in &secrets[1..3] {
        assert!(user_data.contains(s.as_str()), "{s} not in user-data");
    }
    let mut said = vec![
        ("kiln build stdout", built.stdout),
        ("kiln build stderr", built.stderr),
        (
            "manifest",
            std::fs::read(out.join(format!("{node}.manifest.json"))).unwrap(),
        ),
    ];
    for args in [
        vec!["check", "--cluster"],
        vec!["check", "--json", "--cluster"],
        vec!["plan", "--node", node, "--cluster"],
        vec!["plan", "--node", node, "--json", "--cluster"],
    ] {
        let o = run(kiln(&cache).args(&args).arg(&cluster));
        said.push(("kiln check/plan stdout", o.stdout));
        said.push(("kiln check/plan stderr", o.stderr));
    }
    for (what, bytes) in &said {
        let text = String::from_utf8_lossy(bytes);
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{what} shows a secret ({s}):\n{text}"
            );
        }
    }
}
