//! `kiln flash` onto real block devices (loop devices, 512- and 4096-byte sectors), judged by
//! cmp, sfdisk, fsck.vfat and bmaptool; interruption, corruption and refusals.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// A loop device over a file, detached when dropped.
struct Loop {
    dev: PathBuf,
    _file: PathBuf,
}

impl Loop {
    fn new(dir: &Path, name: &str, size: u64, extra: &[&str]) -> Loop {
        let file = dir.join(name);
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let out = stdout(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(extra)
                .arg(&file),
        );
        Loop {
            dev: PathBuf::from(out.trim()),
            _file: file,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn can_loop() -> bool {
    if !is_root() || !Path::new("/dev/loop-control").exists() {
        return skip("flash tests need root and loop devices");
    }
    have_tools(&[
        "losetup",
        "sfdisk",
        "mkfs.vfat",
        "mkfs.ext4",
        "mcopy",
        "fsck.vfat",
        "dumpe2fs",
        "debugfs",
    ])
}

/// A kiln-built image (with .bmap and .sha256sum) of the ceil-one node.
fn built_image(dir: &Path) -> PathBuf {
    let base = hypriot_fixture(dir);
    let cluster = example_cluster("ceil", dir);
    let out = dir.join("out");
    build(
        &dir.join("cache"),
        &cluster,
        "ceil-one",
        base.as_os_str(),
        &out,
    );
    out.join("ceil-one.img")
}

/// A loop device holding `img`, with its ext4 root (partition 2) mounted. The ext4 one: this
/// kernel has no vfat module. The kernel here does not scan loop partitions by itself; partx adds
/// them (BLKPG).
fn mounted(dir: &Path, img: &Path, name: &str) -> (Loop, PathBuf, PathBuf) {
    let lo = Loop::new(dir, name, 256 << 20, &["-P"]);
    run(Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", lo.dev.display()))
        .args(["bs=4M", "conv=fsync", "status=none"]));
    run(Command::new("partx").arg("-a").arg(&lo.dev));
    let part = PathBuf::from(format!("{}p2", lo.dev.display()));
    let mnt = dir.join(format!("{name}.mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").arg(&part).arg(&mnt));
    (lo, part, mnt)
}

/// `kiln flash IMAGE DEV --allow-non-removable`, answering the prompt with `answer`.
fn flash_answering(
    cache: &Path,
    img: &Path,
    dev: &Path,
    answer: &[u8],
) -> (std::process::Output, String) {
    let mut child = kiln(cache)
        .arg("flash")
        .arg(img)
        .arg(dev)
        .arg("--allow-non-removable")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(answer).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, err)
}

/// `mib` MiB of incompressible (xorshift) data with an MBR holding one Linux partition.
fn random_image_with_table(img: &Path, mib: usize, seed: u64) {
    {
        let mut f = std::fs::File::create(img).unwrap();
        let mut chunk = vec![0u8; 1 << 20];
        let mut x = seed;
        for _ in 0..mib {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&chunk).unwrap();
        }
    }
    let mut sf = Command::new("sfdisk")
        .arg("--quiet")
        .arg(img)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, type=83\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
}

fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v).unwrap();
    v
}

