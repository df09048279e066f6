//! Bad input gets a clear error naming the file, line and fix, a non-zero exit, and nothing is
//! left in the output directory.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const GOOD: &str = r#"[cluster]
name = "t"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnTestKeyTestKeyTestKey test"]

[defaults]
image = "hypriot-rpi"

[[node]]
name = "one"
network.eth0 = { address = "10.9.0.11/24", gateway = "10.9.0.1" }
"#;

/// Runs `kiln check` on `text` and returns (success, stderr).
fn check(text: &str) -> (bool, String) {
    check_in(tempfile::tempdir().unwrap().path(), text, &[])
}

fn refused(text: &str, expect: &[&str]) {
    let (ok, err) = check(text);
    assert!(!ok, "kiln accepted:\n{text}");
    for e in expect {
        assert!(err.contains(e), "error does not mention {e:?}:\n{err}");
    }
}

#[test]
fn the_good_file_passes() {
    let (ok, err) = check(GOOD);
    assert!(ok, "{err}");
}

#[test]
fn unknown_key_names_file_and_line() {
    refused(
        &GOOD.replace("gateway = ", "gatway = "),
        &["cluster.toml:10:", "unknown field `gatway`"],
    );
    refused(
        &format!("{GOOD}\n[extra]\nx = 1\n"),
        &["cluster.toml:12:", "unknown field `extra`"],
    );
}

#[test]
fn invalid_hostname_address_and_prefix() {
    refused(
        &GOOD.replace("name = \"one\"", "name = \"one_1\""),
        &["cluster.toml:9:", "not a valid host name"],
    );
    refused(
        &GOOD.replace("10.9.0.11/24", "10.9.0.11"),
        &["cluster.toml:10:", "add the prefix length"],
    );
    refused(
        &GOOD.replace("10.9.0.11/24", "10.9.0.311/24"),
        &["cluster.toml:10:", "not an address with a prefix"],
    );
    refused(
        &GOOD.replace("10.9.0.11/24", "10.9.0.11/33"),
        &["not an address with a prefix"],
    );
    refused(
        &GOOD.replace("10.9.0.11/24", "10.9.0.0/24"),
        &["network or broadcast address"],
    );
    refused(
        &GOOD.replace("gateway = \"10.9.0.1\"", "gateway = \"10.8.0.1\""),
        &["cluster.toml:10:", "outside 10.9.0.0/24"],
    );
}

#[test]
fn duplicate_names_and_addresses() {
    let dup_name = format!("{GOOD}\n[[node]]\nname = \"one\"\n");
    refused(&dup_name, &["cluster.toml:13:", "defined twice"]);
    let dup_addr = format!(
        "{GOOD}\n[[node]]\nname = \"two\"\nnetwork.eth0 = {{ address = \"10.9.0.11/24\" }}\n"
    );
    refused(&dup_addr, &["cluster.toml:14:", "already used by node one"]);
}

#[test]
fn secrets_and_wifi() {
    let wifi = format!(
        "{GOOD}\n[defaults.wifi]\nssid = \"ceil\"\npsk = {{ file = \"nope.psk\" }}\ncountry = \"DE\"\n"
    );
    // [defaults.wifi] is appended after the nodes; TOML still reads it as part of [defaults].
    refused(
        &wifi,
        &["cluster.toml:14:", "cannot read wifi psk", "nope.psk"],
    );
    let no_country = format!(
        "{GOOD}\n[defaults.wifi]\nssid = \"ceil\"\npsk = {{ env = \"KILN_TEST_PSK_UNSET\" }}\n"
    );
    refused(
        &no_country,
        &[
            "wifi needs a country code",
            "KILN_TEST_PSK_UNSET is not set",
        ],
    );
    let inline =
        format!("{GOOD}\n[defaults.wifi]\nssid = \"ceil\"\npsk = \"plain\"\ncountry = \"DE\"\n");
    refused(&inline, &["cluster.toml:14:"]);
}

#[test]
fn swarm_without_manager_or_token() {
    refused(
        &format!("{GOOD}\n[swarm]\nmanagers = []\n"),
        &["cluster.toml:13:", "no manager to join"],
    );
    let with_worker =
        format!("{GOOD}\n[[node]]\nname = \"two\"\n\n[swarm]\nmanagers = [\"one\"]\n");
    refused(&with_worker, &["worker join token"]);
    refused(
        &format!("{GOOD}\n[swarm]\nmanagers = [\"zzz\"]\n"),
        &["manager \"zzz\" is not a node"],
    );
}

