//! `kiln serve --check URL`: replays what Ironic and ironic-python-agent do with an image URL, and
//! says what would make them fail.
//!
//! Ironic HEADs the image (200 with Content-Length). The checksum file beside it is read by IPA's
//! own rules (`_fetch_checksum` in ironic_python_agent/extensions/standby.py, which Ironic's
//! `checksum_utils.get_checksum_from_url` copies), the algorithm follows from the hash's length,
//! and the digest must equal the file's hash exactly (IPA compares strings: an upper-case hash
//! fails). IPA downloads the image with one plain GET, and the format inspector of oslo.utils
//! (see [`crate::artifact::inspect`]) must find a permitted format that passes its safety checks.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256, Sha512};

use crate::artifact::inspect;

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

/// The container format of an image from its head, as a BareMetalHost's `image.format` names
/// it: a partitioned disk (oslo's `gpt`) is `raw`.
pub fn classify(head: &[u8]) -> Format {
    let found = inspect::inspect(head);
    match found.format() {
        Some("raw" | "gpt") => Format::Raw,
        Some("qcow2") => match found.violations.first() {
            None => Format::Qcow2,
            Some(why) => Format::BadQcow2(why),
        },
        Some(other) => Format::Other(other),
        None => Format::Other("ambiguous"),
    }
}

pub fn sniff_format(path: &Path) -> Option<Format> {
    let mut head = Vec::new();
    File::open(path)
        .ok()?
        .take(inspect::HEAD_LEN as u64)
        .read_to_end(&mut head)
        .ok()?;
    Some(classify(&head))
}

/// The digest IPA picks from a checksum's length (`_get_algorithm_by_length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Sha256,
    Sha512,
}

fn algorithm_of(hash: &str) -> Result<Algorithm> {
    match hash.len() {
        64 => Ok(Algorithm::Sha256),
        128 => Ok(Algorithm::Sha512),
        32 => bail!("it is an MD5 hash, which IPA refuses unless md5_enabled is set"),
        n => bail!("a {n}-digit hash is no algorithm IPA knows"),
    }
}

/// Python's `str.isspace()` and the regex `\s` of a str pattern.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// IPA formats the file name into its regexes unescaped: a `.` matches any character.
fn name_matches(text: &[char], name: &[char]) -> bool {
    text.len() == name.len()
        && text
            .iter()
            .zip(name)
            .all(|(t, n)| *n == '.' && *t != '\n' || t == n)
}

/// `\s[*]?{filename}$`
fn name_at_end(line: &[char], name: &[char]) -> bool {
    let Some(at) = line.len().checked_sub(name.len()) else {
        return false;
    };
    if !name_matches(&line[at..], name) {
        return false;
    }
    match at.checked_sub(1).map(|i| line[i]) {
        Some(c) if py_space(c) => true,
        Some('*') => at >= 2 && py_space(line[at - 2]),
        _ => false,
    }
}

/// `\s\({filename}\)\s`, anywhere in the line.
fn name_in_parentheses(line: &[char], name: &[char]) -> bool {
    let n = name.len();
    (0..line.len()).any(|i| {
        line.len() >= i + n + 4
            && py_space(line[i])
            && line[i + 1] == '('
            && name_matches(&line[i + 2..i + 2 + n], name)
            && line[i + 2 + n] == ')'
            && py_space(line[i + 3 + n])
    })
}

fn is_hex(s: &[char]) -> bool {
    s.iter().all(char::is_ascii_hexdigit)
}

/// `^([a-fA-F\d]{len})\s`, then `\s([a-fA-F\d]{len})$`.
fn hash_in_line(line: &[char], len: usize) -> Option<String> {
    if line.len() > len && is_hex(&line[..len]) && py_space(line[len]) {
        return Some(line[..len].iter().collect());
    }
    let at = line.len().checked_sub(len)?;
    (at > 0 && is_hex(&line[at..]) && py_space(line[at - 1])).then(|| line[at..].iter().collect())
}

