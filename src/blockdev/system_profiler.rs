//! Serial numbers of disks on macOS, from `system_profiler -xml` of SPUSBDataType,
//! SPUSBHostDataType and SPCardReaderDataType: diskutil names no serial, so without this a node
//! pinned to a card by `serial` could never be flashed on a Mac. The parsing is a plain function
//! over the plist (tested on every platform, on recorded output in
//! tests/fixtures/macos-system-profiler); running system_profiler is macOS-only.
//!
//! The serials are the ones Linux shows for the same disk, so one cluster file pins the same card
//! on both: a USB stick or reader's USB serial (`serial_num`; `USBDeviceKeySerialNumber` in
//! macOS 26's SPUSBHostDataType), as udev's ID_SERIAL_SHORT; a card in a built-in (PCIe) reader,
//! the card's own serial (`spcardreader_card_serialnumber`), as Linux's mmc `serial`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use plist::{Dictionary, Value};

/// The keys a device's serial number is under, in the reporters' words.
const SERIAL_KEYS: &[&str] = &[
    "serial_num",
    "USBDeviceKeySerialNumber",
    "spcardreader_card_serialnumber",
];

/// Whole disk (`disk4`) → serial number of the device that presents it.
pub fn serials_by_disk(xml: &[u8]) -> Result<BTreeMap<String, String>> {
    let root = Value::from_reader_xml(xml).context("reading the plist of system_profiler")?;
    Ok(serials_in(&root))
}

/// [`serials_by_disk`] over an already parsed report (the tests also read `-json` recordings).
pub fn serials_in(report: &Value) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    // The report is an array with one dictionary per data type; the devices are in `_items`,
    // nested as the buses and hubs are. `_properties` describes the columns and is skipped.
    for data_type in report.as_array().into_iter().flatten() {
        if let Some(d) = data_type.as_dictionary() {
            walk_items(d, &mut found);
        }
    }
    found
}

fn walk_items(parent: &Dictionary, found: &mut BTreeMap<String, String>) {
    let items = parent.get("_items").and_then(Value::as_array);
    for item in items.into_iter().flatten().filter_map(Value::as_dictionary) {
        if let Some(serial) = serial_of(item) {
            for disk in disks_of(item) {
                // The first reporter to name a disk wins; a disk has one device in front of it.
                found.entry(disk).or_insert_with(|| serial.clone());
            }
        }
        walk_items(item, found);
    }
}

fn serial_of(item: &Dictionary) -> Option<String> {
    SERIAL_KEYS.iter().find_map(|k| {
        item.get(k)
            .and_then(Value::as_string)
            .map(str::trim)
            // SPUSBHostDataType says so in words where a device reports none.
            .filter(|s| !s.is_empty() && *s != "Not Provided")
            .map(str::to_string)
    })
}

/// The whole disks a device presents: its own `bsd_name` (SPCardReaderDataType, and older
/// SPUSBDataType) and those of its `Media` entries (newer SPUSBDataType, SPUSBHostDataType).
/// `volumes` (partitions) are not followed.
fn disks_of(item: &Dictionary) -> Vec<String> {
    let media = item.get("Media").and_then(Value::as_array);
    std::iter::once(item)
        .chain(media.into_iter().flatten().filter_map(Value::as_dictionary))
        .filter_map(|d| d.get("bsd_name").and_then(Value::as_string))
        .map(str::trim)
        .filter(|n| is_whole_disk(n))
        .map(str::to_string)
        .collect()
}

/// `disk4`, not `disk4s1` (a partition) or anything else.
fn is_whole_disk(name: &str) -> bool {
    name.strip_prefix("disk")
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// The serials of the disks attached now, asked of system_profiler once per run. A failure leaves every serial unknown, which refuses a pinned node's disk — the
/// safe side — and says why.
#[cfg(target_os = "macos")]
pub fn current() -> &'static std::result::Result<BTreeMap<String, String>, String> {
    static SERIALS: std::sync::OnceLock<std::result::Result<BTreeMap<String, String>, String>> =
        std::sync::OnceLock::new();
    SERIALS.get_or_init(|| {
        let found = asked_of_system_profiler();
        if let Err(e) = &found {
            eprintln!(
                "warning: serial numbers unknown, a node pinned by `serial` will be refused: {e}"
            );
        }
        found
    })
}

