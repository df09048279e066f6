//! Bare-metal disks from OCI images, end to end with real peers: a Debian bookworm root made with
//! debootstrap (kernel, systemd, systemd-boot, cloud-init) is packed as an OCI image by
//! tests/fixtures/oci-pack.py, pushed by skopeo to Debian's docker-registry on loopback, pulled by
//! `kiln build`, written as RAW and QCOW2 and booted with `kiln run` (OVMF, TCG). The disks are
//! checked with e2fsck, fsck.vfat, sgdisk, qemu-img check and qemu-img compare.
//!
//! The Debian root is cached in target/kiln-test-cache (made once, under a lock, by
//! tests/fixtures/make-debian-oci.sh; needs root and the Debian mirror).

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const TOOLS: &[&str] = &[
    "debootstrap",
    "docker-registry",
    "skopeo",
    "qemu-system-x86_64",
    "qemu-img",
    "mke2fs",
    "debugfs",
    "e2fsck",
    "fsck.vfat",
    "sgdisk",
    "flock",
    "runuser",
];
const ESP_OFFSET: u64 = 1 << 20;
const ESP_BYTES: u64 = 256 << 20;
const ROOT_OFFSET: u64 = ESP_OFFSET + ESP_BYTES;

fn prerequisites() -> bool {
    let root = is_root();
    let ovmf = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists();
    if have_tools(TOOLS) && root && ovmf {
        return true;
    }
    skip(&format!("OCI tests: root: {root}, OVMF: {ovmf}"))
}

