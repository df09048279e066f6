//! postmarketOS phones: `kiln build` on a pmOS-layout image made by sgdisk (4096-byte sectors),
//! mkfs.vfat and mkfs.ext4, judged by e2fsck, debugfs, NetworkManager's own keyfile parser and
//! Python's crypt; Android sparse output judged by simg2img; fastboot delivery through Debian's
//! `fastboot` to a fake phone on loopback (tests/fixtures/fake-fastboot.py).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const TOOLS: &[&str] = &[
    "sgdisk",
    "losetup",
    "mkfs.vfat",
    "mcopy",
    "mkfs.ext4",
    "debugfs",
    "e2fsck",
    "fsck.vfat",
    "openssl",
    "nmcli",
    "simg2img",
    "img2simg",
    "fastboot",
];

fn ready() -> bool {
    if !is_root() {
        return skip("the pmOS fixture needs root (losetup --sector-size 4096)");
    }
    have_tools(TOOLS)
}

/// Byte offset of GPT partition `n` (1-based) of a 4096-byte-sector image, read the way the
/// UEFI spec lays it out (independently of kiln's reader).
fn partition(img: &Path, n: usize) -> (u64, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(img).unwrap();
    let mut h = [0u8; 92];
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..8], b"EFI PART");
    let lba = u64::from_le_bytes(h[72..80].try_into().unwrap());
    let mut e = [0u8; 128];
    f.seek(SeekFrom::Start(lba * 4096 + 128 * (n as u64 - 1)))
        .unwrap();
    f.read_exact(&mut e).unwrap();
    let first = u64::from_le_bytes(e[32..40].try_into().unwrap());
    let last = u64::from_le_bytes(e[40..48].try_into().unwrap());
    (first * 4096, (last - first + 1) * 4096)
}

fn debugfs(img: &Path, off: u64, req: &str) -> String {
    stdout(
        Command::new("debugfs")
            .arg("-R")
            .arg(req)
            .arg(format!("{}?offset={off}", img.display())),
    )
}

