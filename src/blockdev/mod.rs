//! The only code that touches kernel devices: discovery, the safety checks that decide whether a
//! disk may be overwritten, and the few ioctls a writer needs.
//!
//! Discovery is plain data (`BlockDevice`): on Linux from `/sys/block`, `/proc/self/mountinfo`,
//! `/proc/swaps` and udev's database (`sysfs`), on macOS from `diskutil -plist` (`diskutil`) and
//! serial numbers from `system_profiler -xml` (`system_profiler`), so
//! the safety rules (`refusals`) are the same everywhere and testable without hardware.

pub mod authopen;
pub mod diskutil;
pub mod eject;
pub mod ioctl;
#[cfg(target_os = "linux")]
pub mod sysfs;
pub mod system_profiler;
pub mod volumes;

#[cfg(target_os = "macos")]
use diskutil as platform;
#[cfg(target_os = "linux")]
use sysfs as platform;

pub use platform::{list, read_device};

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    pub name: String,
    pub path: String,
    pub mountpoints: Vec<String>,
    pub swap: bool,
    pub holders: Vec<String>,
}

/// A whole disk as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDevice {
    pub name: String,
    pub path: String,
    /// `major:minor`.
    pub devno: String,
    pub size: u64,
    pub logical_block_size: u64,
    pub removable: bool,
    pub read_only: bool,
    pub bus: String,
    pub model: String,
    pub serial: Option<String>,
    /// Mount points of the whole disk (a partitionless filesystem).
    pub mountpoints: Vec<String>,
    pub swap: bool,
    pub holders: Vec<String>,
    pub partitions: Vec<PartitionInfo>,
    /// For loop devices, the file behind them.
    pub backing_file: Option<String>,
    /// Reasons the platform's discovery found, in that platform's words, that no flag unlocks:
    /// on macOS the disk behind `/`, an APFS container's store, a virtual disk (`diskutil.rs`).
    pub platform_refusals: Vec<String>,
}

impl BlockDevice {
    pub fn all_mountpoints(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .mountpoints
            .iter()
            .map(|m| (self.path.clone(), m.clone()))
            .collect();
        for p in &self.partitions {
            v.extend(p.mountpoints.iter().map(|m| (p.path.clone(), m.clone())));
        }
        v
    }

    pub fn describe(&self) -> String {
        format!(
            "{} — {}, {}, {} bus{}",
            self.path,
            if self.model.is_empty() {
                "unknown model"
            } else {
                &self.model
            },
            human_size(self.size),
            self.bus,
            self.serial
                .as_ref()
                .map(|s| format!(", serial {s}"))
                .unwrap_or_default()
        )
    }
}

pub fn human_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// What a write goes to.
#[derive(Debug, Clone)]
pub enum Target {
    Device(Box<BlockDevice>),
    /// A plain file (created if missing).
    File(PathBuf),
}

impl Target {
    pub fn path(&self) -> PathBuf {
        match self {
            Target::Device(d) => PathBuf::from(&d.path),
            Target::File(p) => p.clone(),
        }
    }
}

/// What a bare `disk4` (or `rdisk4`, `disk4s1`) on the command line names.
///
/// On macOS it is the disk, as `diskutil` and every guide spell it: `/dev/disk4`. If a file
/// `./disk4` exists too, the name is ambiguous and refused rather than guessed, because one guess
/// overwrites a disk. Elsewhere (Linux has no `/dev/diskN`) a bare name is a file, as always.
pub fn bare_disk(path: &Path, macos: bool, file_exists: bool) -> Result<Option<PathBuf>> {
    let Some(name) = path.to_str().filter(|_| macos) else {
        return Ok(None);
    };
    let number = name
        .strip_prefix("rdisk")
        .or_else(|| name.strip_prefix("disk"));
    let is_disk = number.is_some_and(|n| {
        !n.is_empty()
            && n.split('s')
                .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    });
    if !is_disk {
        return Ok(None);
    }
    if file_exists {
        bail!(
            "{name} could be the file ./{name} or the disk /dev/{name}; write ./{name} or /dev/{name}"
        );
    }
    Ok(Some(PathBuf::from(format!("/dev/{name}"))))
}

