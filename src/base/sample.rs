//! A small sample base image with a profile's exact partition layout, made offline, so the quick
//! start, tests and benchmarks run without the 1.3 GB download.
//!
//! For `hypriot-rpi` that is HypriotOS 1.12.3's layout: an MBR, a FAT16 boot partition labelled
//! `HypriotOS` at sector 2048 (64 MiB, type 0x0C) holding config.txt, cmdline.txt and the
//! release's stock user-data and meta-data, and an ext4 root after it with a tiny tree. The
//! sample is reproducible: the same kiln makes the same bytes.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::disk::{PartitionSlice, gpt};
use crate::fs::{ext4_build, fat};
use crate::plan::profile::{FsKind, Profile, TableKind};

/// 2020-09-13T12:26:40Z: every timestamp in the sample.
const SAMPLE_EPOCH: i64 = 1_600_000_000;
const BOOT_SIZE: u64 = 64 << 20;
const ROOT_SIZE: u64 = 96 << 20;
const FIRST_SECTOR: u64 = 2048;

const CONFIG_TXT: &str = "hdmi_force_hotplug=1\nenable_uart=0\n\n# camera settings, see http://elinux.org/RPiconfig#Camera\nstart_x=1\ndisable_camera_led=1\ngpu_mem=128\n";
const CMDLINE_TXT: &str = "dwc_otg.lpm_enable=0 console=serial0,115200 console=tty1 root=/dev/mmcblk0p2 rootfstype=ext4 cgroup_enable=cpuset cgroup_memory=1 swapaccount=1 elevator=deadline fsck.repair=yes rootwait quiet\n";
/// The stock user-data of the release: the pirate user with the well-known password.
const STOCK_USER_DATA: &str = "#cloud-config\n# vim: syntax=yaml\n#\n\n# Set your hostname here, the manage_etc_hosts will update the hosts file entries as well\nhostname: black-pearl\nmanage_etc_hosts: true\n\n# You could modify this for your own user information\nusers:\n  - name: pirate\n    gecos: \"Hypriot Pirate\"\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/bash\n    groups: users,docker,video\n    plain_text_passwd: hypriot\n    lock_passwd: false\n    ssh_pwauth: true\n    chpasswd: { expire: false }\n\npackage_upgrade: false\n";
const STOCK_META_DATA: &str = "instance-id: pirate001\n";

