//! The native disk builder: an unpacked OS root becomes a bootable UEFI disk without root
//! privileges, loop devices or a container engine.
//!
//! Layout: GPT (GUIDs derived from the image digest); partition 1, an ESP (FAT32, written
//! in-process with fatfs) carrying the image's own bootloader (systemd-boot, or shim + GRUB from
//! bootupd: `disk::bootloader`), its kernel and initramfs, and a Boot Loader Specification entry
//! (and for GRUB a grub.cfg) with `root=PARTUUID=…`; partition 2, the root ext4 made by
//! `fs::ext4_build`; then free space at the end for Ironic's config drive. Every id and time is
//! derived from the inputs, so the same image gives the same bytes.

use std::path::Path;

use anyhow::{Context, Result};
use uuid::Uuid;

use super::bootloader::{self, BootEntry, EspFile};
use crate::base::unpack::{Kind, Meta, Tree};
use crate::disk::gpt::{self, NewPartition};
use crate::disk::slice::PartitionSlice;
use crate::fs::ext4_build::{self, Ext4Options};
use crate::fs::fat::{FatVolume, fat_datetime};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Sizes and kernel arguments of the disk (from the profile's `[disk]`).
#[derive(Debug, Clone)]
pub struct DiskPlan {
    pub esp_mib: u64,
    /// Free space inside the root filesystem beyond what the image fills.
    pub root_free_mib: u64,
    /// Unpartitioned space at the end of the disk (Ironic puts its config drive there).
    pub tail_free_mib: u64,
    pub kernel_args: Vec<String>,
    /// EFI architecture suffix of the bootloader (`x64`, `aa64`).
    pub efi_arch: String,
}

/// What the assembled disk is made of, for the build manifest and for tests.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub size: u64,
    pub disk_guid: Uuid,
    pub esp_guid: Uuid,
    pub root_guid: Uuid,
    pub root_fs_uuid: Uuid,
    pub kernel_version: String,
    pub cloud_init: bool,
    /// Size of the root partition, and the time its ext4 took (mke2fs -d plus kiln's fixups),
    /// reported so the slowest step can be watched apart from the rest.
    pub root_bytes: u64,
    pub ext4_time: std::time::Duration,
}

/// A kernel found in the root, with its initramfs.
struct Kernel {
    version: String,
    linux: String,
    initrd: Option<String>,
}

/// Makes the disk at `dest` from `tree`; `seed` (the image digest) derives every id.
pub fn assemble(
    tree: &mut Tree,
    seed: &str,
    epoch: i64,
    plan: &DiskPlan,
    dest: &Path,
) -> Result<Assembled> {
    let id = |purpose: &str| crate::plan::ids::uuid(seed, "oci-disk", purpose);
    let (disk_guid, esp_guid, root_guid, fs_uuid) =
        (id("disk"), id("esp"), id("root"), id("root-fs"));

    let kernel = find_kernel(tree)?;
    let loader = bootloader::find(tree, &plan.efi_arch)?;

    let cloud_init = add_root_config(tree, epoch, root_guid, esp_guid)?;
    tree.finish()?;

    let layout = layout(tree, plan)?;

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    f.set_len(layout.size)?;

    let vid = esp_volume_id(esp_guid);
    let entry = boot_entry(tree, &kernel, plan, root_guid, vid);
    let esp_files = bootloader::esp_files(&loader, &plan.efi_arch, &entry);
    write_esp(
        tree,
        f.try_clone()?,
        &layout,
        epoch,
        &kernel,
        vid,
        esp_files,
    )?;
    fix_esp(dest, &layout)?;
    drop(f);

    let ext4_time = build_root(tree, dest, &layout, fs_uuid, epoch)?;
    write_partition_table(
        dest,
        &layout,
        disk_guid,
        esp_guid,
        root_guid,
        &plan.efi_arch,
    )?;
    Ok(Assembled {
        size: layout.size,
        disk_guid,
        esp_guid,
        root_guid,
        root_fs_uuid: fs_uuid,
        kernel_version: kernel.version,
        cloud_init,
        root_bytes: layout.root_bytes,
        ext4_time,
    })
}