/// The hash IPA takes for `basename` from a checksum file, exactly as written (IPA keeps its
/// case).
pub fn parse_checksum_file(text: &str, basename: &str) -> Result<String> {
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.trim_matches(py_space))
        .filter(|l| !l.is_empty())
        .collect();
    match lines.as_slice() {
        [] => bail!("Empty checksum file"),
        // One line without a space must be the bare hash: a tab does not separate a name here.
        [only] if !only.contains(' ') => {
            let c: Vec<char> = only.chars().collect();
            if [32, 64, 128].contains(&c.len()) && is_hex(&c) {
                return Ok(only.to_string());
            }
            bail!(
                "Invalid checksum file (No valid checksum found): IPA reads a single line without \
                 a space as the bare hash (`<hash>  <name>` needs spaces, not a tab)"
            )
        }
        _ => {}
    }
    let name: Vec<char> = basename.chars().collect();
    for line in lines.iter().filter(|l| !l.starts_with('#')) {
        let line: Vec<char> = line.chars().collect();
        if !name_at_end(&line, &name) && !name_in_parentheses(&line, &name) {
            continue;
        }
        if let Some(h) = [32, 64, 128].iter().find_map(|&n| hash_in_line(&line, n)) {
            return Ok(h);
        }
    }
    bail!("Checksum file does not contain name {basename} (IPA matches the URL's exact file name)")
}

