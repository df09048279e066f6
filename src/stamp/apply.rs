//! Applies a stamp plan to an image file, without mounting anything.
//!
//! First the image is checked against its profile (the partitions it promises, their
//! filesystems, the boot label); then the boot partition is opened copy-on-write (`disk::CowDevice`)
//! and the seed files are written into its FAT in-process; the MBR disk signature is replaced, with `PARTUUID=`
//! references in `cmdline.txt` following it. The result is a set of patches over the base, which
//! `artifact::writer` applies while it copies the base once.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::disk::patch::Patch;
use crate::disk::{self, CowDevice, DiskLayout, PartitionSlice};
use crate::fs::{self, ext4, fat};
use crate::plan::profile::{
    FsKind, PartitionRole, PartitionSpec, Profile, ProvisionMethod, TableKind,
};
use crate::plan::stamp_plan::StampPlan;

/// Checks that the image at `path` has what `profile` promises; returns its layout.
pub fn check_layout(path: &Path, profile: &Profile) -> Result<DiskLayout> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let layout = disk::read_layout(&mut f, profile.disk.sector_size)
        .with_context(|| format!("reading the partition table of {}", path.display()))?;
    let want = match profile.disk.table {
        TableKind::Mbr => "mbr",
        TableKind::Gpt => "gpt",
    };
    if layout.table != want {
        bail!(
            "{} does not look like a {} image: the profile expects {} but the image has {}",
            path.display(),
            profile.name,
            want.to_uppercase(),
            layout.describe()
        );
    }
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
        check_partition(path, profile, &layout, &mut f, spec, part)?;
    }
    Ok(layout)
}

/// One partition against its profile entry: where it starts, its filesystem, an ext4 label.
fn check_partition(
    path: &Path,
    profile: &Profile,
    layout: &DiskLayout,
    f: &mut File,
    spec: &PartitionSpec,
    part: &disk::Partition,
) -> Result<()> {
    let sector = part.start / profile.disk.sector_size;
    if let Some(want) = spec.first_sector
        && sector != want
    {
        bail!(
            "{} does not look like a {} image: partition {} starts at sector {sector}, the \
             profile expects sector {want} (found {})",
            path.display(),
            profile.name,
            spec.index,
            layout.describe()
        );
    }
    let found = fs::detect(f, part)?;
    if found != Some(spec.fs) {
        bail!(
            "{} does not look like a {} image: partition {} should hold {} but holds {}",
            path.display(),
            profile.name,
            spec.index,
            spec.fs,
            found.map_or("no filesystem kiln recognises".to_string(), |k| k
                .to_string())
        );
    }
    if let (FsKind::Ext4, Some(want)) = (spec.fs, &spec.label) {
        let label = ext4_label(f, part.start)?;
        if &label != want {
            bail!(
                "{} does not look like a {} image: partition {} is labelled {label:?}, expected {want:?}",
                path.display(),
                profile.name,
                spec.index
            );
        }
    }
    Ok(())
}

