//! GUID Partition Tables: read into `DiskLayout`, and written whole for images kiln makes.
//!
//! The `gpt` crate parses and serialises the tables: protective MBR, header at LBA 1 with a CRC32
//! of itself and of the entry array, and the backup of both at the end of the disk, for 512- and
//! 4096-byte sectors. Reading checks both CRCs (a torn or hand-edited table is refused rather
//! than guessed at); writing emits primary and backup so that `sgdisk -v` and firmware find
//! nothing to repair. What kiln adds is what the crate leaves to its callers: every number in a
//! header read from a download is checked before the crate multiplies, allocates or asserts on
//! it, and partitions it would silently truncate or drop are refused before writing.

use std::io::{self, Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, anyhow, bail};
use gpt::disk::LogicalBlockSize;
use gpt::header::HeaderError;
use uuid::Uuid;

use super::{DiskLayout, Partition};

/// The header size every partitioning tool writes, and the only one the crate checksums.
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

fn block_size(sector: u64) -> Result<LogicalBlockSize> {
    LogicalBlockSize::try_from(sector)
        .map_err(|_| anyhow!("GPT sectors are 512 or 4096 bytes, not {sector}"))
}

/// A disk seen as exactly `size` bytes long: the crate finds the backup header's LBA from the
/// device's end, and kiln's callers name the size of the disk they lay out.
struct SizedDisk<'a, D> {
    inner: &'a mut D,
    size: u64,
}

impl<D> std::fmt::Debug for SizedDisk<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "disk of {} bytes", self.size)
    }
}

impl<D: Read> Read for SizedDisk<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<D: Write> Write for SizedDisk<'_, D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<D: Seek> Seek for SizedDisk<'_, D> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let pos = match pos {
            SeekFrom::End(d) => {
                SeekFrom::Start(self.size.checked_add_signed(d).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "seek before the disk's start")
                })?)
            }
            other => other,
        };
        self.inner.seek(pos)
    }
}

/// Writes protective MBR, primary and backup GPT for a disk of `size` bytes.
pub fn write<D: Read + Write + Seek>(
    disk: &mut D,
    size: u64,
    sector: u64,
    disk_guid: Uuid,
    parts: &[NewPartition],
) -> Result<()> {
    let lb = block_size(sector)?;
    if parts.len() > ENTRY_COUNT as usize {
        bail!("a GPT holds at most {ENTRY_COUNT} partitions");
    }
    let last_lba = size / sector - 1;
    let (first_usable, last_usable) = (first_usable_lba(sector), last_usable_lba(size, sector));
    // The crate validates none of this: it cuts names at 36 characters and skips entries whose
    // type is nil (then numbers the next one a slot early).
    let mut entries = std::collections::BTreeMap::new();
    for (i, p) in parts.iter().enumerate() {
        if p.first_lba < first_usable || p.last_lba > last_usable || p.first_lba > p.last_lba {
            bail!(
                "partition {:?} (LBA {}..={}) is outside the usable area {first_usable}..={last_usable}",
                p.name,
                p.first_lba,
                p.last_lba
            );
        }
        if p.name.encode_utf16().count() > 36 {
            bail!(
                "GPT partition name {:?} is longer than 36 characters",
                p.name
            );
        }
        if p.type_guid.is_nil() {
            bail!("GPT partition {:?} has no type GUID", p.name);
        }
        let entry = gpt::partition::Partition {
            part_type_guid: p.type_guid.into(),
            part_guid: p.guid,
            first_lba: p.first_lba,
            last_lba: p.last_lba,
            flags: 0,
            name: p.name.clone(),
        };
        entries.insert(i as u32 + 1, entry);
    }

    let mut device = SizedDisk { inner: disk, size };
    // The crate writes the MBR's first 512 bytes; the rest of a 4096-byte LBA 0 is zeroed too,
    // so nothing of an earlier table survives there.
    device.seek(SeekFrom::Start(0))?;
    device.write_all(&vec![0u8; sector as usize])?;
    // One 0xEE partition covering the disk, capped at 32 bits.
    let covered = u32::try_from(last_lba).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(covered)
        .overwrite_lba0(&mut device)
        .context("writing the protective MBR")?;
    let mut table = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(device, Some(disk_guid))
        .context("laying out the GPT")?;
    table
        .update_partitions(entries)
        .context("laying out the GPT")?;
    table.write().context("writing the GPT")?;
    Ok(())
}

