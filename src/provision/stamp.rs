//! Applies a stamp plan to an image file, without mounting anything.
//!
//! First the image is checked against its profile (the partitions it promises, their
//! filesystems, the boot label); then the seed files are written into the boot FAT in-process; last
//! the MBR disk signature is replaced, with `PARTUUID=` references in `cmdline.txt` following it.

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::plan::StampPlan;
use crate::disk::{self, DiskLayout};
use crate::fs::{self, ext4, fat};
use crate::spec::profile::{PartitionRole, Profile};

/// Checks that the image at `path` has what `profile` promises; returns its layout.
pub fn check_layout(path: &Path, profile: &Profile) -> Result<DiskLayout> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let layout = disk::read_layout(&mut f, profile.disk.sector_size)
        .with_context(|| format!("reading the partition table of {}", path.display()))?;
    // Existence first, so the error lists every partition the image lacks at once.
    let missing: Vec<String> = profile
        .partitions
        .iter()
        .filter(|spec| layout.partition(spec.index).is_none())
        .map(|spec| format!("partition {} ({} {})", spec.index, spec.fs, spec.role))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} does not look like a {} image: the profile expects {} but found {}",
            path.display(),
            profile.name,
            missing.join(" and "),
            layout.describe()
        );
    }
    for spec in &profile.partitions {
        let part = layout.partition(spec.index).expect("checked above");
        let found = fs::detect(&mut f, part)?;
        if found != Some(spec.fs) {
            bail!(
                "{} does not look like a {} image: partition {} should hold {} but holds {}",
                path.display(),
                profile.name,
                spec.index,
                spec.fs,
                found.map_or("no filesystem kiln recognises".to_string(), |k| k.to_string())
            );
        }
    }
    Ok(layout)
}

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

/// What stamping did, for the manifest and the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StampReport {
    pub layout_before: DiskLayout,
    pub disk_signature: Option<String>,
    /// Why a derived disk signature was not applied, if it was not.
    pub kept_signature_because: Option<String>,
    pub fat_timestamp: String,
}

pub fn apply(image_path: &Path, profile: &Profile, plan: &StampPlan) -> Result<StampReport> {
    let layout = check_layout(image_path, profile)?;
    let seed_spec = profile
        .partition(profile.provision.seed_partition)
        .context("the profile names no seed partition")?;
    let seed_part = layout.partition(seed_spec.index).context("seed partition vanished")?.clone();

    let when = match source_date_epoch()? {
        Some(epoch) => Some(fat::fat_datetime(epoch)),
        None => None,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image_path)
        .with_context(|| format!("opening {} for writing", image_path.display()))?;

    // Open once read-only in effect to learn the base's own newest timestamp when no
    // SOURCE_DATE_EPOCH is given: builds on any day then carry the base image's date.
    let when = match when {
        Some(w) => w,
        None => {
            let probe = fat::FatVolume::open(file.try_clone()?, &seed_part, fat::fat_datetime(0))?;
            let t = probe.newest_root_timestamp().unwrap_or_else(|| fat::fat_datetime(0));
            drop(probe);
            t
        }
    };
    let vol = fat::FatVolume::open(file.try_clone()?, &seed_part, when)?;
    if let Some(label) = &seed_spec.label {
        let found = vol.label();
        if !found.eq_ignore_ascii_case(label) {
            bail!(
                "{} does not look like a {} image: partition {} is labelled {found:?}, expected {label:?}",
                image_path.display(),
                profile.name,
                seed_part.index
            );
        }
    }

    let (signature, kept_because) = match &plan.disk_signature {
        Some(sig) => match partuuid_in_fstab(image_path, profile, &layout)? {
            Some(line) => (
                None,
                Some(format!("the root filesystem's /etc/fstab mounts by PARTUUID ({line}); keeping the base's disk signature")),
            ),
            None => (Some(sig.clone()), None),
        },
        None => (None, None),
    };

    for f in plan.partition_files.iter().filter(|f| f.partition == profile.provision.seed_partition || f.partition == PartitionRole::Boot) {
        vol.write_file(&f.path, &f.bytes)?;
    }
    if let Some(new) = &signature {
        // A cmdline.txt that names the root by PARTUUID must follow the new signature.
        if let Some(cmdline) = vol.read_file("cmdline.txt")? {
            let text = String::from_utf8_lossy(&cmdline);
            let old = format!("PARTUUID={}-", layout.disk_id);
            if text.contains(&old) {
                let updated = text.replace(&old, &format!("PARTUUID={new}-"));
                vol.write_file("cmdline.txt", updated.as_bytes())?;
            }
        }
    }
    vol.close()?;
    drop(file);

    if let Some(sig) = &signature {
        let value = u32::from_str_radix(sig, 16).context("derived signature is hex")?;
        let mut f = OpenOptions::new().write(true).open(image_path)?;
        disk::set_disk_signature(&mut f, value)?;
        f.sync_all()?;
    }
    let d = when.date;
    let t = when.time;
    Ok(StampReport {
        layout_before: layout,
        disk_signature: signature,
        kept_signature_because: kept_because,
        fat_timestamp: format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", d.year, d.month, d.day, t.hour, t.min, t.sec),
    })
}

/// The /etc/fstab line on the root partition that mounts by this disk's PARTUUID, if any.
fn partuuid_in_fstab(image: &Path, profile: &Profile, layout: &DiskLayout) -> Result<Option<String>> {
    let Some(root) = profile.partition(PartitionRole::Root) else {
        return Ok(None);
    };
    let Some(part) = layout.partition(root.index) else {
        return Ok(None);
    };
    if !crate::util::cmd::available("debugfs") {
        return Ok(None);
    }
    let fstab = ext4::read_file(image, part, "/etc/fstab")?.unwrap_or_default();
    let needle = format!("PARTUUID={}", layout.disk_id);
    Ok(String::from_utf8_lossy(&fstab)
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && l.to_ascii_lowercase().contains(&needle.to_ascii_lowercase()))
        .map(|l| l.trim().to_string()))
}