/// (mode, uid, gid) of a path, from `debugfs stat`.
fn owner_mode(img: &Path, off: u64, path: &str) -> (String, String, String) {
    let s = debugfs(img, off, &format!("stat \"{path}\""));
    let field = |k: &str| {
        s.split(k)
            .nth(1)
            .and_then(|x| x.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {k} for {path}: {s}"))
            .to_string()
    };
    (field("Mode:"), field("User:"), field("Group:"))
}

fn cloudlet(dir: &Path) -> PathBuf {
    example_cluster("cloudlet", dir)
}

/// A temporary directory with the cloudlet example, a kiln cache, `out/` and a pmOS base image
/// (`init` is "openrc" or "systemd").
struct Lab {
    t: tempfile::TempDir,
    cache: PathBuf,
    cluster: PathBuf,
    base: PathBuf,
    out: PathBuf,
}

fn lab(init: &str) -> Lab {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join(format!("pmos-{init}.img"));
    run(Command::new("bash")
        .arg(repo().join("tests/fixtures/make-pmos-layout.sh"))
        .arg(&base)
        .arg(init));
    Lab {
        cache: t.path().join("cache"),
        cluster: cloudlet(t.path()),
        out: t.path().join("out"),
        base,
        t,
    }
}

impl Lab {
    fn build(&self, node: &str) -> PathBuf {
        build(
            &self.cache,
            &self.cluster,
            node,
            self.base.as_os_str(),
            &self.out,
        );
        self.out.join(format!("{node}.img"))
    }

    /// `kiln flash --yes --node NODE SERIAL` (building the node on the way).
    fn flash_node(&self, node: &str, serial: &str) -> std::process::Output {
        kiln(&self.cache)
            .args(["flash", "--yes", "--node", node, "--cluster"])
            .arg(&self.cluster)
            .arg("--base")
            .arg(&self.base)
            .arg("--out")
            .arg(&self.out)
            .arg(serial)
            .output()
            .unwrap()
    }
}

#[test]
fn a_phone_image_has_everything_and_independent_tools_agree() {
    if !ready() {
        return;
    }
    let lab = lab("openrc");
    let img = lab.build("munga-2");
    let mgr = lab.build("munga");
    let (root, _) = partition(&img, 2);
    let (boot, boot_len) = partition(&img, 1);

    assert_fsck_clean("e2fsck", format!("{}?offset={root}", img.display()));
    let esp = lab.t.path().join("boot.fat");
    extract(&img, boot, boot_len, &esp);
    assert_fsck_clean("fsck.vfat", &esp);

    assert_eq!(debugfs(&img, root, "cat /etc/hostname"), "munga-2\n");
    assert!(debugfs(&img, root, "cat /etc/hosts").contains("127.0.1.1\tmunga-2"));
    // The admin's key, owned by the user, private.
    assert_eq!(
        owner_mode(&img, root, "/home/user/.ssh"),
        ("0700".into(), "10000".into(), "10000".into())
    );
    assert_eq!(
        owner_mode(&img, root, "/home/user/.ssh/authorized_keys"),
        ("0600".into(), "10000".into(), "10000".into())
    );
    assert!(debugfs(&img, root, "cat /home/user/.ssh/authorized_keys").contains("admin@laptop"));
    // Services at boot: OpenRC runlevel links.
    for (link, target) in [
        ("/etc/runlevels/default/docker", "/etc/init.d/docker"),
        ("/etc/runlevels/default/sshd", "/etc/init.d/sshd"),
        ("/etc/runlevels/default/local", "/etc/init.d/local"),
    ] {
        let s = debugfs(&img, root, &format!("stat \"{link}\""));
        assert!(
            s.contains("Type: symlink") && s.contains(&format!("\"{target}\"")),
            "{link}: {s}"
        );
    }
    // The swarm job: root-only token and env, an executable local.d script.
    assert_eq!(
        owner_mode(&img, root, "/etc/kiln/swarm.token"),
        ("0600".into(), "0".into(), "0".into())
    );
    assert!(debugfs(&img, root, "cat /etc/kiln/swarm.env").contains("ROLE=join"));
    assert_eq!(
        owner_mode(&img, root, "/etc/local.d/kiln-swarm.start").0,
        "0755"
    );
    // The manager initialises instead, and has no token.
    assert!(debugfs(&mgr, root, "cat /etc/kiln/swarm.env").contains("ROLE=init"));
    assert!(!debugfs(&mgr, root, "ls /etc/kiln").contains("swarm.token"));

    // The wifi keyfile: root-only, and NetworkManager's own parser accepts it.
    let kf = "/etc/NetworkManager/system-connections/cloudlet.nmconnection";
    assert_eq!(
        owner_mode(&img, root, kf),
        ("0600".into(), "0".into(), "0".into())
    );
    let keyfile = debugfs(&img, root, &format!("cat {kf}"));
    let nm = |text: &str| {
        let mut c = Command::new("nmcli")
            .args([
                "--offline",
                "connection",
                "modify",
                "connection.autoconnect",
                "yes",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let parsed = nm(&keyfile);
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let parsed = String::from_utf8_lossy(&parsed.stdout);
    assert!(
        parsed.contains("ssid=cloudlet")
            && parsed.contains("address1=192.168.50.11/24,192.168.50.1")
    );
    assert!(parsed.contains("autoconnect-priority=10"), "{parsed}");
    // A negative control: NetworkManager refuses a broken keyfile.
    assert!(
        !nm(&keyfile.replace("ssid=cloudlet", "ssid="))
            .status
            .success()
    );
    // Another phone, another connection UUID.
    let other = debugfs(&mgr, root, &format!("cat {kf}"));
    let uuid = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("uuid="))
            .unwrap()
            .to_string()
    };
    assert_ne!(uuid(&keyfile), uuid(&other));

    // The default password is gone; the cluster's is in place (checked by Python's crypt).
    let shadow = debugfs(&img, root, "cat /etc/shadow");
    let hash = shadow
        .lines()
        .find(|l| l.starts_with("user:"))
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .to_string();
    let check = |pw: &str| {
        stdout(Command::new("/usr/bin/python3").args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], sys.argv[2]) == sys.argv[2])",
            pw,
            &hash,
        ]))
    };
    assert_eq!(check("example-only-password").trim(), "True");
    assert_eq!(check("147147").trim(), "False");

    // Reproducible: a second build elsewhere gives the same image.
    let out2 = lab.t.path().join("out2");
    build(
        &lab.cache,
        &lab.cluster,
        "munga-2",
        lab.base.as_os_str(),
        &out2,
    );
    assert_eq!(
        std::fs::read_to_string(lab.out.join("munga-2.img.sha256sum")).unwrap(),
        std::fs::read_to_string(out2.join("munga-2.img.sha256sum")).unwrap()
    );
}

