//! FAT volumes: file edits through fatfs on a partition slice, and the map of used clusters read
//! straight from the BIOS parameter block and the allocation table.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};

use crate::disk::{Partition, PartitionSlice};

/// The fields of the BIOS parameter block that locate everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bpb {
    pub bytes_per_sector: u64,
    pub sectors_per_cluster: u64,
    pub reserved_sectors: u64,
    pub fats: u64,
    pub root_entries: u64,
    pub total_sectors: u64,
    pub fat_sectors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatBits {
    Fat12,
    Fat16,
    Fat32,
}

impl Bpb {
    pub fn parse(sector: &[u8]) -> Result<Bpb> {
        let u16_at = |o: usize| u64::from(u16::from_le_bytes([sector[o], sector[o + 1]]));
        let u32_at = |o: usize| {
            u64::from(u32::from_le_bytes([
                sector[o],
                sector[o + 1],
                sector[o + 2],
                sector[o + 3],
            ]))
        };
        let b = Bpb {
            bytes_per_sector: u16_at(11),
            sectors_per_cluster: u64::from(sector[13]),
            reserved_sectors: u16_at(14),
            fats: u64::from(sector[16]),
            root_entries: u16_at(17),
            total_sectors: if u16_at(19) != 0 {
                u16_at(19)
            } else {
                u32_at(32)
            },
            fat_sectors: if u16_at(22) != 0 {
                u16_at(22)
            } else {
                u32_at(36)
            },
        };
        if !matches!(b.bytes_per_sector, 512 | 1024 | 2048 | 4096)
            || !b.sectors_per_cluster.is_power_of_two()
            || b.fats == 0
            || b.fat_sectors == 0
            || b.reserved_sectors == 0
        {
            bail!("not a FAT boot sector");
        }
        Ok(b)
    }

    /// Checks that the volume the BPB describes fits in `size` bytes (its partition), so that no
    /// product of its fields can overflow or ask for more memory than the partition holds.
    pub fn check_fits(&self, size: u64) -> Result<()> {
        let bytes =
            |sectors: Option<u64>| sectors.and_then(|s| s.checked_mul(self.bytes_per_sector));
        let fats = self.fats.checked_mul(self.fat_sectors);
        let metadata = fats
            .and_then(|f| f.checked_add(self.reserved_sectors))
            .and_then(|m| m.checked_add(self.root_dir_sectors()));
        for (what, value) in [
            ("total sectors", bytes(Some(self.total_sectors))),
            ("FAT sectors", bytes(metadata)),
        ] {
            match value {
                Some(b) if b <= size => {}
                _ => bail!(
                    "the FAT boot sector's {what} describe more than the {size}-byte partition holds (a damaged boot sector)"
                ),
            }
        }
        Ok(())
    }

    /// How many bytes of one FAT describe the volume's clusters (a FAT may be longer).
    fn fat_bytes_needed(&self) -> u64 {
        let entries = self.clusters() + 2;
        match self.bits() {
            FatBits::Fat12 => (entries * 3).div_ceil(2),
            FatBits::Fat16 => entries * 2,
            FatBits::Fat32 => entries * 4,
        }
    }

    pub fn root_dir_sectors(&self) -> u64 {
        (self.root_entries * 32).div_ceil(self.bytes_per_sector)
    }

    pub fn first_data_sector(&self) -> u64 {
        self.reserved_sectors + self.fats * self.fat_sectors + self.root_dir_sectors()
    }

    pub fn clusters(&self) -> u64 {
        self.total_sectors.saturating_sub(self.first_data_sector()) / self.sectors_per_cluster
    }

    /// FAT width is decided by the cluster count alone (Microsoft's FAT specification, 3.5).
    pub fn bits(&self) -> FatBits {
        match self.clusters() {
            c if c < 4085 => FatBits::Fat12,
            c if c < 65525 => FatBits::Fat16,
            _ => FatBits::Fat32,
        }
    }
}

