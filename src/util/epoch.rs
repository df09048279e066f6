//! `SOURCE_DATE_EPOCH` (reproducible-builds.org): the one clock a reproducible build may read.

use anyhow::{Context, Result};

/// Seconds since the epoch from SOURCE_DATE_EPOCH, if set.
pub fn source_date_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        _ => Ok(None),
    }
}