/// One data type per call: SPUSBHostDataType replaced SPUSBDataType in macOS 26, and a data
/// type a release does not know must not cost the others. Only all failing is an error.
#[cfg(target_os = "macos")]
fn asked_of_system_profiler() -> std::result::Result<BTreeMap<String, String>, String> {
    let mut found = BTreeMap::new();
    let mut errors = Vec::new();
    for data_type in ["SPUSBDataType", "SPUSBHostDataType", "SPCardReaderDataType"] {
        let report = crate::util::cmd::run_with(
            std::process::Command::new("system_profiler").args(["-xml", data_type]),
            "system_profiler",
        )
        .and_then(|o| serials_by_disk(&o.stdout));
        match report {
            Ok(serials) => {
                for (disk, serial) in serials {
                    found.entry(disk).or_insert(serial);
                }
            }
            Err(e) => errors.push(format!("{data_type}: {e:#}")),
        }
    }
    if errors.len() == 3 {
        return Err(errors.join("; "));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/macos-system-profiler/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    #[test]
    fn a_usb_disk_of_older_macos_has_its_serial_beside_its_bsd_name() {
        let found = serials_by_disk(&recorded("fusioninventory-SPUSBDataType.xml")).unwrap();
        // The Bluetooth controller has a serial but no disk; the bus that repeats `bsd_name`
        // disk1 has no serial; the volumes (disk1s1, disk1s2) are partitions.
        assert_eq!(
            found,
            BTreeMap::from([("disk1".to_string(), "20150123045944".to_string())])
        );
    }

    #[test]
    fn a_usb_disk_of_newer_macos_is_found_through_its_media() {
        let json = recorded("cyme-system_profiler_dump.json");
        // `system_profiler -json` keys each data type by name; -xml lists them in an array.
        let by_type: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&json).unwrap();
        let report = Value::Array(
            by_type
                .into_values()
                .map(|buses| {
                    let mut d = Dictionary::new();
                    d.insert("_items".into(), Value::Array(buses));
                    Value::Dictionary(d)
                })
                .collect(),
        );
        let found = serials_in(&report);
        // Masked by the repository the recording comes from; the network adapter's serial has
        // no disk.
        assert_eq!(
            found,
            BTreeMap::from([("disk2".to_string(), "************************".to_string())])
        );
    }

    #[test]
    fn a_card_is_not_given_its_readers_serial() {
        // This reporter version names the built-in reader's serial, not the card's: the card
        // stays without a serial (the reader's would match every card put into it).
        let xml = recorded("fusioninventory-SPCardReaderDataType_with_inserted_card.xml");
        assert!(serials_by_disk(&xml).unwrap().is_empty());
    }

    #[test]
    fn a_card_with_its_own_serial_and_a_usb_stick_in_one_report() {
        // CONSTRUCTED, not recorded: the card keys of SPCardReaderDataType's column table
        // (`_properties` in the recording above) and macOS 26's SPUSBHostDataType keys (its
        // "Not Provided" as other projects' issues quote it), to show both reporters in one
        // report are read. No recording of either with a disk attached was found.
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?><plist version="1.0"><array>
            <dict><key>_dataType</key><string>SPUSBHostDataType</string><key>_items</key><array>
              <dict><key>_name</key><string>USB 3.1 Bus</string><key>_items</key><array>
                <dict><key>_name</key><string>Cruzer Blade</string>
                  <key>USBDeviceKeySerialNumber</key><string>4C530001</string>
                  <key>Media</key><array><dict><key>bsd_name</key><string>disk4</string></dict></array>
                </dict>
                <dict><key>_name</key><string>Keyboard</string>
                  <key>USBDeviceKeySerialNumber</key><string>Not Provided</string></dict>
              </array></dict>
            </array></dict>
            <dict><key>_dataType</key><string>SPCardReaderDataType</string><key>_items</key><array>
              <dict><key>_name</key><string>spcardreader</string>
                <key>spcardreader_serialnumber</key><string>000000000820</string>
                <key>_items</key><array>
                  <dict><key>_name</key><string>SDXC Card</string><key>bsd_name</key><string>disk5</string>
                    <key>spcardreader_card_serialnumber</key><string>0x1a2b3c4d</string>
                    <key>volumes</key><array><dict><key>bsd_name</key><string>disk5s1</string></dict></array>
                  </dict>
                </array>
              </dict>
            </array></dict>
        </array></plist>"#;
        let found = serials_by_disk(xml).unwrap();
        assert_eq!(
            found,
            BTreeMap::from([
                ("disk4".to_string(), "4C530001".to_string()),
                ("disk5".to_string(), "0x1a2b3c4d".to_string()),
            ])
        );
    }

    #[test]
    fn not_a_plist_is_an_error() {
        let err = serials_by_disk(b"system_profiler: not found").unwrap_err();
        assert!(format!("{err:#}").contains("system_profiler"), "{err:#}");
    }
}