/// Metadata (boot sector, reserved sectors, every FAT, the root directory) plus every allocated
/// cluster, as byte ranges relative to the partition start, merged and sorted.
pub fn used_ranges<D: Read + Seek>(image: &mut D, part: &Partition) -> Result<Vec<(u64, u64)>> {
    let mut sector = [0u8; 512];
    image.seek(SeekFrom::Start(part.start))?;
    image.read_exact(&mut sector)?;
    let bpb = Bpb::parse(&sector)?;
    bpb.check_fits(part.size)?;
    let bps = bpb.bytes_per_sector;
    // Only the part of the FAT that has entries for real clusters: bounded by the partition size.
    let mut fat = vec![0u8; (bpb.fat_sectors * bps).min(bpb.fat_bytes_needed()) as usize];
    image.seek(SeekFrom::Start(part.start + bpb.reserved_sectors * bps))?;
    image
        .read_exact(&mut fat)
        .context("reading the first FAT")?;

    let mut ranges = vec![(0, bpb.first_data_sector() * bps)];
    let cluster_bytes = bpb.sectors_per_cluster * bps;
    let data_start = bpb.first_data_sector() * bps;
    for n in 2..bpb.clusters() + 2 {
        let entry = match bpb.bits() {
            FatBits::Fat12 => {
                let o = (n + n / 2) as usize;
                if o + 1 >= fat.len() {
                    break;
                }
                let v = u16::from_le_bytes([fat[o], fat[o + 1]]);
                u32::from(if n % 2 == 0 { v & 0x0fff } else { v >> 4 })
            }
            FatBits::Fat16 => {
                let o = (n * 2) as usize;
                if o + 1 >= fat.len() {
                    break;
                }
                u32::from(u16::from_le_bytes([fat[o], fat[o + 1]]))
            }
            FatBits::Fat32 => {
                let o = (n * 4) as usize;
                if o + 3 >= fat.len() {
                    break;
                }
                u32::from_le_bytes([fat[o], fat[o + 1], fat[o + 2], fat[o + 3]]) & 0x0fff_ffff
            }
        };
        if entry != 0 {
            let start = data_start + (n - 2) * cluster_bytes;
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += cluster_bytes,
                _ => ranges.push((start, cluster_bytes)),
            }
        }
    }
    for r in &mut ranges {
        r.1 = r.1.min(part.size.saturating_sub(r.0));
    }
    Ok(ranges)
}

/// A fixed clock for fatfs, so timestamps come from SOURCE_DATE_EPOCH or the base image.
#[derive(Debug)]
struct FixedClock(fatfs::DateTime);

impl fatfs::TimeProvider for FixedClock {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// Converts seconds since the epoch (UTC) to a FAT date-time, clamped to FAT's 1980–2107 range.
pub fn fat_datetime(epoch: i64) -> fatfs::DateTime {
    let min = 315_532_800; // 1980-01-01T00:00:00Z
    let max = 4_354_819_198; // 2107-12-31T23:59:58Z
    let t = epoch.clamp(min, max);
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    fatfs::DateTime {
        date: fatfs::Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: fatfs::Time {
            hour: (secs / 3600) as u16,
            min: (secs % 3600 / 60) as u16,
            sec: (secs % 60) as u16,
            millis: 0,
        },
    }
}

/// An open FAT volume: on a partition of an image file, or on a partition's bytes in memory.
pub struct FatVolume<T: fatfs::ReadWriteSeek> {
    fs: fatfs::FileSystem<T>,
}

impl FatVolume<PartitionSlice<File>> {
    /// Opens the FAT in `part` of an image file; new and changed entries get the time `when`.
    pub fn open(image: File, part: &Partition, when: fatfs::DateTime) -> Result<Self> {
        Self::on(PartitionSlice::new(image, part.start, part.size), when)
            .with_context(|| format!("opening the FAT filesystem in partition {}", part.index))
    }
}

impl<T: fatfs::ReadWriteSeek> FatVolume<T> {
    /// Opens the FAT filesystem that fills `device`.
    pub fn on(mut device: T, when: fatfs::DateTime) -> Result<Self> {
        // fatfs 0.3.6 multiplies and adds BPB fields in u32 without checks (found by the `fat`
        // fuzz target: `fats * sectors_per_fat` overflowed): a boot sector that does not fit its
        // device is refused here first, with checked arithmetic.
        let size = device.seek(SeekFrom::End(0))?;
        let mut sector = [0u8; 512];
        device.seek(SeekFrom::Start(0))?;
        device
            .read_exact(&mut sector)
            .context("reading the FAT boot sector")?;
        let bpb = Bpb::parse(&sector)?;
        bpb.check_fits(size)?;
        if bpb.first_data_sector() > u64::from(u32::MAX) {
            bail!(
                "the FAT boot sector's metadata spans more than 2^32 sectors (a damaged boot sector)"
            );
        }
        // fatfs expects the device positioned at its start.
        device.seek(SeekFrom::Start(0))?;
        // fatfs wants a &'static clock; one small leak per opened volume.
        let clock: &'static FixedClock = Box::leak(Box::new(FixedClock(when)));
        let fs = fatfs::FileSystem::new(device, fatfs::FsOptions::new().time_provider(clock))
            .context("opening the FAT filesystem")?;
        Ok(FatVolume { fs })
    }

    /// The volume label: the root directory's label entry, which is what `blkid` and mtools
    /// show, else the boot sector's copy.
    pub fn label(&self) -> String {
        match self.fs.read_volume_label_from_root_dir() {
            Ok(Some(l)) => l.trim_end().to_string(),
            _ => self.fs.volume_label().trim_end().to_string(),
        }
    }