#[test]
fn passwords_are_hashes_or_files() {
    let plain = format!("{GOOD}\n[[users]]\nname = \"admin\"\npassword_hash = \"hunter2\"\n");
    refused(&plain, &["cluster.toml:14:", "not a crypt(3) hash"]);
    let bad_key = GOOD.replace("ssh-ed25519 AAAA", "ssh-ed25519\nAAAA");
    assert!(!check(&bad_key).0);
}

fn only_fixture_files_left(out: &Path) {
    let names: Vec<String> = std::fs::read_dir(out)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        names.is_empty(),
        "out/ holds {names:?} after a failed build"
    );
}

#[test]
fn wrong_base_checksum_is_refused_and_out_stays_empty() {
    if !have_tools(&["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    let out = dir.path().join("out");
    let o = kiln(&dir.path().join("cache"))
        .args(["build", "--node", "ceil-one", "--cluster"])
        .arg(&cluster)
        .arg("--base")
        .arg(&base)
        .args(["--base-sha256", &"0".repeat(64), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    only_fixture_files_left(&out);
}

#[test]
fn base_without_the_promised_partitions_is_refused() {
    if !have_tools(&["sfdisk", "mkfs.vfat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = example_cluster("ceil", dir.path());
    let out = dir.path().join("out");
    // One FAT partition only: no root partition 2.
    let img = dir.path().join("one-part.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let mut sf = Command::new("sfdisk");
    sf.arg("--quiet")
        .arg(&img)
        .stdin(std::process::Stdio::piped());
    let mut child = sf.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=131072, type=c\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let build = |img: &Path| {
        kiln(&dir.path().join("cache"))
            .args(["build", "--node", "ceil-one", "--cluster"])
            .arg(&cluster)
            .arg("--base")
            .arg(img)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = build(&img);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("expects partition 2") && err.contains("found mbr table with #1"),
        "{err}"
    );
    only_fixture_files_left(&out);

    // A base that is no disk image at all.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0x42u8; 1 << 20]).unwrap();
    let o = build(&junk);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no partition table"));
    only_fixture_files_left(&out);
}

#[test]
fn truncated_archive_is_refused() {
    if !have_tools(&["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "xz"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    run(Command::new("xz").args(["-T0", "-1", "-k"]).arg(&base));
    let xz = dir.path().join("hypriot-layout.img.xz");
    let bytes = std::fs::read(&xz).unwrap();
    std::fs::write(&xz, &bytes[..bytes.len() / 2]).unwrap();
    let cluster = example_cluster("ceil", dir.path());
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    let o = kiln(&cache)
        .args(["build", "--node", "ceil-one", "--cluster"])
        .arg(&cluster)
        .arg("--base")
        .arg(&xz)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("truncated or corrupt"), "{err}");
    only_fixture_files_left(&out);
    // Nothing half-decompressed stays in the cache either.
    let images: Vec<_> = std::fs::read_dir(cache.join("images")).unwrap().collect();
    assert!(images.is_empty(), "{images:?}");
}

/// A small tmpfs, unmounted when dropped: a disk that fills up for real.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip("cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(SmallDisk(at.to_path_buf()))
    }

    /// Takes all but `spare` bytes of what is free, so the next big write fails whatever the
    /// image holds.
    fn fill(&self, spare: u64) {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = [0xa5u8; 4096];
        let mut len = 0u64;
        while f.write_all(&block).is_ok() {
            len += block.len() as u64;
        }
        f.set_len(len.saturating_sub(spare)).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Every file under `dir` with its bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let name = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((name, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_full_disk_is_named_and_what_was_there_stays() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = example_cluster("ceil", dir.path());
    let build = |cache: &Path, out: &Path| {
        build_command(cache, &cluster, "ceil-one", "sample".as_ref(), out)
            .output()
            .unwrap()
    };

    // The output disk fills: the image of an earlier build there is left exactly as it was.
    let Some(small) = SmallDisk::mount(&dir.path().join("small-out"), "1m") else {
        return;
    };
    let out = small.0.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("ceil-one.img"), b"the image of yesterday's build").unwrap();
    std::fs::write(out.join("ceil-one.img.sha256sum"), b"0123  ceil-one.img\n").unwrap();
    small.fill(16 << 10);
    let before = tree(&out);
    let o = build(&dir.path().join("cache"), &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("hint: a disk filled up"), "{err}");
    assert!(
        err.contains(&format!("output: {} has ", out.display())),
        "{err}"
    );
    assert_eq!(tree(&out), before, "the output directory changed");
    drop(small);

    // The cache disk fills while the base is prepared: no half-made base stays in it.
    let Some(small) = SmallDisk::mount(&dir.path().join("small-cache"), "1m") else {
        return;
    };
    small.fill(16 << 10);
    let out = dir.path().join("out");
    let cache = small.0.join("kiln");
    let o = build(&cache, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("hint: a disk filled up"), "{err}");
    assert!(
        err.contains(&format!("cache: {} has ", cache.display())),
        "{err}"
    );
    let left: Vec<_> = tree(&small.0)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "filler")
        .collect();
    assert!(left.is_empty(), "the cache kept {left:?}");
    only_fixture_files_left(&out);
}

/// Runs `kiln check` on a cluster file in `dir` with `env`, failing the test if it takes a minute.
fn check_in(dir: &Path, text: &str, env: &[(&str, &Path)]) -> (bool, String) {
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = kiln(&dir.join("cache"));
    cmd.arg("check").arg("--cluster").arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within_a_minute(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), err)
}

#[test]
fn files_named_by_a_cluster_file_stay_in_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let node_key = |key: &str| {
        GOOD.replace(
            "[[node]]\nname = \"one\"\n",
            &format!("[[node]]\nname = \"one\"\n{key}\n"),
        )
    };
    for (key, line) in [
        (r#"boot = { config_txt = "/etc/shadow" }"#, "config_txt"),
        (r#"user_data = "/etc/shadow""#, "user_data"),
        (r#"user_data = "../../../../../../etc/shadow""#, "user_data"),
        (r#"user_data = "/dev/zero""#, "user_data"),
    ] {
        let (ok, err) = check_in(dir.path(), &node_key(key), &[]);
        assert!(!ok, "accepted {key}");
        assert!(
            err.contains("cluster.toml:10:")
                && err.contains("outside")
                && err.contains("KILN_ALLOW_PATHS"),
            "{key}: {line} not named with the way out:\n{err}"
        );
        assert!(
            !err.contains("root:"),
            "the host's file leaked into the message:\n{err}"
        );
    }
    let secret = format!(
        "{GOOD}\n[defaults.wifi]\nssid = \"ceil\"\npsk = {{ file = \"../../../../etc/shadow\" }}\ncountry = \"DE\"\n"
    );
    let (ok, err) = check_in(dir.path(), &secret, &[]);
    assert!(!ok && err.contains("outside"), "{err}");

    // A directory the user allows, outside the cluster's, is read.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("wifi.psk"), "not-a-real-psk\n").unwrap();
    let allowed = format!(
        "{GOOD}\n[defaults.wifi]\nssid = \"ceil\"\npsk = {{ file = \"{}\" }}\ncountry = \"DE\"\n",
        elsewhere.path().join("wifi.psk").display()
    );
    let (ok, err) = check_in(dir.path(), &allowed, &[]);
    assert!(!ok && err.contains("outside"), "{err}");
    let (ok, err) = check_in(
        dir.path(),
        &allowed,
        &[("KILN_ALLOW_PATHS", elsewhere.path())],
    );
    assert!(ok, "{err}");
}

#[test]
fn a_fifo_or_an_oversized_file_is_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    nix::unistd::mkfifo(
        &dir.path().join("user-data.yaml"),
        nix::sys::stat::Mode::S_IRWXU,
    )
    .unwrap();
    let with = |key: &str| {
        GOOD.replace(
            "[[node]]\nname = \"one\"\n",
            &format!("[[node]]\nname = \"one\"\n{key}\n"),
        )
    };
    let (ok, err) = check_in(dir.path(), &with(r#"user_data = "user-data.yaml""#), &[]);
    assert!(
        !ok && err.contains("a FIFO") && err.contains("cluster.toml:10:"),
        "{err}"
    );

    // A secret of 1 MiB is no secret: the cap names the key's file and its size.
    std::fs::write(dir.path().join("big.psk"), vec![b'x'; 1 << 20]).unwrap();
    let big = format!(
        "{GOOD}\n[defaults.wifi]\nssid = \"ceil\"\npsk = {{ file = \"big.psk\" }}\ncountry = \"DE\"\n"
    );
    let (ok, err) = check_in(dir.path(), &big, &[]);
    assert!(
        !ok && err.contains("1048576 bytes") && err.contains("64 KiB"),
        "{err}"
    );
}

/// A boot partition of 4 GiB (FAT32, sparse) is stamped under a 2 GiB address-space limit: the
/// partition is edited copy-on-write, never read into memory whole (it once was, and an 8 GiB one
/// took 8 GiB of RAM).
#[test]
fn a_huge_boot_partition_is_stamped_without_reading_it_into_memory() {
    if !have_tools(&[
        "sfdisk",
        "mkfs.vfat",
        "mcopy",
        "mtype",
        "mkfs.ext4",
        "prlimit",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.img");
    let (boot, root) = (4u64 << 30, 64u64 << 20);
    std::fs::File::create(&img)
        .unwrap()
        .set_len((1 << 20) + boot + root)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .arg("--quiet")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    write!(
        sfdisk.stdin.take().unwrap(),
        "label: dos\nlabel-id: 0x5452574f\nstart=2048, size={}, type=c\nstart={}, size={}, type=83\n",
        boot / 512,
        2048 + boot / 512,
        root / 512
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "HypriotOS", "--offset", "2048"])
        .arg(&img)
        .arg((boot / 1024).to_string()));
    for (name, text) in [
        ("user-data", "#cloud-config\nhostname: black-pearl\n"),
        ("meta-data", "instance-id: pirate001\n"),
        ("config.txt", "enable_uart=0\n"),
        ("cmdline.txt", "console=tty1 root=/dev/mmcblk0p2 rootwait\n"),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
        run(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!("{}@@1M", img.display()))
            .arg(dir.path().join(name))
            .arg("::/"));
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "root", "-E"])
        .arg(format!("offset={}", (1 << 20) + boot))
        .arg(&img)
        .arg("64M"));

    let cluster = example_cluster("ceil", dir.path());
    let out = dir.path().join("out");
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--as={}", 2u64 << 30))
        .arg(kiln_bin())
        .env("KILN_CACHE_DIR", dir.path().join("cache"))
        .args(["build", "--node", "ceil-one", "--cluster"])
        .arg(&cluster)
        .arg("--base")
        .arg(&img)
        .arg("--out")
        .arg(&out);
    run(&mut cmd);
    let user_data =
        String::from_utf8(mtype(&out.join("ceil-one.img"), 1 << 20, "user-data")).unwrap();
    assert!(user_data.contains("hostname: ceil-one"), "{user_data}");
}

/// What a killed build leaves (a temporary image in out/, an unpacking tree and a half-fetched
/// blob in the cache) is removed by the next run once its process is gone; a running one's is
/// kept.
#[test]
fn a_killed_builds_temporaries_are_swept_by_the_next_run() {
    if !have_tools(&["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    let (out, cache) = (dir.path().join("out"), dir.path().join("cache"));
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let mut alive = Command::new("sleep").arg("60").spawn().unwrap();
    let leftovers = [
        out.join(format!(".ceil-one.raw-tmp.tmp-{dead}")),
        cache.join(format!("oci/stage-{dead}/etc/passwd")),
        cache.join(format!(
            "oci/blobs/sha256/.{}.partial-{dead}",
            "a".repeat(64)
        )),
    ];
    let kept = out.join(format!(".ceil-two.raw-tmp.tmp-{}", alive.id()));
    for p in leftovers.iter().chain([&kept]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "half").unwrap();
    }
    build(&cache, &cluster, "ceil-one", base.as_os_str(), &out);
    alive.kill().unwrap();
    alive.wait().unwrap();
    for p in &leftovers {
        assert!(!p.exists(), "{} was left", p.display());
    }
    assert!(!cache.join(format!("oci/stage-{dead}")).exists());
    assert!(kept.exists(), "a running build's temporary was removed");
}

/// `kiln check | head -1`: the reader goes away after one line. kiln must end quietly (SIGPIPE's
/// status, as `cat` would), not print a panic with a backtrace.
#[test]
fn a_reader_that_stops_early_gets_no_panic() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut text = GOOD.to_string();
    // Enough nodes that `check` prints far more than a pipe holds (64 KiB) after the first line.
    for i in 0..3000 {
        text.push_str(&format!("\n[[node]]\nname = \"n{i}\"\n"));
    }
    std::fs::write(dir.path().join("cluster.toml"), text).unwrap();
    let mut child = Command::new(kiln_bin())
        .args(["check", "--cluster"])
        .arg(dir.path().join("cluster.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader (and with it the pipe's read end) is gone here.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.contains("valid"), "first line: {first}");
    assert!(
        !stderr.contains("panicked"),
        "kiln panicked on a closed stdout:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
}
