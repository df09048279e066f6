//! `kiln check`: validate a cluster file and print the resolved plan of every node.

use std::path::Path;

use anyhow::Result;

use super::ClusterArg;
use kiln::plan::node::{Interface, SwarmRole};

pub fn run(cluster_path: &Path, json: bool) -> Result<()> {
    let cluster = kiln::plan::load(cluster_path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&cluster.nodes)?);
        return Ok(());
    }
    println!(
        "{}: cluster {} (seed {:?}), {} node{} — valid",
        cluster_path.display(),
        cluster.name,
        cluster.seed,
        cluster.nodes.len(),
        if cluster.nodes.len() == 1 { "" } else { "s" }
    );
    for n in &cluster.nodes {
        let net: Vec<String> = n
            .network
            .iter()
            .map(|(name, i)| match i {
                Interface::Dhcp => format!("{name} dhcp"),
                Interface::Static {
                    address, gateway, ..
                } => match gateway {
                    Some(g) => format!("{name} {address} via {g}"),
                    None => format!("{name} {address}"),
                },
            })
            .collect();
        let swarm = match &n.swarm {
            Some(SwarmRole::Init { .. }) => "swarm init".to_string(),
            Some(SwarmRole::Join {
                as_manager: true, ..
            }) => "swarm manager".to_string(),
            Some(SwarmRole::Join { .. }) => "swarm worker".to_string(),
            None => "no swarm".to_string(),
        };
        println!("  {:<14} {:<12} {}", n.name, n.image, net.join(", "));
        let users: Vec<&str> = n.users.iter().map(|u| u.name.as_str()).collect();
        println!(
            "  {:<14} users {}; docker {}; {}{}{}",
            "",
            users.join(","),
            if n.docker { "on" } else { "off" },
            swarm,
            n.wifi
                .as_ref()
                .map(|w| format!("; wifi {:?} ({})", w.ssid, w.country))
                .unwrap_or_default(),
            if n.overlays.is_empty() {
                String::new()
            } else {
                format!("; overlays {}", n.overlays.join(","))
            },
        );
        if let Some(cni) = &n.cni {
            println!(
                "  {:<14} cni {} ({} files to /etc/cni/net.d and /opt/cni/bin)",
                "",
                cni.origin,
                cni.files.len()
            );
        }
        if let Some(bm) = &n.bare_metal {
            println!(
                "  {:<14} bmc {}; boots from {}{}",
                "",
                bm.bmc_address,
                bm.boot_mac,
                bm.root_device_hints
                    .device_name
                    .as_ref()
                    .map(|d| format!("; installs to {d}"))
                    .unwrap_or_default()
            );
            if let Some(image) = &bm.bootc_image {
                println!(
                    "  {:<14} deployed by Ironic from the bootc image {image} (`bootc install` in the \
                     ramdisk): needs Ironic 35 or newer and baremetal-operator v0.12 or newer \
                     (v0.13 for registry credentials)",
                    ""
                );
            }
        }
    }
    print_base_images(&cluster);
    Ok(())
}

/// Where each profile's base image comes from and the digest it must have, so a user can fetch
/// and verify it by hand or see that no digest is known.
fn print_base_images(cluster: &kiln::plan::Cluster) {
    println!("base images:");
    for (name, (profile, origin)) in &cluster.profiles {
        let src = &profile.source;
        let from = match (&src.url, &src.oci) {
            (Some(url), _) => url.clone(),
            (None, Some(oci)) => oci.clone(),
            (None, None) => src
                .obtain
                .clone()
                .unwrap_or_else(|| "given with --base".to_string()),
        };
        println!("  {name:<14} {from}  ({} profile)", origin.describe());
        match (&src.sha256, &src.url) {
            (Some(sha), _) => println!("  {:<14} sha256 {sha}", ""),
            (None, Some(_)) => println!(
                "  {:<14} sha256 not published in the profile: give --base-sha256 HEX to verify the download",
                ""
            ),
            (None, None) => {}
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Print the resolved configuration as JSON (secrets shown as digests).
    #[arg(long)]
    pub json: bool,
}
