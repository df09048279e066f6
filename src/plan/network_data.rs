//! OpenStack `network_data.json`: a node's network as Ironic's config drive carries it.
//!
//! Links are physical NICs named by MAC address (the machine's kernel names are unknown until it
//! boots), networks hang off links (`ipv4`/`ipv6` static or `ipv4_dhcp`/`ipv6_dhcp`), and DNS
//! servers are services. cloud-init's ConfigDrive datasource turns it into netplan or ENI; the
//! tests check it with cloud-init's own `net-convert`.

use std::net::IpAddr;

use anyhow::{Result, bail};
use ipnet::IpNet;
use serde_json::{Value, json};

use crate::plan::node::{Interface, NodeConfig};

/// The MAC address each interface of `node` is matched by: its own `mac`, else the node's boot
/// MAC for the one interface without one.
pub fn link_macs(node: &NodeConfig) -> Result<Vec<(String, String)>> {
    let boot_mac = node.bare_metal.as_ref().map(|b| b.boot_mac.clone());
    let unnamed: Vec<&String> = node
        .network
        .keys()
        .filter(|n| !node.macs.contains_key(*n))
        .collect();
    let boot_claimed = boot_mac
        .as_ref()
        .is_some_and(|m| node.macs.values().any(|v| v == m));
    if unnamed.len() > 1 || (unnamed.len() == 1 && (boot_mac.is_none() || boot_claimed)) {
        bail!(
            "node {}: interface{} {} need{} a `mac` (bare-metal networks are matched by MAC address; only one interface may default to boot_mac)",
            node.name,
            if unnamed.len() > 1 { "s" } else { "" },
            unnamed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if unnamed.len() > 1 { "" } else { "s" },
        );
    }
    Ok(node
        .network
        .keys()
        .map(|name| {
            let mac = node
                .macs
                .get(name)
                .cloned()
                .or_else(|| boot_mac.clone())
                .expect("checked above");
            (name.clone(), mac)
        })
        .collect())
}

/// The MTU of a link the cluster file says nothing about. Ironic's flat and neutron network
/// interfaces put only what networkData says on the config drive, so every link carries one.
pub const DEFAULT_MTU: u32 = 1500;

fn netmask(net: &IpNet) -> String {
    net.netmask().to_string()
}

/// Renders `network_data.json` for `node` (pretty-printed, keys in a fixed order).
pub fn render(node: &NodeConfig) -> Result<String> {
    let mut links = Vec::new();
    let mut networks = Vec::new();
    let mut dns: Vec<IpAddr> = Vec::new();
    for (name, mac) in link_macs(node)? {
        links.push(json!({
            "id": name,
            "type": "phy",
            "ethernet_mac_address": mac,
            "mtu": node.mtus.get(&name).copied().unwrap_or(DEFAULT_MTU),
        }));
        match &node.network[&name] {
            Interface::Dhcp => networks.push(json!({
                "id": format!("{name}-ipv4"),
                "network_id": format!("{name}-ipv4"),
                "type": "ipv4_dhcp",
                "link": name,
            })),
            Interface::Static {
                address,
                gateway,
                dns: servers,
            } => {
                let v6 = matches!(address, IpNet::V6(_));
                let mut routes = Vec::new();
                if let Some(gw) = gateway {
                    let any = if v6 { "::" } else { "0.0.0.0" };
                    routes.push(json!({"network": any, "netmask": any, "gateway": gw.to_string()}));
                }
                let id = format!("{name}-{}", if v6 { "ipv6" } else { "ipv4" });
                networks.push(json!({
                    "id": id,
                    "network_id": id,
                    "type": if v6 { "ipv6" } else { "ipv4" },
                    "link": name,
                    "ip_address": address.addr().to_string(),
                    "netmask": netmask(address),
                    "routes": routes,
                    "services": servers
                        .iter()
                        .map(|s| json!({"type": "dns", "address": s.to_string()}))
                        .collect::<Vec<Value>>(),
                }));
                for s in servers {
                    if !dns.contains(s) {
                        dns.push(*s);
                    }
                }
            }
        }
    }
    let doc = json!({
        "links": links,
        "networks": networks,
        "services": dns
            .iter()
            .map(|s| json!({"type": "dns", "address": s.to_string()}))
            .collect::<Vec<Value>>(),
    });
    Ok(serde_json::to_string_pretty(&doc)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(eth0: &str) -> (tempfile::TempDir, crate::plan::Cluster) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "x\n").unwrap();
        let path = dir.path().join("cluster.toml");
        let text = format!(
            r#"
[cluster]
name = "c"
seed = "c"
[defaults]
image = "bootc-uefi-x86"
bmc = {{ address = "redfish+http://127.0.0.1:8000/redfish/v1/Systems/{{name}}", username = "u", password = {{ file = "pw" }} }}
[[node]]
name = "edge-1"
boot_mac = "52:54:00:00:00:01"
network.eth0 = {{ {eth0} }}
network.eth1 = {{ dhcp = true, mac = "52:54:00:00:00:02" }}
"#
        );
        std::fs::write(&path, text).unwrap();
        let c = crate::plan::load(&path);
        (dir, c.unwrap())
    }

    /// The MTU the cluster file gives reaches networkData, cloud-init's network-config v1 and
    /// NetworkManager's keyfile; networkData gives every other link Ethernet's 1500.
    #[test]
    fn mtu_reaches_every_network_document() {
        let (_dir, c) = cluster(r#"mtu = 9000, address = "10.0.0.2/24""#);
        let node = c.node("edge-1").unwrap();
        let nd: Value = serde_json::from_str(&render(node).unwrap()).unwrap();
        let mtus: Vec<&Value> = nd["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| &l["mtu"])
            .collect();
        assert_eq!(mtus, [&json!(9000), &json!(1500)]);
        let v1 =
            serde_yaml_ng::to_string(&crate::plan::cloud_init::NetworkConfigV1::for_node(node))
                .unwrap();
        assert!(v1.contains("name: eth0\n  mtu: 9000\n"), "{v1}");
        assert_eq!(v1.matches("mtu").count(), 1, "{v1}");
        let (_, keyfile) =
            crate::plan::nm_keyfile::keyfile(&c, node, "eth0", &node.network["eth0"]);
        assert!(keyfile.contains("[ethernet]\nmtu=9000\n"), "{keyfile}");
        let (_, keyfile) =
            crate::plan::nm_keyfile::keyfile(&c, node, "eth1", &node.network["eth1"]);
        assert!(!keyfile.contains("mtu"), "{keyfile}");
    }

    #[test]
    fn an_mtu_no_link_carries_is_refused() {
        for bad in ["mtu = 10, dhcp = true", "mtu = 70000, dhcp = true"] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("pw"), "x\n").unwrap();
            let path = dir.path().join("cluster.toml");
            let text = format!(
                "[cluster]\nname = \"c\"\nseed = \"c\"\n[defaults]\nimage = \"bootc-uefi-x86\"\n[[node]]\nname = \"n\"\nnetwork.eth0 = {{ {bad} }}\n"
            );
            std::fs::write(&path, text).unwrap();
            let e = format!("{:#}", crate::plan::load(&path).unwrap_err());
            assert!(e.contains("outside 68..65535"), "{e}");
        }
    }
}
