//! Image profiles (`images/*.toml`): the facts of one base image, so nobody has to read three wikis.
//!
//! A profile says where the image comes from, what its partition table looks like, which partition
//! holds what, how a node is configured on first boot and how the image is delivered. Profiles are
//! looked up in `images/` beside the cluster file, then in `./images`, then among the ones built
//! into kiln, so a user can add or override one without rebuilding kiln.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::diag::{Seg, SourceText};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Longer notes for the user (one-time bootloader steps, how to obtain the image).
    #[serde(default)]
    pub notes: Option<String>,
    pub source: SourceSpec,
    pub disk: DiskSpec,
    /// The partitions kiln relies on; a profile that stamps nothing may list none.
    #[serde(default, rename = "partition")]
    pub partitions: Vec<PartitionSpec>,
    pub provision: ProvisionSpec,
    #[serde(default)]
    pub deliver: DeliverSpec,
}

/// Where the base image's bytes come from.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A download URL (the archive as published: `.img`, `.zip`, `.xz`, `.gz`, `.zst`).
    pub url: Option<String>,
    /// sha256 of the file at `url`, exactly as downloaded.
    pub sha256: Option<String>,
    /// An OCI reference in skopeo's transport syntax, for images built from containers.
    pub oci: Option<String>,
    /// How to obtain the image when kiln cannot download it (e.g. `pmbootstrap export`).
    pub obtain: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Mbr,
    Gpt,
}

/// What happens to the MBR disk signature (and GPT disk GUID) of each node's image.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskIdentity {
    /// Keep the base image's identifier.
    #[default]
    Keep,
    /// Give every node its own identifier, derived from the seed and the node name.
    Derive,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub table: TableKind,
    #[serde(default = "default_sector_size")]
    pub sector_size: u64,
    #[serde(default)]
    pub disk_identity: DiskIdentity,
    /// For disks kiln makes from an OCI image (`source.oci`): sizes, kernel arguments and
    /// the CPU architecture.
    #[serde(default)]
    pub build: BuildSpec,
}

fn default_sector_size() -> u64 {
    512
}

/// How kiln's native builder lays out a disk made from an OCI image.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// Size of the EFI system partition (FAT32) in MiB.
    #[serde(default = "default_esp_mib")]
    pub esp_mib: u64,
    /// Free space in the root filesystem beyond what the image fills, in MiB.
    #[serde(default = "default_root_free_mib")]
    pub root_free_mib: u64,
    /// Unpartitioned space at the end of the disk, in MiB (Ironic's config drive goes there).
    #[serde(default = "default_tail_free_mib")]
    pub tail_free_mib: u64,
    /// Kernel command line after `root=PARTUUID=… rw`.
    #[serde(default = "default_kernel_args")]
    pub kernel_args: Vec<String>,
    /// `x86_64` or `aarch64`: picks the platform from a multi-arch image and the bootloader.
    #[serde(default = "default_arch")]
    pub arch: String,
}

impl Default for BuildSpec {
    fn default() -> Self {
        BuildSpec {
            esp_mib: default_esp_mib(),
            root_free_mib: default_root_free_mib(),
            tail_free_mib: default_tail_free_mib(),
            kernel_args: default_kernel_args(),
            arch: default_arch(),
        }
    }
}

impl BuildSpec {
    /// The OCI platform architecture (`amd64`, `arm64`).
    pub fn oci_arch(&self) -> &str {
        match self.arch.as_str() {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }
    }
    /// The EFI file-name suffix (`x64`, `aa64`).
    pub fn efi_arch(&self) -> &str {
        match self.arch.as_str() {
            "aarch64" => "aa64",
            _ => "x64",
        }
    }
}

fn default_esp_mib() -> u64 {
    256
}
fn default_root_free_mib() -> u64 {
    1024
}
fn default_tail_free_mib() -> u64 {
    64
}
fn default_kernel_args() -> Vec<String> {
    vec!["console=tty0".into(), "console=ttyS0,115200".into()]
}
fn default_arch() -> String {
    "x86_64".into()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartitionRole {
    Boot,
    Root,
    Other,
}

pub use crate::fs::FsKind;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// 1-based partition number, as the kernel names it (`mmcblk0p1`).
    pub index: usize,
    pub role: PartitionRole,
    pub fs: FsKind,
    /// The filesystem label the image is expected to carry (checked before stamping).
    pub label: Option<String>,
    /// GPT partition name, where the table is GPT.
    pub name: Option<String>,
    /// The sector the partition starts at, where every release of the image agrees on it
    /// (checked before stamping; left out where the image's own table is the only authority).
    pub first_sector: Option<u64>,
}