/// The largest entry array kiln reads: the UEFI minimum is 16 KiB (128 × 128 bytes) and every
/// partitioning tool writes exactly that; 1 MiB leaves room for odd tools without letting a header
/// make kiln allocate gigabytes.
const MAX_ENTRY_ARRAY: u64 = 1 << 20;

/// The primary header, its CRC checked by the crate and every number in it checked here, before
/// the crate seeks, allocates or asserts on it.
fn checked_header<D: Read + Seek>(
    disk: &mut D,
    lb: LogicalBlockSize,
    sector: u64,
    size: u64,
) -> Result<gpt::header::Header> {
    let h = match gpt::header::read_header_from_arbitrary_device(disk, lb) {
        Ok(h) => h,
        Err(HeaderError::InvalidGptSignature) => bail!(
            "protective MBR found but no GPT header at LBA 1 for {sector}-byte sectors (wrong sector size?)"
        ),
        Err(HeaderError::InvalidCRC32Checksum) => {
            bail!("the GPT header's CRC32 does not match (a damaged or hand-edited table)")
        }
        Err(HeaderError::Io(e)) => return Err(e).context("reading the GPT header at LBA 1"),
        Err(e) => return Err(e).context("reading the GPT header at LBA 1"),
    };
    // gpt 4.1 checksums 92 bytes whatever the header says; UEFI allows more, no tool writes more.
    if h.header_size_le != HEADER_SIZE {
        bail!(
            "GPT header size {} is invalid (every partitioning tool writes {HEADER_SIZE})",
            h.header_size_le
        );
    }
    let (entries_lba, count, esize) = (h.part_start, u64::from(h.num_parts), h.part_size);
    // UEFI 2.10, 5.3.2: SizeOfPartitionEntry is 128 × 2^n.
    if esize < 128 || !esize.is_power_of_two() {
        bail!("GPT entry size {esize} is not 128 × 2^n bytes (UEFI 5.3.2)");
    }
    let array_bytes = count
        .checked_mul(u64::from(esize))
        .filter(|&b| b <= MAX_ENTRY_ARRAY)
        .with_context(|| {
            format!(
                "the GPT header claims {count} entries of {esize} bytes, more than the {} KiB kiln reads",
                MAX_ENTRY_ARRAY >> 10
            )
        })?;
    entries_lba
        .checked_mul(sector)
        .and_then(|o| o.checked_add(array_bytes))
        .filter(|&end| entries_lba >= 2 && end <= size)
        .with_context(|| {
            format!(
                "the GPT entry array at LBA {entries_lba} lies outside the {size}-byte image (truncated download?)"
            )
        })?;
    // gpt 4.1 asserts (panics on) any other size; every partitioning tool writes 128.
    if esize != ENTRY_SIZE {
        bail!("GPT entry size {esize} is not supported: kiln reads 128-byte entries");
    }
    Ok(h)
}

