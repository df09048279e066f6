//! macOS disk discovery through `diskutil … -plist`, read into the same plain [`BlockDevice`] data
//! as Linux's sysfs, so the safety rules are the same. The parsing is plain functions over the
//! plist text (tested on every platform); running diskutil, `/dev/rdiskN` and eject are macOS-only.
//!
//! What diskutil cannot say: serial numbers (`system_profiler.rs` finds them, `read_device` adds
//! them) and swap (macOS swaps to files).

use anyhow::{Context, Result, bail};
use plist::{Dictionary, Value};

use super::{BlockDevice, PartitionInfo};

fn parse(xml: &[u8], what: &str) -> Result<Dictionary> {
    Value::from_reader_xml(xml)
        .with_context(|| format!("reading the plist of {what}"))?
        .into_dictionary()
        .with_context(|| format!("the plist of {what} is not a dictionary"))
}

fn text(d: &Dictionary, key: &str) -> Option<String> {
    d.get(key)
        .and_then(Value::as_string)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn flag(d: &Dictionary, key: &str) -> bool {
    d.get(key).and_then(Value::as_boolean).unwrap_or(false)
}

fn number(d: &Dictionary, key: &str) -> Option<u64> {
    d.get(key).and_then(Value::as_unsigned_integer)
}

/// The whole disks of `diskutil list -plist [external|physical]`.
pub fn whole_disks(list_xml: &[u8]) -> Result<Vec<String>> {
    let d = parse(list_xml, "diskutil list")?;
    Ok(d.get("WholeDisks")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_string)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

/// diskutil's bus names, in the words kiln uses on Linux.
fn bus(protocol: &str) -> String {
    match protocol {
        "USB" => "usb",
        "Secure Digital" => "sd/mmc",
        "PCI-Express" | "PCI" | "Apple Fabric" => "nvme",
        "SATA" | "ATA" => "sata",
        "Disk Image" => "disk-image",
        "Thunderbolt" => "thunderbolt",
        _ => "other",
    }
    .to_string()
}

/// Partition contents another layer of macOS keeps open while it exists, and what to do about
/// it: `diskutil unmountDisk` does not release them, so the exclusive open would fail later.
const HELD: &[(&str, &str)] = &[
    (
        "Apple_APFS",
        "stores an APFS container, which macOS keeps open",
    ),
    (
        "Apple_CoreStorage",
        "is a CoreStorage volume, which macOS keeps open",
    ),
    (
        "Apple_RAID",
        "is part of an AppleRAID set, which macOS keeps open",
    ),
];

/// The whole disks behind `/`, from `diskutil info -plist /`.
///
/// Since macOS 11, `/` is a sealed snapshot (`disk1s5s1`) of a volume in a synthesized APFS
/// container (`disk1`, `VirtualOrPhysical` = Virtual); the physical disk (`disk0`) only holds an
/// `Apple_APFS` partition (`disk0s2`) that stores the container. No mount point on the physical
/// disk says "/", so it is found through the container's `APFSPhysicalStores`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootDisks {
    /// The whole disk `/` is on (`ParentWholeDisk`): the APFS container, or on HFS+ the disk.
    pub container: Option<String>,
    /// The partitions that store the container (`disk0s2`).
    pub stores: Vec<String>,
}

/// Reads `diskutil info -plist /` (or the container's own `diskutil info -plist disk1`, which
/// carries the same `ParentWholeDisk` and `APFSPhysicalStores`).
pub fn root_disks(info_xml: &[u8]) -> Result<RootDisks> {
    let info = parse(info_xml, "diskutil info /")?;
    // `diskutil info` names a store `APFSPhysicalStore`, `diskutil list` names it `DeviceIdentifier`.
    let stores = info
        .get("APFSPhysicalStores")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_dictionary)
        .filter_map(|d| text(d, "APFSPhysicalStore").or_else(|| text(d, "DeviceIdentifier")))
        .collect();
    Ok(RootDisks {
        container: text(&info, "ParentWholeDisk"),
        stores,
    })
}

