//! A small sample base image with a profile's exact partition layout, made offline, so the quick
//! start, tests and benchmarks run without the 1.3 GB download.
//!
//! For `hypriot-rpi` that is HypriotOS 1.12.3's layout: an MBR, a FAT16 boot partition labelled
//! `HypriotOS` at sector 2048 (64 MiB, type 0x0C) holding config.txt, cmdline.txt and the
//! release's stock user-data and meta-data, and an ext4 root after it with a tiny tree. For the
//! Raspberry Pi OS profiles it is a FAT32 `bootfs` of 512 MiB at sector 16384 and an ext4
//! `rootfs`; for `ubuntu-rpi` a FAT32 `system-boot` of 512 MiB at sector 2048 and an ext4
//! `writable` — each boot partition with a stock seed of the kind its release ships. Which of
//! them a profile gets follows its boot partition's label. The sample is reproducible: the same
//! kiln makes the same bytes.

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

/// Raspberry Pi OS's stock seed, in substance (pi-gen stage2/04-cloud-init/files): meta-data
/// with the misspelt `instance_id` cloud-init ignores, and network-config v2 with DHCP on eth0.
const RASPIOS_META_DATA: &str = "dsmode: local\ninstance_id: rpios-image\n";
const RASPIOS_USER_DATA: &str = "#cloud-config\n# See https://cloudinit.readthedocs.io/\n";
const V2_DHCP_NETWORK_CONFIG: &str =
    "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n      optional: true\n";
/// The disk signature every sample has (below), as Raspberry Pi OS's cmdline.txt names its root.
const RASPIOS_CMDLINE_TXT: &str = "console=serial0,115200 console=tty1 root=PARTUUID=2d6f3a5e-02 rootfstype=ext4 fsck.repair=yes rootwait quiet\n";
const RPI_CONFIG_TXT: &str = "dtparam=audio=on\ncamera_auto_detect=1\ndisplay_auto_detect=1\nauto_initramfs=1\narm_boost=1\n";
/// Ubuntu's stock seed, in substance: the `ubuntu` user with the password `ubuntu`, to be changed
/// at the first login.
const UBUNTU_USER_DATA: &str = "#cloud-config\nchpasswd:\n  expire: true\n  users:\n  - name: ubuntu\n    password: ubuntu\n    type: text\nssh_pwauth: true\n";
const UBUNTU_META_DATA: &str = "dsmode: local\ninstance_id: cloud-image\n";
const UBUNTU_CMDLINE_TXT: &str = "console=serial0,115200 multipath=off dwc_otg.lpm_enable=0 console=tty1 root=LABEL=writable rootfstype=ext4 rootwait fixrtc\n";

/// The facts of one family's sample: where the boot FAT starts, its size and type, what it
/// holds, and the root's tree.
struct Family {
    first_sector: u64,
    boot_size: u64,
    fat: fatfs::FatType,
    volume_id: u32,
    boot_files: &'static [(&'static str, &'static str)],
    root_files: &'static [(&'static str, &'static str)],
}

const HYPRIOT: Family = Family {
    first_sector: FIRST_SECTOR,
    boot_size: BOOT_SIZE,
    fat: fatfs::FatType::Fat16,
    volume_id: 0x5e3a_6f2d,
    boot_files: &[
        ("config.txt", CONFIG_TXT),
        ("cmdline.txt", CMDLINE_TXT),
        ("user-data", STOCK_USER_DATA),
        ("meta-data", STOCK_META_DATA),
    ],
    root_files: HYPRIOT_ROOT,
};