/// Writes the sample base for `profile` to `dest`.
pub fn make(profile: &Profile, dest: &Path) -> Result<()> {
    if profile.disk.sector_size != 512 {
        bail!(
            "kiln can make sample images for 512-byte-sector profiles only; {} is not one",
            profile.name
        );
    }
    if profile.disk.table == TableKind::Gpt {
        return make_gpt(dest);
    }
    let mut parts = profile.partitions.clone();
    parts.sort_by_key(|p| p.index);
    let mut layout = Vec::new();
    let mut next = FIRST_SECTOR * 512;
    for p in &parts {
        let size = match p.fs {
            FsKind::Vfat => BOOT_SIZE,
            FsKind::Ext4 => ROOT_SIZE,
        };
        layout.push((p.clone(), next, size));
        next += size;
    }
    let total = next;
    let mut f = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    f.set_len(total)?;

    let mut mbr = [0u8; 512];
    // A fixed signature, shared by every sample — as every card of a HypriotOS release shares one.
    mbr[440..444].copy_from_slice(&0x2d6f_3a5eu32.to_le_bytes());
    for (i, (p, start, size)) in layout.iter().enumerate() {
        let e = 446 + 16 * i;
        // CHS fields say "use LBA" as modern partitioners write them.
        mbr[e + 1..e + 4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        mbr[e + 4] = match p.fs {
            FsKind::Vfat => 0x0c,
            FsKind::Ext4 => 0x83,
        };
        mbr[e + 5..e + 8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        mbr[e + 8..e + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        mbr[e + 12..e + 16].copy_from_slice(&((size / 512) as u32).to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&mbr)?;
    f.sync_all()?;
    drop(f);

    for (p, start, size) in &layout {
        match p.fs {
            FsKind::Vfat => make_boot(
                dest,
                *start,
                *size,
                p.label.as_deref().unwrap_or("BOOT"),
                &[
                    ("config.txt", CONFIG_TXT),
                    ("cmdline.txt", CMDLINE_TXT),
                    ("user-data", STOCK_USER_DATA),
                    ("meta-data", STOCK_META_DATA),
                ],
            )?,
            FsKind::Ext4 => make_root(dest, *start, *size, p.label.as_deref().unwrap_or("root"))?,
        }
    }
    Ok(())
}

/// A UEFI disk: an ESP and an x86_64 root, with free space at the end where Ironic puts its
/// config drive. Like the MBR sample it boots nothing; it has the layout a real image has.
fn make_gpt(dest: &Path) -> Result<()> {
    const TAIL_FREE: u64 = 16 << 20;
    let esp_start = FIRST_SECTOR * 512;
    let root_start = esp_start + BOOT_SIZE;
    let total = root_start + ROOT_SIZE + TAIL_FREE;
    // Read and write: the gpt crate reads the device back while it lays the table out.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    f.set_len(total)?;
    let guid = |n: u128| uuid::Uuid::from_u128(0x6b696c6e_5341_4d50_4c45_000000000000 | n);
    gpt::write(
        &mut f,
        total,
        512,
        guid(0),
        &[
            gpt::NewPartition {
                type_guid: gpt::TYPE_ESP,
                guid: guid(1),
                name: "ESP".into(),
                first_lba: esp_start / 512,
                last_lba: root_start / 512 - 1,
            },
            gpt::NewPartition {
                type_guid: gpt::TYPE_LINUX_ROOT_X86_64,
                guid: guid(2),
                name: "root".into(),
                first_lba: root_start / 512,
                last_lba: (root_start + ROOT_SIZE) / 512 - 1,
            },
        ],
    )?;
    f.sync_all()?;
    drop(f);
    make_boot(
        dest,
        esp_start,
        BOOT_SIZE,
        "ESP",
        &[(
            "kiln-sample.txt",
            "This ESP is a kiln sample; it holds no boot loader.\n",
        )],
    )?;
    make_root(dest, root_start, ROOT_SIZE, "root")
}

fn make_boot(
    dest: &Path,
    start: u64,
    size: u64,
    label: &str,
    files: &[(&str, &str)],
) -> Result<()> {
    let f = OpenOptions::new().read(true).write(true).open(dest)?;
    let mut label11 = [b' '; 11];
    for (i, b) in label.bytes().take(11).enumerate() {
        label11[i] = b;
    }
    {
        let mut slice = PartitionSlice::new(f.try_clone()?, start, size);
        fatfs::format_volume(
            &mut slice,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat16)
                .volume_label(label11)
                .volume_id(0x5e3a_6f2d),
        )
        .context("formatting the sample boot partition")?;
    }
    let part = crate::disk::Partition {
        index: 1,
        start,
        size,
        type_code: "0x0c".into(),
        name: None,
        guid: None,
    };
    let vol = fat::FatVolume::open(f, &part, fat::fat_datetime(SAMPLE_EPOCH))?;
    for (name, text) in files {
        vol.write_file(name, text.as_bytes())?;
    }
    vol.close()
}

fn make_root(dest: &Path, start: u64, size: u64, label: &str) -> Result<()> {
    let tree = tempfile::tempdir()?;
    let t = tree.path();
    let files: &[(&str, &str)] = &[
        ("etc/hostname", "black-pearl\n"),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n127.0.1.1\tblack-pearl\n",
        ),
        (
            "etc/os-release",
            "PRETTY_NAME=\"Raspbian GNU/Linux 10 (buster)\"\nNAME=\"Raspbian GNU/Linux\"\nVERSION_ID=\"10\"\nID=raspbian\nID_LIKE=debian\nHYPRIOT_OS=\"HypriotOS/armhf\"\nHYPRIOT_OS_VERSION=\"v1.12.3\"\n",
        ),
        (
            "etc/fstab",
            "proc /proc proc defaults 0 0\n/dev/mmcblk0p1 /boot vfat defaults 0 2\n/dev/mmcblk0p2 / ext4 defaults,noatime 0 1\n",
        ),
        (
            "etc/kiln-sample",
            "This root filesystem is a kiln sample, not a bootable HypriotOS.\n",
        ),
    ];
    for (path, content) in files {
        let p = t.join(path);
        std::fs::create_dir_all(p.parent().expect("has parent"))?;
        std::fs::write(&p, content)?;
    }
    set_times(t)?;
    ext4_build::mkfs_from_tree(
        dest,
        start,
        size,
        t,
        label,
        "4b1d0c2e-5a6f-4e7d-8c9b-0a1b2c3d4e5f",
        SAMPLE_EPOCH,
    )
}

fn set_times(dir: &Path) -> Result<()> {
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(SAMPLE_EPOCH as u64);
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_times(&e.path())?;
        }
        File::open(e.path())?.set_times(
            std::fs::FileTimes::new()
                .set_accessed(when)
                .set_modified(when),
        )?;
    }
    File::open(dir)?.set_times(
        std::fs::FileTimes::new()
            .set_accessed(when)
            .set_modified(when),
    )?;
    Ok(())
}
