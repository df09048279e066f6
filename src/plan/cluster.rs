//! The cluster file as written by its author: serde structures that mirror the TOML one to one.
//!
//! Every table rejects unknown keys, so a typo (`adress`) is an error with a line number instead of
//! a setting that silently does nothing. Nothing here is validated beyond its TOML type; `resolve`
//! turns these structures into one explicit configuration per node.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole file: `[cluster]`, `[defaults]`, `[swarm]`, `[[users]]` and `[[node]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub cluster: ClusterSection,
    #[serde(default)]
    pub defaults: NodeSettings,
    pub swarm: Option<SwarmSection>,
    #[serde(default)]
    pub users: Vec<UserSpec>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    /// Stable identifiers derive from this and the node name; defaults to the cluster name.
    pub seed: Option<String>,
    /// Keys given to every user (and to the profile's default user when no users are listed).
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

/// A secret is read from a file (relative to the cluster file) or an environment variable; it is
/// never written inline, so cluster files can be committed.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub file: Option<String>,
    pub env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Passwordless sudo; on by default because these are admin users of headless machines.
    pub sudo: Option<bool>,
    pub shell: Option<String>,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// A crypt(3) hash (`$6$…`, `$5$…`, `$y$…`).
    pub password_hash: Option<String>,
    /// A file (or variable) holding the plain password, which kiln hashes with SHA-512 crypt.
    pub password: Option<SecretRef>,
}

/// Settings that `[defaults]` gives every node and a `[[node]]` may override.
///
/// `name`, `hostname`, `serial` and `boot_mac` only make sense on a node (`per_node_keys`);
/// `resolve` rejects them in `[defaults]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub name: Option<String>,
    pub hostname: Option<String>,
    /// The image profile (a file in `images/`).
    pub image: Option<String>,
    pub timezone: Option<String>,
    pub docker: Option<bool>,
    /// Whether this node takes part in the swarm described by `[swarm]` (default: yes).
    pub swarm: Option<bool>,
    pub overlays: Option<Vec<String>>,
    /// A CNI folder: its `conf/` goes to `/etc/cni/net.d/`, its `bin/` to `/opt/cni/bin/`.
    pub cni: Option<CniSpec>,
    pub network: Option<BTreeMap<String, InterfaceSpec>>,
    pub wifi: Option<WifiSpec>,
    /// A `#cloud-config` fragment merged into the generated user-data.
    pub user_data: Option<String>,
    pub boot: Option<BootFilesSpec>,
    /// The serial number of the card or disk this node is flashed to.
    pub serial: Option<String>,
    /// How Metal3/Ironic reaches the machine's power control (bare-metal nodes).
    pub bmc: Option<BmcSpec>,
    /// The MAC address of the NIC the machine network-boots from (`bootMACAddress`).
    pub boot_mac: Option<String>,
    /// Which disk Ironic writes the image to.
    pub root_device_hints: Option<RootDeviceHints>,
    /// Whether Metal3 keeps the machine powered on (default: yes).
    pub online: Option<bool>,
    /// Raspberry Pi OS only: interfaces and USB gadget mode, set by cloud-init's `rpi` module.
    pub rpi: Option<RpiSpec>,
    /// A bootc container image (`registry/repo:tag`, e.g. after `kiln oci append`) that Ironic
    /// (35+) installs itself with `bootc install` in its deploy ramdisk, instead of a disk image
    /// kiln builds.
    pub bootc_image: Option<String>,
}

impl NodeSettings {
    /// The keys that name one machine, so `[defaults]` cannot give them, and whether each is set.
    pub fn per_node_keys(&self) -> [(&'static str, bool); 4] {
        [
            ("name", self.name.is_some()),
            ("hostname", self.hostname.is_some()),
            ("serial", self.serial.is_some()),
            ("boot_mac", self.boot_mac.is_some()),
        ]
    }
}

/// A local CNI folder (relative to the cluster file), checked before anything is built.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CniSpec {
    pub dir: String,
    /// Plugins the image already has in `/opt/cni/bin`, which the folder's configurations may use
    /// without shipping them.
    #[serde(default)]
    pub image_plugins: Vec<String>,
}

/// cloud-init's Raspberry Pi module (`cc_raspberry_pi`, the `rpi:` key of user-data, on Raspberry
/// Pi OS), key for key: each interface on (`true`) or off (`false`) through raspi-config, and USB
/// gadget mode through `rpi-usb-gadget`. Keys left out are left as the image has them.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RpiSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<RpiInterfaces>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_usb_gadget: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RpiInterfaces {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spi: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub i2c: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<RpiSerial>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onewire: Option<bool>,
}

/// `serial = true` turns on the serial console (and, before the Pi 5, the UART with it);
/// `serial = { console, hardware }` sets each, which only the Pi 5's two UARTs can tell apart.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RpiSerial {
    Console(bool),
    Each(RpiSerialEach),
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RpiSerialEach {
    #[serde(default)]
    pub console: bool,
    #[serde(default)]
    pub hardware: bool,
}

/// A BMC as Ironic addresses it, e.g. a sushy-tools emulator in front of plugs and AMT.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BmcSpec {
    /// An Ironic BMC URL (`redfish+http://infra:8000/redfish/v1/Systems/{name}`); `{name}` is
    /// replaced by the node name, so one default serves every node behind one emulator.
    pub address: String,
    pub username: String,
    pub password: SecretRef,
    /// BMO's `spec.bmc.disableCertificateVerification`: Ironic then accepts the BMC's
    /// self-signed certificate. The old kiln spelling `disable_certificate_validation` is read too.
    #[serde(default, alias = "disable_certificate_validation")]
    pub disable_certificate_verification: bool,
}

/// Ironic's root device hints; every hint given must match the disk.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RootDeviceHints {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hctl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_size_gigabytes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotational: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSpec {
    /// The interface's MAC address (bare-metal nodes: networkData names links by MAC).
    pub mac: Option<String>,
    pub dhcp: Option<bool>,
    /// Static address with prefix, `11.0.0.101/25`.
    pub address: Option<String>,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    /// The link MTU (networkData always carries one: 1500 unless given here).
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WifiSpec {
    pub ssid: String,
    pub psk: SecretRef,
    /// ISO 3166 country code; without it Raspberry Pi firmware keeps the radio blocked.
    pub country: Option<String>,
    #[serde(default)]
    pub hidden: bool,
}

/// Boot-partition files the cluster file replaces (paths relative to the cluster file).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootFilesSpec {
    pub config_txt: Option<String>,
    pub cmdline_txt: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmSection {
    /// Manager node names; the first one runs `docker swarm init`.
    #[serde(default)]
    pub managers: Vec<String>,
    /// The address the managers are reached at (defaults to the first manager's static address).
    pub advertise_addr: Option<String>,
    /// The worker join token.
    pub token: Option<SecretRef>,
    /// The manager join token, needed only when there is more than one manager.
    pub manager_token: Option<SecretRef>,
}

/// The cluster file flag, shared by every verb that reads one (`-c`, `$KILN_CLUSTER`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArg {
    /// The cluster file.
    #[arg(
        long,
        short = 'c',
        default_value = "cluster.toml",
        env = "KILN_CLUSTER"
    )]
    pub cluster: PathBuf,
}
