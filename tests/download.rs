//! Base images over HTTP: a server on loopback that drops the first connection halfway; kiln must
//! resume with a Range request, verify the sha256, cache the verified file, and never cache (or
//! build from) a mismatching one.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::*;

/// Serves `body` at any path. The first GET is cut off after half the body; later GETs honour
/// `Range: bytes=N-`. Records every request's Range header.
fn serve(body: Vec<u8>) -> (u16, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            log2.lock().unwrap().push(range.clone());
            let start: usize = range.as_deref().and_then(|r| r.parse().ok()).unwrap_or(0);
            let (status, extra) = if start > 0 {
                (
                    "206 Partial Content",
                    format!(
                        "Content-Range: bytes {start}-{}/{}\r\n",
                        body.len() - 1,
                        body.len()
                    ),
                )
            } else {
                ("200 OK", String::new())
            };
            let rest = &body[start..];
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                rest.len()
            );
            let _ = s.write_all(head.as_bytes());
            let send = if n == 0 {
                &rest[..rest.len() / 2]
            } else {
                rest
            };
            let _ = s.write_all(send);
            let _ = s.flush();
            let mut sink = [0u8; 1];
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = reader.read(&mut sink);
        }
    });
    (port, log)
}

#[test]
fn an_interrupted_download_resumes_and_is_verified_and_cached() {
    if !have_tools(&["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "xz"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    run(std::process::Command::new("xz")
        .args(["-T0", "-1", "-k"])
        .arg(&base));
    let xz = std::fs::read(dir.path().join("hypriot-layout.img.xz")).unwrap();
    let sha = sha256_hex(&xz);
    let (port, log) = serve(xz);
    let cluster = example_cluster("ceil", dir.path());
    let cache = dir.path().join("cache");
    let url = format!("http://127.0.0.1:{port}/hypriot-layout.img.xz");
    let out = dir.path().join("out");
    let o = kiln(&cache)
        .args(["build", "--node", "ceil-one", "--cluster"])
        .arg(&cluster)
        .args(["--base", &url, "--base-sha256", &sha, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ranges = log.lock().unwrap().clone();
    assert!(ranges.len() >= 2, "no retry happened: {ranges:?}");
    assert_eq!(ranges[0], None);
    assert!(
        ranges[1]
            .as_deref()
            .is_some_and(|r| r.parse::<u64>().unwrap() > 0),
        "the retry did not resume: {ranges:?}"
    );
    assert!(
        cache.join("downloads").join(&sha).is_file(),
        "the verified download is not in the cache"
    );
    // The build is the same as one from the local file.
    let local_out = dir.path().join("local");
    build(&cache, &cluster, "ceil-one", base.as_os_str(), &local_out);
    assert_eq!(
        std::fs::read(out.join("ceil-one.img.sha256sum")).unwrap(),
        std::fs::read(local_out.join("ceil-one.img.sha256sum")).unwrap()
    );
    // A second build takes the base from the cache: no new request.
    let before = log.lock().unwrap().len();
    run(kiln(&cache)
        .args(["build", "--node", "ceil-two", "--cluster"])
        .arg(&cluster)
        .args(["--base", &url, "--base-sha256", &sha, "--out"])
        .arg(&out));
    assert_eq!(log.lock().unwrap().len(), before);
}

#[test]
fn a_mismatching_download_never_enters_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = serve(vec![7u8; 300_000]);
    let cluster = example_cluster("ceil", dir.path());
    let cache = dir.path().join("cache");
    let out = dir.path().join("out");
    let o = kiln(&cache)
        .args(["build", "--node", "ceil-one", "--cluster"])
        .arg(&cluster)
        .args([
            "--base",
            &format!("http://127.0.0.1:{port}/x.img"),
            "--base-sha256",
            &"a".repeat(64),
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains("deleted"),
        "{err}"
    );
    for sub in ["downloads", "partial", "images"] {
        let n = std::fs::read_dir(cache.join(sub))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(n, 0, "{sub}/ is not empty after a mismatch");
    }
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().count() == 0);
}

/// `kiln flash --node … --progress json`: the base's download and decompression arrive as the
/// same JSON events as the write, on stdout, one object per line.
#[test]
fn a_flash_reports_its_download_as_json_events() {
    if !have_tools(&["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "xz"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    run(std::process::Command::new("xz")
        .args(["-T0", "-1", "-k"])
        .arg(&base));
    let xz = std::fs::read(dir.path().join("hypriot-layout.img.xz")).unwrap();
    let (port, _) = serve(xz);
    let cluster = example_cluster("ceil", dir.path());
    let cache = dir.path().join("cache");
    let card = dir.path().join("card.img");
    let o = kiln(&cache)
        .args(["flash", "--yes", "--progress", "json", "--node", "ceil-one"])
        .arg("--cluster")
        .arg(&cluster)
        .arg("--out")
        .arg(dir.path().join("out"))
        .args([
            "--base",
            &format!("http://127.0.0.1:{port}/hypriot-layout.img.xz"),
        ])
        .arg(&card)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let stages = |stage: &str| {
        events
            .iter()
            .filter(|e| e["event"] == "progress" && e["stage"] == stage)
            .collect::<Vec<_>>()
    };
    let download = stages("download");
    let last = download.last().expect("no download event");
    assert_eq!(last["target"], "hypriot-layout.img.xz");
    assert_eq!(last["bytes"], last["total"], "{download:?}");
    assert!(!stages("decompress").is_empty(), "{events:?}");
    assert!(!stages("write").is_empty(), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "result" && e["ok"] == true),
        "{events:?}"
    );
}