/// Reads the primary GPT of a disk whose first sector is a protective MBR.
///
/// Every number in the header is checked before it is multiplied or used to seek: a header is
/// data from a download or a card, not a promise. The crate checks the header's CRC when it
/// parses it and the entry array's when it reads the entries.
pub fn read<D: Read + Seek>(disk: &mut D, sector: u64, size: u64) -> Result<DiskLayout> {
    let lb = block_size(sector)?;
    let h = checked_header(disk, lb, sector, size)?;
    let lbas = size / sector;
    let entries = gpt::partition::file_read_partitions(disk, &h, lb).map_err(|e| {
        // The crate reports a CRC mismatch as an `Other` error; the array's bounds were checked
        // above, so the remaining failures are reads.
        if e.kind() == io::ErrorKind::Other && e.to_string().contains("CRC") {
            anyhow!("the GPT entry array's CRC32 does not match (a damaged table)")
        } else {
            anyhow!(e).context("reading the GPT entries (truncated image?)")
        }
    })?;
    let mut partitions = Vec::new();
    // The crate skips all-zero entries; an entry is unused when its type GUID is nil (UEFI 5.3.3).
    for (i, e) in entries.iter().filter(|(_, e)| e.is_used()) {
        let (first, last) = (e.first_lba, e.last_lba);
        if last < first {
            bail!("GPT partition {i} ends before it starts");
        }
        // Partitions past the end are reported by the caller as a truncated image; here only
        // what cannot even be expressed in bytes is refused.
        let end = last.checked_add(1).and_then(|l| l.checked_mul(sector));
        if first == 0 || end.is_none() {
            bail!(
                "GPT partition {i} spans LBA {first}..={last}, impossible on a disk of {lbas} sectors"
            );
        }
        partitions.push(Partition {
            index: *i as usize,
            start: first * sector,
            size: (last - first + 1) * sector,
            type_code: e.part_type_guid.guid.to_string(),
            name: Some(e.name.clone()),
            guid: Some(e.part_guid.to_string()),
        });
    }
    Ok(DiskLayout {
        table: "gpt",
        sector_size: sector,
        disk_id: h.disk_guid.to_string(),
        partitions,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SIGNATURE: &[u8; 8] = b"EFI PART";

    fn guid_bytes(u: &Uuid) -> [u8; 16] {
        u.to_bytes_le()
    }

    /// Layouts kiln writes and edge cases of the format, for the byte comparisons below.
    fn layouts(size: u64, sector: u64) -> Vec<Vec<NewPartition>> {
        let first = first_usable_lba(sector);
        let last = last_usable_lba(size, sector);
        let p = |n: u128, name: &str, a: u64, b: u64| NewPartition {
            type_guid: if n % 2 == 1 {
                TYPE_ESP
            } else {
                TYPE_LINUX_ROOT_X86_64
            },
            guid: Uuid::from_u128(0x6b696c6e_0000_4000_8000_000000000000 | n),
            name: name.into(),
            first_lba: a,
            last_lba: b,
        };
        vec![
            vec![],
            vec![p(1, "ESP", first, first)],
            vec![
                p(1, "ESP", 2048 * 512 / sector, 4095 * 512 / sector),
                p(2, "root", 4096 * 512 / sector, last),
            ],
            vec![p(3, "ünïcødé 名前 with 36 characters 0123", first, last)],
            (0..128u64)
                .map(|i| p(u128::from(i) + 1, &format!("p{i}"), first + i, first + i))
                .collect(),
        ]
    }

    type Writer = fn(&mut std::fs::File, u64, u64, Uuid, &[NewPartition]) -> Result<()>;

    /// SHA-256 over the disks `writer` makes of `layouts`, at 512- and 4096-byte sectors, over
    /// garbage (so every byte the table owns must be written), plus the first and last MiB of a
    /// 3 TiB disk (past 2^32 512-byte sectors, where the protective MBR's size is capped).
    fn written_bytes_digest(writer: Writer) -> String {
        use sha2::{Digest, Sha256};
        let mut all = Sha256::new();
        let dir = tempfile::tempdir().unwrap();
        let mut chunk = |f: &mut std::fs::File, at: u64, len: usize| {
            let mut buf = vec![0u8; len];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut buf).unwrap();
            all.update(&buf);
        };
        for sector in [512u64, 4096] {
            for size in [8u64 << 20, (8 << 20) + 3 * sector + 17, 3 << 40] {
                let big = size > 1 << 30;
                let cases = if big {
                    layouts(size, sector)[2..3].to_vec()
                } else {
                    layouts(size, sector)
                };
                for parts in cases {
                    let path = dir.path().join("disk");
                    let mut f = std::fs::File::options()
                        .create(true)
                        .truncate(true)
                        .read(true)
                        .write(true)
                        .open(&path)
                        .unwrap();
                    f.set_len(size).unwrap();
                    if !big {
                        let garbage: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
                        f.write_all(&garbage).unwrap();
                    }
                    writer(&mut f, size, sector, Uuid::from_u128(7), &parts).unwrap();
                    if big {
                        chunk(&mut f, 0, 1 << 20);
                        chunk(&mut f, size - (1 << 20), 1 << 20);
                    } else {
                        chunk(&mut f, 0, size as usize);
                    }
                }
            }
        }
        hex::encode(all.finalize())
    }

    /// The bytes kiln's hand-written writer produced before the `gpt` crate replaced it (the two
    /// were compared byte for byte when it did): disk and partition GUIDs, names, attributes,
    /// entry count and size, protective MBR and backup header stay what they were.
    #[test]
    fn crate_writes_the_bytes_the_hand_written_writer_did() {
        assert_eq!(
            written_bytes_digest(write),
            "26ac5f7568d3676e47d1690a5b220ff502c711d04ec63e907facdfa4bf0ec033"
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
        // 256-byte entries are legal UEFI but the crate asserts 128: refused, not a panic.
        let wide = vec![0u8; 64 * 256];
        let mut d = disk(forged_header(64, 256, 2, &wide));
        let e = read(&mut d, 512, size).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
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
