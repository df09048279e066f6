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

use crate::spec::node::{Interface, NodeConfig};

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