/// The Debian image as an OCI layout, made once per target directory (under a lock, as the
/// tests of this file run in parallel).
fn debian_layout() -> PathBuf {
    let cache = repo().join("target/kiln-test-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let layout = cache.join("debian-oci");
    let script = format!(
        "[ -f {layout}/index.json ] || bash {script} {layout} {work}",
        layout = layout.display(),
        script = repo().join("tests/fixtures/make-debian-oci.sh").display(),
        work = cache.join("debian-oci-work").display(),
    );
    run(Command::new("flock")
        .arg(cache.join("debian-oci.lock"))
        .args(["bash", "-c", &script]));
    layout
}

fn build(cache: &Path, cluster: &Path, base: &str, out: &Path, format: &str) -> PathBuf {
    run(kiln(cache)
        .args([
            "build",
            "--node",
            "edge-1",
            "--insecure",
            "--format",
            format,
        ])
        .arg("--cluster")
        .arg(cluster)
        .args(["--base", base])
        .arg("--out")
        .arg(out));
    out.join(format!("edge-1.{format}"))
}

/// `kiln run` arguments for edge-1 with its NoCloud seed, until cloud-init's closing line.
fn seeded_run(cluster: &Path) -> Vec<&OsStr> {
    let mut args: Vec<&OsStr> = [
        "--seed",
        "edge-1",
        "--until",
        "finished at",
        "--timeout",
        "600",
    ]
    .iter()
    .map(OsStr::new)
    .collect();
    args.extend([OsStr::new("--cluster"), cluster.as_os_str()]);
    args
}

fn file_sha(p: &Path) -> String {
    stdout(Command::new("sha256sum").arg(p))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `debugfs -R "stat PATH"` of the root filesystem: (mode, uid, gid) as printed.
fn stat_in_root(img: &Path, path: &str) -> (String, u32, u32) {
    let out = stdout(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(format!("{}?offset={ROOT_OFFSET}", img.display())),
    );
    let field = |name: &str| -> String {
        let at = out
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {out}"));
        out[at + name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    (
        field("Mode:"),
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
    )
}

#[test]
fn registry_image_becomes_raw_and_qcow2_disks_that_boot_with_cloud_init() {
    if !prerequisites() {
        return;
    }
    let layout = debian_layout();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path());
    let base = reg.push_layout(&layout, "base", "edge/node:base");
    let cluster = bootc_cluster(dir.path());

    let cache1 = dir.path().join("cache1");
    let raw = build(&cache1, &cluster, &base, &dir.path().join("out"), "raw");
    let qcow2 = build(&cache1, &cluster, &base, &dir.path().join("out"), "qcow2");
    assert!(dir.path().join("out/edge-1.raw.bmap").is_file());

    // Independent checks of the disk: GPT, ESP, root.
    run(Command::new("sgdisk").arg("-v").arg(&raw));
    let esp = dir.path().join("esp.img");
    extract(&raw, ESP_OFFSET, ESP_BYTES, &esp);
    assert_fsck_clean("fsck.vfat", &esp);
    assert_fsck_clean("e2fsck", format!("{}?offset={ROOT_OFFSET}", raw.display()));
    let entries = stdout(
        Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-b", "-i"])
            .arg(&esp)
            .arg("::/loader/entries"),
    );
    assert!(entries.contains("kiln-"), "{entries}");
    // The QCOW2 is clean and holds exactly the RAW.
    run(Command::new("qemu-img").arg("check").arg(&qcow2));
    run(Command::new("qemu-img")
        .arg("compare")
        .arg(&raw)
        .arg(&qcow2));
    let info = stdout(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&qcow2),
    );
    assert!(
        !info.contains("backing-filename") && !info.contains("data-file"),
        "{info}"
    );

    // Boot the RAW with the node's NoCloud seed: cloud-init runs to the end and names the host.
    let console = boot(
        &cache1,
        &raw,
        &seeded_run(&cluster),
        &dir.path().join("console.log"),
    );
    assert!(console.contains("Cloud-init v."), "{console}");
    assert!(
        console.contains("edge-1 login:") || console.contains("root@edge-1"),
        "the hostname never appeared:\n{console}"
    );

    // The same inputs later, from an empty cache (pulled, unpacked, assembled again): same bytes.
    // The first build's files go before the second is made: one set of disks at a time keeps
    // the test's peak disk use to what a small CI machine has free.
    let (raw_sha, qcow2_sha) = (file_sha(&raw), file_sha(&qcow2));
    std::fs::remove_dir_all(&cache1).unwrap();
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let cache2 = dir.path().join("cache2");
    let raw2 = build(&cache2, &cluster, &base, &dir.path().join("out2"), "raw");
    let qcow2_2 = build(&cache2, &cluster, &base, &dir.path().join("out2"), "qcow2");
    assert_eq!(raw_sha, file_sha(&raw2));
    assert_eq!(qcow2_sha, file_sha(&qcow2_2));
}

#[test]
fn unprivileged_build_keeps_the_layers_owners_and_modes() {
    if !prerequisites() {
        return;
    }
    let layout = debian_layout();
    // A world-readable copy of the layout and a directory nobody may write.
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("w");
    std::fs::create_dir(&work).unwrap();
    run(Command::new("cp")
        .arg("-r")
        .arg(&layout)
        .arg(work.join("layout")));
    let cluster = bootc_cluster(&work);
    run(Command::new("chown").args(["-R", "nobody"]).arg(&work));
    run(Command::new("chmod").args(["755"]).arg(dir.path()));
    let base = format!("oci:{}:base", work.join("layout").display());

    run(Command::new("runuser")
        .args(["-u", "nobody", "--", "env"])
        .arg(format!("KILN_CACHE_DIR={}", work.join("cache").display()))
        .arg(format!("HOME={}", work.display()))
        .arg(kiln_bin())
        .args(["build", "--node", "edge-1", "--base", &base, "--cluster"])
        .arg(&cluster)
        .arg("--out")
        .arg(work.join("out")));
    let raw = work.join("out/edge-1.raw");
    assert_fsck_clean("e2fsck", format!("{}?offset={ROOT_OFFSET}", raw.display()));

    // What the layer says (read with Python's tarfile, not kiln) is what the image holds.
    let listed = stdout(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import json,sys,tarfile,os\n\
                 d=sys.argv[1]; idx=json.load(open(d+'/index.json'))\n\
                 m=json.load(open(d+'/blobs/sha256/'+idx['manifests'][0]['digest'][7:]))\n\
                 t=tarfile.open(d+'/blobs/sha256/'+m['layers'][0]['digest'][7:])\n\
                 for n in sys.argv[2:]:\n  i=t.getmember(n); print(n, oct(i.mode), i.uid, i.gid)",
            )
            .arg(&layout)
            .args([
                "etc/shadow",
                "usr/bin/chage",
                "var/mail",
                "usr/bin/passwd",
                "root",
            ]),
    );
    let mut non_root_owned = 0;
    for line in listed.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (mode, uid, gid) = stat_in_root(&raw, &format!("/{}", f[0]));
        let want_mode = u32::from_str_radix(f[1].trim_start_matches("0o"), 8).unwrap();
        assert_eq!(
            u32::from_str_radix(&mode, 8).unwrap() & 0o7777,
            want_mode,
            "{line}"
        );
        assert_eq!(
            (uid.to_string(), gid.to_string()),
            (f[2].into(), f[3].into()),
            "{line}"
        );
        if gid != 0 {
            non_root_owned += 1;
        }
    }
    assert!(
        non_root_owned >= 2,
        "the sample should include group-owned files: {listed}"
    );

    // And root builds the very same bytes.
    let cache = dir.path().join("root-cache");
    let raw_root = build(&cache, &cluster, &base, &dir.path().join("out-root"), "raw");
    assert_eq!(file_sha(&raw), file_sha(&raw_root));
}