/// How a node is configured on its first boot.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisionMethod {
    /// cloud-init NoCloud seed files on a FAT partition (HypriotOS).
    CloudInitNocloud,
    /// Nothing is stamped: Ironic writes a config drive with the node's user-data and
    /// `network_data.json` beside the image (Metal3 hosts). The build renders both documents.
    ConfigDrive,
    /// Files, links and accounts written straight into the ext4 root (images without
    /// cloud-init, such as postmarketOS).
    Rootfs,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProvisionSpec {
    pub method: ProvisionMethod,
    /// The partition role that carries the seed (NoCloud only).
    pub seed_partition: Option<PartitionRole>,
    /// Where the running system mounts the seed partition (`/boot` on HypriotOS,
    /// `/boot/firmware` on Raspberry Pi OS and Ubuntu): the first-boot scrub finds the seed there.
    #[serde(default = "default_seed_dir")]
    pub seed_dir: String,
    /// network-config version written to the seed.
    #[serde(default = "default_network_config")]
    pub network_config: u8,
    /// The image's own user, given the cluster's keys when the cluster lists no users.
    pub default_user: String,
    /// Whether docker is installed in the image (so `docker = false` disables it).
    #[serde(default)]
    pub docker_preinstalled: bool,
    /// Passwords the image ships with that a build must not leave in place.
    #[serde(default)]
    pub known_default_passwords: Vec<String>,
    /// Where overlay files go: written by cloud-init on first boot (`first-boot`, the default for
    /// cloud-init profiles) or into the ext4 root at build time (`root`; always for `rootfs`).
    #[serde(default)]
    pub overlays_into: OverlayTarget,
    /// Which network stack of the image joins the node's wifi (cloud-init profiles).
    #[serde(default)]
    pub wifi: WifiMethod,
    /// Whether the image's cloud-init has the Raspberry Pi module (`rpi:` in user-data), so the
    /// cluster file's `rpi` keys may be used.
    #[serde(default)]
    pub rpi_module: bool,
}

/// How a cloud-init node's wifi is configured: each image family's own way.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WifiMethod {
    /// `/etc/wpa_supplicant/wpa_supplicant-wlan0.conf` and `wpa_supplicant@wlan0` (HypriotOS,
    /// Debian with ifupdown).
    #[default]
    WpaSupplicant,
    /// A NetworkManager keyfile written on first boot (Raspberry Pi OS trixie: cloud-init's
    /// NetworkManager renderer drops the `wifis` of network-config v2).
    Networkmanager,
    /// `wifis` in network-config v2, which cloud-init hands to netplan (Ubuntu).
    Netplan,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverlayTarget {
    #[default]
    FirstBoot,
    Root,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsKind::Vfat => "vfat",
            FsKind::Ext4 => "ext4",
        })
    }
}

impl std::fmt::Display for PartitionRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PartitionRole::Boot => "boot",
            PartitionRole::Root => "root",
            PartitionRole::Other => "other",
        })
    }
}

fn default_seed_dir() -> String {
    "/boot".into()
}