const RASPIOS: Family = Family {
    first_sector: 16384,
    boot_size: 512 << 20,
    fat: fatfs::FatType::Fat32,
    volume_id: 0x4b1d_0c2e,
    boot_files: &[
        ("config.txt", RPI_CONFIG_TXT),
        ("cmdline.txt", RASPIOS_CMDLINE_TXT),
        ("user-data", RASPIOS_USER_DATA),
        ("meta-data", RASPIOS_META_DATA),
        ("network-config", V2_DHCP_NETWORK_CONFIG),
    ],
    root_files: &[
        ("etc/hostname", "raspberrypi\n"),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n",
        ),
        (
            "etc/os-release",
            "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"13\"\nVERSION_CODENAME=trixie\nID=debian\n",
        ),
        (
            "etc/fstab",
            "proc /proc proc defaults 0 0\nPARTUUID=2d6f3a5e-01 /boot/firmware vfat defaults 0 2\nPARTUUID=2d6f3a5e-02 / ext4 defaults,noatime 0 1\n",
        ),
        (
            "etc/kiln-sample",
            "This root filesystem is a kiln sample, not a bootable Raspberry Pi OS.\n",
        ),
    ],
};

const UBUNTU: Family = Family {
    first_sector: FIRST_SECTOR,
    boot_size: 512 << 20,
    fat: fatfs::FatType::Fat32,
    volume_id: 0x0c2e_4b1d,
    boot_files: &[
        ("config.txt", RPI_CONFIG_TXT),
        ("cmdline.txt", UBUNTU_CMDLINE_TXT),
        ("user-data", UBUNTU_USER_DATA),
        ("meta-data", UBUNTU_META_DATA),
        ("network-config", V2_DHCP_NETWORK_CONFIG),
    ],
    root_files: &[
        ("etc/hostname", "ubuntu\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n"),
        (
            "etc/os-release",
            "PRETTY_NAME=\"Ubuntu 24.04.3 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\n",
        ),
        (
            "etc/fstab",
            "LABEL=writable\t/\text4\tdiscard,errors=remount-ro\t0 1\nLABEL=system-boot\t/boot/firmware\tvfat\tdefaults\t0 1\n",
        ),
        (
            "etc/kiln-sample",
            "This root filesystem is a kiln sample, not a bootable Ubuntu.\n",
        ),
    ],
};

/// The family a profile's sample belongs to, by its boot partition's label.
fn family(profile: &Profile) -> &'static Family {
    match profile
        .partition(crate::plan::profile::PartitionRole::Boot)
        .and_then(|p| p.label.as_deref())
    {
        Some("bootfs") => &RASPIOS,
        Some("system-boot") => &UBUNTU,
        _ => &HYPRIOT,
    }
}

/// The root tree of the HypriotOS sample (and the GPT one).
const HYPRIOT_ROOT: &[(&str, &str)] = &[
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
    let family = family(profile);
    let mut parts = profile.partitions.clone();
    parts.sort_by_key(|p| p.index);
    let mut layout = Vec::new();
    let mut next = family.first_sector * 512;
    for p in &parts {
        let size = match p.fs {
            FsKind::Vfat => family.boot_size,
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
                (*start, *size),
                p.label.as_deref().unwrap_or("BOOT"),
                (family.fat, family.volume_id),
                family.boot_files,
            )?,
            FsKind::Ext4 => make_root(
                dest,
                *start,
                *size,
                p.label.as_deref().unwrap_or("root"),
                family.root_files,
            )?,
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
        (esp_start, BOOT_SIZE),
        "ESP",
        (fatfs::FatType::Fat16, HYPRIOT.volume_id),
        &[(
            "kiln-sample.txt",
            "This ESP is a kiln sample; it holds no boot loader.\n",
        )],
    )?;
    make_root(dest, root_start, ROOT_SIZE, "root", HYPRIOT_ROOT)
}

/// Formats the FAT at `(start, size)` with `(type, volume id)` and writes `files` into its root.
fn make_boot(
    dest: &Path,
    (start, size): (u64, u64),
    label: &str,
    (fat_type, volume_id): (fatfs::FatType, u32),
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
                .fat_type(fat_type)
                .volume_label(label11)
                .volume_id(volume_id),
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

fn make_root(
    dest: &Path,
    start: u64,
    size: u64,
    label: &str,
    files: &[(&str, &str)],
) -> Result<()> {
    let tree = tempfile::tempdir()?;
    let t = tree.path();
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