impl RootDisks {
    /// Every whole disk behind `/`: the container and the disks of its stores.
    pub fn whole_disks(&self) -> Vec<String> {
        let mut v: Vec<String> = self.container.iter().cloned().collect();
        v.extend(self.stores.iter().map(|s| whole_disk_name(s)));
        v.dedup();
        v
    }

    /// Why `disk` must never be written, when it is behind `/`; no flag unlocks this.
    pub fn reason(&self, disk: &str) -> Option<String> {
        if self.container.as_deref() == Some(disk) {
            return Some(if self.stores.is_empty() {
                "it holds the running macOS (/ is on it)".to_string()
            } else {
                "it holds the running macOS (the APFS container behind /)".to_string()
            });
        }
        let store = self.stores.iter().find(|s| whole_disk_name(s) == disk)?;
        Some(format!(
            "it holds the running macOS ({store} stores the APFS container {} behind /)",
            self.container.as_deref().unwrap_or("")
        ))
    }
}

/// The size of the disk itself. Not `TotalSize`: on a disk with a filesystem on the whole disk
/// (a FAT stick) it is the volume's size (15665463296 of a 15682240512-byte stick).
fn disk_size(info: &Dictionary) -> u64 {
    number(info, "Size")
        .or_else(|| number(info, "IOKitSize"))
        .unwrap_or(0)
}

/// The partitions (and an APFS container's volumes) of one `diskutil list` entry.
fn partitions_of(entry: &Dictionary) -> Vec<PartitionInfo> {
    let parts = ["Partitions", "APFSVolumes"]
        .iter()
        .filter_map(|k| entry.get(k).and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_dictionary);
    let mut v = Vec::new();
    for p in parts {
        let Some(pid) = text(p, "DeviceIdentifier") else {
            continue;
        };
        let mut mountpoints: Vec<String> = text(p, "MountPoint").into_iter().collect();
        // `/` is a mounted snapshot of a volume (disk1s5 → disk1s5s1).
        mountpoints.extend(
            p.get("MountedSnapshots")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_dictionary)
                .filter_map(|s| text(s, "SnapshotMountPoint")),
        );
        mountpoints.dedup();
        v.push(PartitionInfo {
            path: format!("/dev/{pid}"),
            mountpoints,
            swap: false,
            holders: Vec::new(),
            name: pid,
        });
    }
    v
}