/// The file name IPA looks for: the basename of the URL's path (`urlparse(url).path`).
fn url_basename(url: &str) -> &str {
    let no_fragment = url.split('#').next().unwrap_or_default();
    let path = no_fragment.split('?').next().unwrap_or_default();
    path.rsplit('/').next().unwrap_or_default()
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

    let Some(length) = check_head(&agent, url, &mut problems)? else {
        return Ok(problems);
    };
    let expected = match checksum_from_file(&agent, url)? {
        Ok(e) => Some(e),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    let algorithm = expected.as_ref().map_or(Algorithm::Sha256, |e| e.1);
    let Some(got) = download(&agent, url, algorithm, &mut problems)? else {
        return Ok(problems);
    };
    if let Some(l) = length
        && l != got.total
    {
        problems.push(format!(
            "GET delivered {} bytes, HEAD promised {l}",
            got.total
        ));
    }
    check_digest(expected, &got, algorithm, &mut problems);
    check_format(&got.head, &mut problems);
    Ok(problems)
}

/// HEAD: 200, Content-Length and Last-Modified, as Ironic needs them. Returns the length (if
/// sent), or `None` when the status alone ends the check.
fn check_head(
    agent: &ureq::Agent,
    url: &str,
    problems: &mut Vec<String>,
) -> Result<Option<Option<u64>>> {
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
        return Ok(None);
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
    Ok(Some(length))
}

/// The downloaded image's digest against the checksum file's (`expected`), compared as IPA does.
fn check_digest(
    expected: Option<(String, Algorithm)>,
    got: &Download,
    algorithm: Algorithm,
    problems: &mut Vec<String>,
) {
    let name = match algorithm {
        Algorithm::Sha256 => "sha256",
        Algorithm::Sha512 => "sha512",
    };
    match expected {
        Some((e, _)) if e == got.digest => {
            eprintln!("ok   GET {} bytes, {name} matches", got.total)
        }
        Some((e, _)) if e.eq_ignore_ascii_case(&got.digest) => problems.push(format!(
            "the checksum file's hash {e} is not lower-case: IPA compares it exactly with the \
             {name} hex digest {}",
            got.digest
        )),
        Some((e, _)) => problems.push(format!(
            "the image's {name} is {}, the checksum file says {e}",
            got.digest
        )),
        None => {}
    }
}

/// The image's format, by the safety checks of oslo.utils' format inspector that IPA runs.
fn check_format(head: &[u8], problems: &mut Vec<String>) {
    let found = inspect::inspect(head);
    match found.ipa_refusal() {
        None => eprintln!(
            "ok   format {} (oslo.utils' format inspector: safety checks pass)",
            found.formats.join(",")
        ),
        Some(why) => problems.push(why),
    }
}

/// `URL.sha256sum`, read by IPA's rules: the hash and its algorithm, or the problem.
fn checksum_from_file(
    agent: &ureq::Agent,
    url: &str,
) -> Result<std::result::Result<(String, Algorithm), String>> {
    let sum_url = format!("{url}.sha256sum");
    let r = match agent.get(&sum_url).call() {
        Ok(r) if r.status().as_u16() == 200 => r,
        Ok(r) => {
            let status = r.status().as_u16();
            return Ok(Err(format!("checksum file {sum_url} answered {status}")));
        }
        Err(e) => return Ok(Err(format!("checksum file {sum_url}: {e}"))),
    };
    let text = r
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading the checksum file {sum_url}"))?;
    let parsed = parse_checksum_file(&text, url_basename(url))
        .and_then(|h| algorithm_of(&h).map(|a| (h, a)))
        .map_err(|e| format!("{sum_url}: {e:#}"));
    if let Ok((h, _)) = &parsed {
        eprintln!("ok   checksum file {sum_url}: {h}");
    }
    Ok(parsed)
}

struct Download {
    total: u64,
    digest: String,
    /// The first [`inspect::HEAD_LEN`] bytes, for the format inspector.
    head: Vec<u8>,
}

/// IPA's download: one plain GET, no Range, read in 1 MiB pieces, hashed as it comes.
fn download(
    agent: &ureq::Agent,
    url: &str,
    algorithm: Algorithm,
    problems: &mut Vec<String>,
) -> Result<Option<Download>> {
    let resp = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    if resp.status().as_u16() != 200 {
        problems.push(format!("GET {url} answered {}", resp.status().as_u16()));
        return Ok(None);
    }
    let mut body = resp.into_body();
    let mut reader = body.as_reader();
    let (mut sha256, mut sha512) = (Sha256::new(), Sha512::new());
    let mut head = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("downloading {url} after {total} bytes"))?;
        if n == 0 {
            break;
        }
        if head.len() < inspect::HEAD_LEN {
            let take = (inspect::HEAD_LEN - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        match algorithm {
            Algorithm::Sha256 => sha256.update(&buf[..n]),
            Algorithm::Sha512 => sha512.update(&buf[..n]),
        }
        total += n as u64;
    }
    let digest = match algorithm {
        Algorithm::Sha256 => hex::encode(sha256.finalize()),
        Algorithm::Sha512 => hex::encode(sha512.finalize()),
    };
    Ok(Some(Download {
        total,
        digest,
        head,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "9015ee2d8834254d561694a93d45c21b2d345cabfa6f1d44152b0d247eee9f7e";

    #[test]
    fn ipa_checksum_file_forms() {
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
    fn what_ipa_refuses_in_a_checksum_file() {
        // The case is kept, and compared exactly later.
        let upper = H.to_ascii_uppercase();
        assert_eq!(
            parse_checksum_file(&format!("{upper}  x.raw\n"), "x.raw").unwrap(),
            upper
        );
        // One line with a tab and no space: "Invalid checksum file".
        let e = parse_checksum_file(&format!("{H}\tx.raw\n"), "x.raw").unwrap_err();
        assert!(e.to_string().contains("Invalid checksum file"), "{e}");
        // Among several lines, the tab is whitespace like any other.
        assert_eq!(
            parse_checksum_file(&format!("# sums\n{H}\tx.raw\n"), "x.raw").unwrap(),
            H
        );
        assert!(parse_checksum_file("\n \n", "x.raw").is_err());
        assert!(algorithm_of(&"a".repeat(32)).is_err());
        assert_eq!(algorithm_of(&"a".repeat(128)).unwrap(), Algorithm::Sha512);
        assert_eq!(url_basename("http://h/d/x.raw?a=b/c#f"), "x.raw");
    }

    #[test]
    fn container_format_for_the_host() {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(classify(&h), Format::Qcow2);
        h[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        assert_eq!(classify(&h), Format::BadQcow2("Image has a backing file"));
        assert_eq!(classify(&[0u8; 512]), Format::Raw);
    }
}
