//! `kiln serve --check URL`: replays what Ironic and ironic-python-agent do with an image URL, and
//! says what would make them fail.
//!
//! Ironic HEADs the image (200 with Content-Length), reads the checksum file beside it by its own
//! rules (one bare hash, or lines of `<hash>  <name>`, `<hash> *<name>` or BSD
//! `SHA256 (<name>) = <hash>`, matched on the exact basename of the URL), and IPA downloads the
//! image with one plain GET and accepts only raw images and qcow2 without a backing file or an
//! external data file.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    /// A qcow2 IPA refuses, with the reason.
    BadQcow2(&'static str),
    Other(&'static str),
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 | Format::BadQcow2(_) => "qcow2",
            Format::Other(n) => n,
        }
    }
}

/// The format of an image from its first bytes.
pub fn classify(head: &[u8]) -> Format {
    let be64 = |o: usize| {
        head.get(o..o + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or(0)
    };
    let be32 = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
            .unwrap_or(0)
    };
    if head.starts_with(b"QFI\xfb") {
        if be64(8) != 0 {
            return Format::BadQcow2("it has a backing file");
        }
        // qcow2 v3 incompatible feature bit 2: an external data file.
        if be32(4) >= 3 && be64(72) & 0b100 != 0 {
            return Format::BadQcow2("it has an external data file");
        }
        return Format::Qcow2;
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        return Format::Other("vmdk");
    }
    if head.starts_with(b"conectix") {
        return Format::Other("vhd");
    }
    if head.starts_with(b"vhdxfile") {
        return Format::Other("vhdx");
    }
    if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        return Format::Other("vdi");
    }
    Format::Raw
}

pub fn sniff_format(path: &Path) -> Option<Format> {
    let mut head = vec![0u8; 512];
    let n = File::open(path).ok()?.read(&mut head).ok()?;
    head.truncate(n);
    Some(classify(&head))
}

/// The hash for `basename` in a checksum file, by Ironic's rules.
pub fn parse_checksum_file(text: &str, basename: &str) -> Result<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if lines.len() == 1 && is_hex(lines[0]) {
        return Ok(lines[0].to_ascii_lowercase());
    }
    for l in &lines {
        if let Some(rest) = l.strip_prefix("SHA256 (")
            && let Some((name, hash)) = rest.split_once(") = ")
        {
            if name == basename && is_hex(hash.trim()) {
                return Ok(hash.trim().to_ascii_lowercase());
            }
            continue;
        }
        if let Some((hash, name)) = l.split_once(char::is_whitespace) {
            let name = name.trim_start().trim_start_matches('*');
            if name == basename && is_hex(hash) {
                return Ok(hash.to_ascii_lowercase());
            }
        }
    }
    bail!(
        "the checksum file has no sha256 line for {basename:?} (Ironic matches the exact file name)"
    )
}

/// Runs every check against `url`; returns the problems found (empty: Ironic and IPA would be
/// happy). Progress goes to stderr.
pub fn check(url: &str) -> Result<Vec<String>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut problems = Vec::new();
    let basename = url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_string();

    let head = agent
        .head(url)
        .call()
        .with_context(|| format!("HEAD {url}"))?;
    let status = head.status().as_u16();
    let length = head
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if status != 200 {
        problems.push(format!("HEAD {url} answered {status}, Ironic needs 200"));
        return Ok(problems);
    }
    match length {
        Some(l) => eprintln!("ok   HEAD 200, Content-Length {l}"),
        None => {
            problems.push("HEAD has no Content-Length; Ironic needs it to check the size".into())
        }
    }
    if head.headers().get("last-modified").is_none() {
        problems.push(
            "HEAD has no Last-Modified; Ironic's image cache cannot tell when the image changed"
                .into(),
        );
    }

    let sum_url = format!("{url}.sha256sum");
    let expected = match agent.get(&sum_url).call() {
        Ok(r) if r.status().as_u16() == 200 => {
            let text = r
                .into_body()
                .read_to_string()
                .context("reading the checksum file")?;
            match parse_checksum_file(&text, &basename) {
                Ok(h) => {
                    eprintln!("ok   checksum file {sum_url}: {h}");
                    Some(h)
                }
                Err(e) => {
                    problems.push(format!("{sum_url}: {e:#}"));
                    None
                }
            }
        }
        Ok(r) => {
            problems.push(format!(
                "checksum file {sum_url} answered {}",
                r.status().as_u16()
            ));
            None
        }
        Err(e) => {
            problems.push(format!("checksum file {sum_url}: {e}"));
            None
        }
    };

    // IPA: one plain GET, no Range, read in 1 MiB pieces.
    let resp = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    if resp.status().as_u16() != 200 {
        problems.push(format!("GET {url} answered {}", resp.status().as_u16()));
        return Ok(problems);
    }
    let mut body = resp.into_body();
    let mut reader = body.as_reader();
    let mut h = Sha256::new();
    let mut first = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("downloading {url} after {total} bytes"))?;
        if n == 0 {
            break;
        }
        if first.len() < 512 {
            let take = (512 - first.len()).min(n);
            first.extend_from_slice(&buf[..take]);
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    let got = hex::encode(h.finalize());
    if let Some(l) = length
        && l != total
    {
        problems.push(format!("GET delivered {total} bytes, HEAD promised {l}"));
    }
    match expected {
        Some(e) if e == got => eprintln!("ok   GET {total} bytes, sha256 matches"),
        Some(e) => problems.push(format!(
            "the image's sha256 is {got}, the checksum file says {e}"
        )),
        None => {}
    }
    match classify(&first) {
        Format::Raw => eprintln!("ok   format raw"),
        Format::Qcow2 => eprintln!("ok   format qcow2 (no backing file, no data file)"),
        Format::BadQcow2(why) => problems.push(format!("a qcow2 that IPA refuses: {why}")),
        Format::Other(f) => problems.push(format!("format {f}: IPA accepts only raw and qcow2")),
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "9015ee2d8834254d561694a93d45c21b2d345cabfa6f1d44152b0d247eee9f7e";

    #[test]
    fn ironic_checksum_file_forms() {
        assert_eq!(parse_checksum_file(&format!("{H}\n"), "x.raw").unwrap(), H);
        assert_eq!(
            parse_checksum_file(
                &format!("{}  other.raw\n{H}  x.raw\n", "0".repeat(64)),
                "x.raw"
            )
            .unwrap(),
            H
        );
        assert_eq!(
            parse_checksum_file(&format!("{H} *x.raw\n"), "x.raw").unwrap(),
            H
        );
        assert_eq!(
            parse_checksum_file(&format!("SHA256 (x.raw) = {H}\n"), "x.raw").unwrap(),
            H
        );
        // Exact basename only.
        assert!(parse_checksum_file(&format!("{H}  x.raw.bak\n{H}  y.raw\n"), "x.raw").is_err());
    }

    #[test]
    fn qcow2_headers() {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(classify(&h), Format::Qcow2);
        h[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        assert_eq!(classify(&h), Format::BadQcow2("it has a backing file"));
        h[8..16].fill(0);
        h[72..80].copy_from_slice(&4u64.to_be_bytes());
        assert_eq!(
            classify(&h),
            Format::BadQcow2("it has an external data file")
        );
        assert_eq!(classify(&[0u8; 512]), Format::Raw);
    }
}