    /// The newest modification time among the root directory's entries, a stable stand-in for
    /// "when the base image was made".
    pub fn newest_root_timestamp(&self) -> Option<fatfs::DateTime> {
        self.fs
            .root_dir()
            .iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.is_file() || e.is_dir())
            .map(|e| e.modified())
            .max_by_key(|d| {
                (
                    d.date.year,
                    d.date.month,
                    d.date.day,
                    d.time.hour,
                    d.time.min,
                    d.time.sec,
                )
            })
    }

    pub fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let root = self.fs.root_dir();
        match root.open_file(path.trim_start_matches('/')) {
            Ok(mut f) => {
                let mut v = Vec::new();
                f.read_to_end(&mut v)
                    .with_context(|| format!("reading {path} from the FAT"))?;
                Ok(Some(v))
            }
            Err(_) => Ok(None),
        }
    }

    /// Creates or replaces `path` (directories are created as needed).
    pub fn write_file(&self, path: &str, bytes: &[u8]) -> Result<()> {
        let path = path.trim_start_matches('/');
        let mut dir = self.fs.root_dir();
        let mut parts: Vec<&str> = path.split('/').collect();
        let name = parts.pop().context("empty path")?;
        for p in parts {
            dir = dir
                .create_dir(p)
                .with_context(|| format!("creating directory {p} on the FAT"))?;
        }
        let mut f = dir
            .create_file(name)
            .with_context(|| format!("creating {path} on the FAT"))?;
        f.truncate().with_context(|| format!("truncating {path}"))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {path} to the FAT (is the boot partition full?)"))?;
        f.flush()?;
        Ok(())
    }

    /// Flushes and marks the volume clean.
    pub fn close(self) -> Result<()> {
        self.fs.unmount().context("closing the FAT filesystem")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_to_fat_time() {
        let d = fat_datetime(1_700_000_000); // 2023-11-14T22:13:20Z
        assert_eq!((d.date.year, d.date.month, d.date.day), (2023, 11, 14));
        assert_eq!((d.time.hour, d.time.min, d.time.sec), (22, 13, 20));
        assert_eq!(fat_datetime(0).date.year, 1980);
    }

    #[test]
    fn bpb_of_a_formatted_volume() {
        let mut disk = std::io::Cursor::new(vec![0u8; 64 << 20]);
        fatfs::format_volume(
            &mut disk,
            fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat16),
        )
        .unwrap();
        let b = Bpb::parse(&disk.get_ref()[..512]).unwrap();
        assert_eq!(b.bits(), FatBits::Fat16);
        assert_eq!(b.total_sectors * b.bytes_per_sector, 64 << 20);
    }

    #[test]
    fn a_boot_sector_claiming_more_than_its_partition_is_refused() {
        let mut disk = std::io::Cursor::new(vec![0u8; 8 << 20]);
        fatfs::format_volume(
            &mut disk,
            fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat16),
        )
        .unwrap();
        let part = Partition {
            index: 1,
            start: 0,
            size: 8 << 20,
            type_code: "0x0c".into(),
            name: None,
            guid: None,
        };
        assert!(used_ranges(&mut disk, &part).is_ok());
        // BPB_FATSz16 = 0 and BPB_FATSz32 = 0xFFFFFFFF: once a 2 TiB allocation and an abort.
        disk.get_mut()[22..24].fill(0);
        disk.get_mut()[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = used_ranges(&mut disk, &part).unwrap_err().to_string();
        assert!(e.contains("FAT sectors") && e.contains("damaged"), "{e}");
        // Total sectors past the partition's end.
        disk.get_mut()[36..40].copy_from_slice(&64u32.to_le_bytes());
        disk.get_mut()[19..21].fill(0);
        disk.get_mut()[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = used_ranges(&mut disk, &part).unwrap_err().to_string();
        assert!(e.contains("total sectors"), "{e}");
    }

    /// Found by the `fat` fuzz target: fatfs overflowed multiplying the FAT count by a FAT size
    /// of 0xFFF80000 sectors on an 833-byte device; kiln refuses the boot sector before fatfs.
    #[test]
    fn fuzz_regression_fat_size_overflow_in_fatfs() {
        let input: &[u8] = include_bytes!(
            "../../tests/fuzz/regressions/fat/crash-330135805c6972bf42233e9e5bfbc965a4c58368"
        );
        let mut dev = std::io::Cursor::new(input.to_vec());
        let e = match FatVolume::on(&mut dev, fat_datetime(0)) {
            Ok(_) => panic!("a damaged boot sector was opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("damaged boot sector"), "{e}");
    }
}
