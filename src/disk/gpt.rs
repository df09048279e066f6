//! GUID Partition Tables: read into `DiskLayout`, and written whole for images kiln makes.
//!
//! A GPT is a protective MBR, a header at LBA 1 with a CRC32 of itself and of a 128-entry array,
//! and a backup of both at the end of the disk. Reading checks both CRCs (a torn or hand-edited
//! table is refused rather than guessed at); writing emits primary and backup so that `sgdisk -v`
//! and firmware find nothing to repair.

use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};
use uuid::Uuid;

use super::{DiskLayout, Partition};

const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_SIZE: u32 = 92;
const ENTRY_SIZE: u32 = 128;
const ENTRY_COUNT: u32 = 128;

/// Well-known partition type GUIDs.
pub const TYPE_ESP: Uuid = Uuid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
pub const TYPE_LINUX_ROOT_X86_64: Uuid = Uuid::from_u128(0x4F68BCE3_E8CD_4DB1_96E7_FBCAF984B709);
pub const TYPE_LINUX_DATA: Uuid = Uuid::from_u128(0x0FC63DAF_8483_4772_8E79_3D69D8477DE4);

/// One partition to write.
#[derive(Debug, Clone)]
pub struct NewPartition {
    pub type_guid: Uuid,
    pub guid: Uuid,
    pub name: String,
    /// First and last LBA, inclusive.
    pub first_lba: u64,
    pub last_lba: u64,
}

/// GPT writes GUIDs with the first three fields little-endian ("mixed endian").
fn guid_bytes(u: &Uuid) -> [u8; 16] {
    u.to_bytes_le()
}

fn guid_from(b: &[u8]) -> Uuid {
    Uuid::from_bytes_le(b[..16].try_into().expect("16 bytes"))
}

fn entry_array_bytes(sector: u64) -> u64 {
    (u64::from(ENTRY_COUNT * ENTRY_SIZE)).div_ceil(sector) * sector
}

/// The first LBA a partition may use on a disk with `sector`-byte sectors.
pub fn first_usable_lba(sector: u64) -> u64 {
    2 + entry_array_bytes(sector) / sector
}

/// The last LBA a partition may use on a disk of `size` bytes.
pub fn last_usable_lba(size: u64, sector: u64) -> u64 {
    size / sector - 2 - entry_array_bytes(sector) / sector
}