/// Resolves a path given on the command line to a disk or a plain file. Partitions are refused:
/// images go to whole disks. A bare `diskN` is a disk on macOS (`bare_disk`).
pub fn resolve(path: &Path) -> Result<Target> {
    let named = bare_disk(path, cfg!(target_os = "macos"), path.exists())?;
    let path = named.as_deref().unwrap_or(path);
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.starts_with("/dev") => {
            return Ok(Target::File(path.to_path_buf()));
        }
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    if meta.file_type().is_file() {
        return Ok(Target::File(path.to_path_buf()));
    }
    let ft = meta.file_type();
    if !ft.is_block_device() && !ft.is_char_device() {
        bail!("{} is neither a disk nor a regular file", path.display());
    }
    Ok(Target::Device(Box::new(platform::disk_at(path, &meta)?)))
}

/// Whether this user may write `dev` at all, asked before anything is unmounted or written.
///
/// macOS: the raw node is opened (not locked) and closed again, because the privacy controls
/// (Removable Volumes, Full Disk Access) answer only to an open; a mounted disk answers EBUSY,
/// which is fine here (it is unmounted after the question); with `authopen`, EACCES is fine too
/// (the administrator dialog opens it later). Linux: `access(2)`, because closing a block device
/// opened for writing makes udev re-probe it.
pub fn check_access(dev: &BlockDevice, authopen: bool) -> Result<()> {
    #[cfg(target_os = "macos")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let raw = diskutil::raw_path(&dev.path);
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&raw);
        match opened.map_err(|e| e.raw_os_error()) {
            Ok(_) | Err(Some(nix::libc::EBUSY)) => Ok(()),
            Err(Some(nix::libc::EACCES)) if authopen => Ok(()),
            Err(Some(n)) => match diskutil::open_refusal(&raw, n) {
                Some(why) => bail!("{why}"),
                None => bail!("opening {raw}: {}", std::io::Error::from_raw_os_error(n)),
            },
            Err(None) => bail!("opening {raw} failed"),
        }
    }
    #[cfg(not(target_os = "macos"))]
    {
        let _ = authopen;
        use nix::unistd::{AccessFlags, access};
        access(dev.path.as_str(), AccessFlags::R_OK | AccessFlags::W_OK).map_err(|e| {
            anyhow::anyhow!(
                "{} may only be written by root (or the disk group): run kiln with sudo ({e}); nothing was unmounted or written",
                dev.path
            )
        })
    }
}

/// Why a disk must not be written: each reason is final, whatever the user's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    SystemDisk(String),
    Swap(String),
    Holders(Vec<String>),
    NotRemovable,
    TooSmall {
        disk: u64,
        image: u64,
    },
    ReadOnly,
    SerialMismatch {
        expected: String,
        found: Option<String>,
    },
    /// A reason the platform's discovery gave, already worded for the user.
    Platform(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::SystemDisk(m) => {
                write!(f, "it holds the running system ({m} is mounted from it)")
            }
            Refusal::Swap(p) => write!(f, "{p} is in use as swap (swapoff it first)"),
            Refusal::Holders(h) => write!(
                f,
                "it is in use by {} (LVM, RAID or device-mapper); release it first",
                h.join(", ")
            ),
            Refusal::NotRemovable => write!(
                f,
                "it is not a removable disk; pass --allow-non-removable if you really mean it"
            ),
            Refusal::TooSmall { disk, image } => {
                write!(
                    f,
                    "it holds {} but the image needs {}",
                    human_size(*disk),
                    human_size(*image)
                )
            }
            Refusal::ReadOnly => write!(f, "it is read-only (is the card's lock switch on?)"),
            Refusal::SerialMismatch { expected, found } => write!(
                f,
                "the node is pinned to the card with serial {expected}, this disk's serial is {}",
                found.as_deref().unwrap_or("unknown")
            ),
            Refusal::Platform(why) => f.write_str(why),
        }
    }
}

/// Mount points that mean "this is the machine's own disk".
const SYSTEM_MOUNTS: &[&str] = &["/", "/boot", "/boot/efi", "/usr", "/var", "/home", "/efi"];

