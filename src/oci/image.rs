//! A pulled image: its manifest, config and layer blobs, all verified, wherever it came from.

use std::path::PathBuf;

use crate::util::input::read_capped;
use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::manifest::{ImageManifest, MAX_DOCUMENT, MAX_LAYERS, MediaType, parse_manifest};

/// One layer blob on local disk.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub digest: String,
    pub media_type: MediaType,
    pub size: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Image {
    /// The reference as the user gave it.
    pub reference: String,
    /// Digest of the image manifest (the platform's, for a multi-arch index).
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    /// Kept as JSON rather than oci-spec's `ImageConfiguration`: `oci append` extends it and must
    /// keep every field the builder wrote, in kiln's byte layout (sorted keys).
    pub config: Value,
    pub layers: Vec<LayerBlob>,
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Plain HTTP for registries (a local registry without TLS).
    pub insecure: bool,
    /// The platform wanted from a multi-arch index, in OCI terms (`amd64`, `arm64`).
    pub arch: String,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure: false,
            arch: host_arch().to_string(),
        }
    }
}

/// The OCI architecture name of the machine kiln runs on.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

impl Image {
    /// Builds an `Image` from a manifest and a way to find its blobs (already verified).
    pub fn from_manifest(
        manifest_bytes: &[u8],
        manifest_digest: String,
        blob: &mut dyn FnMut(&str) -> Result<PathBuf>,
    ) -> Result<Image> {
        let manifest = parse_manifest(manifest_bytes, &manifest_digest)?;
        let config_digest = manifest.config().digest().to_string();
        let config_bytes = read_capped(&blob(&config_digest)?, MAX_DOCUMENT, "the image config")?;
        let config: Value = serde_json::from_slice(&config_bytes).context("parsing the config")?;
        let listed = manifest.layers().len();
        if listed > MAX_LAYERS {
            bail!("the manifest lists {listed} layers, more than the {MAX_LAYERS} kiln unpacks");
        }
        let mut layers = Vec::new();
        for l in manifest.layers() {
            let digest = l.digest().to_string();
            layers.push(LayerBlob {
                media_type: l.media_type().clone(),
                size: l.size(),
                path: blob(&digest)?,
                digest,
            });
        }
        Ok(Image {
            reference: String::new(),
            manifest_digest,
            manifest,
            config_digest,
            config_bytes,
            config,
            layers,
        })
    }

    /// The image's creation time (`created` in its config), seconds since the epoch.
    ///
    /// Absent: `None`. Before 1970 (Go's zero time, written by some builders): the epoch. A date
    /// kiln cannot put in a filesystem (after 2106, where 32-bit times end) or not a date at all
    /// is refused rather than wrapped.
    pub fn created(&self) -> Result<Option<i64>> {
        let Some(text) = self.config["created"].as_str() else {
            return Ok(None);
        };
        match parse_rfc3339(text) {
            Some(t) if t > i64::from(u32::MAX) => bail!(
                "the image config's created date {text:?} is after 2106; set SOURCE_DATE_EPOCH to build it"
            ),
            Some(t) => Ok(Some(t.max(0))),
            None => bail!(
                "the image config's created date {text:?} is not an RFC 3339 time; set SOURCE_DATE_EPOCH to build it"
            ),
        }
    }

    /// `os/architecture` from the config.
    pub fn platform(&self) -> String {
        format!(
            "{}/{}",
            self.config["os"].as_str().unwrap_or("?"),
            self.config["architecture"].as_str().unwrap_or("?")
        )
    }
}

/// Seconds since the epoch for an RFC 3339 time (`2024-05-01T12:00:00.5+02:00`).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let (date, rest) = s.split_once(['T', 't', ' '])?;
    let mut d = date.splitn(3, '-');
    let (y, mo, da): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    // Field ranges first: every sum below then stays far inside i64.
    if !(0..=9999).contains(&y) || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let tz_at = rest.find(['Z', 'z', '+', '-']).unwrap_or(rest.len());
    let (time, tz) = rest.split_at(tz_at);
    let time = time.split('.').next()?;
    let mut t = time.splitn(3, ':');
    let (h, mi, se): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..=60).contains(&se) {
        return None;
    }
    let offset = match tz.chars().next() {
        Some(sign @ ('+' | '-')) => {
            let (oh, om) = tz[1..].split_once(':')?;
            let (oh, om) = (oh.parse::<i64>().ok()?, om.parse::<i64>().ok()?);
            if !(0..24).contains(&oh) || !(0..60).contains(&om) {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if sign == '+' { o } else { -o }
        }
        _ => 0,
    };
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(
            parse_rfc3339("2023-11-15T00:13:20.123456789+02:00"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        // Out-of-range fields are not dates (they used to wrap into one).
        assert_eq!(parse_rfc3339("99999999999999999-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00+99:00"), None);
        assert_eq!(
            parse_rfc3339("0001-01-01T00:00:00Z").map(|t| t < 0),
            Some(true)
        );
    }
}
