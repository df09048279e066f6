//! Helpers shared by the integration tests: run the built kiln, run independent tools, skip (or,
//! with KILN_REQUIRE_TOOLS=1 as in CI, fail) when a tool is missing.
#![allow(dead_code)]

pub mod bmo;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A kiln command with its own cache directory. Without sudo's variables even when the suite
/// runs under sudo: as root with them, `flash --node` builds as that user (util/sudo.rs), who may
/// not write the tests' root-owned temporary directories.
pub fn kiln(cache: &Path) -> Command {
    let mut c = Command::new(kiln_bin());
    c.env("KILN_CACHE_DIR", cache)
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID");
    c
}

/// True when every tool is on PATH. Otherwise the test is skipped with a message — unless
/// KILN_REQUIRE_TOOLS=1 (CI), where a missing tool is a failure, so CI cannot pass by skipping.
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!("missing tools {}", missing.join(", ")))
}

/// Skips the calling test (returns false) with `why` — or, under KILN_REQUIRE_TOOLS=1, fails it.
pub fn skip(why: &str) -> bool {
    if std::env::var("KILN_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("test prerequisites missing: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// Whether the tests run as root (loop devices, chroots, mounts need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("utf-8 output")
}

/// Boots `image` with `kiln run IMAGE ARGS --log LOG` and returns what the serial console showed;
/// when kiln run fails (timeout, QEMU error) the panic carries its stderr and the console's last
/// 60 lines, which is where a boot that went wrong says why.
pub fn boot(cache: &Path, image: &Path, args: &[&std::ffi::OsStr], log: &Path) -> String {
    let out = kiln(cache)
        .arg("run")
        .arg(image)
        .args(args)
        .arg("--log")
        .arg(log)
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    assert!(
        out.status.success(),
        "kiln run {} failed ({}): {}\nlast console lines:\n{}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        last_lines(&console, 60)
    );
    console
}

/// Runs `cmd` with stderr captured and fails the test if it has not finished within a minute:
/// for inputs (a FIFO, /dev/zero) that once made kiln wait or read forever.
pub fn output_within_a_minute(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{cmd:?} hung for a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{cmd:?} panicked:\n{err}");
    out
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Makes the sfdisk + mkfs.vfat + mkfs.ext4 HypriotOS-layout fixture.
pub fn hypriot_fixture(dir: &Path) -> PathBuf {
    let img = dir.join("hypriot-layout.img");
    run(Command::new("bash")
        .arg(repo().join("tests/fixtures/make-hypriot-layout.sh"))
        .arg(&img));
    img
}

/// Copies an example cluster (with its secrets) into `dir` and returns the cluster file path.
pub fn example_cluster(name: &str, dir: &Path) -> PathBuf {
    let src = repo().join("examples").join(name);
    copy_tree(&src, &dir.join(name));
    dir.join(name).join("cluster.toml")
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// `sfdisk --json` of an image, parsed.
pub fn sfdisk_json(img: &Path) -> serde_json::Value {
    serde_json::from_str(&stdout(Command::new("sfdisk").arg("--json").arg(img))).unwrap()
}

/// Reads one file from a FAT partition at `offset` with mtools.
pub fn mtype(img: &Path, offset: u64, name: &str) -> Vec<u8> {
    run(Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", img.display()))
        .arg(format!("::{name}")))
    .stdout
}

/// Extracts `len` bytes at `offset` into a file (for fsck tools that want a whole device).
pub fn extract(img: &Path, offset: u64, len: u64, to: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    std::fs::write(to, buf).unwrap();
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// `kiln build --node NODE --cluster CLUSTER --base BASE --out OUT`, which must succeed.
pub fn build(cache: &Path, cluster: &Path, node: &str, base: &std::ffi::OsStr, out: &Path) {
    run(&mut build_command(cache, cluster, node, base, out));
}

/// `kiln build --node NODE --cluster CLUSTER --base BASE --out OUT`, not yet run.
pub fn build_command(
    cache: &Path,
    cluster: &Path,
    node: &str,
    base: &std::ffi::OsStr,
    out: &Path,
) -> Command {
    let mut c = kiln(cache);
    c.args(["build", "--node", node, "--cluster"])
        .arg(cluster)
        .arg("--base")
        .arg(base)
        .arg("--out")
        .arg(out);
    c
}

/// A small UEFI disk (GPT, FAT32 ESP, ext4 root) made by sgdisk, mkfs.vfat and mkfs.ext4.
pub fn uefi_fixture(dir: &Path) -> PathBuf {
    let img = dir.join("uefi-layout.img");
    run(Command::new("bash")
        .arg(repo().join("tests/fixtures/make-uefi-layout.sh"))
        .arg(&img));
    img
}

/// Runs a filesystem checker in no-change mode (`fsck.vfat -n FILE`, `e2fsck -fn FILE?offset=N`)
/// and fails the test with its report unless it finds the filesystem clean.
pub fn assert_fsck_clean(tool: &str, target: impl AsRef<std::ffi::OsStr>) {
    let flag = if tool == "e2fsck" { "-fn" } else { "-n" };
    let o = Command::new(tool).arg(flag).arg(target).output().unwrap();
    assert!(
        o.status.success(),
        "{tool}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A cluster with one bare-metal node, edge-1, on the bootc-uefi-x86 profile (tests/oci*.rs).
pub fn bootc_cluster(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("bmc.password"), "secret\n").unwrap();
    let path = dir.join("cluster.toml");
    std::fs::write(
        &path,
        r#"
[cluster]
name = "edge"
seed = "edge-test"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnExampleKeyReplaceMeWithYourOwnKey0001 admin@laptop"]

[[users]]
name = "admin"
groups = ["adm", "sudo"]
sudo = true

[defaults]
image = "bootc-uefi-x86"
bmc = { address = "redfish+http://127.0.0.1:8000/redfish/v1/Systems/{name}", username = "metal3", password = { file = "bmc.password" } }

[[node]]
name = "edge-1"
boot_mac = "52:54:00:0e:d9:01"
"#,
    )
    .unwrap();
    path
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(addr: &str, what: &str, child: &mut std::process::Child) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what} did not start on {addr}");
}

/// Debian's docker-registry on a free loopback port, storing under `dir`, plain HTTP; with
/// `token`, it wants bearer tokens from tests/fixtures/token-server.py. Killed on drop.
pub struct Registry {
    children: Vec<std::process::Child>,
    pub addr: String,
    /// The token server's directory (its `requests` log), when there is one.
    pub token_dir: Option<PathBuf>,
}

/// Who may use a token-auth registry.
pub struct TokenAuth<'a> {
    pub user: &'a str,
    pub password: &'a str,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Self::start_with(dir, None)
    }

    pub fn start_with(dir: &Path, token: Option<TokenAuth>) -> Registry {
        let mut children = Vec::new();
        let mut auth = String::new();
        let mut token_dir = None;
        if let Some(t) = token {
            let tdir = dir.join("token-server");
            std::fs::create_dir_all(&tdir).unwrap();
            let mut child = Command::new("python3")
                .arg(repo().join("tests/fixtures/token-server.py"))
                .arg(&tdir)
                .args([t.user, t.password])
                .stderr(std::fs::File::create(tdir.join("stderr")).unwrap())
                .spawn()
                .unwrap();
            let port_file = tdir.join("port");
            for _ in 0..200 {
                if port_file.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let port = std::fs::read_to_string(&port_file).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "the token server did not start: {}",
                    std::fs::read_to_string(tdir.join("stderr")).unwrap_or_default()
                )
            });
            wait_for_port(&format!("127.0.0.1:{port}"), "the token server", &mut child);
            children.push(child);
            auth = format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{port}/token\n    \
                 service: kiln-test-registry\n    issuer: kiln-test-issuer\n    \
                 rootcertbundle: {}\n",
                tdir.join("cert.pem").display()
            );
            token_dir = Some(tdir);
        }
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n{auth}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(dir.join("registry.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("registry.err")).unwrap())
            .spawn()
            .unwrap();
        wait_for_port(&addr, "docker-registry", &mut child);
        children.push(child);
        Registry {
            children,
            addr,
            token_dir,
        }
    }

    /// Pushes an OCI layout with skopeo (not kiln) as `name`; `creds` is `user:password`.
    pub fn push_layout_as(
        &self,
        layout: &Path,
        tag: &str,
        name: &str,
        creds: Option<&str>,
    ) -> String {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(creds) = creds {
            c.args(["--dest-creds", creds]);
        }
        run(c.args([
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{}/{name}", self.addr),
        ]));
        format!("docker://{}/{name}", self.addr)
    }

    pub fn push_layout(&self, layout: &Path, tag: &str, name: &str) -> String {
        self.push_layout_as(layout, tag, name, None)
    }

    /// The token server's log: one JSON object per token request.
    pub fn token_requests(&self) -> Vec<serde_json::Value> {
        let dir = self.token_dir.as_ref().expect("a token-auth registry");
        std::fs::read_to_string(dir.join("requests"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The image `script` makes, built once per target directory as `name.img`.
pub fn cached_image(name: &str, script: &str) -> PathBuf {
    let cache = repo().join("target/kiln-test-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let img = cache.join(format!("{name}.img"));
    if !img.exists() {
        let tmp = cache.join(format!("{name}.img.partial"));
        run(std::process::Command::new("bash")
            .arg(repo().join("tests/fixtures").join(script))
            .arg(&tmp)
            .arg(cache.join(format!("{name}-work"))));
        std::fs::rename(&tmp, &img).unwrap();
    }
    img
}

/// The tools every QEMU boot test needs to build its Debian fixture and boot it.
pub const BOOT_TOOLS: &[&str] = &[
    "debootstrap",
    "qemu-system-x86_64",
    "sfdisk",
    "mkfs.vfat",
    "mcopy",
    "mkfs.ext4",
    "dumpe2fs",
    "debugfs",
];

/// `dir/cni`: the smallest CNI folder — a loopback conf and an executable `loopback` in bin/.
pub fn loopback_cni_folder(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let cni = dir.join("cni");
    std::fs::create_dir_all(cni.join("conf")).unwrap();
    std::fs::create_dir_all(cni.join("bin")).unwrap();
    std::fs::write(
        cni.join("conf/99-loopback.conf"),
        r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
    )
    .unwrap();
    std::fs::write(cni.join("bin/loopback"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(
        cni.join("bin/loopback"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    cni
}