#[test]
fn the_default_password_is_refused_unless_the_cluster_sets_one() {
    if !ready() {
        return;
    }
    let lab = lab("openrc");
    let text = std::fs::read_to_string(&lab.cluster).unwrap();
    // The cluster's admin is someone else; pmbootstrap's "user" would keep 147147.
    std::fs::write(
        &lab.cluster,
        text.replace("name = \"user\"", "name = \"admin\""),
    )
    .unwrap();
    let o = kiln(&lab.cache)
        .args(["build", "--node", "munga-2", "--cluster"])
        .arg(&lab.cluster)
        .arg("--base")
        .arg(&lab.base)
        .arg("--out")
        .arg(&lab.out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("147147") && err.contains("\"user\""), "{err}");
    let left: Vec<_> = std::fs::read_dir(&lab.out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "out/ holds {left:?}");
}

#[test]
fn android_sparse_output_expands_to_the_same_bytes() {
    if !ready() {
        return;
    }
    let lab = lab("openrc");
    let (t, cache, cluster, base, out) = (&lab.t, &lab.cache, &lab.cluster, &lab.base, &lab.out);
    build(cache, cluster, "munga-3", base.as_os_str(), out);
    let img = out.join("munga-3.img");
    let simg = out.join("munga-3.simg");
    run(kiln(cache)
        .args(["convert"])
        .arg(&img)
        .args(["--to", "android-sparse"])
        .arg(&simg));
    let back = t.path().join("back.img");
    run(Command::new("simg2img").arg(&simg).arg(&back));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&img).unwrap());
    // Split by a download size: every piece is a whole sparse image; together they are the image.
    let split = out.join("split.simg");
    let o = stdout(
        kiln(cache)
            .args(["convert"])
            .arg(&img)
            .args(["--to", "android-sparse", "--max-size", "64K"])
            .arg(&split),
    );
    let pieces: Vec<PathBuf> = o
        .lines()
        .map(|l| PathBuf::from(l.split_whitespace().next().unwrap()))
        .collect();
    assert!(pieces.len() > 2, "{o}");
    for p in &pieces {
        assert!(std::fs::metadata(p).unwrap().len() <= 64 << 10);
    }
    let back2 = t.path().join("back2.img");
    run(Command::new("simg2img").args(&pieces).arg(&back2));
    assert!(std::fs::read(&back2).unwrap() == std::fs::read(&img).unwrap());
}

struct FakePhone {
    child: Child,
    serial: String,
    part: PathBuf,
    log: PathBuf,
}