#[test]
fn oci_append_pushes_a_deterministic_layer_that_pulls_back() {
    if !prerequisites() {
        return;
    }
    let layout = debian_layout();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path());
    let base = reg.push_layout(&layout, "base", "edge/node:base");
    // An overlay of the user's own, beside the working directory.
    let ov = dir.path().join("overlays/motd");
    std::fs::create_dir_all(ov.join("root/etc/kiln")).unwrap();
    std::fs::write(
        ov.join("overlay.toml"),
        "description = \"a message of the day\"\n\
         [[file]]\npath = \"/etc/kiln/motd\"\nmode = \"0640\"\ngroup = \"adm\"\n",
    )
    .unwrap();
    std::fs::write(ov.join("root/etc/kiln/motd"), "built by kiln\n").unwrap();

    let mut digests = Vec::new();
    for tag in ["v2", "v3"] {
        let out = stdout(
            kiln(&dir.path().join("cache"))
                .current_dir(dir.path())
                .args(["oci", "append", "--insecure", "--from", &base])
                .args(["--overlay", "motd", "--to"])
                .arg(format!("docker://{}/edge/node:{tag}", reg.addr)),
        );
        let layer = out
            .split("new layer ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("{out}"))
            .to_string();
        digests.push(layer);
    }
    assert_eq!(digests[0], digests[1], "two appends of one overlay differ");

    // Pulled back by skopeo: the new layer is last and holds the overlay file.
    let back = dir.path().join("back");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/edge/node:v2", reg.addr),
        &format!("oci:{}:v2", back.display()),
    ]));
    let check = stdout(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import json,sys,tarfile\n\
                 d=sys.argv[1]; idx=json.load(open(d+'/index.json'))\n\
                 m=json.load(open(d+'/blobs/sha256/'+idx['manifests'][0]['digest'][7:]))\n\
                 l=m['layers'][-1]['digest']\n\
                 t=tarfile.open(d+'/blobs/sha256/'+l[7:])\n\
                 i=t.getmember('etc/kiln/motd')\n\
                 print(l, len(m['layers']), oct(i.mode), i.uid, i.gid, t.extractfile(i).read().decode().strip())",
            )
            .arg(&back),
    );
    let f: Vec<&str> = check.split_whitespace().collect();
    assert_eq!(f[0], digests[0]);
    assert_eq!(f[1], "2");
    assert_eq!(&f[2..5], ["0o640", "0", "4"], "{check}"); // adm is gid 4 in Debian
    assert!(check.ends_with("built by kiln\n"), "{check}");
}