/// An ext4 volume name: the superblock (1024 bytes into the partition) holds it at 0x78, 16
/// bytes padded with NULs.
fn ext4_label(f: &mut File, start: u64) -> Result<String> {
    let mut name = [0u8; 16];
    f.seek(SeekFrom::Start(start + 1024 + 0x78))?;
    f.read_exact(&mut name)
        .context("reading the ext4 superblock's volume name")?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
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

/// A stamped node, still in memory: the byte regions that differ from the base, and the byte
/// ranges of the image that hold data (for the bmap).
pub struct Stamped {
    pub patches: Vec<Patch>,
    pub used: Vec<(u64, u64)>,
    pub report: StampReport,
}

/// Stamps the plan onto the base's boot partition in memory; the base file is only read.
pub fn stamp(base: &Path, profile: &Profile, plan: &StampPlan) -> Result<Stamped> {
    let layout = check_layout(base, profile)?;
    if profile.provision.method == ProvisionMethod::ConfigDrive {
        return unstamped(base, layout);
    }
    let seed_spec = profile
        .provision
        .seed_partition
        .and_then(|role| profile.partition(role))
        .context("the profile names no seed partition")?;
    let seed_part = layout
        .partition(seed_spec.index)
        .context("seed partition vanished")?
        .clone();

    let mut file = File::open(base).with_context(|| format!("opening {}", base.display()))?;
    // The boot partition is edited copy-on-write: only the pages the FAT code writes are held.
    let mut boot = CowDevice::new(
        PartitionSlice::new(file.try_clone()?, seed_part.start, seed_part.size),
        seed_part.size,
    );

    let when = fat_timestamp(&mut boot)?;

    let (signature, kept_because) = signature_to_apply(base, profile, &layout, plan)?;

    {
        let vol = fat::FatVolume::on(&mut boot, when).with_context(|| {
            format!(
                "opening the FAT filesystem in partition {}",
                seed_part.index
            )
        })?;
        if let Some(label) = &seed_spec.label {
            let found = vol.label();
            if !found.eq_ignore_ascii_case(label) {
                bail!(
                    "{} does not look like a {} image: partition {} is labelled {found:?}, expected {label:?}",
                    base.display(),
                    profile.name,
                    seed_part.index
                );
            }
        }
        for f in &plan.partition_files {
            vol.write_file(&f.path, &f.bytes)?;
        }
        if let Some(new) = &signature {
            follow_signature(&vol, &layout.disk_id, new)?;
        }
        vol.close()?;
    }

    let mut patches = Vec::new();
    if let Some(sig) = &signature {
        patches.push(mbr_patch(&mut file, sig)?);
    }

    let used = used_ranges(base, &mut file, &layout, seed_part.index, &mut boot)?;
    patches.extend(boot.into_runs().into_iter().map(|(offset, bytes)| Patch {
        offset: seed_part.start + offset,
        bytes,
    }));

    Ok(Stamped {
        patches,
        used,
        report: StampReport {
            layout_before: layout,
            disk_signature: signature,
            kept_signature_because: kept_because,
            fat_timestamp: iso_timestamp(&when),
        },
    })
}

/// A cmdline.txt that names the root by PARTUUID must follow the new disk signature.
fn follow_signature<T: Read + Write + Seek>(
    vol: &fat::FatVolume<T>,
    old_id: &str,
    new: &str,
) -> Result<()> {
    if let Some(cmdline) = vol.read_file("cmdline.txt")? {
        let text = String::from_utf8_lossy(&cmdline);
        let old = format!("PARTUUID={old_id}-");
        if text.contains(&old) {
            vol.write_file(
                "cmdline.txt",
                text.replace(&old, &format!("PARTUUID={new}-")).as_bytes(),
            )?;
        }
    }
    Ok(())
}

/// The FAT timestamps of what is written: SOURCE_DATE_EPOCH, else the base's own newest
/// root-directory entry, so builds on any day carry the base image's date.
fn fat_timestamp<D: Read + Write + Seek>(boot: &mut D) -> Result<fatfs::DateTime> {
    Ok(
        match crate::util::epoch::source_date_epoch()?.map(fat::fat_datetime) {
            Some(w) => w,
            None => {
                let probe = fat::FatVolume::on(boot, fat::fat_datetime(0))?;
                probe
                    .newest_root_timestamp()
                    .unwrap_or_else(|| fat::fat_datetime(0))
            }
        },
    )
}

fn iso_timestamp(when: &fatfs::DateTime) -> String {
    let (d, t) = (when.date, when.time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        d.year, d.month, d.day, t.hour, t.min, t.sec
    )
}

/// The disk signature the plan asks for, unless the root's fstab mounts by PARTUUID (then the
/// base's is kept, and why is the second value).
fn signature_to_apply(
    base: &Path,
    profile: &Profile,
    layout: &DiskLayout,
    plan: &StampPlan,
) -> Result<(Option<String>, Option<String>)> {
    Ok(match &plan.disk_signature {
        Some(sig) => match partuuid_in_fstab(base, profile, layout)? {
            Some(line) => (
                None,
                Some(format!(
                    "the root filesystem's /etc/fstab mounts by PARTUUID ({line}); keeping the base's disk signature"
                )),
            ),
            None => (Some(sig.clone()), None),
        },
        None => (None, None),
    })
}

/// The MBR with the new disk signature, as a patch over sector 0.
fn mbr_patch(file: &mut File, sig: &str) -> Result<Patch> {
    let mut mbr = Cursor::new(vec![0u8; 512]);
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(mbr.get_mut())?;
    disk::set_disk_signature(
        &mut mbr,
        u32::from_str_radix(sig, 16).context("signature is hex")?,
    )?;
    Ok(Patch {
        offset: 0,
        bytes: mbr.into_inner(),
    })
}

/// The byte ranges of the stamped image that hold data: the table area, the stamped boot FAT,
/// and the untouched partitions as they are in the base.
fn used_ranges<D: Read + Seek>(
    base: &Path,
    file: &mut File,
    layout: &DiskLayout,
    seed_index: usize,
    boot: &mut D,
) -> Result<Vec<(u64, u64)>> {
    let first = layout
        .partitions
        .iter()
        .map(|p| p.start)
        .min()
        .unwrap_or(layout.size);
    let mut used = vec![(0, first.max(512))];
    for p in &layout.partitions {
        let ranges = if p.index == seed_index {
            let whole = disk::Partition {
                start: 0,
                ..p.clone()
            };
            fat::used_ranges(boot, &whole)?
        } else {
            fs::used_ranges(base, file, p)?
        };
        used.extend(ranges.into_iter().map(|(s, l)| (p.start + s, l)));
    }
    Ok(used)
}

/// A config-drive image: no patches, only the byte ranges that hold data.
pub fn unstamped(base: &Path, layout: DiskLayout) -> Result<Stamped> {
    let mut file = File::open(base).with_context(|| format!("opening {}", base.display()))?;
    let first = layout
        .partitions
        .iter()
        .map(|p| p.start)
        .min()
        .unwrap_or(layout.size);
    let mut used = vec![(0, first.max(512))];
    if layout.table == "gpt" {
        // The backup entry array and header live in the last sectors of the disk.
        let sector = layout.sector_size;
        let tail = layout.size - (disk::gpt::last_usable_lba(layout.size, sector) + 1) * sector;
        used.push((layout.size - tail, tail));
    }
    for p in &layout.partitions {
        let ranges = fs::used_ranges(base, &mut file, p)?;
        used.extend(ranges.into_iter().map(|(s, l)| (p.start + s, l)));
    }
    used.sort_unstable();
    Ok(Stamped {
        patches: Vec::new(),
        used,
        report: StampReport {
            layout_before: layout,
            disk_signature: None,
            kept_signature_because: None,
            fat_timestamp: String::new(),
        },
    })
}

/// The /etc/fstab line on the root partition that mounts by this disk's PARTUUID, if any.
fn partuuid_in_fstab(
    image: &Path,
    profile: &Profile,
    layout: &DiskLayout,
) -> Result<Option<String>> {
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
        .find(|l| {
            !l.trim_start().starts_with('#')
                && l.to_ascii_lowercase()
                    .contains(&needle.to_ascii_lowercase())
        })
        .map(|l| l.trim().to_string()))
}