/// Adds what the root needs to boot from this disk: cloud-init's datasources, and an fstab naming
/// the partitions when the image has none. Returns whether the image has cloud-init.
fn add_root_config(tree: &mut Tree, epoch: i64, root_guid: Uuid, esp_guid: Uuid) -> Result<bool> {
    // cloud-init: the datasources Metal3 (ConfigDrive) and `kiln run --seed` (NoCloud) use.
    let cloud_init = tree
        .resolve("etc/cloud")
        .is_some_and(|(_, m)| m.kind == Kind::Dir);
    let file_meta = |mode| Meta {
        kind: Kind::File,
        mode,
        uid: 0,
        gid: 0,
        mtime: epoch,
        xattrs: Default::default(),
    };
    if cloud_init {
        tree.add_file(
            "etc/cloud/cloud.cfg.d/90-kiln-datasources.cfg",
            b"# Written by kiln: Ironic's config drive, else a NoCloud seed (kiln run --seed).\n\
              datasource_list: [ ConfigDrive, NoCloud, None ]\n",
            file_meta(0o644),
        )?;
    }
    // A root without an fstab (container images have none) gets one naming its partitions.
    let fstab_empty = match tree.resolve("etc/fstab") {
        Some((p, m)) if m.kind == Kind::File => std::fs::read_to_string(tree.host_path(&p))
            .unwrap_or_default()
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')),
        _ => true,
    };
    if fstab_empty && tree.resolve("etc").is_some() {
        let mut fstab = format!("# Written by kiln.\nPARTUUID={root_guid} / ext4 defaults 0 1\n");
        if tree
            .resolve("boot/efi")
            .is_some_and(|(_, m)| m.kind == Kind::Dir)
        {
            fstab.push_str(&format!(
                "PARTUUID={esp_guid} /boot/efi vfat umask=0077 0 0\n"
            ));
        }
        tree.add_file("etc/fstab", fstab.as_bytes(), file_meta(0o644))?;
    }
    Ok(cloud_init)
}

/// Where the partitions sit on the disk, in bytes.
#[derive(Debug, Clone, Copy)]
struct Layout {
    esp_start: u64,
    esp_bytes: u64,
    root_start: u64,
    root_bytes: u64,
    size: u64,
}

/// Sizes: the root holds the tree with room to spare; inode tables and journal on top.
fn layout(tree: &Tree, plan: &DiskPlan) -> Result<Layout> {
    let data = tree.data_bytes()?;
    let overhead = tree.entries.len() as u64 * 320 + 128 * MIB;
    let root_bytes = (data + data / 8 + overhead + plan.root_free_mib * MIB).div_ceil(MIB) * MIB;
    let esp_bytes = plan.esp_mib * MIB;
    let esp_start = MIB;
    let root_start = esp_start + esp_bytes;
    let size = root_start + root_bytes + plan.tail_free_mib * MIB + MIB;
    Ok(Layout {
        esp_start,
        esp_bytes,
        root_start,
        root_bytes,
        size,
    })
}

/// The FAT volume id of the ESP, taken from its partition GUID.
fn esp_volume_id(esp_guid: Uuid) -> u32 {
    u32::from_le_bytes(esp_guid.as_bytes()[..4].try_into().expect("4 bytes"))
}

/// The Boot Loader Specification entry for `kernel`, as copied onto the ESP under `kiln/<version>`.
fn boot_entry(
    tree: &Tree,
    kernel: &Kernel,
    plan: &DiskPlan,
    root_guid: Uuid,
    vid: u32,
) -> BootEntry {
    let kdir = format!("kiln/{}", kernel.version);
    let mut options = vec![format!("root=PARTUUID={root_guid}"), "rw".to_string()];
    options.extend(plan.kernel_args.iter().cloned());
    BootEntry {
        title: pretty_name(tree),
        version: kernel.version.clone(),
        linux: format!("{kdir}/linux"),
        initrd: kernel.initrd.as_ref().map(|_| format!("{kdir}/initrd")),
        options: options.join(" "),
        esp_volume_id: vid,
    }
}

/// Formats the ESP in `f` and writes onto it the kernel, its initramfs and `esp_files` (the
/// bootloader and its entry).
fn write_esp(
    tree: &Tree,
    f: std::fs::File,
    layout: &Layout,
    epoch: i64,
    kernel: &Kernel,
    vid: u32,
    esp_files: Vec<(String, EspFile)>,
) -> Result<()> {
    let mut slice = PartitionSlice::new(f, layout.esp_start, layout.esp_bytes);
    fatfs::format_volume(
        &mut slice,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .volume_label(*b"ESP        ")
            .volume_id(vid),
    )
    .context("formatting the ESP")?;
    let esp = FatVolume::on(slice, fat_datetime(epoch))?;
    let kdir = format!("kiln/{}", kernel.version);
    esp.write_file(
        &format!("{kdir}/linux"),
        &std::fs::read(tree.host_path(&kernel.linux))?,
    )?;
    if let Some(initrd) = &kernel.initrd {
        esp.write_file(
            &format!("{kdir}/initrd"),
            &std::fs::read(tree.host_path(initrd))?,
        )?;
    }
    for (path, file) in esp_files {
        let bytes = match file {
            EspFile::FromTree(p) => std::fs::read(tree.host_path(&p))
                .with_context(|| format!("reading /{p} from the image"))?,
            EspFile::Text(t) => t.into_bytes(),
        };
        esp.write_file(&path, &bytes)?;
    }
    esp.close()
}

