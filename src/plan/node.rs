//! The resolved, fully explicit configuration of one node: what `kiln check` prints and what every
//! later stage reads. No defaults are left to apply and no file is left to read.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Serialize, Serializer};
use serde_yaml_ng::Mapping;
use sha2::{Digest, Sha256};

pub use super::cluster::{RootDeviceHints, RpiSpec};
pub use super::input_file::InputFile;
use super::overlay::Overlay;

/// A secret value. It prints as `<secret sha256:…>` and serialises as its digest, so `kiln check`
/// output and build manifests never contain it, yet a changed secret still changes the digest of
/// the node's configuration (and with it the cloud-init instance-id).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    fn digest(&self) -> String {
        format!(
            "sha256:{}",
            &hex::encode(Sha256::digest(self.0.as_bytes()))[..16]
        )
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret {}>", self.digest())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("<secret {}>", self.digest()))
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeConfig {
    pub name: String,
    pub hostname: String,
    pub image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    pub docker: bool,
    pub users: Vec<User>,
    pub network: BTreeMap<String, Interface>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wifi: Option<Wifi>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swarm: Option<SwarmRole>,
    pub overlays: Vec<String>,
    /// The overlays named in `overlays`, loaded (and so checked) once, during resolution.
    #[serde(skip)]
    pub loaded_overlays: Vec<Overlay>,
    /// The node's CNI folder, loaded and checked during resolution; always written into the root.
    #[serde(skip)]
    pub cni: Option<Overlay>,
    /// Plugins the cluster file says the image has in /opt/cni/bin; the build checks that it does.
    #[serde(skip)]
    pub cni_image_plugins: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<UserData>,
    /// Files on the boot partition the cluster file replaces, by their name there.
    pub boot_files: BTreeMap<String, InputFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// MAC addresses the cluster file gives for interfaces, by interface name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub macs: BTreeMap<String, String>,
    /// MTUs the cluster file gives for interfaces, by interface name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub mtus: BTreeMap<String, u32>,
    /// Settings for cloud-init's Raspberry Pi module (Raspberry Pi OS profiles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpi: Option<RpiSpec>,
    /// What Metal3 needs to manage the machine, for bare-metal nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bare_metal: Option<BareMetal>,
}

/// A machine managed by Metal3/Ironic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BareMetal {
    /// The BMC URL with `{name}` already replaced.
    pub bmc_address: String,
    pub bmc_username: String,
    pub bmc_password: Secret,
    pub disable_certificate_verification: bool,
    /// Lower-case, colon-separated.
    pub boot_mac: String,
    pub root_device_hints: RootDeviceHints,
    pub online: bool,
    /// `oci://registry/repo:tag` of a bootc container image Ironic deploys as it is.
    pub bootc_image: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub sudo: bool,
    pub shell: String,
    pub ssh_authorized_keys: Vec<String>,
    /// A crypt(3) hash; `None` locks the password (ssh keys only). Serialised as a digest, like
    /// a [`Secret`]: a hash is an offline guessing target, so `kiln check --json` never shows it.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "password_hash_digest"
    )]
    pub password_hash: Option<String>,
}

fn password_hash_digest<S: Serializer>(hash: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match hash {
        Some(h) => Secret::new(h.clone()).serialize(s),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Interface {
    Dhcp,
    Static {
        #[serde(serialize_with = "display")]
        address: IpNet,
        #[serde(skip_serializing_if = "Option::is_none")]
        gateway: Option<IpAddr>,
        dns: Vec<IpAddr>,
    },
}

fn display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Interface {
    pub fn static_ip(&self) -> Option<IpAddr> {
        match self {
            Interface::Static { address, .. } => Some(address.addr()),
            Interface::Dhcp => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Wifi {
    pub ssid: String,
    pub psk: Secret,
    pub country: String,
    pub hidden: bool,
}

/// What a node does in the Docker swarm.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum SwarmRole {
    /// The first manager: `docker swarm init --advertise-addr <advertise_addr>`.
    Init { advertise_addr: String },
    /// Any other node: join `manager_addr:2377` with the token.
    Join {
        manager_addr: String,
        advertise_addr: String,
        as_manager: bool,
        token: Secret,
    },
}

/// A user's `#cloud-config` fragment: its file, and the mapping parsed from it once, during
/// resolution. It serialises as its file (path and digest).
#[derive(Debug, Clone, PartialEq)]
pub struct UserData {
    pub file: InputFile,
    pub fragment: Mapping,
}

impl Serialize for UserData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.file.serialize(s)
    }
}

impl NodeConfig {
    /// A digest of everything that configures the node (secrets included, through their digests).
    pub fn digest(&self) -> [u8; 32] {
        // serde_json of a struct is deterministic: fields in declaration order, maps sorted.
        let json = serde_json::to_vec(self).expect("NodeConfig serialises");
        Sha256::digest(&json).into()
    }
}
