//! HTTP(S) downloads of base images: resumable (Range), retried with backoff, verified by sha256
//! before they enter the cache.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::cache::{Cache, sha256_file};
use crate::io::progress::{Progress, Stage};

const ATTEMPTS: u32 = 6;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Downloads `url` into the cache and returns the cached path and its sha256. With `expected`,
/// a cached copy is used without network access, and a mismatching download is deleted and
/// refused.
pub fn download(cache: &Cache, url: &str, expected: Option<&str>) -> Result<(PathBuf, String)> {
    if let Some(sha) = expected {
        let hit = cache.download(sha);
        if hit.is_file() {
            return Ok((hit, sha.to_string()));
        }
    }
    let partial = cache.partial(url);
    let agent = agent();
    let mut last_error = None;
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        match fetch_once(&agent, url, &partial) {
            Ok(()) => {
                last_error = None;
                break;
            }
            Err(e) => {
                if attempt < ATTEMPTS && is_retryable(&e) {
                    eprintln!(
                        "download of {url} interrupted ({e:#}); resuming in {:.1} s",
                        delay.as_secs_f64()
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                let fatal = !is_retryable(&e);
                last_error = Some(e);
                if fatal {
                    break;
                }
            }
        }
    }
    if let Some(e) = last_error {
        return Err(e.context(format!(
            "downloading {url} failed; the partial file {} is kept, and the next run resumes it",
            partial.display()
        )));
    }
    let got = sha256_file(&partial)?;
    if let Some(sha) = expected
        && !got.eq_ignore_ascii_case(sha)
    {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "checksum mismatch for {url}: expected sha256 {sha}, got {got}; the download was deleted. \
             Check the URL and the profile's sha256 (a server may have replaced the file)"
        );
    }
    let dest = cache.download(&got);
    std::fs::rename(&partial, &dest)
        .with_context(|| format!("moving the download into {}", dest.display()))?;
    Ok((dest, got))
}

/// An error worth retrying: anything but an HTTP status that says the file is not there.
fn is_retryable(e: &anyhow::Error) -> bool {
    !e.to_string().starts_with("HTTP ")
}

fn fetch_once(agent: &ureq::Agent, url: &str, partial: &PathBuf) -> Result<()> {
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let resp = req
        .call()
        .map_err(|e| anyhow::anyhow!("connecting to {url}: {e}"))?;
    let status = resp.status().as_u16();
    let append = match status {
        206 => true,
        200 => false, // the server ignored Range (or we had nothing): start over
        416 if have > 0 => return Ok(()), // already complete
        s => bail!("HTTP {s} for {url}"),
    };
    let length = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    let start = if append { have } else { 0 };
    let name = url
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(url);
    let mut progress = Progress::new(Stage::Download, name, length.map(|l| l + start));
    progress.inc(start);
    let mut body = resp.into_body();
    let mut reader = body.as_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("receiving {url} after {} bytes", start + received))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", partial.display()))?;
        received += n as u64;
        progress.inc(n as u64);
    }
    file.sync_all()?;
    progress.finish();
    if let Some(l) = length
        && received < l
    {
        bail!("connection closed after {received} of {l} bytes");
    }
    Ok(())
}