/// Every reason `dev` must not receive an image of `image_size` bytes.
pub fn refusals(
    dev: &BlockDevice,
    image_size: Option<u64>,
    allow_non_removable: bool,
    pinned_serial: Option<&str>,
) -> Vec<Refusal> {
    let mut r: Vec<Refusal> = dev
        .platform_refusals
        .iter()
        .cloned()
        .map(Refusal::Platform)
        .collect();
    for (_, m) in dev.all_mountpoints() {
        if SYSTEM_MOUNTS.contains(&m.as_str()) {
            r.push(Refusal::SystemDisk(m));
        }
    }
    if dev.swap {
        r.push(Refusal::Swap(dev.path.clone()));
    }
    for p in &dev.partitions {
        if p.swap {
            r.push(Refusal::Swap(p.path.clone()));
        }
    }
    let mut holders = dev.holders.clone();
    for p in &dev.partitions {
        holders.extend(p.holders.iter().map(|h| format!("{h} (on {})", p.name)));
    }
    if !holders.is_empty() {
        r.push(Refusal::Holders(holders));
    }
    if !dev.removable && !allow_non_removable {
        r.push(Refusal::NotRemovable);
    }
    if dev.read_only {
        r.push(Refusal::ReadOnly);
    }
    if let Some(size) = image_size
        && size > dev.size
    {
        r.push(Refusal::TooSmall {
            disk: dev.size,
            image: size,
        });
    }
    if let Some(expected) = pinned_serial
        && dev.serial.as_deref() != Some(expected)
    {
        r.push(Refusal::SerialMismatch {
            expected: expected.to_string(),
            found: dev.serial.clone(),
        });
    }
    r
}

/// A USB card reader holding a 32 GiB card, for the tests of the safety rules.
#[cfg(test)]
pub(crate) fn card() -> BlockDevice {
    BlockDevice {
        name: "sdb".into(),
        path: "/dev/sdb".into(),
        devno: "8:16".into(),
        size: 32 << 30,
        logical_block_size: 512,
        removable: true,
        read_only: false,
        bus: "usb".into(),
        model: "SanDisk Ultra".into(),
        serial: Some("4C530001".into()),
        mountpoints: vec![],
        swap: false,
        holders: vec![],
        partitions: vec![PartitionInfo {
            name: "sdb1".into(),
            path: "/dev/sdb1".into(),
            mountpoints: vec![],
            swap: false,
            holders: vec![],
        }],
        backing_file: None,
        platform_refusals: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_disk_name_is_the_mac_disk_and_a_file_elsewhere() {
        let mac = |p: &str, exists| bare_disk(Path::new(p), true, exists);
        assert_eq!(mac("disk4", false).unwrap(), Some("/dev/disk4".into()));
        assert_eq!(mac("rdisk12", false).unwrap(), Some("/dev/rdisk12".into()));
        assert_eq!(mac("disk4s1", false).unwrap(), Some("/dev/disk4s1".into()));
        let both = mac("disk4", true).unwrap_err().to_string();
        assert!(both.contains("write ./disk4 or /dev/disk4"), "{both}");
        for file in [
            "disk",
            "disks",
            "disk4.img",
            "./disk4",
            "disk4s",
            "/tmp/disk4",
            "mydisk4",
        ] {
            assert_eq!(mac(file, false).unwrap(), None, "{file}");
        }
        assert_eq!(bare_disk(Path::new("disk4"), false, false).unwrap(), None);
    }

    #[test]
    fn a_plain_card_is_fine() {
        assert!(refusals(&card(), Some(2 << 30), false, Some("4C530001")).is_empty());
    }

    #[test]
    fn system_disks_swap_and_holders_are_refused_even_when_allowed() {
        let mut d = card();
        d.partitions[0].mountpoints = vec!["/".into()];
        d.partitions[0].holders = vec!["dm-0".into()];
        d.swap = true;
        let r = refusals(&d, None, true, None);
        assert!(r.contains(&Refusal::SystemDisk("/".into())));
        assert!(r.iter().any(|x| matches!(x, Refusal::Holders(_))));
        assert!(r.contains(&Refusal::Swap("/dev/sdb".into())));
    }

    #[test]
    fn non_removable_small_and_wrong_serial() {
        let mut d = card();
        d.removable = false;
        let r = refusals(&d, Some(64 << 30), false, Some("OTHER"));
        assert!(r.contains(&Refusal::NotRemovable));
        assert!(r.iter().any(|x| matches!(x, Refusal::TooSmall { .. })));
        assert!(
            r.iter()
                .any(|x| matches!(x, Refusal::SerialMismatch { .. }))
        );
        assert!(!refusals(&d, None, true, None).contains(&Refusal::NotRemovable));
    }

    #[test]
    fn a_mounted_data_partition_is_not_a_refusal() {
        // It is unmounted after confirmation instead.
        let mut d = card();
        d.partitions[0].mountpoints = vec!["/media/pi/boot".into()];
        assert!(refusals(&d, None, false, None).is_empty());
        assert_eq!(
            d.all_mountpoints(),
            vec![("/dev/sdb1".to_string(), "/media/pi/boot".to_string())]
        );
    }
}
