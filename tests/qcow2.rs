//! `kiln convert --to qcow2`, judged by qemu-img: `check` finds no errors or leaks, `compare`
//! finds the same guest bytes as the raw image, `info` shows no backing file.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::*;

fn convert(cache: &Path, raw: &Path, out: &Path) {
    run(kiln(cache)
        .arg("convert")
        .arg(raw)
        .args(["--to", "qcow2"])
        .arg(out));
}

fn judged_by_qemu_img(raw: &Path, q: &Path) {
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(q)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{text}");
    assert!(text.contains("No errors were found"), "{text}");
    run(Command::new("qemu-img").arg("compare").arg(raw).arg(q));
    let info: serde_json::Value = serde_json::from_str(&stdout(
        Command::new("qemu-img")
            .args(["info", "--output", "json"])
            .arg(q),
    ))
    .unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(
        info["virtual-size"].as_u64().unwrap(),
        std::fs::metadata(raw).unwrap().len().next_multiple_of(512)
    );
}

#[test]
fn qcow2_of_a_built_node_and_of_odd_images() {
    if !have_tools(&["qemu-img", "sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    // A built node, with its bmap beside it.
    let cluster = example_cluster("ceil", t.path());
    let base = hypriot_fixture(t.path());
    let out = t.path().join("out");
    build(&cache, &cluster, "ceil-two", base.as_os_str(), &out);
    let q = t.path().join("ceil-two.qcow2");
    convert(&cache, &out.join("ceil-two.img"), &q);
    judged_by_qemu_img(&out.join("ceil-two.img"), &q);
    // Zero clusters are not stored: far smaller than the image.
    assert!(std::fs::metadata(&q).unwrap().len() < 8 << 20);
    // Same input, same bytes.
    let q2 = t.path().join("again.qcow2");
    convert(&cache, &out.join("ceil-two.img"), &q2);
    assert!(std::fs::read(&q).unwrap() == std::fs::read(&q2).unwrap());

    // No bmap, a size that is not a multiple of the cluster, data at the very end and across a
    // 512 MiB L2 boundary.
    let raw = t.path().join("odd.img");
    {
        let mut f = std::fs::File::create(&raw).unwrap();
        f.set_len((600 << 20) + 12345).unwrap();
        for (off, byte) in [
            (0u64, 1u8),
            ((512 << 20) - 100, 2),
            ((600 << 20) + 12000, 3),
        ] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![byte; 300]).unwrap();
        }
    }
    let q3 = t.path().join("odd.qcow2");
    convert(&cache, &raw, &q3);
    judged_by_qemu_img(&raw, &q3);
}

/// Without a bmap, the file's data extents (SEEK_DATA/SEEK_HOLE) decide what is read and
/// written: a 4 GiB file with 3 MiB of data is read for its data only. The bytes kiln read are
/// what the kernel counted for it (`rchar` in /proc/<shell>/io, which includes reaped children).
#[test]
fn qcow2_without_a_bmap_reads_only_the_data_extents() {
    if !have_tools(&["qemu-img", "bash"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("sparse.img");
    {
        let mut f = std::fs::File::create(&raw).unwrap();
        f.set_len(4 << 30).unwrap();
        // Data extents with zeros inside them, one across a 512 MiB L2 boundary, one at the end.
        for (off, len) in [
            (0u64, 1 << 20),
            ((512 << 20) - 4096, 1 << 20),
            ((4 << 30) - (1 << 20), 1 << 20),
        ] {
            let mut data = vec![0u8; len];
            data[..100].fill(7);
            data[len - 100..].fill(9);
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&data).unwrap();
        }
    }
    let q = t.path().join("sparse.qcow2");
    let o = Command::new("bash")
        .arg("-c")
        .arg(r#""$1" convert "$2" --to qcow2 "$3" 2>&1; grep '^rchar:' /proc/$$/io"#)
        .arg("bash")
        .arg(kiln_bin())
        .arg(&raw)
        .arg(&q)
        .env("KILN_CACHE_DIR", t.path().join("cache"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(
        !text.contains("Android") && !text.contains("FILL"),
        "{text}"
    );
    let rchar: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        rchar < 64 << 20,
        "kiln read {rchar} bytes of a 4 GiB file with 3 MiB of data"
    );
    judged_by_qemu_img(&raw, &q);
}
