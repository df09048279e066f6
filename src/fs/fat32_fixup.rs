//! Repairs two things fatfs 0.3 gets wrong on the FAT32 volumes kiln formats itself (the ESP),
//! so `fsck.vfat -n` finds nothing to fix:
//!
//! - `create_dir` writes a long-name entry before `.` and before `..` (it treats the dot names
//!   as long names), so a new directory starts `[LFN][.][LFN][..]` where `[.][..]` must come
//!   first. The dot entries are moved to slots 0 and 1 and the two stray slots marked deleted;
//!   `..` of a directory in the root is given cluster 0, as the FAT specification wants.
//! - the FSInfo sector's free-cluster count and next-free hint are left "unknown"; they are
//!   filled in from the allocation table.

use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Result, bail};

use super::fat::{Bpb, FatBits};

const ENTRY: usize = 32;
const ATTR_LFN: u8 = 0x0F;
const ATTR_DIR: u8 = 0x10;

/// Fixes the FAT32 volume that fills `dev`.
pub fn fix<D: Read + Write + Seek>(dev: &mut D) -> Result<()> {
    let mut boot = vec![0u8; 512];
    dev.seek(SeekFrom::Start(0))?;
    dev.read_exact(&mut boot)?;
    let bpb = Bpb::parse(&boot)?;
    if bpb.bits() != FatBits::Fat32 {
        bail!("not a FAT32 volume");
    }
    let bps = bpb.bytes_per_sector;
    let root_cluster = u32::from_le_bytes(boot[44..48].try_into().expect("4 bytes"));
    let fsinfo_sector = u64::from(u16::from_le_bytes([boot[48], boot[49]]));

    let mut fat = vec![0u8; (bpb.fat_sectors * bps) as usize];
    dev.seek(SeekFrom::Start(bpb.reserved_sectors * bps))?;
    dev.read_exact(&mut fat)?;
    let vol = Volume {
        fat,
        data_start: bpb.first_data_sector() * bps,
        cluster_bytes: bps * bpb.sectors_per_cluster,
    };

    // Walk the directory tree from the root, by cluster chains.
    let mut dirs = vec![(root_cluster, 0u32)];
    let mut seen = std::collections::BTreeSet::new();
    while let Some((first, parent)) = dirs.pop() {
        if !seen.insert(first) {
            continue;
        }
        let mut bytes = vol.read_chain(dev, first)?;
        if first != root_cluster {
            fix_dot_entries(&mut bytes, parent, root_cluster);
            dev.seek(SeekFrom::Start(vol.offset_of(first)))?;
            dev.write_all(&bytes[..4 * ENTRY])?;
        }
        for c in subdirectories(&bytes) {
            dirs.push((c, first));
        }
    }

    // FSInfo: free clusters and the first free one.
    let clusters = bpb.clusters() as u32;
    let free: Vec<u32> = (2..clusters + 2).filter(|&c| vol.next(c) == 0).collect();
    let mut info = vec![0u8; 512];
    dev.seek(SeekFrom::Start(fsinfo_sector * bps))?;
    dev.read_exact(&mut info)?;
    if info[..4] == *b"RRaA" && info[484..488] == *b"rrAa" {
        info[488..492].copy_from_slice(&(free.len() as u32).to_le_bytes());
        info[492..496].copy_from_slice(&free.first().copied().unwrap_or(0xFFFF_FFFF).to_le_bytes());
        dev.seek(SeekFrom::Start(fsinfo_sector * bps))?;
        dev.write_all(&info)?;
    }
    dev.flush()?;
    Ok(())
}

/// The allocation table and where clusters sit, enough to read a directory's cluster chain.
struct Volume {
    fat: Vec<u8>,
    /// Byte offset of cluster 2.
    data_start: u64,
    cluster_bytes: u64,
}

impl Volume {
    /// The cluster after `c` in its chain (or an end/free/bad marker).
    fn next(&self, c: u32) -> u32 {
        let o = c as usize * 4;
        u32::from_le_bytes(self.fat[o..o + 4].try_into().expect("4 bytes")) & 0x0FFF_FFFF
    }

    /// Byte offset of cluster `c`.
    fn offset_of(&self, c: u32) -> u64 {
        self.data_start + u64::from(c - 2) * self.cluster_bytes
    }

    /// The contents of the chain starting at `first`, read cluster by cluster.
    fn read_chain<D: Read + Seek>(&self, dev: &mut D, first: u32) -> Result<Vec<u8>> {
        let cluster_bytes = self.cluster_bytes;
        let mut chain = vec![first];
        while let Some(&c) = chain.last() {
            let n = self.next(c);
            if !(2..0x0FFF_FFF8).contains(&n) || chain.len() > 1 << 20 {
                break;
            }
            chain.push(n);
        }
        let mut bytes = Vec::with_capacity(chain.len() * cluster_bytes as usize);
        for &c in &chain {
            let mut buf = vec![0u8; cluster_bytes as usize];
            dev.seek(SeekFrom::Start(self.offset_of(c)))?;
            dev.read_exact(&mut buf)?;
            bytes.extend_from_slice(&buf);
        }
        Ok(bytes)
    }
}

/// Puts `.` and `..` of a directory other than the root (its entries in `bytes`, whose parent
/// starts at cluster `parent`) into slots 0 and 1, and points `..` at the right cluster.
fn fix_dot_entries(bytes: &mut [u8], parent: u32, root_cluster: u32) {
    let slot = |b: &[u8], i: usize| b[i * ENTRY..(i + 1) * ENTRY].to_vec();
    let is_dot =
        |e: &[u8], dots: &[u8]| e[11] & ATTR_DIR != 0 && e[11] != ATTR_LFN && e[..11] == *dots;
    if bytes.len() >= 4 * ENTRY
        && bytes[11] == ATTR_LFN
        && is_dot(&slot(bytes, 1), b".          ")
        && bytes[2 * ENTRY + 11] == ATTR_LFN
        && is_dot(&slot(bytes, 3), b"..         ")
    {
        let (dot, dotdot) = (slot(bytes, 1), slot(bytes, 3));
        bytes[..ENTRY].copy_from_slice(&dot);
        bytes[ENTRY..2 * ENTRY].copy_from_slice(&dotdot);
        for i in 2..4 {
            bytes[i * ENTRY..(i + 1) * ENTRY].fill(0);
            bytes[i * ENTRY] = 0xE5;
        }
    }
    // `..` of a directory in the root names cluster 0, not the root's cluster.
    if is_dot(&slot(bytes, 1), b"..         ") {
        let want = if parent == root_cluster { 0 } else { parent };
        bytes[ENTRY + 20..ENTRY + 22].copy_from_slice(&((want >> 16) as u16).to_le_bytes());
        bytes[ENTRY + 26..ENTRY + 28].copy_from_slice(&(want as u16).to_le_bytes());
    }
}

/// The first clusters of the subdirectories listed in a directory's entries (not `.` or `..`).
fn subdirectories(bytes: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in bytes.chunks(ENTRY) {
        if e[0] == 0 {
            break;
        }
        if e[0] == 0xE5 || e[11] == ATTR_LFN || e[11] & ATTR_DIR == 0 || e[0] == b'.' {
            continue;
        }
        let c = u32::from(u16::from_le_bytes([e[20], e[21]])) << 16
            | u32::from(u16::from_le_bytes([e[26], e[27]]));
        if c >= 2 {
            out.push(c);
        }
    }
    out
}
