//! NetworkManager keyfiles: the connections a rootfs node (postmarketOS) gets, rendered as data
//! for the plan; `stamp::rootfs` writes them root-owned 0600, the only way NetworkManager reads them.
//! A Raspberry Pi OS node gets its wifi connection the same way, written by cloud-init.

use std::fmt::Write as _;

use crate::plan::node::{Interface, NodeConfig};
use crate::plan::{Cluster, ids};

/// A NetworkManager keyfile for one interface: wifi (wlan0, with the node's wifi) or ethernet.
pub fn keyfile(
    cluster: &Cluster,
    node: &NodeConfig,
    ifname: &str,
    iface: &Interface,
) -> (String, String) {
    render(
        cluster,
        node,
        ifname,
        iface,
        node.wifi.as_ref().map(|w| w.psk.expose().to_string()),
    )
}

/// The wlan0 connection of a node with wifi, its PSK the 256-bit key derived from the passphrase
/// (as wpa_supplicant's files carry it), for keyfiles that travel on the boot FAT inside a seed.
pub fn wifi_keyfile_with_derived_psk(
    cluster: &Cluster,
    node: &NodeConfig,
    iface: &Interface,
) -> String {
    let psk = node
        .wifi
        .as_ref()
        .map(|w| crate::plan::wifi::psk_hex(&w.ssid, w.psk.expose()));
    render(cluster, node, "wlan0", iface, psk).1
}

fn render(
    cluster: &Cluster,
    node: &NodeConfig,
    ifname: &str,
    iface: &Interface,
    psk: Option<String>,
) -> (String, String) {
    let uuid = ids::uuid(
        &cluster.seed,
        &node.name,
        &format!("nm-connection-{ifname}"),
    );
    let mut t = String::new();
    let wifi = node.wifi.as_ref().filter(|_| ifname == "wlan0");
    let name = match wifi {
        Some(w) => w.ssid.clone(),
        None => format!("kiln-{ifname}"),
    };
    let _ = writeln!(t, "[connection]\nid={name}\nuuid={uuid}");
    let _ = writeln!(
        t,
        "type={}",
        if wifi.is_some() { "wifi" } else { "ethernet" }
    );
    // Prefer kiln's connection over any the image ships for the same device.
    let _ = writeln!(
        t,
        "interface-name={ifname}\nautoconnect=true\nautoconnect-priority=10\n"
    );
    if let Some(w) = wifi {
        let _ = writeln!(t, "[wifi]\nmode=infrastructure\nssid={}", w.ssid);
        if w.hidden {
            let _ = writeln!(t, "hidden=true");
        }
        if let Some(mtu) = node.mtus.get(ifname) {
            let _ = writeln!(t, "mtu={mtu}");
        }
        let _ = writeln!(
            t,
            "\n[wifi-security]\nkey-mgmt=wpa-psk\npsk={}\n",
            psk.as_deref().unwrap_or_default()
        );
    } else {
        let _ = writeln!(t, "[ethernet]");
        if let Some(mtu) = node.mtus.get(ifname) {
            let _ = writeln!(t, "mtu={mtu}");
        }
        let _ = writeln!(t);
    }
    match iface {
        Interface::Dhcp => {
            let _ = writeln!(t, "[ipv4]\nmethod=auto\n");
        }
        Interface::Static {
            address,
            gateway,
            dns,
        } => {
            let v6 = address.addr().is_ipv6();
            let sect = if v6 { "ipv6" } else { "ipv4" };
            let _ = write!(t, "[{sect}]\nmethod=manual\naddress1={address}");
            if let Some(gw) = gateway {
                let _ = write!(t, ",{gw}");
            }
            let _ = writeln!(t);
            if !dns.is_empty() {
                let list: String = dns.iter().map(|d| format!("{d};")).collect();
                let _ = writeln!(t, "dns={list}");
            }
            let _ = writeln!(t);
            if v6 {
                let _ = writeln!(t, "[ipv4]\nmethod=disabled\n");
            }
        }
    }
    if !matches!(iface, Interface::Static { address, .. } if address.addr().is_ipv6()) {
        let _ = writeln!(t, "[ipv6]\naddr-gen-mode=default\nmethod=auto\n");
    }
    (name, t.trim_end().to_string() + "\n")
}
