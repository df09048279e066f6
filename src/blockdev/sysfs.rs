//! Linux disk discovery: `/sys/block`, `/proc/self/mountinfo`, `/proc/swaps` and udev's
//! database, read into plain [`BlockDevice`] data.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{BlockDevice, PartitionInfo};

/// The whole disk at `path` (a block device node); a partition is refused with the disk's name.
pub fn disk_at(path: &Path, meta: &std::fs::Metadata) -> Result<BlockDevice> {
    if !meta.file_type().is_block_device() {
        bail!(
            "{} is neither a block device nor a regular file",
            path.display()
        );
    }
    let rdev = meta.rdev();
    let devno = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let sys_dev = PathBuf::from(format!("/sys/dev/block/{devno}"));
    let real = std::fs::canonicalize(&sys_dev)
        .with_context(|| format!("finding {} in sysfs", path.display()))?;
    if real.join("partition").exists() {
        let disk = real
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        bail!(
            "{} is a partition; give the whole disk (/dev/{disk})",
            path.display()
        );
    }
    let name = real
        .file_name()
        .context("sysfs path has a name")?
        .to_string_lossy()
        .into_owned();
    read_device(&name)
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Mount points by device number, from /proc/self/mountinfo (field 3 is `major:minor`, field 5
/// the mount point, with octal escapes for spaces).
fn mounts_by_devno() -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() > 4 {
                m.entry(f[2].to_string())
                    .or_default()
                    .push(f[4].replace("\\040", " "));
            }
        }
    }
    m
}

/// Device numbers of active swap areas.
fn swap_devnos() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/swaps") {
        for line in text.lines().skip(1) {
            if let Some(path) = line.split_whitespace().next()
                && let Ok(meta) = std::fs::metadata(path)
                && meta.file_type().is_block_device()
            {
                let rdev = meta.rdev();
                v.push(format!(
                    "{}:{}",
                    nix::sys::stat::major(rdev),
                    nix::sys::stat::minor(rdev)
                ));
            }
        }
    }
    v
}

fn list_dir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The serial number: sysfs where the driver exposes it, else udev's ID_SERIAL_SHORT.
fn serial_of(sys: &Path, devno: &str) -> Option<String> {
    for attr in ["device/serial", "serial", "device/vpd_pg80"] {
        if let Some(s) = read_trim(&sys.join(attr)) {
            let s: String = s
                .chars()
                .filter(|c| !c.is_control())
                .collect::<String>()
                .trim()
                .to_string();
            if !s.is_empty() {
                return Some(s);
            }
        }
    }
    let udev = std::fs::read_to_string(format!("/run/udev/data/b{devno}")).ok()?;
    udev.lines()
        .find_map(|l| l.strip_prefix("E:ID_SERIAL_SHORT="))
        .or_else(|| udev.lines().find_map(|l| l.strip_prefix("E:ID_SERIAL=")))
        .map(str::to_string)
}

fn bus_of(sys: &Path, name: &str) -> String {
    let real = std::fs::canonicalize(sys)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if name.starts_with("loop") {
        "loop".into()
    } else if real.contains("/usb") {
        "usb".into()
    } else if name.starts_with("mmcblk") || real.contains("/mmc") {
        "sd/mmc".into()
    } else if name.starts_with("nvme") {
        "nvme".into()
    } else if real.contains("/virtio") {
        "virtio".into()
    } else if real.contains("/ata") {
        "sata".into()
    } else if real.contains("/virtual/") {
        "virtual".into()
    } else {
        "other".into()
    }
}

/// Reads one disk from sysfs.
pub fn read_device(name: &str) -> Result<BlockDevice> {
    let sys = PathBuf::from("/sys/block").join(name);
    let devno = read_trim(&sys.join("dev"))
        .with_context(|| format!("{name} is not a block device in /sys/block"))?;
    let mounts = mounts_by_devno();
    let swaps = swap_devnos();
    let mut partitions = Vec::new();
    for entry in list_dir(&sys) {
        let p = sys.join(&entry);
        if p.join("partition").exists() {
            let pdev = read_trim(&p.join("dev")).unwrap_or_default();
            partitions.push(PartitionInfo {
                path: format!("/dev/{entry}"),
                mountpoints: mounts.get(&pdev).cloned().unwrap_or_default(),
                swap: swaps.contains(&pdev),
                holders: list_dir(&p.join("holders")),
                name: entry,
            });
        }
    }
    let model = [
        read_trim(&sys.join("device/vendor")),
        read_trim(&sys.join("device/model")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ");
    Ok(BlockDevice {
        name: name.to_string(),
        path: format!("/dev/{name}"),
        size: read_trim(&sys.join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            * 512,
        logical_block_size: read_trim(&sys.join("queue/logical_block_size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(512),
        removable: read_trim(&sys.join("removable")).as_deref() == Some("1"),
        read_only: read_trim(&sys.join("ro")).as_deref() == Some("1"),
        bus: bus_of(&sys, name),
        model,
        serial: serial_of(&sys, &devno),
        mountpoints: mounts.get(&devno).cloned().unwrap_or_default(),
        swap: swaps.contains(&devno),
        holders: list_dir(&sys.join("holders")),
        partitions,
        backing_file: read_trim(&sys.join("loop/backing_file")),
        devno,
        platform_refusals: Vec::new(),
    })
}

/// Disks worth showing: real disks and attached loop devices (no RAM disks, zram, dm or md).
pub fn list() -> Result<Vec<BlockDevice>> {
    let mut v = Vec::new();
    for name in list_dir(Path::new("/sys/block")) {
        if ["ram", "zram", "dm-", "md", "sr", "fd"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let d = read_device(&name)?;
        if d.size == 0 || (d.bus == "loop" && d.backing_file.is_none()) {
            continue;
        }
        v.push(d);
    }
    Ok(v)
}
