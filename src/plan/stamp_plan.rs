//! The stamp plan: everything a node's image gets, computed as plain data before anything is
//! written. `kiln plan` prints it; `stamp` applies it. For the cloud-init NoCloud method that is
//! the seed files on the boot partition and, inside user-data, the files and commands cloud-init
//! applies on first boot.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::plan::node::{InputFile, NodeConfig, SwarmRole};
use crate::plan::overlay::{self, Overlay};
use crate::plan::profile::{DiskIdentity, OverlayTarget, PartitionRole, Profile, ProvisionMethod};
use crate::plan::{Cluster, ids};
use crate::stamp::cloud_init::{
    self, CloudConfig, CloudUser, MetaData, NetworkConfigV1, WriteFile,
};
use crate::stamp::{network_data, seed_scrub, wifi};

/// The swarm helper and its unit, shipped in `scripts/`.
pub const SWARM_SCRIPT: &str = include_str!("../../scripts/kiln-swarm.sh");
pub const SWARM_UNIT: &str = include_str!("../../scripts/kiln-swarm.service");

/// A file written onto a partition of the image.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionFile {
    pub partition: PartitionRole,
    pub path: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
    pub size: usize,
    pub sha256: String,
    /// What produced it (`cloud-init`, `cluster file`, …).
    pub why: String,
}

