//! macOS disk discovery through `diskutil … -plist`, read into the same plain [`BlockDevice`] data
//! as Linux's sysfs, so the safety rules are the same. The parsing is plain functions over the
//! plist text (tested on every platform); running diskutil, `/dev/rdiskN` and eject are macOS-only.
//!
//! What diskutil cannot say: serial numbers (pinned serials cannot be checked on macOS) and swap
//! (macOS swaps to files).

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

/// Partition contents that mean "another layer uses this partition": it is then a holder, as
/// LVM and device-mapper are on Linux.
const HELD: &[(&str, &str)] = &[
    ("Apple_APFS", "an APFS container"),
    ("Apple_CoreStorage", "CoreStorage"),
    ("Apple_RAID", "AppleRAID"),
];

/// One whole disk from `diskutil info -plist diskN` and `diskutil list -plist diskN`.
pub fn device_from(info_xml: &[u8], list_xml: &[u8]) -> Result<BlockDevice> {
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
    let mut partitions = Vec::new();
    let mut holders = Vec::new();
    let mut mountpoints = Vec::new();
    if let Some(e) = entry {
        mountpoints.extend(text(e, "MountPoint"));
        for p in e
            .get("Partitions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_dictionary)
        {
            let Some(pid) = text(p, "DeviceIdentifier") else {
                continue;
            };
            let content = text(p, "Content").unwrap_or_default();
            let held: Vec<String> = HELD
                .iter()
                .filter(|(c, _)| *c == content)
                .map(|(_, what)| format!("{what} on {pid}"))
                .collect();
            holders.extend(held.iter().cloned());
            partitions.push(PartitionInfo {
                path: format!("/dev/{pid}"),
                mountpoints: text(p, "MountPoint").into_iter().collect(),
                swap: false,
                holders: held,
                name: pid,
            });
        }
    }
    let protocol = text(&info, "BusProtocol").unwrap_or_default();
    Ok(BlockDevice {
        path: format!("/dev/{id}"),
        devno: id.clone(),
        size: number(&info, "TotalSize")
            .or_else(|| number(&info, "Size"))
            .unwrap_or(0),
        logical_block_size: number(&info, "DeviceBlockSize").unwrap_or(512),
        // Cards and sticks; a USB SSD is "external" but not removable media, as on Linux.
        removable: flag(&info, "RemovableMedia") || flag(&info, "Removable"),
        read_only: info.contains_key("WritableMedia") && !flag(&info, "WritableMedia"),
        bus: bus(&protocol),
        model: text(&info, "MediaName")
            .or_else(|| text(&info, "IORegistryEntryName"))
            .unwrap_or_default(),
        serial: None,
        mountpoints,
        swap: false,
        holders,
        partitions,
        backing_file: None,
        name: id,
    })
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

#[cfg(target_os = "macos")]
pub fn read_device(name: &str) -> Result<BlockDevice> {
    device_from(
        &diskutil(&["info", "-plist", name])?,
        &diskutil(&["list", "-plist", name])?,
    )
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

/// `diskutil unmountDisk`: every volume of the disk at once, as Imager and Etcher do.
#[cfg(target_os = "macos")]
pub fn unmount_disk(dev: &str) -> Result<()> {
    diskutil(&["unmountDisk", dev]).map(|_| ())
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
        let d = device_from(CARD_INFO.as_bytes(), CARD_LIST.as_bytes()).unwrap();
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
        let d = device_from(info.as_bytes(), list.as_bytes()).unwrap();
        assert_eq!(d.bus, "nvme");
        let why: Vec<String> = super::super::refusals(&d, Some(1 << 30), true, None)
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert!(
            why.iter()
                .any(|w| w.contains("an APFS container on disk0s2")),
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
        let e = device_from(part.as_bytes(), CARD_LIST.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("give the whole disk (/dev/disk4)"),
            "{e}"
        );
        let locked = CARD_INFO.replace(
            "<key>WritableMedia</key><true/>",
            "<key>WritableMedia</key><false/>",
        );
        let d = device_from(locked.as_bytes(), CARD_LIST.as_bytes()).unwrap();
        assert!(d.read_only);
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
}