/// The partitions' contents from the same entry, for the `HELD` check.
fn contents_of(entry: &Dictionary) -> Vec<(String, String)> {
    entry
        .get("Partitions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_dictionary)
        .filter_map(|p| Some((text(p, "DeviceIdentifier")?, text(p, "Content")?)))
        .collect()
}

/// Every macOS-only reason `id` must not be written, in macOS's words.
fn macos_refusals(
    id: &str,
    info: &Dictionary,
    entry: Option<&Dictionary>,
    root: &RootDisks,
) -> Vec<String> {
    if let Some(why) = root.reason(id) {
        // The boot disk: say only that, never how to erase it.
        return vec![why];
    }
    let mut r = Vec::new();
    let virtual_disk = text(info, "VirtualOrPhysical").as_deref() == Some("Virtual");
    if virtual_disk && text(info, "BusProtocol").as_deref() != Some("Disk Image") {
        r.push(
            "it is a virtual disk macOS synthesized (an APFS container or a RAID set); give the physical disk behind it"
                .to_string(),
        );
    }
    for (pid, content) in entry.map(contents_of).unwrap_or_default() {
        if let Some((_, what)) = HELD.iter().find(|(c, _)| *c == content) {
            r.push(format!(
                "{pid} {what}; if the card may be erased, reformat it first (diskutil eraseDisk FAT32 CARD MBRFormat /dev/{id}) and flash again"
            ));
        }
    }
    r
}

/// One whole disk from `diskutil info -plist diskN` and `diskutil list -plist diskN`, judged
/// against the disks behind `/` (`root_disks`).
pub fn device_from(info_xml: &[u8], list_xml: &[u8], root: &RootDisks) -> Result<BlockDevice> {
    let info = parse(info_xml, "diskutil info")?;
    let id = text(&info, "DeviceIdentifier").context("diskutil info names no device")?;
    if !flag(&info, "WholeDisk") {
        let parent = text(&info, "ParentWholeDisk").unwrap_or_else(|| "the disk".into());
        bail!("/dev/{id} is a partition; give the whole disk (/dev/{parent})");
    }
    let list = parse(list_xml, "diskutil list")?;
    let entry = list
        .get("AllDisksAndPartitions")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .filter_map(Value::as_dictionary)
                .find(|e| text(e, "DeviceIdentifier").as_deref() == Some(id.as_str()))
        });
    let protocol = text(&info, "BusProtocol").unwrap_or_default();
    Ok(BlockDevice {
        path: format!("/dev/{id}"),
        devno: id.clone(),
        size: disk_size(&info),
        logical_block_size: number(&info, "DeviceBlockSize").unwrap_or(512),
        // Cards and sticks; a USB SSD is "external" but not removable media, as on Linux.
        removable: flag(&info, "RemovableMedia") || flag(&info, "Removable"),
        read_only: info.contains_key("WritableMedia") && !flag(&info, "WritableMedia"),
        bus: bus(&protocol),
        model: text(&info, "MediaName")
            .or_else(|| text(&info, "IORegistryEntryName"))
            .unwrap_or_default(),
        serial: None,
        // A filesystem on the whole disk (a stick formatted without a partition table).
        mountpoints: entry
            .and_then(|e| text(e, "MountPoint"))
            .into_iter()
            .collect(),
        swap: false,
        holders: Vec::new(),
        partitions: entry.map(partitions_of).unwrap_or_default(),
        backing_file: None,
        platform_refusals: macos_refusals(&id, &info, entry, root),
        name: id,
    })
}

/// The whole disks to `diskutil unmountDisk` so that nothing of the targets stays mounted: one
/// per disk, whichever of its partitions (or the whole disk) is mounted.
pub fn unmount_plan(mounted: &[(String, String)]) -> Vec<String> {
    let mut disks: Vec<String> = mounted.iter().map(|(p, _)| whole_disk_of(p)).collect();
    disks.sort();
    disks.dedup();
    disks
}

/// What to tell the user when macOS refuses to open the raw node `raw` with `errno`; None for
/// errors with nothing macOS-specific to say.
pub fn open_refusal(raw: &str, errno: i32) -> Option<String> {
    use nix::libc::{EACCES, EBUSY, EPERM};
    match errno {
        // rdiskN is crw-r----- root:operator: only root may write it. authopen (the
        // administrator dialog) hands kiln an open descriptor, so the build stays the user's.
        EACCES => Some(format!(
            "{raw} may only be written by root: add --authopen to approve this one disk in macOS's administrator dialog, or run kiln with sudo (nothing was unmounted or written)"
        )),
        // The privacy controls (TCC) answer EPERM, even to root, until the terminal is allowed.
        EPERM => Some(format!(
            "macOS did not let this terminal open {raw}: allow the terminal app under System Settings → Privacy & Security → Files and Folders → Removable Volumes (or Full Disk Access), then run again (nothing was unmounted or written)"
        )),
        EBUSY => Some(format!(
            "{raw} is busy: a volume of it is mounted again or a program holds it (macOS re-mounts a card when a writer closes it); `diskutil unmountDisk force {}` and run again",
            raw.replacen("/dev/rdisk", "/dev/disk", 1)
        )),
        _ => None,
    }
}

