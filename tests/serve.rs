//! `kiln serve`, `kiln publish` and `kiln serve --check` with real clients (curl, wget) and a real
//! peer (nginx serving the same directory).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: kiln serve shuts down gracefully, nginx's master takes its workers with it. A
        // server that does not stop within a minute (one stuck on a FIFO) is killed, so a failing
        // test fails instead of hanging.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..600 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_port(p: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", p)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {p}");
}

fn kiln_serve(dir: &Path, cache: &Path) -> Server {
    kiln_serve_with(dir, cache, &[], None)
}

/// `kiln serve dir` with extra environment and, when `nofile` is given, that many descriptors
/// (soft and hard limit, set by prlimit, which then execs kiln: the child is the server).
fn kiln_serve_with(dir: &Path, cache: &Path, env: &[(&str, &str)], nofile: Option<u32>) -> Server {
    let p = free_port();
    let serve = kiln(cache);
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg(serve.get_program());
            c.envs(serve.get_envs().filter_map(|(k, v)| Some((k, v?))));
            c
        }
        None => serve,
    };
    let child = cmd
        .arg("serve")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{p}")])
        .envs(env.iter().copied())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(p);
    Server {
        child,
        base: format!("http://127.0.0.1:{p}"),
    }
}

fn nginx(dir: &Path, work: &Path) -> Server {
    let p = free_port();
    let conf = work.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; user root; worker_processes 2; pid {}/nginx.pid; error_log stderr;\n\
             events {{}}\nhttp {{ access_log off; sendfile on; client_body_temp_path {0}; proxy_temp_path {0};\n\
             fastcgi_temp_path {0}; uwsgi_temp_path {0}; scgi_temp_path {0};\n\
             server {{ listen 127.0.0.1:{p}; root {}; }} }}\n",
            work.display(),
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(p);
    Server {
        child,
        base: format!("http://127.0.0.1:{p}"),
    }
}

/// curl's status code, headers (lower-cased, for matching) and body for `args`.
fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let (code, h, b) = curl_raw(args);
    (code, h.to_ascii_lowercase(), b)
}

