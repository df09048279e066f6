//! Partition tables and partition slices over any `Read + Write + Seek`.
//!
//! `read_layout` turns an MBR or a GPT into plain data (`DiskLayout`); `PartitionSlice` lets
//! filesystem code treat one partition of an image file as a whole device. The only edit kiln makes
//! to an existing table is the MBR disk signature, four bytes written by `set_disk_signature`;
//! `gpt::write` writes whole tables for disks kiln lays out itself. GPTs are read and written
//! through the `gpt` crate, MBRs read through `mbrman`.

pub mod cow;
pub mod gpt;
pub mod patch;
pub mod slice;

use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};
use serde::Serialize;

pub use cow::CowDevice;
pub use slice::PartitionSlice;

/// Byte offset of the 32-bit disk signature in an MBR.
const DISK_SIGNATURE_OFFSET: u64 = 440;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based, as the kernel numbers it.
    pub index: usize,
    /// Byte offset of the first sector.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// MBR type byte (`0x0c`) or GPT partition type GUID.
    pub type_code: String,
    /// GPT partition name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT unique partition GUID (what `PARTUUID=` names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskLayout {
    pub table: &'static str,
    pub sector_size: u64,
    /// The MBR disk signature as 8 hex digits, or the GPT disk GUID (`sfdisk --json`'s `id`).
    pub disk_id: String,
    pub partitions: Vec<Partition>,
    /// Size of the image in bytes.
    pub size: u64,
}

impl DiskLayout {
    pub fn partition(&self, index: usize) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.index == index)
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .partitions
            .iter()
            .map(|p| {
                format!(
                    "#{} at {} ({} MiB, type {})",
                    p.index,
                    p.start,
                    p.size >> 20,
                    p.type_code
                )
            })
            .collect();
        format!(
            "{} table with {}",
            self.table,
            if parts.is_empty() {
                "no partitions".into()
            } else {
                parts.join(", ")
            }
        )
    }
}

/// Reads the partition table of an image.
pub fn read_layout<D: Read + Seek>(disk: &mut D, sector_size: u64) -> Result<DiskLayout> {
    let size = disk.seek(SeekFrom::End(0))?;
    if size < 512 {
        bail!("the image is {size} bytes, too small to hold a partition table");
    }
    let mut sector = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut sector)?;
    if sector[510..512] != [0x55, 0xaa] {
        bail!("no partition table: the first sector lacks the 0x55AA boot signature");
    }
    check_mbr_entries(disk, &sector, sector_size, size)?;
    disk.seek(SeekFrom::Start(0))?;
    let mbr = mbrman::MBR::read_from(disk, sector_size as u32).context("reading the MBR")?;
    let mut partitions = Vec::new();
    for (index, p) in mbr.iter() {
        if !p.is_used() {
            continue;
        }
        if p.sys == 0xee {
            let layout = gpt::read(disk, sector_size, size)?;
            check_ends(&layout)?;
            return Ok(layout);
        }
        partitions.push(Partition {
            index,
            start: u64::from(p.starting_lba) * sector_size,
            size: u64::from(p.sectors) * sector_size,
            type_code: format!("0x{:02x}", p.sys),
            name: None,
            guid: None,
        });
    }
    let sig = u32::from_le_bytes(mbr.header.disk_signature);
    let layout = DiskLayout {
        table: "mbr",
        sector_size,
        disk_id: format!("{sig:08x}"),
        partitions,
        size,
    };
    check_ends(&layout)?;
    Ok(layout)
}

/// At most this many logical partitions are followed in an extended partition's EBR chain.
const MAX_LOGICAL: usize = 128;

