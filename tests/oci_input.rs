//! Bad OCI input gets a clear error and leaves nothing behind: a corrupt blob, an unknown
//! transport, an image without a kernel; and --engine bootc-image-builder without podman.
//! Images are small layouts packed by tests/fixtures/oci-pack.py (Python's tarfile, not kiln).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tiny root (with or without a kernel) as an OCI layout tagged `base`.
fn layout(dir: &Path, with_kernel: bool) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd/boot/efi")).unwrap();
    std::fs::write(root.join("etc/os-release"), "PRETTY_NAME=\"Tiny\"\n").unwrap();
    std::fs::write(
        root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        b"MZ not really",
    )
    .unwrap();
    if with_kernel {
        std::fs::write(root.join("boot/vmlinuz-6.1.0-1-amd64"), b"kernel").unwrap();
        std::fs::write(root.join("boot/initrd.img-6.1.0-1-amd64"), b"initrd").unwrap();
    }
    let out = dir.join("layout");
    run(Command::new("python3")
        .arg(repo().join("tests/fixtures/oci-pack.py"))
        .arg(&root)
        .arg(&out)
        .arg("base"));
    out
}

fn build(dir: &Path, base: &str, extra: &[&str]) -> std::process::Output {
    kiln(&dir.join("cache"))
        .args(["build", "--node", "edge-1", "--cluster"])
        .arg(bootc_cluster(dir))
        .args(["--base", base, "--out"])
        .arg(dir.join("out"))
        .args(extra)
        .output()
        .unwrap()
}

fn assert_no_image(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir.join("out"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "out/ holds {left:?}");
}

#[test]
fn a_corrupt_layer_blob_is_refused_by_digest() {
    if !have_tools(&["python3", "mke2fs", "debugfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    // Flip a byte in the (largest) blob: the layer.
    let blob = std::fs::read_dir(lay.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let o = build(dir.path(), &format!("oci:{}:base", lay.display()), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not match its digest"), "{err}");
    assert_no_image(dir.path());
}

#[test]
fn an_image_without_a_kernel_says_what_to_install() {
    if !have_tools(&["python3", "mke2fs", "debugfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), false);
    let o = build(dir.path(), &format!("oci:{}:base", lay.display()), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no kernel") && err.contains("linux-image"),
        "{err}"
    );
    assert_no_image(dir.path());
    // Nothing half-made is left in the cache either.
    let stage = dir.path().join("cache/oci");
    let leftovers: Vec<_> = std::fs::read_dir(&stage)
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name() != "blobs")
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_missing_tag_and_an_unknown_transport_are_named() {
    if !have_tools(&["python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    let o = build(dir.path(), &format!("oci:{}:nope", lay.display()), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no image tagged \"nope\""),
        "{err}"
    );
    let o = build(dir.path(), "docker://127.0.0.1:9/none:tag", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--insecure"), "{err}");
    assert_no_image(dir.path());
}

#[test]
fn bootc_image_builder_engine_without_podman_says_so_config_only() {
    if which("podman").is_some() {
        eprintln!("SKIPPED: podman is installed; this test is about its absence");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = build(
        dir.path(),
        "docker://registry.local:5000/edge/node:v2",
        &["--engine", "bootc-image-builder", "--format", "qcow2"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs podman"), "{err}");
    assert_no_image(dir.path());
}

#[test]
fn oci_archive_and_docker_archive_made_by_skopeo_build() {
    if !have_tools(&["python3", "skopeo", "mke2fs", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    for (transport, file) in [
        ("oci-archive", "img.oci.tar"),
        ("docker-archive", "img.docker.tar"),
    ] {
        let archive = dir.path().join(file);
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &format!("oci:{}:base", lay.display()),
            &format!("{transport}:{}", archive.display()),
        ]));
        let out = dir.path().join(format!("out-{transport}"));
        let o = kiln(&dir.path().join("cache"))
            .args(["build", "--node", "edge-1", "--cluster"])
            .arg(bootc_cluster(dir.path()))
            .args([
                "--base",
                &format!("{transport}:{}", archive.display()),
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let raw = out.join("edge-1.raw");
        assert_fsck_clean(
            "e2fsck",
            format!("{}?offset={}", raw.display(), 257u64 << 20),
        );
    }
}