/// curl's status code, headers as sent and body for `args`.
fn curl_raw(args: &[&str]) -> (u16, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("h");
    let body = dir.path().join("b");
    let out = Command::new("curl")
        .args(["-s", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (
        code,
        std::fs::read_to_string(&headers).unwrap_or_default(),
        std::fs::read(&body).unwrap_or_default(),
    )
}

fn random_file(p: &Path, mib: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(p, data).unwrap();
}

/// A served directory with a published node build and a 32 MiB random image.
fn served_dir(work: &Path) -> (PathBuf, PathBuf) {
    let cluster = example_cluster("ceil", work);
    let cache = work.join("cache");
    let out = work.join("out");
    build(
        &cache,
        &cluster,
        "ceil-one",
        std::ffi::OsStr::new("sample"),
        &out,
    );
    let srv = work.join("srv");
    let o = kiln(&cache)
        .args(["publish", "--node", "ceil-one", "--out"])
        .arg(&out)
        .arg("--to")
        .arg(&srv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let published = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    random_file(&srv.join("big.raw"), 32, 7);
    (srv, PathBuf::from(published))
}

#[test]
fn real_clients_get_what_ironic_needs() {
    if !have_tools(&[
        "curl",
        "wget",
        "mke2fs",
        "debugfs",
        "dumpe2fs",
        "sha256sum",
        "sha512sum",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, published) = served_dir(dir.path());
    let name = published
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("ceil-one-") && name.ends_with(".raw"),
        "{name}"
    );
    let s = kiln_serve(&srv, &dir.path().join("cache"));
    let url = format!("{}/{name}", s.base);
    let bytes = std::fs::read(&published).unwrap();

    // HEAD: 200, length, validators, no compression even when asked for.
    let (code, h, _) = curl(&["-I", "-H", "Accept-Encoding: gzip, br", &url]);
    assert_eq!(code, 200);
    assert!(
        h.contains(&format!("content-length: {}", bytes.len())),
        "{h}"
    );
    assert!(
        h.contains("last-modified: ") && h.contains("etag: ") && h.contains("accept-ranges: bytes"),
        "{h}"
    );
    assert!(!h.contains("content-encoding"), "{h}");
    let (_, raw_headers, _) = curl_raw(&["-I", &url]);
    let value = |name: &str| {
        raw_headers
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap()
    };
    let (etag, last_modified) = (value("etag"), value("last-modified"));

    // One range, an unsatisfiable range, conditional requests.
    let (code, h, body) = curl(&["-r", "1000-1999", &url]);
    assert_eq!((code, body.as_slice()), (206, &bytes[1000..2000]));
    assert!(
        h.contains(&format!("content-range: bytes 1000-1999/{}", bytes.len())),
        "{h}"
    );
    let (code, _, _) = curl(&["-r", &format!("{}-", bytes.len() + 10), &url]);
    assert_eq!(code, 416);
    assert_eq!(
        curl(&["-H", &format!("If-None-Match: {etag}"), &url]).0,
        304
    );
    assert_eq!(
        curl(&["-H", &format!("If-Modified-Since: {last_modified}"), &url]).0,
        304
    );

    // A resumed download and wget agree with the file.
    let part = dir.path().join("resumed");
    std::fs::write(&part, &bytes[..(1 << 20) + 123]).unwrap();
    run(Command::new("curl")
        .args(["-s", "-C", "-", "-o"])
        .arg(&part)
        .arg(&url));
    assert_eq!(
        sha256_hex(&std::fs::read(&part).unwrap()),
        sha256_hex(&bytes)
    );
    let w = dir.path().join("wget");
    run(Command::new("wget").args(["-q", "-O"]).arg(&w).arg(&url));
    assert_eq!(sha256_hex(&std::fs::read(&w).unwrap()), sha256_hex(&bytes));

    // The checksum file, and the index.
    let (code, _, sum) = curl(&[&format!("{url}.sha256sum")]);
    assert_eq!(code, 200);
    assert_eq!(
        String::from_utf8(sum).unwrap(),
        format!("{}  {name}\n", sha256_hex(&bytes))
    );
    // Both digests, for the published image (its .sha256sum is on disk) and for one without
    // checksum files; coreutils' own `sha256sum -c`/`sha512sum -c` judge them in the directory.
    for file in [name.as_str(), "big.raw"] {
        for tool in ["sha256sum", "sha512sum"] {
            let (code, h, sum) = curl(&[&format!("{}/{file}.{tool}", s.base)]);
            assert_eq!(code, 200, "{file}.{tool}");
            assert!(h.contains("content-type: text/plain"), "{h}");
            let mut c = Command::new(tool)
                .args(["-c", "--strict", "-"])
                .current_dir(&srv)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&sum).unwrap();
            }
            let o = c.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "{tool} -c: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
    }
    let (code, _, index) = curl(&[&format!("{}/index.json", s.base)]);
    assert_eq!(code, 200);
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let entry = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name.as_str())
        .unwrap();
    assert_eq!(entry["sha256"], sha256_hex(&bytes));
    assert_eq!(entry["format"], "raw");
    assert_eq!(entry["size"], bytes.len());
}

#[test]
fn concurrent_downloads_aborts_and_replacement_in_flight() {
    if !have_tools(&["curl", "mke2fs", "debugfs", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = served_dir(dir.path());
    let s = kiln_serve(&srv, &dir.path().join("cache"));
    let url = format!("{}/big.raw", s.base);
    let old = sha256_hex(&std::fs::read(srv.join("big.raw")).unwrap());

    // 16 at once, each complete and intact.
    let spawn = |i: usize, rate: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-s", "-o"]).arg(dir.path().join(format!("dl{i}")));
        if let Some(r) = rate {
            c.args(["--limit-rate", r]);
        }
        c.arg(&url).spawn().unwrap()
    };
    let kids: Vec<Child> = (0..16).map(|i| spawn(i, None)).collect();
    for (i, mut k) in kids.into_iter().enumerate() {
        assert!(k.wait().unwrap().success());
        assert_eq!(
            sha256_hex(&std::fs::read(dir.path().join(format!("dl{i}"))).unwrap()),
            old,
            "download {i}"
        );
    }

    // Slow clients: two are killed mid-stream, the file is replaced by rename; the others finish
    // with the bytes of the file they started on.
    let mut slow: Vec<Child> = (20..24).map(|i| spawn(i, Some("8M"))).collect();
    std::thread::sleep(Duration::from_millis(1200));
    slow[0].kill().unwrap();
    slow[1].kill().unwrap();
    random_file(&srv.join(".big.raw.new"), 32, 99);
    std::fs::rename(srv.join(".big.raw.new"), srv.join("big.raw")).unwrap();
    for k in slow.iter_mut() {
        let _ = k.wait();
    }
    for i in [22, 23] {
        assert_eq!(
            sha256_hex(&std::fs::read(dir.path().join(format!("dl{i}"))).unwrap()),
            old,
            "slow download {i}"
        );
    }
    // New requests get the new file, and a new checksum.
    let new = sha256_hex(&std::fs::read(srv.join("big.raw")).unwrap());
    assert_ne!(new, old);
    let (code, _, sum) = curl(&[&format!("{url}.sha256sum")]);
    assert_eq!(code, 200);
    assert_eq!(String::from_utf8(sum).unwrap(), format!("{new}  big.raw\n"));
}

#[test]
fn traversal_hidden_and_partial_files_are_404() {
    if !have_tools(&["curl", "mke2fs", "debugfs", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = served_dir(dir.path());
    std::fs::write(srv.join(".hidden.raw"), "x").unwrap();
    std::fs::write(srv.join("upload.raw.tmp"), "x").unwrap();
    std::fs::write(dir.path().join("secret"), "outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), srv.join("escape.raw")).unwrap();
    let s = kiln_serve(&srv, &dir.path().join("cache"));
    for path in [
        "/../secret",
        "/../../../../etc/passwd",
        "/%2e%2e/secret",
        "/%2E%2E%2Fsecret",
        "/..%2fsecret",
        "/.%2e/secret",
        "/%2fetc%2fpasswd",
        "//etc/passwd",
        "/.hidden.raw",
        "/upload.raw.tmp",
        "/escape.raw",
        "/escape.raw.sha256sum",
        "/nope.raw",
    ] {
        let (code, _, body) = curl(&["--path-as-is", &format!("{}{path}", s.base)]);
        assert_eq!(code, 404, "{path} answered {code}");
        assert!(!String::from_utf8_lossy(&body).contains("outside"));
    }
}

#[test]
fn check_accepts_kiln_and_nginx_and_names_what_is_wrong() {
    if !have_tools(&["curl", "nginx", "qemu-img", "mke2fs", "debugfs", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, published) = served_dir(dir.path());
    let name = published
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let cache = dir.path().join("cache");
    let k = kiln_serve(&srv, &cache);
    let n = nginx(&srv, dir.path());
    let check = |url: String| {
        kiln(&cache)
            .args(["serve", "--check", &url])
            .output()
            .unwrap()
    };
    // --check must fail and say why.
    let fails_with = |url: String, why: &str| {
        let o = check(url);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(!o.status.success() && out.contains(why), "{out}");
    };
    for base in [&k.base, &n.base] {
        let o = check(format!("{base}/{name}"));
        assert!(
            o.status.success(),
            "{base}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A checksum file that lies.
    std::fs::write(
        srv.join("big.raw.sha256sum"),
        format!("{}  big.raw\n", "0".repeat(64)),
    )
    .unwrap();
    for base in [&k.base, &n.base] {
        fails_with(format!("{base}/big.raw"), "the checksum file says");
    }
    // A qcow2 with a backing file.
    let overlay = srv.join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(srv.join("big.raw"))
        .arg(&overlay));
    let sum = sha256_hex(&std::fs::read(&overlay).unwrap());
    std::fs::write(
        srv.join("overlay.qcow2.sha256sum"),
        format!("{sum}  overlay.qcow2\n"),
    )
    .unwrap();
    fails_with(format!("{}/overlay.qcow2", n.base), "backing file");
    // A plain qcow2 passes.
    let plain = srv.join("plain.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&published)
        .arg(&plain));
    let o = check(format!("{}/plain.qcow2", k.base));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// The Python of the venv scripts/setup.sh makes with ironic-python-agent (and the oslo.utils it
/// pins) from tests/python/requirements-ipa.txt.
fn ipa_python() -> Option<PathBuf> {
    let venv = std::env::var_os("KILN_IPA_VENV").unwrap_or("/opt/kiln-ipa-venv".into());
    let py = PathBuf::from(venv).join("bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import ironic_python_agent, oslo_utils.imageutils"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(&format!(
            "no ironic-python-agent at {} (scripts/setup.sh installs it)",
            py.display()
        ));
        return None;
    }
    Some(py)
}

/// Images and checksum files with known quirks, made by real tools where one exists (sgdisk,
/// sfdisk, mkfs.vfat, qemu-img) and patched where IPA's rules turn on one field. Returns
/// (case name, image file name, checksum file text); every image is in `dir`.
fn ipa_cases(dir: &Path) -> Vec<(String, String, String)> {
    let mut cases = Vec::new();
    let patch = |file: &Path, at: u64, bytes: &[u8]| {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(bytes).unwrap();
    };
    let blank = |name: &str| {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        p
    };
    let qemu = |name: &str, args: &[&str]| {
        let p = dir.join(name);
        run(Command::new("qemu-img")
            .args(["create", "-q"])
            .args(args)
            .arg(&p)
            .arg("16M"));
        p
    };
    let sum_of = |p: &Path| sha256_hex(&std::fs::read(p).unwrap());

    // Formats, each with a well-formed checksum file.
    let mut images: Vec<PathBuf> = Vec::new();
    let gpt = blank("gpt.raw");
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:0", "-t", "1:8300"])
        .arg(&gpt));
    images.push(gpt.clone());
    let hybrid = blank("hybrid.raw");
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:0", "-h", "1"])
        .arg(&hybrid));
    images.push(hybrid);
    let mbr = blank("mbr.raw");
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&mbr)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        sf.stdin
            .take()
            .unwrap()
            .write_all(b"label: dos\nstart=2048, type=83, bootable\n")
            .unwrap();
    }
    assert!(sf.wait().unwrap().success());
    images.push(mbr.clone());
    let bad_flag = dir.join("bootflag.raw");
    std::fs::copy(&mbr, &bad_flag).unwrap();
    patch(&bad_flag, 446, &[0x81]);
    images.push(bad_flag);
    let empty_mbr = blank("empty-mbr.raw");
    patch(&empty_mbr, 510, &[0x55, 0xAA]);
    images.push(empty_mbr);
    let fat = blank("fat.raw");
    run(Command::new("mkfs.vfat").arg(&fat));
    images.push(fat);
    let iso = blank("iso.raw");
    patch(&iso, 32768, b"\x01CD001\x01");
    images.push(iso);
    images.push(blank("zeros.raw"));
    images.push(qemu("v3.qcow2", &["-f", "qcow2"]));
    images.push(qemu("v2.qcow2", &["-f", "qcow2", "-o", "compat=0.10"]));
    images.push(qemu(
        "zstd.qcow2",
        &["-f", "qcow2", "-o", "compression_type=zstd"],
    ));
    images.push(qemu(
        "extl2.qcow2",
        &["-f", "qcow2", "-o", "extended_l2=on"],
    ));
    let data_file = dir.join("ext.data");
    let data_file_opt = format!("data_file={}", data_file.display());
    images.push(qemu(
        "datafile.qcow2",
        &["-f", "qcow2", "-o", &data_file_opt],
    ));
    let backing = format!("{}", gpt.display());
    images.push(qemu(
        "backing.qcow2",
        &["-f", "qcow2", "-F", "raw", "-b", &backing],
    ));
    for (name, at, bytes) in [
        ("version1.qcow2", 4, &[0u8, 0, 0, 1][..]),
        ("version4.qcow2", 4, &[0, 0, 0, 4][..]),
        ("dirty.qcow2", 79, &[0x01][..]),
        ("unknownbit.qcow2", 79, &[0x20][..]),
    ] {
        let p = dir.join(name);
        std::fs::copy(dir.join("v3.qcow2"), &p).unwrap();
        patch(&p, at, bytes);
        images.push(p);
    }
    images.push(qemu("disk.vmdk", &["-f", "vmdk"]));
    images.push(qemu("disk.vdi", &["-f", "vdi"]));
    images.push(qemu("disk.qed", &["-f", "qed"]));
    images.push(qemu("disk.vhdx", &["-f", "vhdx"]));
    images.push(qemu("disk.vhd", &["-f", "vpc"]));
    for p in &images {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        cases.push((
            name.clone(),
            name.clone(),
            format!("{}  {name}\n", sum_of(p)),
        ));
    }

    // Checksum files, each beside its own copy of one raw image.
    let data = dir.join("data.bin");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[4096..4200].fill(0x5a);
    std::fs::write(&data, &bytes).unwrap();
    let h = sha256_hex(&bytes);
    let upper = h.to_ascii_uppercase();
    let sha512 = {
        let o = Command::new("sha512sum").arg(&data).output().unwrap();
        String::from_utf8(o.stdout).unwrap()[..128].to_string()
    };
    let md5 = {
        let o = Command::new("md5sum").arg(&data).output().unwrap();
        String::from_utf8(o.stdout).unwrap()[..32].to_string()
    };
    let sums: Vec<(&str, String)> = vec![
        ("two-spaces", format!("{h}  NAME\n")),
        ("upper", format!("{upper}  NAME\n")),
        ("bare", format!("{h}\n")),
        ("bare-upper", format!("{upper}\n")),
        ("tab-one-line", format!("{h}\tNAME\n")),
        ("tab-among-lines", format!("# kiln\n{h}\tNAME\n")),
        ("star", format!("{h} *NAME\n")),
        ("bsd", format!("SHA256 (NAME) = {h}\n")),
        ("sha512", format!("{sha512}  NAME\n")),
        ("md5", format!("{md5}  NAME\n")),
        ("other-name", format!("{h}  NAME.bak\n")),
        ("dot-slash", format!("{h}  ./NAME\n")),
        ("comment-only", "# nothing\n".to_string()),
        ("crlf", format!("{h}  NAME\r\n")),
    ];
    for (case, text) in sums {
        let name = format!("sum-{case}.img");
        std::fs::copy(&data, dir.join(&name)).unwrap();
        cases.push((
            format!("sum-{case}"),
            name.clone(),
            text.replace("NAME", &name),
        ));
    }
    // IPA formats the name into a regex unescaped: "x.img" matches a line for "xAimg".
    let name = "sum-dot.img".to_string();
    std::fs::copy(&data, dir.join(&name)).unwrap();
    cases.push((
        "sum-dot-wildcard".into(),
        name,
        format!("{h}  sum-dotXimg\n"),
    ));
    cases
}

#[test]
fn check_agrees_with_ipa_on_checksum_files_and_formats() {
    if !have_tools(&[
        "qemu-img",
        "sgdisk",
        "sfdisk",
        "mkfs.vfat",
        "sha512sum",
        "md5sum",
    ]) {
        return;
    }
    let Some(py) = ipa_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let srv = dir.path().join("srv");
    std::fs::create_dir(&srv).unwrap();
    let cases = ipa_cases(&srv);
    let cache = dir.path().join("cache");
    let k = kiln_serve(&srv, &cache);

    let mut judge_input = Vec::new();
    let mut kiln_verdicts = Vec::new();
    for (case, image, sums) in &cases {
        let sum_file = srv.join(format!("{image}.sha256sum"));
        std::fs::write(&sum_file, sums).unwrap();
        let url = format!("{}/{image}", k.base);
        judge_input.push(serde_json::json!({
            "name": case, "url": url, "image": srv.join(image), "sums": sum_file,
        }));
        let o = kiln(&cache)
            .args(["serve", "--check", &url])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let format = err
            .lines()
            .find_map(|l| l.strip_prefix("ok   format "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string);
        let said = String::from_utf8_lossy(&o.stdout).into_owned();
        kiln_verdicts.push((o.status.success(), format, said));
    }
    let input = dir.path().join("cases.json");
    std::fs::write(&input, serde_json::to_vec(&judge_input).unwrap()).unwrap();
    let o = Command::new(&py)
        .arg(repo().join("tests/python/ipa_judge.py"))
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ipa: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();

    let mut disagree = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for ((case, ..), (ok, format, said), j) in zip3(&cases, &kiln_verdicts, &ipa) {
        let ipa_ok = j["accepted"].as_bool().unwrap();
        let ipa_format = j["format"].as_str().map(str::to_string);
        if ipa_ok {
            accepted += 1
        } else {
            refused += 1
        }
        eprintln!(
            "{case:<22} kiln {:<7} IPA {:<7} {:?} {}",
            if *ok { "accepts" } else { "refuses" },
            if ipa_ok { "accepts" } else { "refuses" },
            ipa_format,
            j["why"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .last()
                .unwrap_or_default()
        );
        if *ok != ipa_ok || (ipa_ok && *format != ipa_format) {
            disagree.push(format!(
                "{case}: kiln {} ({format:?}) {said}  IPA {} ({ipa_format:?}) {}",
                if *ok { "accepts" } else { "refuses" },
                if ipa_ok { "accepts" } else { "refuses" },
                j["why"]
            ));
        }
    }
    assert!(
        disagree.is_empty(),
        "kiln serve --check and IPA disagree:\n{}",
        disagree.join("\n")
    );
    // The set has both kinds, so agreement is not all-yes or all-no.
    assert!(
        accepted >= 8 && refused >= 8,
        "{accepted} accepted, {refused} refused"
    );
}

fn zip3<'a, A, B, C>(
    a: &'a [A],
    b: &'a [B],
    c: &'a [C],
) -> impl Iterator<Item = (&'a A, &'a B, &'a C)> {
    assert!(a.len() == b.len() && b.len() == c.len());
    a.iter().zip(b).zip(c).map(|((a, b), c)| (a, b, c))
}

#[test]
fn publishing_an_unbuilt_node_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = kiln(&dir.path().join("cache"))
        .args(["publish", "--node", "ceil-two", "--out"])
        .arg(dir.path().join("out"))
        .arg("--to")
        .arg(dir.path().join("srv"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("node ceil-two is not built"));
}

/// A served directory with only `big.raw` (`mib` MiB of random bytes); no build needed.
fn image_dir(work: &Path, mib: usize) -> PathBuf {
    let srv = work.join("srv");
    std::fs::create_dir_all(&srv).unwrap();
    random_file(&srv.join("big.raw"), mib, 7);
    srv
}

/// Downloads `url` with curl into `to` and returns the sha256 of what arrived.
fn download_sha256(url: &str, to: &Path, extra: &[&str]) -> String {
    run(Command::new("curl")
        .args(["-sf", "--max-time", "120", "-o"])
        .arg(to)
        .args(extra)
        .arg(url));
    sha256_hex(&std::fs::read(to).unwrap())
}

#[test]
fn fifo_is_404_at_once_and_downloads_go_on() {
    if !have_tools(&["curl", "mkfifo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 16);
    let want = sha256_hex(&std::fs::read(srv.join("big.raw")).unwrap());
    run(Command::new("mkfifo").arg(srv.join("pipe.raw")));
    let s = kiln_serve(&srv, &dir.path().join("cache"));
    // Opening a FIFO for reading waits for a writer; a server that opens it parks a thread per
    // request. Each of these must be answered 404 (curl gives up after 20 s and reports 000).
    let fifo = |path: &str| {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "20",
            ])
            .arg(format!("{}{path}", s.base))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut kids: Vec<Child> = (0..8).map(|_| fifo("/pipe.raw")).collect();
    kids.push(fifo("/pipe.raw.sha256sum"));
    kids.push(fifo("/index.json"));
    let got = download_sha256(&format!("{}/big.raw", s.base), &dir.path().join("dl"), &[]);
    assert_eq!(got, want);
    let codes: Vec<String> = kids
        .into_iter()
        .map(|k| String::from_utf8_lossy(&k.wait_with_output().unwrap().stdout).into_owned())
        .collect();
    assert_eq!(codes[..9], ["404"; 9], "FIFO requests answered {codes:?}");
    assert_eq!(
        codes[9], "200",
        "index.json beside a FIFO answered {}",
        codes[9]
    );
}

#[test]
fn symlinks_to_hidden_or_partial_files_are_404() {
    if !have_tools(&["curl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 1);
    std::fs::write(srv.join(".hidden.raw"), "hidden").unwrap();
    std::fs::write(srv.join("upload.raw.part"), "partial").unwrap();
    std::fs::create_dir(srv.join(".cache")).unwrap();
    std::fs::write(srv.join(".cache/inner.raw"), "in a hidden directory").unwrap();
    let link = |target: &Path, name: &str| std::os::unix::fs::symlink(target, srv.join(name));
    link(Path::new(".hidden.raw"), "to-hidden.raw").unwrap();
    link(&srv.join(".hidden.raw"), "to-hidden-abs.raw").unwrap();
    link(Path::new("upload.raw.part"), "to-partial.raw").unwrap();
    link(Path::new(".cache/inner.raw"), "to-hidden-dir.raw").unwrap();
    link(Path::new(".cache"), "cache-dir").unwrap();
    link(Path::new("big.raw"), "to-big.raw").unwrap();
    let s = kiln_serve(&srv, &dir.path().join("cache"));
    for path in [
        "/.hidden.raw",
        "/to-hidden.raw",
        "/to-hidden.raw.sha256sum",
        "/to-hidden-abs.raw",
        "/to-partial.raw",
        "/to-partial.raw.sha256sum",
        "/to-hidden-dir.raw",
        "/cache-dir/inner.raw",
    ] {
        let (code, _, body) = curl(&[&format!("{}{path}", s.base)]);
        assert_eq!(code, 404, "{path} answered {code}");
        assert_eq!(body, b"not found\n", "{path}");
    }
    // A symlink to a served image is served like it.
    let (code, _, body) = curl(&[&format!("{}/to-big.raw", s.base)]);
    assert_eq!(
        (code, body),
        (200, std::fs::read(srv.join("big.raw")).unwrap())
    );
    let (_, _, index) = curl(&[&format!("{}/index.json", s.base)]);
    let index = String::from_utf8(index).unwrap();
    assert!(
        !index.contains("hidden") && !index.contains("partial"),
        "{index}"
    );
}

/// Bytes the process has read with read(2) and its kin, files and sockets alike.
fn bytes_read_by(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn concurrent_checksum_requests_read_the_image_once() {
    if !have_tools(&["curl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mib = 32;
    let srv = image_dir(dir.path(), mib);
    let want = format!(
        "{}  big.raw\n",
        sha256_hex(&std::fs::read(srv.join("big.raw")).unwrap())
    );
    // The on-disk cache of the checksum cannot be written (a directory holds its name), as in a
    // read-only directory: without a shared computation every request would hash again, however
    // the requests interleave.
    std::fs::create_dir(srv.join(".big.raw.sha256")).unwrap();
    let s = kiln_serve(&srv, &dir.path().join("cache"));
    let before = bytes_read_by(s.child.id());
    let url = format!("{}/big.raw.sha256sum", s.base);
    let kids: Vec<_> = (0..16)
        .map(|_| {
            Command::new("curl")
                .args(["-sf", "--max-time", "120"])
                .arg(&url)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for k in kids {
        let out = k.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    }
    // Once more, after all finished: the result is remembered.
    let (code, _, body) = curl(&[&url]);
    assert_eq!((code, String::from_utf8(body).unwrap()), (200, want));
    let read = bytes_read_by(s.child.id()) - before;
    let image = (mib as u64) << 20;
    assert!(
        read < 2 * image,
        "17 checksum requests read {read} bytes: the {image}-byte image {:.1} times",
        read as f64 / image as f64
    );
}

/// Raises this test process's descriptor limit to `n` (prlimit on our own pid), or says why not.
fn raise_own_nofile(n: u32) -> bool {
    let me = std::process::id().to_string();
    for limits in [format!("{n}:"), format!("{n}:{n}")] {
        let ok = Command::new("prlimit")
            .args(["--pid", &me, &format!("--nofile={limits}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return true;
        }
    }
    skip(&format!("cannot raise the descriptor limit to {n}"))
}

/// True when the server closed `conn` (EOF or reset) before `deadline`.
fn closed_by_server(conn: &std::net::TcpStream, deadline: std::time::Instant) -> bool {
    use std::io::Read;
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 64];
    let mut reader = conn;
    match reader.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn idle_connections_neither_exhaust_nor_block_the_server() {
    use std::io::{Read, Write};
    if !have_tools(&["curl", "prlimit"]) || !raise_own_nofile(4096) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 16);
    let want = sha256_hex(&std::fs::read(srv.join("big.raw")).unwrap());
    // 256 descriptors: 2000 silent connections are far more than the server can hold open.
    let timeout_secs = 3;
    let s = kiln_serve_with(
        &srv,
        &dir.path().join("cache"),
        &[("KILN_SERVE_HEADER_TIMEOUT", &timeout_secs.to_string())],
        Some(256),
    );
    let addr = s.base.trim_start_matches("http://").to_string();
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    let opened = std::time::Instant::now();
    let mut idle = Vec::new();
    for i in 0..2000 {
        match std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5)) {
            Ok(c) => idle.push(c),
            Err(e) => panic!(
                "connection {i} not accepted while {} are idle: {e}",
                idle.len()
            ),
        }
    }
    // While they are held: a plain download, and a slow one that takes longer than the header
    // timeout (16 MiB at 4 MB/s), both complete and intact.
    let url = format!("{}/big.raw", s.base);
    let slow = Command::new("curl")
        .args(["-sf", "--max-time", "120", "--limit-rate", "4M", "-o"])
        .arg(dir.path().join("slow"))
        .arg(&url)
        .spawn()
        .unwrap();
    assert_eq!(download_sha256(&url, &dir.path().join("dl"), &[]), want);
    assert!(slow.wait_with_output().unwrap().status.success());
    assert_eq!(
        sha256_hex(&std::fs::read(dir.path().join("slow")).unwrap()),
        want
    );
    // Every silent connection is closed by the server: evicted for newer ones, or at the header
    // timeout (generous bound: the timeout plus 30 s).
    let deadline = opened + Duration::from_secs(timeout_secs + 30);
    let open: Vec<usize> = idle
        .iter()
        .enumerate()
        .filter(|(_, c)| !closed_by_server(c, deadline))
        .map(|(i, _)| i)
        .take(5)
        .collect();
    assert!(open.is_empty(), "silent connections still open: {open:?}…");
    drop(idle);
    // Recovered: served again; and a new silent connection, one that sends half a request head,
    // and a keep-alive connection idle after its response are all closed by the server.
    assert_eq!(download_sha256(&url, &dir.path().join("dl2"), &[]), want);
    let silent = std::net::TcpStream::connect(sock).unwrap();
    let mut half = std::net::TcpStream::connect(sock).unwrap();
    half.write_all(b"GET /big.raw HTTP/1.1\r\nHost: kil")
        .unwrap();
    let mut kept = std::net::TcpStream::connect(sock).unwrap();
    kept.write_all(b"HEAD /big.raw HTTP/1.1\r\nHost: kiln\r\n\r\n")
        .unwrap();
    let mut status = [0u8; 15];
    kept.read_exact(&mut status).unwrap();
    assert_eq!(&status, b"HTTP/1.1 200 OK");
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout_secs + 30);
    for (what, c) in [
        ("silent", &silent),
        ("half a head", &half),
        ("kept alive", &kept),
    ] {
        // Drain what the server sent (the HEAD response), then wait for the close.
        while !closed_by_server(c, deadline) {
            assert!(std::time::Instant::now() < deadline, "{what}: still open");
        }
    }
}

#[test]
fn a_download_nobody_reads_is_dropped_and_frees_its_place() {
    use std::io::{Read, Write};
    if !have_tools(&["curl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 32);
    let want = sha256_hex(&std::fs::read(srv.join("big.raw")).unwrap());
    // Two places, both taken by downloads whose clients read the status line and then nothing.
    let s = kiln_serve_with(
        &srv,
        &dir.path().join("cache"),
        &[
            ("KILN_SERVE_MAX_CONNECTIONS", "2"),
            ("KILN_SERVE_STALL_TIMEOUT", "3"),
        ],
        None,
    );
    let sock: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let stalled: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(sock).unwrap();
            c.write_all(b"GET /big.raw HTTP/1.1\r\nHost: kiln\r\n\r\n")
                .unwrap();
            let mut status = [0u8; 12];
            c.read_exact(&mut status).unwrap();
            assert_eq!(&status, b"HTTP/1.1 200");
            c
        })
        .collect();
    // A third download gets a place once the stalled ones are dropped, and completes; so does a
    // slow one that takes longer than the stall timeout but always progresses (256 KiB every
    // 50 ms: about 6 s for 32 MiB; curl's --limit-rate reads in bursts with pauses of seconds).
    let url = format!("{}/big.raw", s.base);
    assert_eq!(download_sha256(&url, &dir.path().join("dl"), &[]), want);
    let mut c = std::net::TcpStream::connect(sock).unwrap();
    c.write_all(b"GET /big.raw HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let n = c.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(sha256_hex(&got[body..]), want);
    drop(stalled);
}

/// Chromium as root, headless, with nothing but the page: no network of its own, a fresh profile.
fn chromium(profile: &Path) -> Command {
    let mut c = Command::new("timeout");
    c.args([
        "120",
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The `href` values in a serialized DOM, as the browser resolves them against `base`.
fn links(dom: &str, base: &str) -> Vec<String> {
    dom.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"'))
        .map(|(href, _)| {
            assert!(!href.contains('&'), "an href needing entities: {href}");
            format!("{base}/{}", href.trim_start_matches("./"))
        })
        .collect()
}

#[test]
fn a_browser_sees_an_html_index_whose_links_resolve() {
    if !have_tools(&["chromium", "curl", "timeout"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 2);
    // Names a browser must show as text and link as one path segment each.
    let odd = "a&b <b>x \"q\" 'p' #1?%20.img";
    let unicode = "nœud ~ é.qcow2";
    random_file(&srv.join(odd), 1, 11);
    random_file(&srv.join(unicode), 1, 13);
    // What must not appear: a file outside (through a symlink), hidden and partial files.
    std::fs::write(dir.path().join("outside.raw"), "outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside.raw"), srv.join("leak.raw")).unwrap();
    std::os::unix::fs::symlink("../outside.raw", srv.join("leak-relative.raw")).unwrap();
    std::fs::write(srv.join(".secret.raw"), "secret").unwrap();
    std::fs::write(srv.join("half.raw.part"), "partial").unwrap();
    let s = kiln_serve(&srv, &dir.path().join("cache"));

    let profile = dir.path().join("profile");
    std::fs::create_dir(&profile).unwrap();
    let out = run(chromium(&profile)
        .arg("--dump-dom")
        .arg(format!("{}/", s.base)));
    let dom = String::from_utf8(out.stdout).unwrap();
    assert!(
        dom.contains("<table>") && dom.contains("<th>sha256</th>"),
        "{dom}"
    );
    // The odd name is text, not markup: no <b> element was made of it.
    assert!(
        dom.contains("a&amp;b &lt;b&gt;x \"q\" 'p' #1?%20.img</a>"),
        "{dom}"
    );
    assert!(!dom.contains("<b>"), "{dom}");
    assert!(dom.contains(&format!("{unicode}</a>")), "{dom}");
    for absent in ["outside", "leak", "secret", "half.raw"] {
        assert!(!dom.contains(absent), "{absent} listed: {dom}");
    }

    // Every link resolves: each image link to that image's bytes, each checksum link to its
    // sha256 in coreutils form, and the JSON link to the index.
    let served = ["big.raw", odd, unicode];
    let digests: Vec<String> = served
        .iter()
        .map(|n| sha256_hex(&std::fs::read(srv.join(n)).unwrap()))
        .collect();
    let (mut images, mut sums) = (Vec::new(), Vec::new());
    for url in links(&dom, &s.base) {
        let (code, _, body) = curl(&[&url]);
        assert_eq!(code, 200, "{url}");
        if url.ends_with("/index.json") {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v.as_array().map(Vec::len), Some(served.len()), "{v}");
        } else if url.ends_with(".sha256sum") {
            let line = String::from_utf8(body).unwrap();
            let (hex, name) = line.trim_end().split_once("  ").unwrap();
            let i = served.iter().position(|n| *n == name).expect(&line);
            assert_eq!(hex, digests[i], "{url}");
            sums.push(name.to_string());
        } else {
            let i = digests
                .iter()
                .position(|d| *d == sha256_hex(&body))
                .unwrap_or_else(|| panic!("{url} is none of the images"));
            images.push(served[i].to_string());
        }
    }
    images.sort();
    sums.sort();
    let mut want: Vec<String> = served.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!((images, sums), (want.clone(), want));

    // A program still gets the JSON at `/`, as before.
    let (_, headers, body) = curl(&["-H", "Accept: application/json", &format!("{}/", s.base)]);
    assert!(
        headers.contains("content-type: application/json"),
        "{headers}"
    );
    assert!(headers.contains("vary: accept"), "{headers}");
    serde_json::from_slice::<serde_json::Value>(&body).unwrap();

    // The page renders: a PNG screenshot with something on it.
    let png = dir.path().join("index.png");
    run(chromium(&profile)
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1400,500")
        .arg(format!("{}/", s.base)));
    let shot = std::fs::read(&png).unwrap();
    assert!(shot.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        shot.len() > 10_000,
        "a {}-byte screenshot is blank",
        shot.len()
    );
    if let Some(keep) = std::env::var_os("KILN_KEEP_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
}

/// `kiln serve dir` with its access log (stderr) going to `log`.
fn kiln_serve_logged(dir: &Path, cache: &Path, log: &Path) -> Server {
    let p = free_port();
    let child = kiln(cache)
        .arg("serve")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{p}")])
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_port(p);
    Server {
        child,
        base: format!("http://127.0.0.1:{p}"),
    }
}

/// The access log's byte counts for `request` (`GET /big.raw 206`), once `n` such lines are
/// written (the line is written when the answer is done, which may be after the client has it).
fn logged_bytes(log: &Path, request: &str, n: usize) -> Vec<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // `<ip> <method> <path> <status> <bytes> <seconds>s`
        let counts: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest))
            .filter_map(|rest| rest.strip_prefix(request)?.split_whitespace().next())
            .map(|n| n.parse().unwrap())
            .collect();
        if counts.len() >= n {
            return counts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} lines of {request} not logged:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn files_and_ranges_arrive_byte_exact_and_are_logged_with_their_size() {
    if !have_tools(&["curl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 8);
    let data = std::fs::read(srv.join("big.raw")).unwrap();
    let log = dir.path().join("log");
    let s = kiln_serve_logged(&srv, &dir.path().join("cache"), &log);
    let url = format!("{}/big.raw", s.base);
    let (code, headers, body) = curl(&["-r", "1000-5000000", &url]);
    assert_eq!(code, 206);
    assert!(headers.contains("content-range: bytes 1000-5000000/8388608"));
    assert!(body == data[1000..=5000000], "the range differs");
    let (code, _, body) = curl(&["-r", "-4097", &url]);
    assert_eq!(code, 206);
    assert!(
        body == data[data.len() - 4097..],
        "the suffix range differs"
    );
    assert_eq!(
        download_sha256(&url, &dir.path().join("dl"), &[]),
        sha256_hex(&data)
    );
    // (That a HEAD answer has no body, the pipelining test sees: its next answer follows the head.)
    let (code, headers, _) = curl(&["-I", &url]);
    assert_eq!(code, 200);
    assert!(headers.contains("content-length: 8388608"), "{headers}");
    assert_eq!(
        logged_bytes(&log, "GET /big.raw 206 ", 2),
        [5000000 - 1000 + 1, 4097]
    );
    assert_eq!(logged_bytes(&log, "GET /big.raw 200 ", 1), [8 << 20]);
    assert_eq!(logged_bytes(&log, "HEAD /big.raw 200 ", 1), [0]);
}

#[test]
fn a_client_gone_mid_download_is_logged_with_what_was_sent() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 64);
    let log = dir.path().join("log");
    let s = kiln_serve_logged(&srv, &dir.path().join("cache"), &log);
    let sock: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let mut c = std::net::TcpStream::connect(sock).unwrap();
    c.write_all(b"GET /big.raw HTTP/1.1\r\nHost: kiln\r\n\r\n")
        .unwrap();
    let mut first = vec![0u8; 1 << 20];
    c.read_exact(&mut first).unwrap();
    drop(c);
    // What the kernel took before the reset: at least what arrived, less than the whole file
    // (socket buffers hold a few MiB, not 64).
    let sent = logged_bytes(&log, "GET /big.raw 200 ", 1)[0];
    assert!(
        ((1 << 20) - 200..64 << 20).contains(&sent),
        "logged {sent} bytes"
    );
    // The server goes on serving.
    let (code, _, body) = curl(&["-r", "0-9", &format!("{}/big.raw", s.base)]);
    assert_eq!((code, body.len()), (206, 10));
}

/// Splits what a server sent on one connection into (status line, headers, body) answers, by
/// Content-Length; `heads` says which answers (to HEAD) have no body.
fn split_answers(mut raw: &[u8], heads: &[bool]) -> Vec<(String, String, Vec<u8>)> {
    let mut answers = Vec::new();
    for &head in heads {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let text = String::from_utf8(raw[..end].to_vec())
            .unwrap()
            .to_ascii_lowercase();
        let (status, headers) = text.split_once("\r\n").unwrap();
        let len: usize = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let len = if head { 0 } else { len };
        answers.push((
            status.to_string(),
            headers.to_string(),
            raw[end..end + len].to_vec(),
        ));
        raw = &raw[end + len..];
    }
    assert!(raw.is_empty(), "{} bytes after the last answer", raw.len());
    answers
}

#[test]
fn keep_alive_and_pipelined_requests_share_one_connection() {
    use std::io::{Read, Write};
    if !have_tools(&["curl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = image_dir(dir.path(), 4);
    let data = std::fs::read(srv.join("big.raw")).unwrap();
    let s = kiln_serve(&srv, &dir.path().join("cache"));
    let url = format!("{}/big.raw", s.base);
    // curl reuses the connection for its second URL (no new connect) and gets both intact.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let out = stdout(
        Command::new("curl")
            .args(["-sf", "-w", "%{num_connects}\\n", "-r", "0-99999", "-o"])
            .arg(&a)
            .arg(&url)
            .arg("-o")
            .arg(&b)
            .arg(format!("{}/index.json", s.base)),
    );
    assert_eq!(out, "1\n0\n");
    assert!(std::fs::read(&a).unwrap() == data[..100000]);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(&b).unwrap()).unwrap();
    assert_eq!(index[0]["name"], "big.raw");
    // Three requests in one write; the answers come in order, the last closes the connection.
    let sock: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let mut c = std::net::TcpStream::connect(sock).unwrap();
    c.write_all(
        b"GET /big.raw HTTP/1.1\r\nHost: kiln\r\nRange: bytes=10-19\r\n\r\n\
          HEAD /big.raw HTTP/1.1\r\nHost: kiln\r\n\r\n\
          GET /big.raw HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let answers = split_answers(&raw, &[false, true, false]);
    assert_eq!(answers[0].0, "http/1.1 206 partial content");
    assert!(answers[0].2 == data[10..20]);
    assert_eq!(answers[1].0, "http/1.1 200 ok");
    assert!(answers[1].1.contains("content-length: 4194304"));
    assert!(answers[2].1.contains("connection: close"));
    assert!(answers[2].2 == data, "the whole file differs");
    // A malformed head is answered 400 and the connection closed.
    let mut c = std::net::TcpStream::connect(sock).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 400 "), "{raw:?}");
}