/// The raw (unbuffered, much faster) node of a disk: `/dev/disk4` → `/dev/rdisk4`.
pub fn raw_path(dev: &str) -> String {
    match dev.strip_prefix("/dev/disk") {
        Some(rest) => format!("/dev/rdisk{rest}"),
        None => dev.to_string(),
    }
}

/// `/dev/rdisk4` or `/dev/disk4` → `disk4`; None for paths that are not disks.
pub fn disk_name(path: &str) -> Option<String> {
    let name = path
        .strip_prefix("/dev/r")
        .or_else(|| path.strip_prefix("/dev/"))?;
    (name.starts_with("disk") && name.len() > 4).then(|| name.to_string())
}

/// The whole disk of a partition's name: `disk0s2` → `disk0`.
fn whole_disk_name(part: &str) -> String {
    whole_disk_of(&format!("/dev/{part}"))
        .trim_start_matches("/dev/")
        .to_string()
}

/// The whole disk of a partition node: `/dev/disk4s1` → `/dev/disk4`.
pub fn whole_disk_of(part: &str) -> String {
    match part.rfind('s') {
        Some(i) if i > "/dev/disk".len() && part[i + 1..].chars().all(|c| c.is_ascii_digit()) => {
            part[..i].to_string()
        }
        _ => part.to_string(),
    }
}

#[cfg(target_os = "macos")]
fn diskutil(args: &[&str]) -> Result<Vec<u8>> {
    let out = crate::util::cmd::run_with(
        std::process::Command::new("diskutil").args(args),
        "diskutil",
    )?;
    Ok(out.stdout)
}

/// The disks behind `/`, asked of diskutil once per run. A failure is an error, not "none":
/// without it the boot disk could not be told apart.
#[cfg(target_os = "macos")]
fn root() -> Result<&'static RootDisks> {
    static ROOT: std::sync::OnceLock<RootDisks> = std::sync::OnceLock::new();
    if let Some(r) = ROOT.get() {
        return Ok(r);
    }
    let r = root_disks(&diskutil(&["info", "-plist", "/"])?)
        .context("finding the disks behind / (diskutil info -plist /)")?;
    Ok(ROOT.get_or_init(|| r))
}

#[cfg(target_os = "macos")]
pub fn read_device(name: &str) -> Result<BlockDevice> {
    let mut dev = device_from(
        &diskutil(&["info", "-plist", name])?,
        &diskutil(&["list", "-plist", name])?,
        root()?,
    )?;
    if let Ok(serials) = super::system_profiler::current() {
        dev.serial = serials.get(&dev.name).cloned();
    }
    Ok(dev)
}

/// Physical disks (internal ones too, so `kiln devices` shows why they are refused).
#[cfg(target_os = "macos")]
pub fn list() -> Result<Vec<BlockDevice>> {
    whole_disks(&diskutil(&["list", "-plist", "physical"])?)?
        .iter()
        .map(|d| read_device(d))
        .collect()
}

#[cfg(target_os = "macos")]
pub fn disk_at(path: &std::path::Path, _meta: &std::fs::Metadata) -> Result<BlockDevice> {
    let p = path.to_string_lossy();
    let name = disk_name(&p).with_context(|| format!("{p} is not a disk (/dev/diskN)"))?;
    read_device(&name)
}

/// The system's volumes through `diskutil`: `unmountDisk force` takes every volume of the disk
/// at once, as Raspberry Pi Imager and etcher do.
#[cfg(target_os = "macos")]
pub struct Diskutil;