/// The mapped byte ranges of a bmap file.
fn mapped(bmap: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(bmap).unwrap();
    let size: u64 = text
        .split("<ImageSize>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    text.lines()
        .filter(|l| l.trim_start().starts_with("<Range"))
        .map(|l| {
            let body = l
                .split('>')
                .nth(1)
                .unwrap()
                .split('<')
                .next()
                .unwrap()
                .trim();
            let (a, b) = body.split_once('-').unwrap_or((body, body));
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            (a * 4096, ((b + 1) * 4096).min(size))
        })
        .collect()
}

/// A bmap text with its `<BmapFileChecksum>` recomputed as bmaptool computes it (sha256 of the
/// file with the checksum's characters zeroed), for tests that edit a bmap on purpose.
fn with_file_checksum(xml: &str) -> String {
    let stored = xml
        .split("<BmapFileChecksum>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .trim()
        .to_string();
    let zeroed = xml.replacen(&stored, &"0".repeat(stored.len()), 1);
    zeroed.replacen(&"0".repeat(stored.len()), &sha256_hex(zeroed.as_bytes()), 1)
}

fn assert_mapped_equal(img: &Path, bmap: &Path, dev: &Path) {
    for (a, b) in mapped(bmap) {
        assert!(
            read_range(img, a, b - a) == read_range(dev, a, b - a),
            "bytes {a}..{b} differ on {}",
            dev.display()
        );
    }
}

fn flash(cache: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut c = kiln(cache);
    c.arg("flash");
    for a in args {
        c.arg(a);
    }
    c.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn flashes_a_loop_device_and_independent_tools_agree() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let bmap = img.with_extension("img.bmap");
    let lo = Loop::new(dir.path(), "card.img", 256 << 20, &[]);
    // Old contents everywhere, so skipped blocks and the tail are visible.
    std::fs::write(&lo._file, vec![0x5au8; 256 << 20]).unwrap();
    let o = flash(
        &dir.path().join("cache"),
        &[&img, &lo.dev, &"--yes", &"--allow-non-removable"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_mapped_equal(&img, &bmap, &lo.dev);
    let layout = |p: &Path| -> Vec<(u64, u64, String)> {
        sfdisk_json(p)["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| {
                (
                    q["start"].as_u64().unwrap(),
                    q["size"].as_u64().unwrap(),
                    q["type"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(layout(&img), layout(&lo.dev));
    assert_eq!(
        sfdisk_json(&img)["partitiontable"]["id"],
        sfdisk_json(&lo.dev)["partitiontable"]["id"]
    );
    let boot = dir.path().join("boot.fat");
    extract(&lo.dev, 1 << 20, 64 << 20, &boot);
    assert_fsck_clean("fsck.vfat", &boot);
    assert_fsck_clean(
        "e2fsck",
        format!("{}?offset={}", lo.dev.display(), 65u64 << 20),
    );
    // The last MiB (where a stale backup GPT would be) was zeroed.
    assert!(
        read_range(&lo.dev, (256 << 20) - (1 << 20), 1 << 20)
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn flashes_a_4096_byte_sector_device() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let lo = Loop::new(
        dir.path(),
        "card4k.img",
        256 << 20,
        &["--sector-size", "4096"],
    );
    let o = flash(
        &dir.path().join("cache"),
        &[&img, &lo.dev, &"--yes", &"--allow-non-removable"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_mapped_equal(&img, &img.with_extension("img.bmap"), &lo.dev);
}

#[test]
fn bmaptool_interoperates() {
    if !can_loop() || !have_tools(&["bmaptool"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    // bmaptool accepts kiln's bmap (it checks the bmap's own checksum and every range's).
    let lo = Loop::new(dir.path(), "a.img", 256 << 20, &[]);
    run(Command::new("bmaptool")
        .args(["copy", "--bmap"])
        .arg(img.with_extension("img.bmap"))
        .arg(&img)
        .arg(&lo.dev));
    assert_mapped_equal(&img, &img.with_extension("img.bmap"), &lo.dev);
    // kiln accepts bmaptool's bmap of the same image.
    let theirs = dir.path().join("bmaptool.bmap");
    run(Command::new("bmaptool")
        .args(["create", "-o"])
        .arg(&theirs)
        .arg(&img));
    let lo2 = Loop::new(dir.path(), "b.img", 256 << 20, &[]);
    let o = flash(
        &dir.path().join("cache"),
        &[
            &img,
            &lo2.dev,
            &"--yes",
            &"--allow-non-removable",
            &"--bmap",
            &theirs,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_mapped_equal(&img, &theirs, &lo2.dev);
}

#[test]
fn a_bmap_that_does_not_match_is_refused() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let bmap = std::fs::read_to_string(img.with_extension("img.bmap")).unwrap();
    // Same size, one range's checksum wrong.
    let first = bmap.split("chksum=\"").nth(1).unwrap()[..64].to_string();
    let bad = dir.path().join("bad.bmap");
    // The file's own checksum is made to agree, so that the range check is what refuses it.
    std::fs::write(
        &bad,
        with_file_checksum(&bmap.replacen(&first, &"f".repeat(64), 1)),
    )
    .unwrap();
    let lo = Loop::new(dir.path(), "c.img", 256 << 20, &[]);
    let o = flash(
        &dir.path().join("cache"),
        &[
            &img,
            &lo.dev,
            &"--yes",
            &"--allow-non-removable",
            &"--bmap",
            &bad,
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bmap does not match"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        read_range(&lo.dev, 0, 1 << 20).iter().all(|&b| b == 0),
        "a partition table was written"
    );
}

#[test]
fn a_corrupt_xz_leaves_no_partition_table() {
    if !can_loop() || !have_tools(&["xz"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let xz = dir.path().join("ceil-one.img.xz");
    run(Command::new("sh").arg("-c").arg(format!(
        "xz -T0 -1 -c '{}' > '{}'",
        img.display(),
        xz.display()
    )));
    let mut bytes = std::fs::read(&xz).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&xz, bytes).unwrap();
    let lo = Loop::new(dir.path(), "d.img", 256 << 20, &[]);
    std::fs::write(&lo._file, vec![0x33u8; 256 << 20]).unwrap();
    let o = flash(
        &dir.path().join("cache"),
        &[&xz, &lo.dev, &"--yes", &"--allow-non-removable"],
    );
    assert!(!o.status.success());
    assert!(
        read_range(&lo.dev, 0, 1 << 20).iter().all(|&b| b == 0),
        "a partition table was written"
    );
    assert!(
        !Command::new("sfdisk")
            .arg("--json")
            .arg(&lo.dev)
            .output()
            .unwrap()
            .status
            .success()
            || {
                let j = sfdisk_json(&lo.dev);
                j["partitiontable"]["partitions"]
                    .as_array()
                    .is_none_or(|p| p.is_empty())
            }
    );
}

#[test]
fn a_killed_flash_leaves_the_first_mib_zero() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A big image of incompressible data with a partition table, so the write takes a while.
    let img = dir.path().join("big.img");
    random_image_with_table(&img, 768, 0x9e37_79b9_7f4a_7c15);
    let lo = Loop::new(dir.path(), "e.img", 1 << 30, &[]);
    let mut child = kiln(&dir.path().join("cache"))
        .arg("flash")
        .arg(&img)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--progress", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Wait until the body is being written, then kill -9.
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("\"stage\":\"write\"") && !line.contains("\"bytes\":0,") {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        read_range(&lo.dev, 0, 1 << 20).iter().all(|&b| b == 0),
        "an interrupted flash left a partition table"
    );
}

#[test]
fn refusals_leave_the_disk_untouched() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let cache = dir.path().join("cache");
    let marker = vec![0xa5u8; 1 << 20];

    // A non-removable disk without --allow-non-removable.
    let lo = Loop::new(dir.path(), "f.img", 256 << 20, &[]);
    std::fs::write(&lo._file, &marker).unwrap();
    let o = flash(&cache, &[&img, &lo.dev, &"--yes"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a removable disk"));
    assert_eq!(read_range(&lo.dev, 0, 1 << 20), marker);

    // A disk smaller than the image.
    let small = Loop::new(dir.path(), "g.img", 64 << 20, &[]);
    std::fs::write(&small._file, &marker).unwrap();
    let o = flash(
        &cache,
        &[&img, &small.dev, &"--yes", &"--allow-non-removable"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(read_range(&small.dev, 0, 1 << 20), marker);

    // A disk with a mounted partition, and the user answers no.
    let (parted, part, mnt) = mounted(dir.path(), &img, "h.img");
    let before = read_range(&parted.dev, 0, 1 << 20);
    let (o, err) = flash_answering(&cache, &img, &parted.dev, b"n\n");
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(!o.status.success());
    assert!(
        err.contains("not confirmed")
            && err.contains(&format!("{} on {}", part.display(), mnt.display())),
        "{err}"
    );
    assert_eq!(read_range(&parted.dev, 0, 1 << 20), before);

    // A partition instead of a disk.
    let o = flash(&cache, &[&img, &part, &"--yes", &"--allow-non-removable"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a partition"));
}

#[test]
fn fleet_writes_one_image_to_several_disks() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let a = Loop::new(dir.path(), "fa.img", 256 << 20, &[]);
    let b = Loop::new(dir.path(), "fb.img", 256 << 20, &[]);
    let small = Loop::new(dir.path(), "fc.img", 64 << 20, &[]);
    // The too-small disk is refused up front: nothing is written anywhere.
    let o = flash(
        &dir.path().join("cache"),
        &[&img, &a.dev, &small.dev, &"--yes", &"--allow-non-removable"],
    );
    assert!(!o.status.success());
    assert!(read_range(&a.dev, 0, 1 << 20).iter().all(|&x| x == 0));
    let o = flash(
        &dir.path().join("cache"),
        &[
            &img,
            &a.dev,
            &b.dev,
            &"--yes",
            &"--allow-non-removable",
            &"--progress",
            &"json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["event"] == "result")
        .collect();
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| r["ok"] == true && r["verified"] == true)
    );
    for lo in [&a, &b] {
        assert_mapped_equal(&img, &img.with_extension("img.bmap"), &lo.dev);
    }
}

#[test]
fn flash_by_node_builds_then_writes_and_honours_the_pinned_serial() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    let out = dir.path().join("out");
    let lo = Loop::new(dir.path(), "n.img", 256 << 20, &[]);
    let o = flash(
        &dir.path().join("cache"),
        &[
            &"--node",
            &"ceil-two",
            &"--cluster",
            &cluster,
            &"--base",
            &base,
            &"--out",
            &out,
            &lo.dev,
            &"--yes",
            &"--allow-non-removable",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = out.join("ceil-two.img");
    assert_mapped_equal(&img, &img.with_extension("img.bmap"), &lo.dev);
    let ud = String::from_utf8(mtype(&lo.dev, 1 << 20, "user-data")).unwrap();
    assert!(ud.contains("hostname: ceil-two"));

    // A node pinned to another card's serial is refused before anything is written.
    let text = std::fs::read_to_string(&cluster).unwrap().replace(
        "name = \"ceil-three\"",
        "name = \"ceil-three\"\nserial = \"4C530001\"",
    );
    std::fs::write(&cluster, text).unwrap();
    let lo2 = Loop::new(dir.path(), "m.img", 256 << 20, &[]);
    std::fs::write(&lo2._file, vec![0x77u8; 1 << 20]).unwrap();
    let o = flash(
        &dir.path().join("cache"),
        &[
            &"--node",
            &"ceil-three",
            &"--cluster",
            &cluster,
            &"--base",
            &base,
            &"--out",
            &out,
            &lo2.dev,
            &"--yes",
            &"--allow-non-removable",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pinned to the card with serial 4C530001"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(read_range(&lo2.dev, 0, 1 << 20).iter().all(|&b| b == 0x77));
}

#[test]
fn hypriot_flash_options_customise_the_boot_partition() {
    if !can_loop() || !have_tools(&["xz", "mtype"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let before = sha256_hex(&std::fs::read(&base).unwrap());
    run(Command::new("xz").args(["-T0", "-1", "-k"]).arg(&base));
    let xz = dir.path().join("hypriot-layout.img.xz");
    let ud = dir.path().join("user-data.yml");
    std::fs::write(&ud, "#cloud-config\nhostname: replaced-below\nusers:\n  - name: pirate\n    ssh_authorized_keys: [\"ssh-ed25519 AAAAC3Nza test\"]\n").unwrap();
    let conf = dir.path().join("config.txt");
    std::fs::write(&conf, "enable_uart=1\n").unwrap();
    let extra = dir.path().join("ssh");
    std::fs::write(&extra, "").unwrap();
    let lo = Loop::new(dir.path(), "hy.img", 256 << 20, &[]);
    let o = flash(
        &dir.path().join("cache"),
        &[
            &xz,
            &lo.dev,
            &"--yes",
            &"--allow-non-removable",
            &"--hostname",
            &"black-pearl-2",
            &"--userdata",
            &ud,
            &"--bootconf",
            &conf,
            &"--file",
            &extra,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = String::from_utf8(mtype(&lo.dev, 1 << 20, "user-data")).unwrap();
    assert!(
        got.starts_with("#cloud-config\n")
            && got.contains("hostname: black-pearl-2")
            && got.contains("ssh-ed25519"),
        "{got}"
    );
    assert_eq!(mtype(&lo.dev, 1 << 20, "config.txt"), b"enable_uart=1\n");
    assert!(mtype(&lo.dev, 1 << 20, "ssh").is_empty());
    assert!(
        String::from_utf8(mtype(&lo.dev, 1 << 20, "meta-data"))
            .unwrap()
            .contains("local-hostname: black-pearl-2")
    );
    let boot = dir.path().join("boot.fat");
    extract(&lo.dev, 1 << 20, 64 << 20, &boot);
    assert_fsck_clean("fsck.vfat", &boot);
    // The root partition arrived untouched, and the image file was not modified.
    assert_eq!(
        read_range(&lo.dev, 65 << 20, 64 << 20),
        read_range(&base, 65 << 20, 64 << 20)
    );
    assert_eq!(sha256_hex(&std::fs::read(&base).unwrap()), before);
}

#[test]
fn a_confirmed_flash_unmounts_the_targets_partitions_first() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let (parted, part, mnt) = mounted(dir.path(), &img, "u.img");
    let (o, err) = flash_answering(&dir.path().join("cache"), &img, &parted.dev, b"y\n");
    let still_mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(&mnt.display().to_string());
    if still_mounted {
        let _ = Command::new("umount").arg(&mnt).status();
    }
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("unmounted {}", part.display())),
        "{err}"
    );
    assert!(!still_mounted, "kiln left the partition mounted");
    assert_mapped_equal(&img, &img.with_extension("img.bmap"), &parted.dev);
}

/// A card that dies mid-write: the loop device's backing file lives on a 24 MiB tmpfs, so writes
/// past 24 MiB fail with an I/O error, as a worn-out card's do.
#[test]
fn a_card_failing_mid_write_leaves_no_partition_table_and_says_where() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    random_image_with_table(&img, 64, 0x2545_f491_4f6c_dd1d);

    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mnt));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    // The loop device (declared after the mount guard) is detached before the unmount.
    let lo = Loop::new(&mnt, "card.img", 128 << 20, &[]);
    let o = kiln(&dir.path().join("cache"))
        .arg("flash")
        .arg(&img)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--progress", "none"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}{err}");
    assert!(
        format!("{out}{err}").contains("at byte"),
        "the error does not say where: {out}{err}"
    );
    assert!(
        read_range(&lo.dev, 0, 1 << 20).iter().all(|&b| b == 0),
        "a failed flash left a partition table"
    );
}

/// Hostile bmaps (issue 20): each once made kiln divide by zero, write nothing while reporting
/// success, or report a false mismatch. Each is refused before a byte reaches the card, and
/// `kiln convert` leaves no output.
#[test]
fn hostile_bmaps_are_refused_before_writing() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = built_image(dir.path());
    let good = std::fs::read_to_string(img.with_extension("img.bmap")).unwrap();
    let ranges: Vec<String> = good
        .lines()
        .filter(|l| l.trim_start().starts_with("<Range"))
        .map(str::to_string)
        .collect();
    assert!(ranges.len() >= 2, "the fixture maps too few ranges: {good}");
    let block_map = |rs: &[String]| {
        let (head, rest) = good.split_once("<BlockMap>").unwrap();
        let tail = rest.split_once("</BlockMap>").unwrap().1;
        with_file_checksum(&format!(
            "{head}<BlockMap>\n{}\n    </BlockMap>{tail}",
            rs.join("\n")
        ))
    };
    let mut swapped = ranges.clone();
    swapped.swap(0, 1);
    let mut doubled = ranges.clone();
    doubled.insert(1, ranges[0].clone());
    let cases = [
        (
            "block size 0",
            with_file_checksum(&good.replace(
                "<BlockSize> 4096 </BlockSize>",
                "<BlockSize> 0 </BlockSize>",
            )),
            "BlockSize",
        ),
        (
            "a wrapping range",
            block_map(&["        <Range> 0-18446744073709551615 </Range>".to_string()]),
            "outside",
        ),
        ("duplicate ranges", block_map(&doubled), "overlaps"),
        (
            "a stale file checksum",
            good.replacen("<BlockMap>", "<BlockMap><!-- edited -->", 1),
            "own checksum",
        ),
    ];
    let lo = Loop::new(dir.path(), "c.img", 256 << 20, &[]);
    for (what, xml, says) in &cases {
        let bad = dir.path().join("bad.bmap");
        std::fs::write(&bad, xml).unwrap();
        let o = flash(
            &dir.path().join("cache"),
            &[
                &img,
                &lo.dev,
                &"--yes",
                &"--allow-non-removable",
                &"--bmap",
                &bad,
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(
            read_range(&lo.dev, 0, 4 << 20).iter().all(|&b| b == 0),
            "{what}: bytes reached the card"
        );
        let out = dir.path().join("out.qcow2");
        let o = kiln(&dir.path().join("cache"))
            .args(["convert", "--to", "qcow2", "--bmap"])
            .arg(&bad)
            .arg(&img)
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "{what}: convert {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!out.exists(), "{what}: convert left {}", out.display());
    }

    // Unsorted ranges with correct checksums are the same map: flashed and verified as bmaptool
    // would, not reported as a mismatch.
    let unsorted = dir.path().join("unsorted.bmap");
    std::fs::write(&unsorted, block_map(&swapped)).unwrap();
    let o = flash(
        &dir.path().join("cache"),
        &[
            &img,
            &lo.dev,
            &"--yes",
            &"--allow-non-removable",
            &"--bmap",
            &unsorted,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_mapped_equal(&img, &img.with_extension("img.bmap"), &lo.dev);
}

/// Every file under `dir` (and `dir` itself) with an owner other than `uid`.
fn not_owned_by(dir: &Path, uid: u32) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut wrong = Vec::new();
    let meta = std::fs::symlink_metadata(dir).unwrap();
    if meta.uid() != uid {
        wrong.push(format!("{} (uid {})", dir.display(), meta.uid()));
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            wrong.extend(not_owned_by(&e.unwrap().path(), uid));
        }
    }
    wrong
}

#[test]
fn under_sudo_flash_by_node_builds_as_the_invoking_user() {
    // `sudo kiln flash --node`: root writes the card, but out/ and the cache entries the build
    // makes belong to the user behind sudo (here nobody, 65534), as without sudo.
    if !is_root() {
        skip("the sudo test runs kiln as root");
        return;
    }
    if !have_tools(&["chown", "mke2fs", "debugfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = example_cluster("ceil", dir.path());
    // The user's own checkout: theirs, as their cluster file and secrets would be.
    run(Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(dir.path()));
    let (out, cache) = (dir.path().join("out"), dir.path().join("cache"));
    let card = dir.path().join("card.img");
    let o = kiln(&cache)
        .args([
            "flash",
            "--node",
            "ceil-one",
            "--base",
            "sample",
            "--yes",
            "--cluster",
        ])
        .arg(&cluster)
        .arg("--out")
        .arg(&out)
        .arg(&card)
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = out.join("ceil-one.img");
    assert!(img.is_file() && out.join("ceil-one.img.bmap").is_file());
    assert_eq!(not_owned_by(&out, 65534), Vec::<String>::new());
    assert!(std::fs::read_dir(&cache).unwrap().count() > 0);
    assert_eq!(not_owned_by(&cache, 65534), Vec::<String>::new());
    // The write itself was root's, and it is the image that was built.
    assert_mapped_equal(&img, &img.with_extension("img.bmap"), &card);
}

/// A loop device over `mib` MiB of a non-zero pattern, as a used card holds: a block that one
/// flash writes and another skips then shows.
fn junk_loop(dir: &Path, name: &str, mib: usize) -> Loop {
    let file = dir.join(name);
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8 | 0x40).collect();
    let mut f = std::fs::File::create(&file).unwrap();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let out = stdout(Command::new("losetup").args(["-f", "--show"]).arg(&file));
    Loop {
        dev: PathBuf::from(out.trim()),
        _file: file,
    }
}

#[test]
fn flash_by_node_streams_the_bytes_kiln_build_makes_and_writes_no_image() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    // The judge: the images `kiln build` makes, each flashed from its file with its bmap.
    let built = dir.path().join("built");
    let nodes = ["ceil-one", "ceil-two"];
    let mut prebuilt = Vec::new();
    for node in nodes {
        build(&cache, &cluster, node, base.as_os_str(), &built);
        let lo = junk_loop(dir.path(), &format!("{node}-prebuilt.img"), 160);
        let img = built.join(format!("{node}.img"));
        let o = flash(&cache, &[&img, &lo.dev, &"--yes", &"--allow-non-removable"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        prebuilt.push(lo);
    }
    // Streamed: both nodes in one run, from a directory where `out/` would appear.
    let cwd = dir.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let streamed: Vec<Loop> = nodes
        .iter()
        .map(|n| junk_loop(dir.path(), &format!("{n}-streamed.img"), 160))
        .collect();
    let o = kiln(&cache)
        .current_dir(&cwd)
        .args(["flash", "--node", nodes[0], "--node", nodes[1], "--cluster"])
        .arg(&cluster)
        .arg("--base")
        .arg(&base)
        .arg(&streamed[0].dev)
        .arg(&streamed[1].dev)
        .args(["--yes", "--allow-non-removable", "--progress", "none"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("stamped ceil-one"), "{err}");
    assert!(err.contains("verified"), "{err}");
    // Nothing was written where a build would have put its image, nor beside the cluster file.
    assert!(
        !cwd.join("out").exists(),
        "flash --node made {}/out",
        cwd.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&cwd).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Byte for byte the same card as the pre-built image makes, junk left where both skip.
    for (node, (s, p)) in nodes.iter().zip(streamed.iter().zip(&prebuilt)) {
        let (a, b) = (
            read_range(&s.dev, 0, 160 << 20),
            read_range(&p.dev, 0, 160 << 20),
        );
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(first.is_none(), "{node}: cards differ at byte {first:?}");
        let img = built.join(format!("{node}.img"));
        assert_mapped_equal(&img, &img.with_extension("img.bmap"), &s.dev);
    }
    let ud = String::from_utf8(mtype(&streamed[1].dev, 1 << 20, "user-data")).unwrap();
    assert!(ud.contains("hostname: ceil-two"));
}