/// Writes protective MBR, primary and backup GPT for a disk of `size` bytes.
pub fn write<D: Write + Seek>(
    disk: &mut D,
    size: u64,
    sector: u64,
    disk_guid: Uuid,
    parts: &[NewPartition],
) -> Result<()> {
    if parts.len() > ENTRY_COUNT as usize {
        bail!("a GPT holds at most {ENTRY_COUNT} partitions");
    }
    let last_lba = size / sector - 1;
    let (first_usable, last_usable) = (first_usable_lba(sector), last_usable_lba(size, sector));
    for p in parts {
        if p.first_lba < first_usable || p.last_lba > last_usable || p.first_lba > p.last_lba {
            bail!(
                "partition {:?} (LBA {}..={}) is outside the usable area {first_usable}..={last_usable}",
                p.name,
                p.first_lba,
                p.last_lba
            );
        }
    }

    let mut entries = vec![0u8; entry_array_bytes(sector) as usize];
    for (i, p) in parts.iter().enumerate() {
        let e = &mut entries[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
        e[0..16].copy_from_slice(&guid_bytes(&p.type_guid));
        e[16..32].copy_from_slice(&guid_bytes(&p.guid));
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        let name: Vec<u16> = p.name.encode_utf16().collect();
        if name.len() > 36 {
            bail!(
                "GPT partition name {:?} is longer than 36 characters",
                p.name
            );
        }
        for (k, c) in name.iter().enumerate() {
            e[56 + 2 * k..58 + 2 * k].copy_from_slice(&c.to_le_bytes());
        }
    }
    let entries_crc = crc32fast::hash(&entries[..(ENTRY_COUNT * ENTRY_SIZE) as usize]);
    let entries_sectors = entry_array_bytes(sector) / sector;

    let header = |my_lba: u64, alt_lba: u64, entries_lba: u64| -> Vec<u8> {
        let mut h = vec![0u8; sector as usize];
        h[0..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
        h[40..48].copy_from_slice(&first_usable.to_le_bytes());
        h[48..56].copy_from_slice(&last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&guid_bytes(&disk_guid));
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&ENTRY_COUNT.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };

    // Protective MBR: one 0xEE partition covering the disk (capped at 32 bits).
    let mut mbr = vec![0u8; sector as usize];
    mbr[446 + 1..446 + 4].copy_from_slice(&[0x00, 0x02, 0x00]);
    mbr[446 + 4] = 0xee;
    mbr[446 + 5..446 + 8].copy_from_slice(&[0xff, 0xff, 0xff]);
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    let covered = u32::try_from(last_lba).unwrap_or(u32::MAX);
    mbr[446 + 12..446 + 16].copy_from_slice(&covered.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    let backup_entries_lba = last_lba - entries_sectors;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&mbr)?;
    disk.write_all(&header(1, last_lba, 2))?;
    disk.write_all(&entries)?;
    disk.seek(SeekFrom::Start(backup_entries_lba * sector))?;
    disk.write_all(&entries)?;
    disk.write_all(&header(last_lba, 1, backup_entries_lba))?;
    Ok(())
}

/// The largest entry array kiln reads: the UEFI minimum is 16 KiB (128 × 128 bytes) and every
/// partitioning tool writes exactly that; 1 MiB leaves room for odd tools without letting a header
/// make kiln allocate gigabytes.
const MAX_ENTRY_ARRAY: u64 = 1 << 20;

/// Reads the primary GPT of a disk whose first sector is a protective MBR.
///
/// Every number in the header is checked before it is multiplied or used to seek: a header is
/// data from a download or a card, not a promise.
pub fn read<D: Read + Seek>(disk: &mut D, sector: u64, size: u64) -> Result<DiskLayout> {
    let mut h = vec![0u8; sector as usize];
    disk.seek(SeekFrom::Start(sector))?;
    disk.read_exact(&mut h)
        .context("reading the GPT header at LBA 1")?;
    if &h[0..8] != SIGNATURE {
        bail!(
            "protective MBR found but no GPT header at LBA 1 for {sector}-byte sectors (wrong sector size?)"
        );
    }
    let header_size = u32::from_le_bytes(h[12..16].try_into()?) as usize;
    if !(HEADER_SIZE as usize..=sector as usize).contains(&header_size) {
        bail!("GPT header size {header_size} is invalid");
    }
    let stored = u32::from_le_bytes(h[16..20].try_into()?);
    let mut check = h[..header_size].to_vec();
    check[16..20].fill(0);
    if crc32fast::hash(&check) != stored {
        bail!("the GPT header's CRC32 does not match (a damaged or hand-edited table)");
    }
    let disk_guid = guid_from(&h[56..72]);
    let entries_lba = u64::from_le_bytes(h[72..80].try_into()?);
    let count = u64::from(u32::from_le_bytes(h[80..84].try_into()?));
    let esize = u64::from(u32::from_le_bytes(h[84..88].try_into()?));
    let entries_crc = u32::from_le_bytes(h[88..92].try_into()?);
    // UEFI 2.10, 5.3.2: SizeOfPartitionEntry is 128 × 2^n.
    if esize < 128 || !esize.is_power_of_two() {
        bail!("GPT entry size {esize} is not 128 × 2^n bytes (UEFI 5.3.2)");
    }
    let array_bytes = count
        .checked_mul(esize)
        .filter(|&b| b <= MAX_ENTRY_ARRAY)
        .with_context(|| {
            format!(
                "the GPT header claims {count} entries of {esize} bytes, more than the {} KiB kiln reads",
                MAX_ENTRY_ARRAY >> 10
            )
        })?;
    let lbas = size / sector;
    let array_end = entries_lba
        .checked_mul(sector)
        .and_then(|o| o.checked_add(array_bytes))
        .filter(|&end| entries_lba >= 2 && end <= size)
        .with_context(|| {
            format!(
                "the GPT entry array at LBA {entries_lba} lies outside the {size}-byte image (truncated download?)"
            )
        })?;
    let mut entries = vec![0u8; array_bytes as usize];
    disk.seek(SeekFrom::Start(array_end - array_bytes))?;
    disk.read_exact(&mut entries)
        .context("reading the GPT entries (truncated image?)")?;
    if crc32fast::hash(&entries) != entries_crc {
        bail!("the GPT entry array's CRC32 does not match (a damaged table)");
    }
    let mut partitions = Vec::new();
    for (i, e) in entries.chunks_exact(esize as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = u64::from_le_bytes(e[32..40].try_into()?);
        let last = u64::from_le_bytes(e[40..48].try_into()?);
        if last < first {
            bail!("GPT partition {} ends before it starts", i + 1);
        }
        // Partitions past the end are reported by the caller as a truncated image; here only
        // what cannot even be expressed in bytes is refused.
        let end = last.checked_add(1).and_then(|l| l.checked_mul(sector));
        if first == 0 || end.is_none() {
            bail!(
                "GPT partition {} spans LBA {first}..={last}, impossible on a disk of {lbas} sectors",
                i + 1
            );
        }
        let name: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        partitions.push(Partition {
            index: i + 1,
            start: first * sector,
            size: (last - first + 1) * sector,
            type_code: guid_from(&e[0..16]).to_string(),
            name: Some(String::from_utf16_lossy(&name)),
            guid: Some(guid_from(&e[16..32]).to_string()),
        });
    }
    Ok(DiskLayout {
        table: "gpt",
        sector_size: sector,
        disk_id: disk_guid.to_string(),
        partitions,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn written_table_reads_back() {
        let size = 8u64 << 20;
        let mut d = Cursor::new(vec![0u8; size as usize]);
        let parts = vec![
            NewPartition {
                type_guid: TYPE_ESP,
                guid: Uuid::from_u128(1),
                name: "ESP".into(),
                first_lba: 2048,
                last_lba: 4095,
            },
            NewPartition {
                type_guid: TYPE_LINUX_ROOT_X86_64,
                guid: Uuid::from_u128(2),
                name: "root".into(),
                first_lba: 4096,
                last_lba: last_usable_lba(size, 512),
            },
        ];
        write(&mut d, size, 512, Uuid::from_u128(7), &parts).unwrap();
        let l = read(&mut d, 512, size).unwrap();
        assert_eq!(l.disk_id, Uuid::from_u128(7).to_string());
        assert_eq!(l.partitions.len(), 2);
        assert_eq!(l.partitions[0].start, 2048 * 512);
        assert_eq!(l.partitions[0].name.as_deref(), Some("ESP"));
        assert_eq!(
            l.partitions[1].type_code,
            TYPE_LINUX_ROOT_X86_64.to_string()
        );
        // A flipped byte in the entries is caught by the CRC.
        d.get_mut()[1024 + 40] ^= 1;
        assert!(
            read(&mut d, 512, size)
                .unwrap_err()
                .to_string()
                .contains("CRC32")
        );
    }

    /// A header with `count` entries of `esize` bytes at `entries_lba`, CRCs valid.
    fn forged_header(count: u32, esize: u32, entries_lba: u64, entries: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..8].copy_from_slice(SIGNATURE);
        h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&count.to_le_bytes());
        h[84..88].copy_from_slice(&esize.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(entries).to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    #[test]
    fn hostile_headers_are_refused_without_overflow_or_huge_allocations() {
        let size = 1u64 << 20;
        let disk = |header: Vec<u8>| {
            let mut d = vec![0u8; size as usize];
            d[512..1024].copy_from_slice(&header);
            Cursor::new(d)
        };
        // 1024 entries of 4 MiB, CRCs valid for what would be read: refused before reading.
        let e = read(&mut disk(forged_header(1024, 4 << 20, 2, &[])), 512, size).unwrap_err();
        assert!(e.to_string().contains("more than the 1024 KiB"), "{e}");
        // Entry sizes that are not 128 × 2^n, and arrays past the end or at absurd LBAs.
        for (count, esize, lba) in [
            (128, 129, 2),
            (128, 0, 2),
            (128, 128, u64::MAX / 256),
            (128, 128, 0),
        ] {
            let e = read(&mut disk(forged_header(count, esize, lba, &[])), 512, size).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
        // A valid array whose one partition ends at the last LBA expressible: no overflow.
        let mut entries = vec![0u8; 128 * 128];
        entries[0..16].copy_from_slice(&guid_bytes(&TYPE_ESP));
        entries[32..40].copy_from_slice(&34u64.to_le_bytes());
        entries[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut d = disk(forged_header(128, 128, 2, &entries));
        d.get_mut()[1024..1024 + entries.len()].copy_from_slice(&entries);
        let e = read(&mut d, 512, size).unwrap_err();
        assert!(e.to_string().contains("impossible"), "{e}");
    }
}