#[cfg(target_os = "macos")]
impl super::volumes::Volumes for Diskutil {
    fn mounted(&self, disk: &str) -> Result<Vec<String>> {
        let name = disk_name(disk).with_context(|| format!("{disk} is not a disk"))?;
        let list = parse(&diskutil(&["list", "-plist", &name])?, "diskutil list")?;
        Ok(list
            .get("AllDisksAndPartitions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_dictionary)
            .flat_map(|e| {
                let mut m: Vec<String> = text(e, "MountPoint").into_iter().collect();
                m.extend(partitions_of(e).into_iter().flat_map(|p| p.mountpoints));
                m
            })
            .collect())
    }
    fn unmount_disk(&self, disk: &str) -> Result<()> {
        diskutil(&["unmountDisk", "force", disk]).map(drop)
    }
    fn eject(&self, disk: &str) -> Result<()> {
        diskutil(&["eject", disk]).map(drop)
    }
    fn pause(&self, how_long: std::time::Duration) {
        std::thread::sleep(how_long);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `diskutil info -plist disk4` of a 32 GB card in a USB reader (keys as diskutil prints them).
    const CARD_INFO: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>BusProtocol</key><string>USB</string>
	<key>Content</key><string>FDisk_partition_scheme</string>
	<key>DeviceBlockSize</key><integer>512</integer>
	<key>DeviceIdentifier</key><string>disk4</string>
	<key>DeviceNode</key><string>/dev/disk4</string>
	<key>Ejectable</key><true/>
	<key>IORegistryEntryName</key><string>SD Card Reader Media</string>
	<key>Internal</key><false/>
	<key>MediaName</key><string>Apple SD Card Reader</string>
	<key>MountPoint</key><string></string>
	<key>ParentWholeDisk</key><string>disk4</string>
	<key>Removable</key><true/>
	<key>RemovableMedia</key><true/>
	<key>Size</key><integer>31914983424</integer>
	<key>TotalSize</key><integer>31914983424</integer>
	<key>VirtualOrPhysical</key><string>Physical</string>
	<key>WholeDisk</key><true/>
	<key>Writable</key><true/>
	<key>WritableMedia</key><true/>
</dict>
</plist>"#;

    const CARD_LIST: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<plist version="1.0">
<dict>
	<key>AllDisks</key><array><string>disk4</string><string>disk4s1</string><string>disk4s2</string></array>
	<key>AllDisksAndPartitions</key>
	<array>
		<dict>
			<key>Content</key><string>FDisk_partition_scheme</string>
			<key>DeviceIdentifier</key><string>disk4</string>
			<key>OSInternal</key><false/>
			<key>Partitions</key>
			<array>
				<dict>
					<key>Content</key><string>Windows_FAT_32</string>
					<key>DeviceIdentifier</key><string>disk4s1</string>
					<key>MountPoint</key><string>/Volumes/HypriotOS</string>
					<key>Size</key><integer>67108864</integer>
					<key>VolumeName</key><string>HypriotOS</string>
				</dict>
				<dict>
					<key>Content</key><string>Linux</string>
					<key>DeviceIdentifier</key><string>disk4s2</string>
					<key>Size</key><integer>1394606080</integer>
				</dict>
			</array>
			<key>Size</key><integer>31914983424</integer>
		</dict>
	</array>
	<key>VolumesFromDisks</key><array><string>HypriotOS</string></array>
	<key>WholeDisks</key><array><string>disk4</string></array>
</dict>
</plist>"#;

    #[test]
    fn a_card_in_a_usb_reader() {
        assert_eq!(whole_disks(CARD_LIST.as_bytes()).unwrap(), ["disk4"]);
        let d = device_from(
            CARD_INFO.as_bytes(),
            CARD_LIST.as_bytes(),
            &RootDisks::default(),
        )
        .unwrap();
        assert_eq!(d.path, "/dev/disk4");
        assert_eq!(d.size, 31_914_983_424);
        assert!(d.removable && !d.read_only);
        assert_eq!(d.bus, "usb");
        assert_eq!(d.model, "Apple SD Card Reader");
        assert_eq!(
            d.all_mountpoints(),
            [("/dev/disk4s1".to_string(), "/Volumes/HypriotOS".to_string())]
        );
        assert!(d.holders.is_empty());
        // The same safety rules as on Linux: a card this size takes a 2 GiB image.
        assert!(super::super::refusals(&d, Some(2 << 30), false, None).is_empty());
    }

    #[test]
    fn the_internal_apfs_disk_is_refused() {
        let info = CARD_INFO
            .replace("disk4", "disk0")
            .replace("<string>USB</string>", "<string>Apple Fabric</string>")
            .replace(
                "<key>RemovableMedia</key><true/>",
                "<key>RemovableMedia</key><false/>",
            )
            .replace(
                "<key>Removable</key><true/>",
                "<key>Removable</key><false/>",
            );
        let list = CARD_LIST
            .replace("disk4", "disk0")
            .replace("Windows_FAT_32", "EFI")
            .replace("<string>Linux</string>", "<string>Apple_APFS</string>")
            .replace("/Volumes/HypriotOS", "");
        let d = device_from(info.as_bytes(), list.as_bytes(), &RootDisks::default()).unwrap();
        assert_eq!(d.bus, "nvme");
        let why: Vec<String> = super::super::refusals(&d, Some(1 << 30), true, None)
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert!(
            why.iter()
                .any(|w| w.contains("disk0s2 stores an APFS container")
                    && w.contains("diskutil eraseDisk FAT32 CARD MBRFormat /dev/disk0")),
            "{why:?}"
        );
        assert!(
            !super::super::refusals(&d, Some(1 << 30), false, None).is_empty(),
            "not removable"
        );
    }

    #[test]
    fn partitions_and_locked_cards() {
        let part = CARD_INFO
            .replace(
                "<key>DeviceIdentifier</key><string>disk4</string>",
                "<key>DeviceIdentifier</key><string>disk4s1</string>",
            )
            .replace(
                "<key>WholeDisk</key><true/>",
                "<key>WholeDisk</key><false/>",
            );
        let e =
            device_from(part.as_bytes(), CARD_LIST.as_bytes(), &RootDisks::default()).unwrap_err();
        assert!(
            e.to_string().contains("give the whole disk (/dev/disk4)"),
            "{e}"
        );
        let locked = CARD_INFO.replace(
            "<key>WritableMedia</key><true/>",
            "<key>WritableMedia</key><false/>",
        );
        let d = device_from(
            locked.as_bytes(),
            CARD_LIST.as_bytes(),
            &RootDisks::default(),
        )
        .unwrap();
        assert!(d.read_only);
    }

    #[test]
    fn open_refusals_say_what_to_do_on_a_mac() {
        let eacces = open_refusal("/dev/rdisk4", nix::libc::EACCES).unwrap();
        assert!(
            eacces.contains("--authopen") && eacces.contains("run kiln with sudo"),
            "{eacces}"
        );
        let eperm = open_refusal("/dev/rdisk4", nix::libc::EPERM).unwrap();
        assert!(eperm.contains("Removable Volumes") && eperm.contains("Full Disk Access"));
        let ebusy = open_refusal("/dev/rdisk4", nix::libc::EBUSY).unwrap();
        assert!(
            ebusy.contains("diskutil unmountDisk force /dev/disk4"),
            "{ebusy}"
        );
        assert_eq!(open_refusal("/dev/rdisk4", nix::libc::EIO), None);
    }

    #[test]
    fn raw_and_buffered_names() {
        assert_eq!(raw_path("/dev/disk4"), "/dev/rdisk4");
        assert_eq!(raw_path("/tmp/card.img"), "/tmp/card.img");
        assert_eq!(disk_name("/dev/rdisk4").as_deref(), Some("disk4"));
        assert_eq!(disk_name("/dev/disk12").as_deref(), Some("disk12"));
        assert_eq!(disk_name("/dev/sdb"), None);
        assert_eq!(whole_disk_of("/dev/disk4s1"), "/dev/disk4");
        assert_eq!(whole_disk_of("/dev/disk12s10"), "/dev/disk12");
        assert_eq!(whole_disk_of("/dev/disk4"), "/dev/disk4");
    }

    /// Plists diskutil printed on a real Mac (an Intel Mac on macOS 11+), read where they sit
    /// beside the clone (`../shared/fixtures/macos`, provenance in its SOURCES.txt), never copied
    /// into the project. None (skipped; failed under KILN_REQUIRE_TOOLS=1) when absent.
    fn recorded(name: &str) -> Option<Vec<u8>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "../shared/fixtures/macos/henrikstengaard+hst-imager__src__Hst.Imager.Core.Tests__TestData__diskutil__diskutil-{name}.plist"
        ));
        match std::fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) if std::env::var("KILN_REQUIRE_TOOLS").as_deref() == Ok("1") => {
                panic!("recorded plist {} missing: {e}", path.display())
            }
            Err(e) => {
                eprintln!("SKIPPED: recorded plist {} missing: {e}", path.display());
                None
            }
        }
    }

    /// The disks behind `/` on the recorded Mac. No `diskutil info -plist /` was recorded there;
    /// the container's own info plist (disk1, which holds `/`) carries the same two keys
    /// `root_disks` reads (`ParentWholeDisk`, `APFSPhysicalStores`), so it stands in for it.
    fn recorded_root() -> Option<RootDisks> {
        Some(root_disks(&recorded("info-disk1")?).unwrap())
    }

    fn recorded_device(info: &str, list: &str) -> Option<BlockDevice> {
        Some(device_from(&recorded(info)?, &recorded(list)?, &recorded_root()?).unwrap())
    }

    fn reasons(d: &BlockDevice, allow_non_removable: bool) -> Vec<String> {
        super::super::refusals(d, Some(1 << 30), allow_non_removable, None)
            .iter()
            .map(|r| r.to_string())
            .collect()
    }

    #[test]
    fn recorded_root_is_the_container_and_the_nvme_behind_it() {
        let Some(root) = recorded_root() else { return };
        assert_eq!(root.container.as_deref(), Some("disk1"));
        assert_eq!(root.stores, ["disk0s2"]);
        assert_eq!(root.whole_disks(), ["disk1", "disk0"]);
        assert_eq!(root.reason("disk2"), None);
    }

    #[test]
    fn recorded_stick_is_offered_with_the_disk_size_not_the_volume_size() {
        let Some(d) = recorded_device("info-disk2-usb-stick", "all-usb-stick") else {
            return;
        };
        // TotalSize in this plist is the FAT volume's 15665463296; Size/IOKitSize the disk's.
        assert_eq!(d.size, 15_682_240_512);
        assert_eq!(d.logical_block_size, 512);
        assert!(d.removable && !d.read_only);
        assert_eq!((d.bus.as_str(), d.model.as_str()), ("usb", "Cruzer Fit"));
        assert!(reasons(&d, false).is_empty(), "{:?}", reasons(&d, false));
        // FAT on the whole disk: the disk itself is what is mounted, and what gets unmounted.
        let mounted = d.all_mountpoints();
        assert_eq!(
            mounted,
            [("/dev/disk2".to_string(), "/Volumes/NO NAME".to_string())]
        );
        assert_eq!(unmount_plan(&mounted), ["/dev/disk2"]);
        // A 15682240512-byte stick takes an image of exactly that size, not one byte more.
        assert!(super::super::refusals(&d, Some(15_682_240_512), false, None).is_empty());
        assert!(!super::super::refusals(&d, Some(15_682_240_513), false, None).is_empty());
    }

    #[test]
    fn recorded_internal_nvme_is_refused_as_the_disk_behind_root_even_when_allowed() {
        let Some(d) = recorded_device("info-disk0", "all-usb-stick") else {
            return;
        };
        assert_eq!((d.size, d.bus.as_str()), (512_110_190_592, "nvme"));
        for allow in [false, true] {
            let why = reasons(&d, allow);
            assert!(
                why.iter().any(|w| w
                    == "it holds the running macOS (disk0s2 stores the APFS container disk1 behind /)"),
                "{why:?}"
            );
            // Never a hint to erase the boot disk, and no Linux words.
            assert!(
                !why.iter()
                    .any(|w| w.contains("eraseDisk") || w.contains("LVM")),
                "{why:?}"
            );
        }
        assert!(
            reasons(&d, false)
                .iter()
                .any(|w| w.contains("not a removable disk"))
        );
    }

    #[test]
    fn recorded_apfs_container_holding_root_is_refused_even_when_allowed() {
        let Some(d) = recorded_device("info-disk1", "all-usb-stick") else {
            return;
        };
        assert_eq!((d.size, d.logical_block_size), (511_900_434_432, 4096));
        // The sealed snapshot mounted on `/` is seen as one of the container's volumes.
        assert!(
            d.all_mountpoints()
                .iter()
                .any(|(p, m)| p == "/dev/disk1s5" && m == "/")
        );
        let why = reasons(&d, true);
        assert!(
            why.iter()
                .any(|w| w == "it holds the running macOS (the APFS container behind /)"),
            "{why:?}"
        );
    }

    #[test]
    fn recorded_usb_ssd_with_a_mounted_fat32_partition() {
        let Some(d) = recorded_device("info-disk2-usb-ide-adapter", "external-usb-ide-adapter")
        else {
            return;
        };
        assert_eq!((d.size, d.bus.as_str()), (128_035_676_160, "usb"));
        // An SSD behind a USB adapter is not removable media: refused unless allowed, as on Linux.
        assert!(
            reasons(&d, false)
                .iter()
                .any(|w| w.contains("not a removable disk"))
        );
        assert!(reasons(&d, true).is_empty(), "{:?}", reasons(&d, true));
        let mounted = d.all_mountpoints();
        assert_eq!(
            mounted,
            [("/dev/disk2s1".to_string(), "/Volumes/PC".to_string())]
        );
        assert_eq!(unmount_plan(&mounted), ["/dev/disk2"]);
    }

    #[test]
    fn an_apfs_formatted_card_is_refused_with_how_to_reformat_it() {
        // The recorded stick, reformatted as APFS: its list entry gains an Apple_APFS partition.
        let Some(info) = recorded("info-disk2-usb-stick") else {
            return;
        };
        let list = CARD_LIST
            .replace("disk4", "disk2")
            .replace("Windows_FAT_32", "EFI")
            .replace("<string>Linux</string>", "<string>Apple_APFS</string>");
        let root = recorded_root().unwrap();
        let d = device_from(&info, list.as_bytes(), &root).unwrap();
        let why = reasons(&d, true);
        assert_eq!(
            why,
            [
                "disk2s2 stores an APFS container, which macOS keeps open; if the card may be erased, reformat it first (diskutil eraseDisk FAT32 CARD MBRFormat /dev/disk2) and flash again"
            ]
        );
    }

    #[test]
    fn a_virtual_disk_other_than_a_disk_image_is_refused() {
        let Some(info) = recorded("info-disk1") else {
            return;
        };
        // disk1 on a Mac whose `/` is elsewhere: still a synthesized disk, still refused.
        let d = device_from(&info, CARD_LIST.as_bytes(), &RootDisks::default()).unwrap();
        assert!(reasons(&d, true).iter().any(|w| w.contains("virtual disk")));
        let image = String::from_utf8(info).unwrap().replace(
            "<string>PCI-Express</string>",
            "<string>Disk Image</string>",
        );
        let d = device_from(
            image.as_bytes(),
            CARD_LIST.as_bytes(),
            &RootDisks::default(),
        )
        .unwrap();
        assert!(!reasons(&d, true).iter().any(|w| w.contains("virtual disk")));
    }
}