/// Applies the FAT32 fixups to the ESP of `dest`, through a fresh handle.
fn fix_esp(dest: &Path, layout: &Layout) -> Result<()> {
    let mut slice = PartitionSlice::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dest)?,
        layout.esp_start,
        layout.esp_bytes,
    );
    crate::fs::fat32_fixup::fix(&mut slice)
}

/// Makes the root ext4 in its partition; returns how long that took.
fn build_root(
    tree: &Tree,
    dest: &Path,
    layout: &Layout,
    fs_uuid: Uuid,
    epoch: i64,
) -> Result<std::time::Duration> {
    let ext4_started = std::time::Instant::now();
    ext4_build::build(
        tree,
        dest,
        layout.root_start,
        layout.root_bytes,
        &Ext4Options {
            label: "root",
            uuid: &fs_uuid.to_string(),
            epoch,
        },
    )?;
    Ok(ext4_started.elapsed())
}

/// Writes the GPT (the ESP, then the root with the architecture's discoverable-partition type)
/// and syncs the disk.
fn write_partition_table(
    dest: &Path,
    layout: &Layout,
    disk_guid: Uuid,
    esp_guid: Uuid,
    root_guid: Uuid,
    efi_arch: &str,
) -> Result<()> {
    let Layout {
        esp_start,
        root_start,
        root_bytes,
        size,
        ..
    } = *layout;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dest)?;
    gpt::write(
        &mut f,
        size,
        SECTOR,
        disk_guid,
        &[
            NewPartition {
                type_guid: gpt::TYPE_ESP,
                guid: esp_guid,
                name: "ESP".into(),
                first_lba: esp_start / SECTOR,
                last_lba: (root_start / SECTOR) - 1,
            },
            NewPartition {
                type_guid: if efi_arch == "aa64" {
                    Uuid::from_u128(0xB921B045_1DF0_41C3_AF44_4C6F280D3FAE)
                } else {
                    gpt::TYPE_LINUX_ROOT_X86_64
                },
                guid: root_guid,
                name: "root".into(),
                first_lba: root_start / SECTOR,
                last_lba: (root_start + root_bytes) / SECTOR - 1,
            },
        ],
    )?;
    f.sync_all()?;
    Ok(())
}

/// The newest kernel: `/usr/lib/modules/<v>/vmlinuz` (bootc, Fedora) or `/boot/vmlinuz-<v>`
/// (Debian), with `initramfs.img`, `initrd.img-<v>` or `initramfs-<v>.img` beside it.
fn find_kernel(tree: &Tree) -> Result<Kernel> {
    let mut found: Vec<Kernel> = Vec::new();
    let file = |p: &str| {
        tree.resolve(p)
            .filter(|(_, m)| matches!(m.kind, Kind::File | Kind::Hardlink(_)))
            .map(|(p, _)| p)
    };
    for path in tree.entries.keys() {
        let version = if let Some(rest) = path.strip_prefix("usr/lib/modules/") {
            rest.strip_suffix("/vmlinuz").filter(|v| !v.contains('/'))
        } else {
            path.strip_prefix("boot/vmlinuz-")
                .filter(|v| !v.contains('/'))
        };
        let Some(v) = version else { continue };
        let Some(linux) = file(path) else { continue };
        let initrd = [
            format!("usr/lib/modules/{v}/initramfs.img"),
            format!("boot/initrd.img-{v}"),
            format!("boot/initramfs-{v}.img"),
        ]
        .iter()
        .find_map(|p| file(p));
        found.push(Kernel {
            version: v.to_string(),
            linux,
            initrd,
        });
    }
    found.sort_by_key(|k| version_key(&k.version));
    // Prefer a kernel with an initramfs; most distribution kernels need one to find the root.
    let best = found
        .iter()
        .rposition(|k| k.initrd.is_some())
        .or(found.len().checked_sub(1))
        .context(
            "the image has no kernel (looked for /usr/lib/modules/*/vmlinuz and /boot/vmlinuz-*); \
             install one in the image (linux-image-amd64 on Debian)",
        )?;
    Ok(found.swap_remove(best))
}

/// Orders `6.1.0-10-amd64` before `6.1.0-9-amd64`'s successor: numbers compare as numbers.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut num = String::new();
    let mut text = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                out.push((0, std::mem::take(&mut text)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((num.parse().unwrap_or(0), String::new()));
                num.clear();
            }
            text.push(c);
        }
    }
    if !num.is_empty() {
        out.push((num.parse().unwrap_or(0), String::new()));
    }
    if !text.is_empty() {
        out.push((0, text));
    }
    out
}

/// PRETTY_NAME from the image's os-release, for the boot menu.
fn pretty_name(tree: &Tree) -> String {
    ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .filter_map(|p| tree.resolve(p))
        .filter_map(|(p, _)| std::fs::read_to_string(tree.host_path(&p)).ok())
        .find_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-28-amd64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(
            v,
            vec!["5.10.0-28-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]
        );
    }
}