impl Drop for FakePhone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fake_phone(dir: &Path, name: &str, product: &str, size: u64) -> FakePhone {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let part = dir.join(format!("{name}.userdata"));
    let log = dir.join(format!("{name}.log"));
    let child = Command::new("/usr/bin/python3")
        .arg(repo().join("tests/fixtures/fake-fastboot.py"))
        .args(["--port", &port.to_string(), "--product", product])
        .arg("--partition")
        .arg(format!("userdata={}:{size}", part.display()))
        // Small, so fastboot has to split the image into several downloads.
        .args(["--max-download-size", "0x20000"])
        .arg("--log")
        .arg(&log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    FakePhone {
        child,
        serial: format!("tcp:127.0.0.1:{port}"),
        part,
        log,
    }
}

fn prefix_equals(part: &Path, img: &Path) -> bool {
    let a = std::fs::read(part).unwrap();
    let b = std::fs::read(img).unwrap();
    a.len() >= b.len() && a[..b.len()] == b[..]
}

#[test]
fn fastboot_delivers_exactly_the_image_and_refuses_the_wrong_phone() {
    if !ready() {
        return;
    }
    let lab = lab("openrc");
    let (t, cache, base, out) = (&lab.t, &lab.cache, &lab.base, &lab.out);
    let size = std::fs::metadata(base).unwrap().len();

    // Debian's fastboot talks to the fake phone on its own.
    let phone = fake_phone(t.path(), "a", "flame", size + (8 << 20));
    let v = Command::new("fastboot")
        .args(["-s", &phone.serial, "getvar", "product"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stderr).contains("product: flame"));

    // kiln flash --node: build, sparse, check, flash in pieces, reboot.
    let o = lab.flash_node("munga-2", &phone.serial);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(prefix_equals(&phone.part, &out.join("munga-2.img")));
    let log = std::fs::read_to_string(&phone.log).unwrap();
    assert!(log.matches("flash:userdata").count() > 1, "{log}");
    assert!(log.contains("reboot"), "{log}");

    // img2simg's output of the same image goes through the same path to the same bytes.
    let ref_simg = t.path().join("ref.simg");
    run(Command::new("img2simg")
        .arg(out.join("munga-2.img"))
        .arg(&ref_simg));
    let phone_b = fake_phone(t.path(), "b", "flame", size + (8 << 20));
    run(kiln(cache).args(["flash", "--yes"]).arg(&ref_simg).args([
        "--fastboot",
        &phone_b.serial,
        "--product",
        "flame",
    ]));
    assert!(std::fs::read(&phone_b.part).unwrap() == std::fs::read(&phone.part).unwrap());

    // Refusals happen before anything is sent: the wrong product, a partition too small, no phone.
    let wrong = fake_phone(t.path(), "c", "sunfish", size + (8 << 20));
    let small = fake_phone(t.path(), "d", "flame", 64 << 20);
    for (p, expect) in [(&wrong, "sunfish"), (&small, "holds")] {
        let o = lab.flash_node("munga-2", &p.serial);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains(expect) && err.contains("nothing was written"),
            "{err}"
        );
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        assert!(
            !log.contains("download") && !log.contains("flash:"),
            "{log}"
        );
    }
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = kiln(cache)
        .args(["flash", "--yes"])
        .arg(&ref_simg)
        .args(["--fastboot", &format!("tcp:127.0.0.1:{gone}")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing was written"));
}

/// Services are enabled the image's way: on a systemd root, `wants` links and a oneshot unit for
/// the swarm instead of OpenRC runlevels and local.d.
#[test]
fn a_systemd_root_gets_wants_links_instead_of_runlevels() {
    if !ready() {
        return;
    }
    let lab = lab("systemd");
    let img = lab.build("munga-4");
    let (root, _) = partition(&img, 2);
    for (link, target) in [
        (
            "/etc/systemd/system/multi-user.target.wants/docker.service",
            "/usr/lib/systemd/system/docker.service",
        ),
        (
            "/etc/systemd/system/multi-user.target.wants/sshd.service",
            "/usr/lib/systemd/system/sshd.service",
        ),
        (
            "/etc/systemd/system/multi-user.target.wants/kiln-swarm.service",
            "/etc/systemd/system/kiln-swarm.service",
        ),
    ] {
        let s = debugfs(&img, root, &format!("stat \"{link}\""));
        assert!(
            s.contains("Type: symlink") && s.contains(&format!("\"{target}\"")),
            "{link}: {s}"
        );
    }
    assert!(!debugfs(&img, root, "ls /etc/runlevels/default").contains("docker"));
    assert!(
        debugfs(&img, root, "cat /etc/systemd/system/kiln-swarm.service").contains("kiln-swarm")
    );
}