fn default_network_config() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeliverMethod {
    #[default]
    BlockDevice,
    Fastboot,
    Http,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DeliverSpec {
    #[serde(default)]
    pub method: DeliverMethod,
    /// fastboot: the partition the image is flashed to (`userdata`).
    pub partition: Option<String>,
    /// fastboot: what `getvar product` must answer (`flame`); another phone is refused.
    pub product: Option<String>,
}

impl Profile {
    pub fn partition(&self, role: PartitionRole) -> Option<&PartitionSpec> {
        self.partitions.iter().find(|p| p.role == role)
    }

    /// Parses a profile, with errors in file:line form.
    pub fn parse(path: &Path, text: &str) -> Result<Profile> {
        let source = SourceText::new(path, text.to_string());
        let profile: Profile = toml::from_str(text).map_err(|e| source.from_toml(&e))?;
        profile.validate(&source)?;
        Ok(profile)
    }

    fn validate(&self, source: &SourceText) -> Result<()> {
        if let Some(sha) = &self.source.sha256
            && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(source
                .error_at(
                    &[Seg::Key("source".into()), Seg::Key("sha256".into())],
                    "sha256 must be 64 hex digits",
                    None,
                )
                .into());
        }
        if !matches!(self.disk.sector_size, 512 | 4096) {
            return Err(source
                .error_at(
                    &[Seg::Key("disk".into()), Seg::Key("sector_size".into())],
                    format!("sector size {} is not 512 or 4096", self.disk.sector_size),
                    None,
                )
                .into());
        }
        self.validate_network(source)?;
        let seed_path = [
            Seg::Key("provision".into()),
            Seg::Key("seed_partition".into()),
        ];
        match (self.provision.method, self.provision.seed_partition) {
            (ProvisionMethod::CloudInitNocloud, None) => {
                return Err(source
                    .error_at(
                        &[Seg::Key("provision".into())],
                        "cloud-init-nocloud needs seed_partition (the partition role holding the seed)",
                        None,
                    )
                    .into());
            }
            (ProvisionMethod::CloudInitNocloud, Some(role)) if self.partition(role).is_none() => {
                return Err(source
                    .error_at(
                        &seed_path,
                        "no partition has the seed partition's role",
                        None,
                    )
                    .into());
            }
            (ProvisionMethod::Rootfs, _) if self.partition(PartitionRole::Root).is_none() => {
                return Err(source
                    .error_at(
                        &[Seg::Key("provision".into())],
                        "rootfs provisioning needs a partition with role = \"root\" (ext4)",
                        None,
                    )
                    .into());
            }
            (ProvisionMethod::ConfigDrive | ProvisionMethod::Rootfs, Some(_)) => {
                return Err(source
                    .error_at(
                        &seed_path,
                        "only cloud-init-nocloud profiles have a seed partition",
                        None,
                    )
                    .into());
            }
            _ => {}
        }
        Ok(())
    }

    /// The network-config version exists, and the wifi method can be written in it.
    fn validate_network(&self, source: &SourceText) -> Result<()> {
        if !matches!(self.provision.network_config, 1 | 2) {
            return Err(source
                .error_at(
                    &[
                        Seg::Key("provision".into()),
                        Seg::Key("network_config".into()),
                    ],
                    format!(
                        "network-config version {} does not exist (1 or 2)",
                        self.provision.network_config
                    ),
                    None,
                )
                .into());
        }
        if self.provision.wifi == WifiMethod::Netplan && self.provision.network_config != 2 {
            return Err(source
                .error_at(
                    &[Seg::Key("provision".into()), Seg::Key("wifi".into())],
                    "wifi = \"netplan\" needs network_config = 2 (netplan reads `wifis` from v2)",
                    None,
                )
                .into());
        }
        Ok(())
    }
}

/// The profiles compiled into kiln, so an installed binary works without the source tree.
const BUILTIN: &[(&str, &str)] = &[
    (
        "bootc-uefi-arm64",
        include_str!("../../images/bootc-uefi-arm64.toml"),
    ),
    (
        "bootc-uefi-x86",
        include_str!("../../images/bootc-uefi-x86.toml"),
    ),
    ("hypriot-rpi", include_str!("../../images/hypriot-rpi.toml")),
    (
        "raspios-arm64",
        include_str!("../../images/raspios-arm64.toml"),
    ),
    (
        "raspios-armhf",
        include_str!("../../images/raspios-armhf.toml"),
    ),
    ("ubuntu-rpi", include_str!("../../images/ubuntu-rpi.toml")),
    (
        "metal3-uefi-x86",
        include_str!("../../images/metal3-uefi-x86.toml"),
    ),
    (
        "pmos-google-flame",
        include_str!("../../images/pmos-google-flame.toml"),
    ),
];