#[test]
fn a_shim_and_grub_image_boots_through_grub() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The Debian image plus a layer with bootupd's shim + GRUB and a whiteout for systemd-boot:
    // the shape of a Fedora/CentOS bootc image. Blobs are linked from the shared layout; the
    // index is copied, as oci-pack.py rewrites it.
    let lay = d.join("layout");
    run(Command::new("cp").arg("-al").arg(debian_layout()).arg(&lay));
    let index = std::fs::read(lay.join("index.json")).unwrap();
    std::fs::remove_file(lay.join("index.json")).unwrap();
    std::fs::write(lay.join("index.json"), index).unwrap();
    let shim_cache = repo().join("target/kiln-test-cache/shim-grub");
    run(Command::new("bash")
        .arg(repo().join("tests/fixtures/make-shim-grub-layer.sh"))
        .arg(d.join("bootupd-root"))
        .arg(&shim_cache));
    run(Command::new("/usr/bin/python3")
        .arg(repo().join("tests/fixtures/oci-pack.py"))
        .arg(d.join("bootupd-root"))
        .arg(&lay)
        .args(["shim", "--on", "base"]));

    let cluster = bootc_cluster(d);
    let cache = d.join("cache");
    let base = format!("oci:{}:shim", lay.display());
    let raw = build(&cache, &cluster, &base, &d.join("out"), "raw");

    // The ESP: shim where firmware looks on a new disk, GRUB beside it and in the vendor
    // directory, each with kiln's grub.cfg; no systemd-boot (the whiteout removed it).
    let shim = std::fs::read(shim_cache.join("x/usr/lib/shim/shimx64.efi.signed")).unwrap();
    assert!(mtype(&raw, ESP_OFFSET, "EFI/BOOT/BOOTX64.EFI") == shim);
    for dir in ["EFI/BOOT", "EFI/debian"] {
        let cfg = String::from_utf8(mtype(&raw, ESP_OFFSET, &format!("{dir}/grub.cfg"))).unwrap();
        assert!(
            cfg.contains("linux /kiln/") && cfg.contains("root=PARTUUID="),
            "{cfg}"
        );
    }
    let esp = d.join("esp.img");
    extract(&raw, ESP_OFFSET, ESP_BYTES, &esp);
    assert_fsck_clean("fsck.vfat", &esp);
    let listing = stdout(
        Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-/", "-b", "-i"])
            .arg(&esp)
            .arg("::/"),
    );
    assert!(!listing.to_lowercase().contains("systemd"), "{listing}");
    // The whiteout deleted the file from the root too; its directory stays.
    let gone = Command::new("debugfs")
        .arg("-R")
        .arg("stat /usr/lib/systemd/boot/efi/systemd-bootx64.efi")
        .arg(format!("{}?offset={ROOT_OFFSET}", raw.display()))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("File not found"),
        "{gone:?}"
    );
    assert_eq!(stat_in_root(&raw, "/usr/lib/systemd/boot/efi").0, "0755");

    // It boots: OVMF starts shim, shim starts GRUB, GRUB the kernel; cloud-init names the host.
    let console = boot(&cache, &raw, &seeded_run(&cluster), &d.join("console.log"));
    assert!(console.contains("Welcome to GRUB"), "{console}");
    assert!(
        console.contains("edge-1 login:") || console.contains("root@edge-1"),
        "the hostname never appeared:\n{console}"
    );
}