/// Checks the MBR's entries, and the EBR chain of an extended partition, for what mbrman 0.6
/// turns into a panic or an overflow: used entries at LBA 0 (its alignment search then has no
/// candidate), and start sectors whose u32 sums wrap. Sums are done here in u64.
fn check_mbr_entries<D: Read + Seek>(
    disk: &mut D,
    mbr: &[u8; 512],
    sector_size: u64,
    size: u64,
) -> Result<()> {
    let entry = |s: &[u8], i: usize| {
        let e = &s[446 + 16 * i..446 + 16 * (i + 1)];
        let start = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]]));
        (e[4], start)
    };
    let is_extended = |sys: u8| matches!(sys, 0x05 | 0x0f | 0x85 | 0xc5 | 0xd5);
    let mut extended = None;
    for i in 0..4 {
        let (sys, start) = entry(mbr, i);
        if sys == 0 {
            continue;
        }
        if start == 0 {
            bail!(
                "MBR partition {} starts at sector 0, on top of the partition table: a damaged or hand-made table",
                i + 1
            );
        }
        if is_extended(sys) && extended.is_none() {
            extended = Some(start);
        }
    }
    let Some(ext_start) = extended else {
        return Ok(());
    };
    let mut relative = 0u64;
    let mut ebr = [0u8; 512];
    for _ in 0..MAX_LOGICAL {
        let at = ext_start + relative;
        let offset = at.saturating_mul(sector_size);
        if at > u64::from(u32::MAX) {
            bail!(
                "an EBR of the extended partition lies past sector 2^32: a damaged extended partition"
            );
        }
        if offset.saturating_add(512) > size {
            // mbrman stops (first EBR) or fails (later ones) with an I/O error itself.
            return Ok(());
        }
        disk.seek(SeekFrom::Start(offset))?;
        disk.read_exact(&mut ebr)?;
        if ebr[510..512] != [0x55, 0xaa] {
            return Ok(());
        }
        let (_, start) = entry(&ebr, 0);
        if at + start > u64::from(u32::MAX) {
            bail!(
                "logical partition at EBR sector {at} starts past 2 TiB of sectors: a damaged extended partition"
            );
        }
        let (_, next) = entry(&ebr, 1);
        if next == 0 || next <= relative {
            return Ok(());
        }
        relative = next;
    }
    bail!(
        "the extended partition chains more than {MAX_LOGICAL} logical partitions: a damaged or looping table"
    )
}

fn check_ends(layout: &DiskLayout) -> Result<()> {
    let size = layout.size;
    let partitions = &layout.partitions;
    for p in partitions {
        if p.end() > size {
            bail!(
                "partition {} ends at byte {} but the image is only {size} bytes (truncated download?)",
                p.index,
                p.end()
            );
        }
    }
    Ok(())
}

/// Overwrites the MBR disk signature (and nothing else of the table).
pub fn set_disk_signature<D: Write + Seek>(disk: &mut D, signature: u32) -> Result<()> {
    disk.seek(SeekFrom::Start(DISK_SIGNATURE_OFFSET))?;
    disk.write_all(&signature.to_le_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An in-memory MBR disk with one partition entry.
    fn disk_with(start: u32, sectors: u32, sys: u8, len: usize) -> Cursor<Vec<u8>> {
        let mut d = vec![0u8; len];
        d[440..444].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        let e = 446;
        d[e + 4] = sys;
        d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        d[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        Cursor::new(d)
    }

    #[test]
    fn reads_a_partition_and_the_signature() {
        let mut d = disk_with(8, 16, 0x0c, 32 * 512);
        let l = read_layout(&mut d, 512).unwrap();
        assert_eq!(l.disk_id, "12345678");
        assert_eq!(
            l.partitions,
            vec![Partition {
                index: 1,
                start: 4096,
                size: 8192,
                type_code: "0x0c".into(),
                name: None,
                guid: None,
            }]
        );
    }

    #[test]
    fn truncated_image_is_refused() {
        let mut d = disk_with(8, 64, 0x83, 32 * 512);
        let e = read_layout(&mut d, 512).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn no_signature_no_table() {
        let mut d = Cursor::new(vec![0u8; 4096]);
        assert!(read_layout(&mut d, 512).is_err());
    }

    #[test]
    fn signature_write_touches_four_bytes() {
        let mut d = disk_with(8, 16, 0x0c, 32 * 512);
        let before = d.get_ref().clone();
        set_disk_signature(&mut d, 0xdead_beef).unwrap();
        let after = d.get_ref();
        let changed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert_eq!(changed, vec![440, 441, 442, 443]);
        assert_eq!(read_layout(&mut d, 512).unwrap().disk_id, "deadbeef");
    }

    #[test]
    fn a_partition_at_sector_zero_is_refused_not_a_panic() {
        let mut d = disk_with(0, 16, 0x0c, 32 * 512);
        let e = read_layout(&mut d, 512).unwrap_err().to_string();
        assert!(e.contains("sector 0"), "{e}");
    }

    #[test]
    fn extended_partition_chains_that_wrap_or_loop_are_refused() {
        // An extended partition at sector 8 whose EBR puts its logical partition past 2^32.
        let mut d = disk_with(8, 16, 0x05, 64 * 512);
        let ebr = 8 * 512;
        let bytes = d.get_mut();
        bytes[ebr + 446 + 4] = 0x83;
        bytes[ebr + 446 + 8..ebr + 446 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes[ebr + 446 + 12..ebr + 446 + 16].copy_from_slice(&1u32.to_le_bytes());
        bytes[ebr + 510] = 0x55;
        bytes[ebr + 511] = 0xaa;
        let e = read_layout(&mut d, 512).unwrap_err().to_string();
        assert!(e.contains("damaged extended partition"), "{e}");
    }
}