/// A file cloud-init writes on the node's first boot.
#[derive(Debug, Clone, Serialize)]
pub struct FirstBootFile {
    pub path: String,
    pub mode: String,
    pub owner: String,
    pub size: usize,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StampPlan {
    pub node: String,
    pub profile: String,
    /// The MBR disk signature the image gets, when the profile derives one per node.
    pub disk_signature: Option<String>,
    pub instance_id: String,
    pub partition_files: Vec<PartitionFile>,
    pub first_boot_files: Vec<FirstBootFile>,
    pub first_boot_commands: Vec<Vec<String>>,
    /// Files read to make the plan (overlays, fragments, boot files), for the build manifest.
    pub inputs: Vec<InputFile>,
    /// The cloud-init user-data document (on the seed partition, or on Ironic's config drive).
    #[serde(skip)]
    pub user_data: String,
    /// OpenStack `network_data.json`, for config-drive profiles.
    #[serde(skip)]
    pub network_data: Option<String>,
    /// For profiles whose details depend on the image (rootfs): what the build will do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl StampPlan {
    pub fn file(&self, path: &str) -> Option<&PartitionFile> {
        self.partition_files.iter().find(|f| f.path == path)
    }
}

fn partition_file(
    partition: PartitionRole,
    path: &str,
    bytes: Vec<u8>,
    why: &str,
) -> PartitionFile {
    let f = InputFile::new(path.into(), bytes);
    PartitionFile {
        partition,
        path: path.into(),
        size: f.bytes.len(),
        sha256: f.sha256,
        bytes: f.bytes,
        why: why.into(),
    }
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// Computes the plan for `node`.
pub fn plan(cluster: &Cluster, node: &NodeConfig) -> Result<StampPlan> {
    let (profile, _) = cluster.profile_of(node);
    if profile.provision.method == ProvisionMethod::Rootfs {
        // No cloud-init: the build writes into the root, deciding details from the image.
        return Ok(StampPlan {
            node: node.name.clone(),
            profile: profile.name.clone(),
            disk_signature: None,
            instance_id: String::new(),
            partition_files: Vec::new(),
            first_boot_files: Vec::new(),
            first_boot_commands: Vec::new(),
            inputs: Vec::new(),
            user_data: String::new(),
            network_data: None,
            note: Some(format!(
                "written into the root partition at build time, after reading the image (OpenRC or systemd, its accounts):\n    \
                 /etc/hostname, /etc/hosts{tz}; users {users} with their ssh keys ({pw}); sshd{docker} enabled at boot;\n    \
                 NetworkManager keyfiles for {ifs}{swarm}{overlays}",
                tz = if node.timezone.is_some() {
                    ", /etc/localtime"
                } else {
                    ""
                },
                users = node
                    .users
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                pw = if node.users.iter().any(|u| u.password_hash.is_some()) {
                    "password hashes from the cluster file"
                } else {
                    "passwords locked"
                },
                docker = if node.docker { " and docker" } else { "" },
                ifs = node.network.keys().cloned().collect::<Vec<_>>().join(", "),
                swarm = match &node.swarm {
                    Some(SwarmRole::Init { .. }) => "; the swarm init as a first-boot job",
                    Some(SwarmRole::Join { .. }) =>
                        "; the swarm join as a first-boot job (token 0600, deleted after joining)",
                    None => "",
                },
                overlays = if node.overlays.is_empty() {
                    String::new()
                } else {
                    format!("; overlays {}", node.overlays.join(", "))
                },
            )),
        });
    }
    let overlays: Vec<Overlay> = node
        .overlays
        .iter()
        .map(|o| overlay::load(o, &cluster.overlay_dirs()))
        .collect::<Result<_>>()?;
    let mut inputs = Vec::new();
    let mut write_files: Vec<(WriteFile, String)> = Vec::new();
    let mut runcmd: Vec<Vec<String>> = Vec::new();
    // A NoCloud seed sits on the boot FAT, readable by all: it is scrubbed after first boot.
    let scrub_seed = profile.provision.method == ProvisionMethod::CloudInitNocloud;
    let mut units_written = scrub_seed;

    if let Some(w) = &node.wifi {
        write_files.push((
            WriteFile::new(
                "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf",
                wifi::wpa_supplicant_conf(&node.name, w).as_bytes(),
                0o600,
                "root",
                "root",
            ),
            "wifi".into(),
        ));
    }

    let into_root = profile.provision.overlays_into == OverlayTarget::Root;
    for o in &overlays {
        inputs.push(o.manifest_file.clone());
        if into_root {
            // Written into the root at build time (rootfs::overlay_entries); services still start
            // through cloud-init below.
            for f in &o.files {
                inputs.push(f.content.clone());
            }
            continue;
        }
        for f in &o.files {
            inputs.push(f.content.clone());
            write_files.push((
                WriteFile::new(&f.target, &f.content.bytes, f.mode, &f.owner, &f.group),
                format!("overlay {}", o.name),
            ));
            units_written |=
                f.target.starts_with("/etc/systemd/") || f.target.starts_with("/lib/systemd/");
        }
    }

    if let Some(role) = &node.swarm {
        let (env, token) = swarm_env(role);
        if let Some(token) = token {
            write_files.push((
                WriteFile::new(
                    "/etc/kiln/swarm.token",
                    token.as_bytes(),
                    0o600,
                    "root",
                    "root",
                ),
                "swarm join token".into(),
            ));
        }
        write_files.push((
            WriteFile::new("/etc/kiln/swarm.env", env.as_bytes(), 0o600, "root", "root"),
            "swarm".into(),
        ));
        write_files.push((
            WriteFile::new(
                "/usr/local/sbin/kiln-swarm",
                SWARM_SCRIPT.as_bytes(),
                0o755,
                "root",
                "root",
            ),
            "swarm".into(),
        ));
        write_files.push((
            WriteFile::new(
                "/etc/systemd/system/kiln-swarm.service",
                SWARM_UNIT.as_bytes(),
                0o644,
                "root",
                "root",
            ),
            "swarm".into(),
        ));
        units_written = true;
    }

    if units_written {
        runcmd.push(argv(&["systemctl", "daemon-reload"]));
    }
    if node.docker {
        runcmd.push(argv(&["systemctl", "enable", "--now", "docker.service"]));
    } else if profile.provision.docker_preinstalled {
        runcmd.push(argv(&[
            "systemctl",
            "disable",
            "--now",
            "docker.service",
            "docker.socket",
        ]));
    }
    if node.wifi.is_some() {
        // wpa_supplicant@wlan0 associates; ifup then gets the address network-config asked for.
        runcmd.push(argv(&[
            "systemctl",
            "enable",
            "--now",
            "wpa_supplicant@wlan0.service",
        ]));
        runcmd.push(argv(&["ifup", "wlan0"]));
    }
    for o in &overlays {
        if let Some(v) = &o.manifest.venv {
            // The overlay's Python programs run in their own venv, made on first boot.
            let mut pip = vec![
                format!("{}/bin/pip", v.path),
                "install".into(),
                "-q".into(),
                "--disable-pip-version-check".into(),
            ];
            pip.extend(v.requirements.iter().cloned());
            runcmd.push(argv(&["python3", "-m", "venv", &v.path]));
            runcmd.push(pip);
        }
        for svc in &o.manifest.services {
            runcmd.push(argv(&["systemctl", "enable", svc]));
            runcmd.push(argv(&["systemctl", "restart", svc]));
        }
    }
    if node.swarm.is_some() {
        // --no-block: the join waits for the manager, which must not hold up cloud-init.
        runcmd.push(argv(&[
            "systemctl",
            "enable",
            "--now",
            "--no-block",
            "kiln-swarm.service",
        ]));
    }
    if scrub_seed {
        // --no-block: the unit is ordered after cloud-final, which is running this command.
        runcmd.push(argv(&[
            "systemctl",
            "enable",
            "--now",
            "--no-block",
            seed_scrub::SCRUB_UNIT_NAME,
        ]));
    }

    let users: Vec<CloudUser> = node
        .users
        .iter()
        .map(|u| CloudUser {
            name: u.name.clone(),
            groups: (!u.groups.is_empty()).then(|| u.groups.join(",")),
            sudo: u.sudo.then(|| "ALL=(ALL) NOPASSWD:ALL".to_string()),
            shell: u.shell.clone(),
            lock_passwd: u.password_hash.is_none(),
            passwd: u.password_hash.clone(),
            ssh_authorized_keys: u.ssh_authorized_keys.clone(),
        })
        .collect();
    let mut config = CloudConfig {
        hostname: node.hostname.clone(),
        manage_etc_hosts: true,
        preserve_hostname: false,
        timezone: node.timezone.clone(),
        ssh_pwauth: node.users.iter().any(|u| u.password_hash.is_some()),
        users,
        write_files: write_files.iter().map(|(w, _)| w.clone()).collect(),
        runcmd: runcmd.clone(),
    };
    let fragment = match &node.user_data {
        Some(f) => {
            inputs.push(f.clone());
            Some(
                cloud_init::parse_fragment(&f.bytes)
                    .with_context(|| format!("user-data fragment {}", f.path))?,
            )
        }
        None => None,
    };
    if scrub_seed {
        let clean = seed_scrub::clean_user_data(&config, fragment.as_ref())?;
        for w in seed_scrub::first_boot_files(&clean) {
            config.write_files.push(w.clone());
            write_files.push((w, "seed scrub (no secrets left on the boot FAT)".into()));
        }
    }
    let user_data = cloud_init::render_user_data(&config, fragment)?;
    let network_config = cloud_init::render_yaml(&NetworkConfigV1::for_node(node))?;

    let mut digest_input = node.digest().to_vec();
    digest_input.extend_from_slice(user_data.as_bytes());
    digest_input.extend_from_slice(network_config.as_bytes());
    let instance_id = ids::instance_id(&cluster.seed, &node.name, &digest_input);
    let meta_data = cloud_init::render_yaml(&MetaData {
        instance_id: instance_id.clone(),
        local_hostname: node.hostname.clone(),
    })?;

    let mut partition_files = Vec::new();
    let mut network_data = None;
    match (profile.provision.method, profile.provision.seed_partition) {
        (ProvisionMethod::CloudInitNocloud, Some(seed)) => {
            partition_files.push(partition_file(
                seed,
                "user-data",
                user_data.clone().into_bytes(),
                "cloud-init user-data",
            ));
            partition_files.push(partition_file(
                seed,
                "meta-data",
                meta_data.into_bytes(),
                "cloud-init meta-data",
            ));
            partition_files.push(partition_file(
                seed,
                "network-config",
                network_config.into_bytes(),
                "cloud-init network-config v1",
            ));
        }
        (ProvisionMethod::CloudInitNocloud, None) => {
            anyhow::bail!("profile {} names no seed partition", profile.name)
        }
        // Ironic's config drive carries user-data and network_data.json; Ironic makes meta-data.
        (ProvisionMethod::ConfigDrive, _) => {
            network_data = Some(network_data::render(node)?);
        }
        // Written into the root by `rootfs`, which needs the image to decide the details.
        (ProvisionMethod::Rootfs, _) => {}
    }
    for (name, f) in &node.boot_files {
        inputs.push(f.clone());
        partition_files.push(partition_file(
            PartitionRole::Boot,
            name,
            f.bytes.clone(),
            "cluster file",
        ));
    }

    let first_boot_files = write_files
        .iter()
        .map(|(w, why)| FirstBootFile {
            path: w.path.clone(),
            mode: w.permissions.clone(),
            owner: w.owner.clone(),
            size: if w.encoding.is_some() {
                w.content.len() * 3 / 4
            } else {
                w.content.len()
            },
            why: why.clone(),
        })
        .collect();

    Ok(StampPlan {
        node: node.name.clone(),
        profile: profile.name.clone(),
        disk_signature: disk_signature(profile, &cluster.seed, &node.name),
        instance_id,
        partition_files,
        first_boot_files,
        first_boot_commands: runcmd,
        inputs,
        user_data,
        network_data,
        note: None,
    })
}

/// `/etc/kiln/swarm.env` for a swarm role, and the join token file's content when it joins.
pub fn swarm_env(role: &SwarmRole) -> (String, Option<String>) {
    let mut env = String::from("# Written by kiln: how this node joins its Docker swarm.\n");
    match role {
        SwarmRole::Init { advertise_addr } => {
            env.push_str(&format!("ROLE=init\nADVERTISE_ADDR={advertise_addr}\n"));
            (env, None)
        }
        SwarmRole::Join {
            manager_addr,
            advertise_addr,
            token,
            ..
        } => {
            env.push_str(&format!(
                "ROLE=join\nADVERTISE_ADDR={advertise_addr}\nMANAGER_ADDR={manager_addr}\nTOKEN_FILE=/etc/kiln/swarm.token\n"
            ));
            (env, Some(format!("{}\n", token.expose())))
        }
    }
}

fn disk_signature(profile: &Profile, seed: &str, node: &str) -> Option<String> {
    (profile.disk.disk_identity == DiskIdentity::Derive)
        .then(|| format!("{:08x}", ids::disk_signature(seed, node)))
}

/// The plan as the human-readable listing `kiln plan` prints.
pub fn describe(plan: &StampPlan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "node {} (profile {})", plan.node, plan.profile);
    if let Some(note) = &plan.note {
        let _ = writeln!(s, "  {note}");
        return s;
    }
    if let Some(sig) = &plan.disk_signature {
        let _ = writeln!(
            s,
            "  disk signature      {sig} (derived from the seed and node name)"
        );
    }
    let _ = writeln!(s, "  cloud-init instance {}", plan.instance_id);
    let _ = writeln!(s, "\n  written to the image now:");
    for f in &plan.partition_files {
        let _ = writeln!(
            s,
            "    {:<5} {:<16} {:>7} bytes  sha256:{}  ({})",
            format!("{:?}", f.partition).to_lowercase(),
            f.path,
            f.size,
            &f.sha256[..12],
            f.why
        );
    }
    if !plan.first_boot_files.is_empty() {
        let _ = writeln!(s, "\n  written by cloud-init on first boot:");
        for f in &plan.first_boot_files {
            let _ = writeln!(
                s,
                "    {} {:<10} {:<48} {:>6} bytes  ({})",
                f.mode, f.owner, f.path, f.size, f.why
            );
        }
    }
    if !plan.first_boot_commands.is_empty() {
        let _ = writeln!(s, "\n  run by cloud-init on first boot:");
        for c in &plan.first_boot_commands {
            let _ = writeln!(s, "    {}", c.join(" "));
        }
    }
    s
}