/// Finds and parses the profile `name`: first `images/<name>.toml` in each search directory, then
/// the built-in copy.
pub fn load(name: &str, search_dirs: &[PathBuf]) -> Result<(Profile, ProfileOrigin)> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("image profile name {name:?} may only contain letters, digits, '-' and '_'");
    }
    for dir in search_dirs {
        let path = dir.join(format!("{name}.toml"));
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading image profile {}", path.display()))?;
            let profile = Profile::parse(&path, &text)?;
            return Ok((profile, ProfileOrigin::File(path, text)));
        }
    }
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) {
        let path = PathBuf::from(format!("<built-in>/images/{name}.toml"));
        let profile = Profile::parse(&path, text)?;
        return Ok((profile, ProfileOrigin::BuiltIn(text.to_string())));
    }
    let known: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
    bail!(
        "no image profile named {name:?} (looked in {} and the built-in profiles: {})",
        search_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        known.join(", ")
    )
}

/// Where a profile was found; its text goes into the build manifest.
#[derive(Debug, Clone)]
pub enum ProfileOrigin {
    File(PathBuf, String),
    BuiltIn(String),
}

impl ProfileOrigin {
    pub fn text(&self) -> &str {
        match self {
            ProfileOrigin::File(_, t) | ProfileOrigin::BuiltIn(t) => t,
        }
    }
    pub fn describe(&self) -> String {
        match self {
            ProfileOrigin::File(p, _) => p.display().to_string(),
            ProfileOrigin::BuiltIn(_) => "built-in".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse() {
        for (name, _) in BUILTIN {
            let (p, _) = load(name, &[]).unwrap();
            assert_eq!(&p.name, name);
        }
    }

    #[test]
    fn hypriot_profile_has_the_published_facts() {
        let (p, _) = load("hypriot-rpi", &[]).unwrap();
        assert_eq!(
            p.source.sha256.as_deref(),
            Some("9015ee2d8834254d561694a93d45c21b2d345cabfa6f1d44152b0d247eee9f7e")
        );
        assert_eq!(p.disk.table, TableKind::Mbr);
        let boot = p.partition(PartitionRole::Boot).unwrap();
        assert_eq!(
            (boot.index, boot.fs, boot.label.as_deref()),
            (1, FsKind::Vfat, Some("HypriotOS"))
        );
        assert_eq!(p.partition(PartitionRole::Root).unwrap().index, 2);
    }

    #[test]
    fn raspberry_pi_profiles_have_their_layouts() {
        for (name, boot, root, first) in [
            ("raspios-arm64", "bootfs", "rootfs", Some(16384)),
            ("raspios-armhf", "bootfs", "rootfs", Some(16384)),
            ("ubuntu-rpi", "system-boot", "writable", None),
        ] {
            let (p, _) = load(name, &[]).unwrap();
            assert_eq!(p.disk.table, TableKind::Mbr);
            let b = p.partition(PartitionRole::Boot).unwrap();
            assert_eq!((b.label.as_deref(), b.first_sector), (Some(boot), first));
            let r = p.partition(PartitionRole::Root).unwrap();
            assert_eq!(r.label.as_deref(), Some(root));
            assert_eq!(p.provision.network_config, 2, "{name}");
        }
        let (p, _) = load("raspios-arm64", &[]).unwrap();
        assert_eq!(p.provision.wifi, WifiMethod::Networkmanager);
        assert_eq!(p.disk.disk_identity, DiskIdentity::Keep);
        let (p, _) = load("ubuntu-rpi", &[]).unwrap();
        assert_eq!(p.provision.wifi, WifiMethod::Netplan);
        assert!(p.source.sha256.is_some());
        let (p, _) = load("raspios-armhf", &[]).unwrap();
        assert!(p.source.sha256.is_none(), "no published digest was found");
    }

    #[test]
    fn netplan_wifi_needs_network_config_v2() {
        let (p, _) = load("ubuntu-rpi", &[]).unwrap();
        let text = toml::to_string(&p)
            .unwrap()
            .replace("network_config = 2", "network_config = 1");
        let err = Profile::parse(Path::new("images/u.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs network_config = 2"), "{err}");
        let text = text.replace("network_config = 1", "network_config = 3");
        let err = Profile::parse(Path::new("images/u.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 3 does not exist"), "{err}");
    }

    #[test]
    fn unknown_profile_key_names_the_line() {
        let text = "name = \"x\"\ndescription = \"d\"\nbogus = 1\n";
        let err = Profile::parse(Path::new("images/x.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("images/x.toml:3:1:"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }
}