#[test]
fn an_arm64_image_becomes_a_disk_that_boots_under_aavmf() {
    let aavmf = Path::new("/usr/share/AAVMF/AAVMF_CODE.fd").exists();
    let tools = [
        "qemu-system-aarch64",
        "cpio",
        "curl",
        "dpkg-deb",
        "sgdisk",
        "fsck.vfat",
        "e2fsck",
        "mke2fs",
        "debugfs",
        "mtype",
    ];
    if !have_tools(&tools) {
        return;
    }
    if !aavmf {
        skip("AAVMF (qemu-efi-aarch64) is missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Debian's arm64 kernel and systemd-boot with a busybox initramfs that prints its command line.
    let debs = repo().join("target/kiln-test-cache/arm64-debs");
    let lay = d.join("layout");
    run(Command::new("bash")
        .arg(repo().join("tests/fixtures/make-arm64-oci.sh"))
        .arg(&lay)
        .arg(&debs));
    let cluster = bootc_cluster(d);
    let text = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(&cluster, text.replace("bootc-uefi-x86", "bootc-uefi-arm64")).unwrap();
    let cache = d.join("cache");
    let raw = build(
        &cache,
        &cluster,
        &format!("oci:{}:base", lay.display()),
        &d.join("out"),
        "raw",
    );

    // The arm64 shape, checked by sgdisk, fsck.vfat, e2fsck and mtools.
    let part = stdout(Command::new("sgdisk").args(["-i", "2"]).arg(&raw));
    assert!(part.contains("Linux ARM64 root"), "{part}");
    let guid = part
        .lines()
        .find_map(|l| l.strip_prefix("Partition unique GUID: "))
        .unwrap()
        .trim()
        .to_lowercase();
    let loader =
        std::fs::read(debs.join("x/usr/lib/systemd/boot/efi/systemd-bootaa64.efi")).unwrap();
    assert!(mtype(&raw, ESP_OFFSET, "EFI/BOOT/BOOTAA64.EFI") == loader);
    let esp = d.join("esp.img");
    extract(&raw, ESP_OFFSET, ESP_BYTES, &esp);
    assert_fsck_clean("fsck.vfat", &esp);
    assert_fsck_clean("e2fsck", format!("{}?offset={ROOT_OFFSET}", raw.display()));

    // AAVMF -> systemd-boot -> the kernel and initramfs with kiln's command line.
    let args = [
        "--arch",
        "aarch64",
        "--until",
        "kiln-arm64-init:",
        "--timeout",
        "600",
    ];
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let console = boot(&cache, &raw, &args, &d.join("console.log"));
    let line = console
        .lines()
        .find(|l| l.starts_with("kiln-arm64-init:"))
        .unwrap_or_else(|| panic!("{console}"));
    assert!(line.contains(" aarch64 "), "{line}");
    assert!(
        line.contains(&format!("root=PARTUUID={guid} ")) && line.contains("console=ttyAMA0"),
        "{line}"
    );
}

/// Issue 22: a CNI folder, named by its path, is appended as a layer like an overlay: conf/ in
/// etc/cni/net.d (0644), bin/ in opt/cni/bin (0755), read back from the pulled layer by tarfile.
#[test]
fn oci_append_takes_a_cni_folder_by_its_path() {
    if !prerequisites() {
        return;
    }
    let layout = debian_layout();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path());
    let base = reg.push_layout(&layout, "base", "edge/node:base");
    loopback_cni_folder(dir.path());
    run(kiln(&dir.path().join("cache"))
        .current_dir(dir.path())
        .args(["oci", "append", "--insecure", "--from", &base])
        .args(["--overlay", "./cni", "--to"])
        .arg(format!("docker://{}/edge/node:cni", reg.addr)));
    let back = dir.path().join("back");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/edge/node:cni", reg.addr),
        &format!("oci:{}:cni", back.display()),
    ]));
    let modes = stdout(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import json,sys,tarfile\n\
                 d=sys.argv[1]; idx=json.load(open(d+'/index.json'))\n\
                 m=json.load(open(d+'/blobs/sha256/'+idx['manifests'][0]['digest'][7:]))\n\
                 t=tarfile.open(d+'/blobs/sha256/'+m['layers'][-1]['digest'][7:])\n\
                 for n in ['etc/cni/net.d/99-loopback.conf', 'opt/cni/bin/loopback']:\n\
                 \x20   i=t.getmember(n); print(n, oct(i.mode), i.uid, i.gid)",
            )
            .arg(&back),
    );
    assert_eq!(
        modes,
        "etc/cni/net.d/99-loopback.conf 0o644 0 0\nopt/cni/bin/loopback 0o755 0 0\n"
    );
}
