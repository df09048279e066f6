//! cloud-init NoCloud documents — `user-data`, `meta-data`, `network-config` (v1, or v2 for the
//! images whose cloud-init renders NetworkManager or netplan) — rendered from typed structures, so
//! a value with a colon, a quote or a newline cannot break the YAML.
//!
//! The shapes follow cloud-init's documented modules as of 18.3 (HypriotOS 1.12) and later:
//! `users`, `write_files`, `runcmd` (argv lists, which cloud-init quotes itself), `timezone`,
//! `manage_etc_hosts`. A user's extra fragment is merged in last (lists appended, maps merged).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_yaml_ng::{Mapping, Value};

use crate::plan::node::{Interface, NodeConfig, RpiSpec};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CloudConfig {
    pub hostname: String,
    pub manage_etc_hosts: bool,
    pub preserve_hostname: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Password logins over ssh only when some user has a password.
    pub ssh_pwauth: bool,
    pub users: Vec<CloudUser>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub write_files: Vec<WriteFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runcmd: Vec<Vec<String>>,
    /// cloud-init's Raspberry Pi module (Raspberry Pi OS): `rpi: {interfaces, enable_usb_gadget}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpi: Option<RpiSpec>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CloudUser {
    pub name: String,
    /// Comma-separated, the form every cloud-init release accepts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sudo: Option<String>,
    pub shell: String,
    pub lock_passwd: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passwd: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WriteFile {
    pub path: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    pub owner: String,
    pub permissions: String,
}

impl WriteFile {
    /// A file for `write_files`; binary content (or content YAML would not keep byte for byte)
    /// is base64-encoded.
    pub fn new(path: &str, bytes: &[u8], mode: u32, owner: &str, group: &str) -> Self {
        use base64_engine::encode;
        let text = std::str::from_utf8(bytes).ok().filter(|t| {
            !t.chars()
                .any(|c| (c.is_control() && c != '\n' && c != '\t') || c == '\u{feff}')
        });
        let (content, encoding) = match text {
            Some(t) => (t.to_string(), None),
            None => (encode(bytes), Some("b64".to_string())),
        };
        WriteFile {
            path: path.to_string(),
            content,
            encoding,
            owner: format!("{owner}:{group}"),
            permissions: format!("{mode:04o}"),
        }
    }
}

/// Minimal standard base64, so kiln does not need a crate for one encoder.
/// Standard base64 with padding (what cloud-init `encoding: b64` and Kubernetes Secrets take).
pub use base64_engine::encode as base64;

mod base64_engine {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetaData {
    #[serde(rename = "instance-id")]
    pub instance_id: String,
    #[serde(rename = "local-hostname")]
    pub local_hostname: String,
}

/// network-config version 1 (the version cloud-init 18.3 reads from a NoCloud seed).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetworkConfigV1 {
    pub version: u8,
    pub config: Vec<PhysicalInterface>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PhysicalInterface {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    pub subnets: Vec<Subnet>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Subnet {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_nameservers: Vec<String>,
}

impl NetworkConfigV1 {
    pub fn for_node(node: &NodeConfig) -> Self {
        let config = node
            .network
            .iter()
            .map(|(name, iface)| PhysicalInterface {
                kind: "physical".into(),
                name: name.clone(),
                mtu: node.mtus.get(name).copied(),
                subnets: vec![match iface {
                    Interface::Dhcp => Subnet {
                        kind: "dhcp".into(),
                        address: None,
                        gateway: None,
                        dns_nameservers: vec![],
                    },
                    Interface::Static {
                        address,
                        gateway,
                        dns,
                    } => Subnet {
                        // v1 accepts address/prefix in `address`.
                        kind: "static".into(),
                        address: Some(address.to_string()),
                        gateway: gateway.map(|g| g.to_string()),
                        dns_nameservers: dns.iter().map(ToString::to_string).collect(),
                    },
                }],
            })
            .collect();
        NetworkConfigV1 { version: 1, config }
    }
}

/// network-config version 2 (netplan's format, `network:` at the top as Raspberry Pi OS and
/// Ubuntu ship it): what cloud-init 25 renders to NetworkManager connections on Raspberry Pi OS
/// and hands to netplan on Ubuntu.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetworkConfigV2Document {
    pub network: NetworkConfigV2,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetworkConfigV2 {
    pub version: u8,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ethernets: BTreeMap<String, V2Interface>,
    /// netplan only: cloud-init's other renderers drop `wifis` with a warning.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub wifis: BTreeMap<String, V2Interface>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct V2Interface {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dhcp4: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// A default route rather than the deprecated `gateway4`/`gateway6`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<V2Route>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<V2Nameservers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(rename = "regulatory-domain", skip_serializing_if = "Option::is_none")]
    pub regulatory_domain: Option<String>,
    #[serde(rename = "access-points", skip_serializing_if = "BTreeMap::is_empty")]
    pub access_points: BTreeMap<String, V2AccessPoint>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct V2Route {
    pub to: String,
    pub via: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct V2Nameservers {
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct V2AccessPoint {
    /// 64 hex digits: netplan writes it to wpa_supplicant as the raw PSK, not a passphrase.
    pub password: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

impl V2Interface {
    fn for_interface(iface: &Interface, mtu: Option<u32>) -> Self {
        let mut v = V2Interface {
            mtu,
            ..Default::default()
        };
        match iface {
            Interface::Dhcp => v.dhcp4 = true,
            Interface::Static {
                address,
                gateway,
                dns,
            } => {
                v.addresses.push(address.to_string());
                // cloud-init 25.1's v2 parser refuses netplan's `to: default`; the network
                // itself is what both cloud-init and netplan read.
                if let Some(gw) = gateway {
                    v.routes.push(V2Route {
                        to: if gw.is_ipv6() { "::/0" } else { "0.0.0.0/0" }.into(),
                        via: gw.to_string(),
                    });
                }
                if !dns.is_empty() {
                    v.nameservers = Some(V2Nameservers {
                        addresses: dns.iter().map(ToString::to_string).collect(),
                    });
                }
            }
        }
        v
    }
}

impl NetworkConfigV2Document {
    /// The node's interfaces; wlan0 with its access point under `wifis` when `wifis` (netplan),
    /// else left out (a NetworkManager keyfile configures it).
    pub fn for_node(node: &NodeConfig, wifis: bool) -> Self {
        let mut network = NetworkConfigV2 {
            version: 2,
            ethernets: BTreeMap::new(),
            wifis: BTreeMap::new(),
        };
        for (name, iface) in &node.network {
            let mut v = V2Interface::for_interface(iface, node.mtus.get(name).copied());
            match node.wifi.as_ref().filter(|_| name == "wlan0") {
                Some(w) if wifis => {
                    v.regulatory_domain = Some(w.country.clone());
                    v.access_points.insert(
                        w.ssid.clone(),
                        V2AccessPoint {
                            password: crate::plan::wifi::psk_hex(&w.ssid, w.psk.expose()),
                            hidden: w.hidden,
                        },
                    );
                    network.wifis.insert(name.clone(), v);
                }
                Some(_) => {}
                None => {
                    network.ethernets.insert(name.clone(), v);
                }
            }
        }
        NetworkConfigV2Document { network }
    }
}

/// Parses a user's `#cloud-config` fragment; it must be a YAML mapping.
pub fn parse_fragment(bytes: &[u8]) -> Result<Mapping> {
    let text = std::str::from_utf8(bytes).context("the fragment is not UTF-8 text")?;
    let value: Value = serde_yaml_ng::from_str(text).context("the fragment is not valid YAML")?;
    match value {
        Value::Mapping(m) => Ok(m),
        Value::Null => Ok(Mapping::new()),
        _ => bail!("the fragment must be a YAML mapping of cloud-config keys"),
    }
}

/// Merges `extra` into `base`: lists are appended, mappings merged key by key, other values from
/// `extra` replace those of `base`.
pub fn merge(base: &mut Mapping, extra: Mapping) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(Value::Sequence(a)), Value::Sequence(b)) => a.extend(b),
            (Some(Value::Mapping(a)), Value::Mapping(b)) => merge(a, b),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Renders user-data: `#cloud-config` and the YAML of `config` merged with `fragment`.
pub fn render_user_data(config: &CloudConfig, fragment: Option<Mapping>) -> Result<String> {
    let mut value = serde_yaml_ng::to_value(config)?;
    if let (Value::Mapping(m), Some(f)) = (&mut value, fragment) {
        merge(m, f);
    }
    Ok(format!(
        "#cloud-config\n{}",
        serde_yaml_ng::to_string(&value)?
    ))
}

pub fn render_yaml<T: Serialize>(v: &T) -> Result<String> {
    Ok(serde_yaml_ng::to_string(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CloudConfig {
        CloudConfig {
            hostname: "ceil-one".into(),
            manage_etc_hosts: true,
            preserve_hostname: false,
            timezone: None,
            ssh_pwauth: false,
            users: vec![],
            write_files: vec![],
            runcmd: vec![vec!["echo".into(), "a: b # 'quoted' \"x\"".into()]],
            rpi: None,
        }
    }

    #[test]
    fn awkward_values_survive_a_round_trip() {
        let text = render_user_data(&config(), None).unwrap();
        assert!(text.starts_with("#cloud-config\n"));
        let back: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(back["runcmd"][0][1].as_str(), Some("a: b # 'quoted' \"x\""));
    }

    #[test]
    fn fragments_append_lists_and_merge_maps() {
        let frag = parse_fragment(b"runcmd:\n  - [touch, /x]\npackages: [htop]\nhostname: other\n")
            .unwrap();
        let text = render_user_data(&config(), Some(frag)).unwrap();
        let back: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(back["runcmd"].as_sequence().unwrap().len(), 2);
        assert_eq!(back["packages"][0].as_str(), Some("htop"));
        assert_eq!(back["hostname"].as_str(), Some("other"));
    }

    #[test]
    fn fragment_must_be_a_mapping() {
        assert!(parse_fragment(b"- a\n- b\n").is_err());
        assert!(parse_fragment(b"a: [unclosed\n").is_err());
    }

    #[test]
    fn binary_files_are_base64() {
        let w = WriteFile::new("/x", &[0, 159, 146, 150], 0o600, "root", "root");
        assert_eq!(w.encoding.as_deref(), Some("b64"));
        assert_eq!(w.content, "AJ+Slg==");
        assert_eq!(w.permissions, "0600");
        let t = WriteFile::new("/y", b"hello\n", 0o644, "root", "root");
        assert_eq!((t.content.as_str(), t.encoding), ("hello\n", None));
    }
}
