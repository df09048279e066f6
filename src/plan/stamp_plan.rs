//! The stamp plan: everything a node's image gets, computed as plain data before anything is
//! written. `kiln plan` prints it; `stamp` applies it. For the cloud-init NoCloud method that is
//! the seed files on the boot partition and, inside user-data, the files and commands cloud-init
//! applies on first boot. For the rootfs method (images without cloud-init) it is every file,
//! account, service and network connection the root gets; the image then settles only how (which
//! init enables a service, the uids behind user and group names, the shell of a new account).

use std::fmt::Write as _;

use anyhow::{Result, bail};
use serde::Serialize;
use serde_yaml_ng::Mapping;

use crate::plan::cloud_init::{
    self, CloudConfig, CloudUser, MetaData, NetworkConfigV1, NetworkConfigV2Document, WriteFile,
};
use crate::plan::node::{InputFile, Interface, NodeConfig, SwarmRole, User};
use crate::plan::overlay::Overlay;
use crate::plan::profile::{
    DiskIdentity, OverlayTarget, PartitionRole, Profile, ProvisionMethod, WifiMethod,
};
use crate::plan::{Cluster, ids};
use crate::plan::{network_data, nm_keyfile, seed_scrub, wifi};

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

/// A file written into the image's root at build time, owned by names the image's own accounts
/// turn into ids.
#[derive(Debug, Clone, PartialEq)]
pub struct RootFile {
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    /// The overlay it comes from, for errors about its owner.
    pub overlay: String,
}

/// A service enabled at boot: its name (OpenRC's init script) and the systemd units that may
/// provide it, in order of preference.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub units: Vec<String>,
}

impl Service {
    fn new(name: &str, units: &[&str]) -> Self {
        Service {
            name: name.into(),
            units: units.iter().map(|u| u.to_string()).collect(),
        }
    }
}

/// A NetworkManager connection (keyfile) for one interface.
#[derive(Debug, Clone, PartialEq)]
pub struct Keyfile {
    /// The connection's name, which is also its file name.
    pub name: String,
    pub text: String,
}

/// What the root of a rootfs node gets, applied in this order by `stamp::rootfs`.
#[derive(Debug, Clone, PartialEq)]
pub struct RootfsPlan {
    /// `/etc/hostname`, `/etc/hosts`, `/etc/timezone`, keeping the mode of what the image has.
    pub identity: Vec<(String, String)>,
    /// The zoneinfo file `/etc/localtime` links to.
    pub localtime: Option<String>,
    /// Accounts added to or updated in /etc/passwd, /etc/group and /etc/shadow, with their keys.
    pub users: Vec<User>,
    /// Whether the users join the image's `docker` group.
    pub docker_group: bool,
    /// sshd always (keys are the way in), docker when asked.
    pub services: Vec<Service>,
    /// One connection per interface, written when the image has NetworkManager.
    pub keyfiles: Vec<Keyfile>,
    /// Whether the node cannot do without its network settings (wifi or a static address), so an
    /// image without NetworkManager is refused rather than built unreachable.
    pub network_required: bool,
    /// `/etc/kiln/swarm.env` and the join token, for the first-boot swarm job.
    pub swarm: Option<(String, Option<String>)>,
    /// The overlays' services, enabled after their files are written.
    pub overlay_services: Vec<Service>,
    /// Well-known passwords of the release that must not survive on an account.
    pub known_default_passwords: Vec<String>,
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
    /// The cloud-init meta-data and network-config (v1) documents of a NoCloud seed (`kiln run`
    /// makes one from them for any cloud-init node).
    #[serde(skip)]
    pub meta_data: String,
    #[serde(skip)]
    pub network_config: String,
    /// OpenStack `network_data.json`, for config-drive profiles.
    #[serde(skip)]
    pub network_data: Option<String>,
    /// Overlay files written into the root at build time (profiles with overlays into the root,
    /// and rootfs profiles).
    #[serde(skip)]
    pub root_files: Vec<RootFile>,
    /// For rootfs profiles: everything else the root gets.
    #[serde(skip)]
    pub rootfs: Option<RootfsPlan>,
    /// Files the base image's root must already have (plugins a CNI folder's confs use without
    /// shipping them); the build refuses an image without them.
    #[serde(skip)]
    pub root_must_have: Vec<String>,
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
    let overlays = &node.loaded_overlays;
    if profile.provision.method == ProvisionMethod::Rootfs {
        return rootfs_plan(cluster, node, profile, overlays);
    }
    cloud_init_plan(cluster, node, profile, overlays)
}

/// The image's own CNI plugins the node's confs rely on, as paths in the root (those the folder
/// ships itself are written by the build, so they need not be there).
fn image_plugins(node: &NodeConfig) -> Vec<String> {
    node.cni_image_plugins
        .iter()
        .map(|p| format!("{}/{p}", crate::plan::cni::BIN_DIR))
        .filter(|path| {
            !node
                .cni
                .iter()
                .flat_map(|o| &o.files)
                .any(|f| &f.target == path)
        })
        .collect()
}

/// The overlays' files as files of the root.
fn root_files<'a>(overlays: impl IntoIterator<Item = &'a Overlay>) -> Vec<RootFile> {
    overlays
        .into_iter()
        .flat_map(|o| {
            o.files.iter().map(|f| RootFile {
                path: f.target.clone(),
                bytes: f.content.bytes.clone(),
                mode: f.mode,
                owner: f.owner.clone(),
                group: f.group.clone(),
                overlay: o.name.clone(),
            })
        })
        .collect()
}

/// The plan of a rootfs node: no cloud-init, everything written into the root at build time.
fn rootfs_plan(
    cluster: &Cluster,
    node: &NodeConfig,
    profile: &Profile,
    overlays: &[Overlay],
) -> Result<StampPlan> {
    if node.user_data.is_some() {
        bail!(
            "node {}: user_data is a cloud-init fragment, and {} images have no cloud-init",
            node.name,
            profile.name
        );
    }
    if !node.boot_files.is_empty() {
        bail!(
            "node {}: boot files (config.txt, cmdline.txt) are for Raspberry Pi images",
            node.name
        );
    }
    let mut services = vec![Service::new("sshd", &["sshd.service", "ssh.service"])];
    if node.docker {
        services.push(Service::new("docker", &["docker.service"]));
    }
    let overlay_services = overlays
        .iter()
        .flat_map(|o| &o.manifest.services)
        .map(|svc| Service::new(svc.trim_end_matches(".service"), &[svc.as_str()]))
        .collect();
    let rootfs = RootfsPlan {
        identity: identity_files(node),
        localtime: node
            .timezone
            .as_ref()
            .map(|tz| format!("/usr/share/zoneinfo/{tz}")),
        users: node.users.clone(),
        docker_group: node.docker,
        services,
        keyfiles: node
            .network
            .iter()
            .map(|(ifname, iface)| {
                let (name, text) = nm_keyfile::keyfile(cluster, node, ifname, iface);
                Keyfile { name, text }
            })
            .collect(),
        network_required: node.wifi.is_some()
            || node.network.values().any(|i| i.static_ip().is_some()),
        swarm: node.swarm.as_ref().map(swarm_env),
        overlay_services,
        known_default_passwords: profile.provision.known_default_passwords.clone(),
    };
    Ok(StampPlan {
        node: node.name.clone(),
        profile: profile.name.clone(),
        disk_signature: None,
        instance_id: String::new(),
        partition_files: Vec::new(),
        first_boot_files: Vec::new(),
        first_boot_commands: Vec::new(),
        inputs: Vec::new(),
        user_data: String::new(),
        meta_data: String::new(),
        network_config: String::new(),
        network_data: None,
        root_files: root_files(overlays.iter().chain(&node.cni)),
        rootfs: Some(rootfs),
        root_must_have: image_plugins(node),
        note: Some(rootfs_note(node)),
    })
}

/// `/etc/hostname`, `/etc/hosts` (the node's static addresses under its name) and `/etc/timezone`.
fn identity_files(node: &NodeConfig) -> Vec<(String, String)> {
    let mut hosts = format!(
        "127.0.0.1\tlocalhost localhost.localdomain\n::1\t\tlocalhost localhost.localdomain\n127.0.1.1\t{}\n",
        node.hostname
    );
    for ip in node.network.values().filter_map(|i| i.static_ip()) {
        let _ = writeln!(hosts, "{ip}\t{}", node.hostname);
    }
    let mut files = vec![
        ("/etc/hostname".to_string(), format!("{}\n", node.hostname)),
        ("/etc/hosts".to_string(), hosts),
    ];
    if let Some(tz) = &node.timezone {
        files.push(("/etc/timezone".to_string(), format!("{tz}\n")));
    }
    files
}

/// What `kiln plan` says of a rootfs node, whose details the image decides.
fn rootfs_note(node: &NodeConfig) -> String {
    format!(
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
    )
}

/// The cloud-init documents of a node and where they go.
struct Documents {
    user_data: String,
    meta_data: String,
    network_config: String,
    instance_id: String,
}

/// The plan of a cloud-init node (a NoCloud seed, or Ironic's config drive).
fn cloud_init_plan(
    cluster: &Cluster,
    node: &NodeConfig,
    profile: &Profile,
    overlays: &[Overlay],
) -> Result<StampPlan> {
    // A NoCloud seed sits on the boot FAT, readable by all: it is scrubbed after first boot.
    let scrub_seed = profile.provision.method == ProvisionMethod::CloudInitNocloud;
    let into_root = profile.provision.overlays_into == OverlayTarget::Root;
    let mut inputs: Vec<InputFile> = overlays
        .iter()
        .chain(&node.cni)
        .flat_map(|o| std::iter::once(&o.manifest_file).chain(o.files.iter().map(|f| &f.content)))
        .cloned()
        .collect();
    // Overlays into the root are written at build time; their services still start through
    // cloud-init below.
    let overlay_writes = if into_root { &[][..] } else { overlays };
    let mut write_files = first_boot_writes(cluster, node, profile, overlay_writes);
    let units_written = scrub_seed
        || node.swarm.is_some()
        || write_files.iter().any(|(w, _)| {
            w.path.starts_with("/etc/systemd/") || w.path.starts_with("/lib/systemd/")
        });
    let runcmd = first_boot_commands(node, profile, overlays, units_written, scrub_seed);
    let mut config = cloud_config(node, &write_files, &runcmd);
    let fragment = node.user_data.as_ref().map(|u| {
        inputs.push(u.file.clone());
        u.fragment.clone()
    });
    if scrub_seed {
        let clean = seed_scrub::clean_user_data(&config, fragment.as_ref())?;
        for w in seed_scrub::first_boot_files(&clean, &profile.provision.seed_dir) {
            config.write_files.push(w.clone());
            write_files.push((w, "seed scrub (no secrets left on the boot FAT)".into()));
        }
    }
    let docs = documents(cluster, node, profile, &config, fragment)?;
    let (mut partition_files, network_data) = seed_files(node, profile, &docs)?;
    for (name, f) in &node.boot_files {
        inputs.push(f.clone());
        partition_files.push(partition_file(
            PartitionRole::Boot,
            name,
            f.bytes.clone(),
            "cluster file",
        ));
    }
    Ok(StampPlan {
        node: node.name.clone(),
        profile: profile.name.clone(),
        disk_signature: disk_signature(profile, &cluster.seed, &node.name),
        instance_id: docs.instance_id,
        partition_files,
        first_boot_files: write_files.iter().map(first_boot_file).collect(),
        first_boot_commands: runcmd,
        inputs,
        user_data: docs.user_data,
        meta_data: docs.meta_data,
        network_config: docs.network_config,
        network_data,
        // A CNI folder always goes into the root: its plugins are megabytes each, too big for
        // cloud-init's user-data on the boot FAT (and YAML-parsed on a Pi at first boot).
        root_files: root_files(overlays.iter().filter(|_| into_root).chain(&node.cni)),
        rootfs: None,
        root_must_have: image_plugins(node),
        note: None,
    })
}

/// Where NetworkManager reads kiln's wifi connection; it ignores a keyfile that is not root's
/// with mode 0600.
pub const NM_WIFI_KEYFILE: &str = "/etc/NetworkManager/system-connections/kiln-wlan0.nmconnection";

/// The files cloud-init writes on first boot (before the seed scrub's), each with why.
fn first_boot_writes(
    cluster: &Cluster,
    node: &NodeConfig,
    profile: &Profile,
    overlays: &[Overlay],
) -> Vec<(WriteFile, String)> {
    let root_file =
        |path: &str, bytes: &[u8], mode: u32| WriteFile::new(path, bytes, mode, "root", "root");
    let mut out = Vec::new();
    let wlan0 = node.network.get("wlan0").unwrap_or(&Interface::Dhcp);
    match (&node.wifi, profile.provision.wifi) {
        (Some(w), WifiMethod::WpaSupplicant) => out.push((
            root_file(
                "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf",
                wifi::wpa_supplicant_conf(&node.name, w).as_bytes(),
                0o600,
            ),
            "wifi".into(),
        )),
        (Some(_), WifiMethod::Networkmanager) => out.push((
            root_file(
                NM_WIFI_KEYFILE,
                nm_keyfile::wifi_keyfile_with_derived_psk(cluster, node, wlan0).as_bytes(),
                0o600,
            ),
            "wifi (NetworkManager connection)".into(),
        )),
        // In network-config v2's `wifis`.
        (Some(_), WifiMethod::Netplan) | (None, _) => {}
    }
    for o in overlays {
        for f in &o.files {
            out.push((
                WriteFile::new(&f.target, &f.content.bytes, f.mode, &f.owner, &f.group),
                format!("overlay {}", o.name),
            ));
        }
    }
    if let Some(role) = &node.swarm {
        let (env, token) = swarm_env(role);
        if let Some(token) = token {
            out.push((
                root_file("/etc/kiln/swarm.token", token.as_bytes(), 0o600),
                "swarm join token".into(),
            ));
        }
        for (path, bytes, mode) in [
            ("/etc/kiln/swarm.env", env.as_bytes(), 0o600),
            ("/usr/local/sbin/kiln-swarm", SWARM_SCRIPT.as_bytes(), 0o755),
            (
                "/etc/systemd/system/kiln-swarm.service",
                SWARM_UNIT.as_bytes(),
                0o644,
            ),
        ] {
            out.push((root_file(path, bytes, mode), "swarm".into()));
        }
    }
    out
}

/// The commands cloud-init runs on first boot, in order.
fn first_boot_commands(
    node: &NodeConfig,
    profile: &Profile,
    overlays: &[Overlay],
    units_written: bool,
    scrub_seed: bool,
) -> Vec<Vec<String>> {
    let mut runcmd = Vec::new();
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
    if let Some(w) = &node.wifi {
        runcmd.extend(wifi_commands(profile.provision.wifi, &w.country));
    }
    for o in overlays {
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
    // --no-block: the join waits for the manager, which must not hold up cloud-init; the scrub
    // unit is ordered after cloud-final, which is running these commands.
    if node.swarm.is_some() {
        runcmd.push(argv(&[
            "systemctl",
            "enable",
            "--now",
            "--no-block",
            "kiln-swarm.service",
        ]));
    }
    if scrub_seed {
        runcmd.push(argv(&[
            "systemctl",
            "enable",
            "--now",
            "--no-block",
            seed_scrub::SCRUB_UNIT_NAME,
        ]));
    }
    runcmd
}

/// What brings the wifi up once its configuration is written.
fn wifi_commands(method: WifiMethod, country: &str) -> Vec<Vec<String>> {
    match method {
        // wpa_supplicant@wlan0 associates; ifup then gets the address network-config asked for.
        WifiMethod::WpaSupplicant => vec![
            argv(&[
                "systemctl",
                "enable",
                "--now",
                "wpa_supplicant@wlan0.service",
            ]),
            argv(&["ifup", "wlan0"]),
        ],
        // Raspberry Pi OS keeps the radio rfkill-blocked until a country is set, which its
        // raspi-config does (and sets the regulatory domain); NetworkManager then reads the
        // keyfile written after it started.
        WifiMethod::Networkmanager => vec![
            vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "if command -v raspi-config >/dev/null; then raspi-config nonint do_wifi_country {country}; fi"
                ),
            ],
            argv(&["nmcli", "connection", "reload"]),
        ],
        // netplan brings it up from network-config, regulatory domain included.
        WifiMethod::Netplan => Vec::new(),
    }
}

/// The cloud-config kiln writes for `node` (before a user fragment is merged in).
fn cloud_config(
    node: &NodeConfig,
    write_files: &[(WriteFile, String)],
    runcmd: &[Vec<String>],
) -> CloudConfig {
    let users = node
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
    CloudConfig {
        hostname: node.hostname.clone(),
        manage_etc_hosts: true,
        preserve_hostname: false,
        timezone: node.timezone.clone(),
        ssh_pwauth: node.users.iter().any(|u| u.password_hash.is_some()),
        users,
        write_files: write_files.iter().map(|(w, _)| w.clone()).collect(),
        runcmd: runcmd.to_vec(),
        rpi: node.rpi.clone(),
    }
}

/// user-data, network-config, and the instance-id (a digest of the node and both documents)
/// in meta-data.
fn documents(
    cluster: &Cluster,
    node: &NodeConfig,
    profile: &Profile,
    config: &CloudConfig,
    fragment: Option<Mapping>,
) -> Result<Documents> {
    let user_data = cloud_init::render_user_data(config, fragment)?;
    let network_config = match profile.provision.network_config {
        2 => cloud_init::render_yaml(&NetworkConfigV2Document::for_node(
            node,
            profile.provision.wifi == WifiMethod::Netplan,
        ))?,
        _ => cloud_init::render_yaml(&NetworkConfigV1::for_node(node))?,
    };
    let mut digest_input = node.digest().to_vec();
    digest_input.extend_from_slice(user_data.as_bytes());
    digest_input.extend_from_slice(network_config.as_bytes());
    let instance_id = ids::instance_id(&cluster.seed, &node.name, &digest_input);
    let meta_data = cloud_init::render_yaml(&MetaData {
        instance_id: instance_id.clone(),
        local_hostname: node.hostname.clone(),
    })?;
    Ok(Documents {
        user_data,
        meta_data,
        network_config,
        instance_id,
    })
}

/// The seed files on the image (NoCloud), or the config drive's network_data.json (which Ironic
/// writes, with user-data; it makes meta-data itself).
fn seed_files(
    node: &NodeConfig,
    profile: &Profile,
    docs: &Documents,
) -> Result<(Vec<PartitionFile>, Option<String>)> {
    match (profile.provision.method, profile.provision.seed_partition) {
        (ProvisionMethod::CloudInitNocloud, Some(seed)) => Ok((
            vec![
                partition_file(
                    seed,
                    "user-data",
                    docs.user_data.clone().into_bytes(),
                    "cloud-init user-data",
                ),
                partition_file(
                    seed,
                    "meta-data",
                    docs.meta_data.clone().into_bytes(),
                    "cloud-init meta-data",
                ),
                partition_file(
                    seed,
                    "network-config",
                    docs.network_config.clone().into_bytes(),
                    &format!(
                        "cloud-init network-config v{}",
                        profile.provision.network_config
                    ),
                ),
            ],
            None,
        )),
        (ProvisionMethod::CloudInitNocloud, None) => {
            bail!("profile {} names no seed partition", profile.name)
        }
        (ProvisionMethod::ConfigDrive, _) => Ok((Vec::new(), Some(network_data::render(node)?))),
        // Planned by `rootfs_plan`: nothing goes on a seed.
        (ProvisionMethod::Rootfs, _) => Ok((Vec::new(), None)),
    }
}

/// How `kiln plan` lists a first-boot file.
fn first_boot_file((w, why): &(WriteFile, String)) -> FirstBootFile {
    FirstBootFile {
        path: w.path.clone(),
        mode: w.permissions.clone(),
        owner: w.owner.clone(),
        size: if w.encoding.is_some() {
            w.content.len() * 3 / 4
        } else {
            w.content.len()
        },
        why: why.clone(),
    }
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
    if !plan.root_files.is_empty() {
        let _ = writeln!(s, "\n  written into the root now:");
        for f in &plan.root_files {
            let _ = writeln!(
                s,
                "    {:04o} {:<10} {:<48} {:>7} bytes  ({})",
                f.mode,
                format!("{}:{}", f.owner, f.group),
                f.path,
                f.bytes.len(),
                if f.overlay == "cni" {
                    "CNI folder".to_string()
                } else {
                    format!("overlay {}", f.overlay)
                }
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnExampleKeyReplaceMeWithYourOwnKey0001 admin@laptop";

    /// A cluster of one profile kind, parsed from text; its secrets are files in a temporary
    /// directory (the cluster file's own, which it may read).
    fn cluster(image: &str, body: &str) -> (tempfile::TempDir, Cluster) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("psk"), "correct horse battery\n").unwrap();
        std::fs::write(dir.path().join("token"), "SWMTKN-1-test\n").unwrap();
        let text = format!(
            "[cluster]\nname = \"lab\"\nssh_authorized_keys = [\"{KEY}\"]\n\n\
             [[users]]\nname = \"admin\"\nsudo = true\n\
             password_hash = \"$6$saltsalt$0123456789abcdefghijklmnopqrstuv\"\n\n\
             [defaults]\nimage = \"{image}\"\ntimezone = \"Europe/Berlin\"\n\n{body}"
        );
        let c = crate::plan::resolve::parse(&dir.path().join("cluster.toml"), text).unwrap();
        (dir, c)
    }

    const SWARM_AND_WIFI: &str = "\
        [defaults.wifi]\nssid = \"lab\"\npsk = { file = \"psk\" }\ncountry = \"DE\"\n\n\
        [swarm]\nmanagers = [\"one\"]\ntoken = { file = \"token\" }\n\n\
        [[node]]\nname = \"one\"\ndocker = true\noverlays = [\"docker-daemon\"]\n\
        network.eth0 = { address = \"10.0.0.1/24\", gateway = \"10.0.0.254\" }\n\n\
        [[node]]\nname = \"two\"\ndocker = true\noverlays = [\"docker-daemon\"]\n\
        network.eth0 = { address = \"10.0.0.2/24\", gateway = \"10.0.0.254\" }\n";

    fn plan_of(c: &Cluster, node: &str) -> StampPlan {
        plan(c, c.node(node).unwrap()).unwrap()
    }

    #[test]
    fn a_cni_folder_goes_into_the_root_not_into_user_data() {
        let dir = tempfile::tempdir().unwrap();
        let cni = dir.path().join("cni");
        std::fs::create_dir_all(cni.join("conf")).unwrap();
        std::fs::create_dir_all(cni.join("bin")).unwrap();
        std::fs::write(
            cni.join("conf/99-lo.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .unwrap();
        std::fs::write(cni.join("bin/loopback"), b"\x7fELF").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            cni.join("bin/loopback"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let text = "[cluster]\nname = \"lab\"\n[defaults]\nimage = \"hypriot-rpi\"\n\
                    cni = { dir = \"cni\" }\n[[node]]\nname = \"one\"\n";
        let c = crate::plan::resolve::parse(&dir.path().join("cluster.toml"), text.into()).unwrap();
        let p = plan_of(&c, "one");
        let root: Vec<_> = p
            .root_files
            .iter()
            .map(|f| (f.path.as_str(), f.mode))
            .collect();
        assert_eq!(
            root,
            [
                ("/opt/cni/bin/loopback", 0o755),
                ("/etc/cni/net.d/99-lo.conf", 0o644)
            ]
        );
        assert!(!p.user_data.contains("/etc/cni"), "{}", p.user_data);
        assert!(
            describe(&p).contains("0755 root:root  /opt/cni/bin/loopback"),
            "{}",
            describe(&p)
        );
        assert!(p.inputs.iter().any(|i| i.path.ends_with("99-lo.conf")));
        assert!(p.root_must_have.is_empty());
        // The image's own plugins must be there, except those the folder ships.
        let with = text.replace(
            "dir = \"cni\"",
            "dir = \"cni\", image_plugins = [\"loopback\", \"portmap\"]",
        );
        let c = crate::plan::resolve::parse(&dir.path().join("cluster.toml"), with).unwrap();
        assert_eq!(plan_of(&c, "one").root_must_have, ["/opt/cni/bin/portmap"]);

        // Outside the cluster file's directory, or broken: refused with the file named.
        std::fs::write(cni.join("bin/loopback"), b"").unwrap();
        std::fs::set_permissions(
            cni.join("bin/loopback"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e =
            crate::plan::resolve::parse(&dir.path().join("cluster.toml"), text.into()).unwrap_err();
        assert!(format!("{e:#}").contains("bin/loopback"), "{e:#}");
        let outside = text.replace("dir = \"cni\"", "dir = \"/etc\"");
        let e = crate::plan::resolve::parse(&dir.path().join("cluster.toml"), outside).unwrap_err();
        assert!(format!("{e:#}").contains("outside"), "{e:#}");
    }

    #[test]
    fn a_nocloud_node_gets_its_seed_and_first_boot_steps() {
        let (_dir, c) = cluster("hypriot-rpi", SWARM_AND_WIFI);
        let p = plan_of(&c, "two");
        let seed: Vec<_> = p
            .partition_files
            .iter()
            .map(|f| (f.partition, f.path.as_str()))
            .collect();
        assert_eq!(
            seed,
            [
                (PartitionRole::Boot, "user-data"),
                (PartitionRole::Boot, "meta-data"),
                (PartitionRole::Boot, "network-config"),
            ]
        );
        assert_eq!(p.file("user-data").unwrap().bytes, p.user_data.as_bytes());
        assert_eq!(p.file("meta-data").unwrap().bytes, p.meta_data.as_bytes());
        assert!(p.meta_data.contains(&p.instance_id));
        assert!(p.network_config.contains("10.0.0.2/24"));
        assert!(
            p.disk_signature.is_some(),
            "hypriot derives a disk signature"
        );
        assert!(p.rootfs.is_none() && p.root_files.is_empty() && p.note.is_none());

        let files: Vec<_> = p.first_boot_files.iter().map(|f| f.path.as_str()).collect();
        for want in [
            "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf",
            "/etc/docker/daemon.json",
            "/etc/kiln/swarm.token",
            "/etc/kiln/swarm.env",
            seed_scrub::CLEAN_USER_DATA,
        ] {
            assert!(files.contains(&want), "{want} missing from {files:?}");
        }
        let token = p
            .first_boot_files
            .iter()
            .find(|f| f.path == "/etc/kiln/swarm.token")
            .unwrap();
        assert_eq!(
            (token.mode.as_str(), token.owner.as_str()),
            ("0600", "root:root")
        );

        let cmds: Vec<String> = p.first_boot_commands.iter().map(|c| c.join(" ")).collect();
        assert_eq!(cmds.first().unwrap(), "systemctl daemon-reload");
        assert!(cmds.contains(&"systemctl enable --now docker.service".to_string()));
        assert!(cmds.contains(&"ifup wlan0".to_string()));
        assert!(cmds.contains(&"systemctl restart docker.service".to_string()));
        let n = cmds.len();
        assert_eq!(
            cmds[n - 2..],
            [
                "systemctl enable --now --no-block kiln-swarm.service".to_string(),
                format!(
                    "systemctl enable --now --no-block {}",
                    seed_scrub::SCRUB_UNIT_NAME
                ),
            ]
        );
        // The overlay's manifest and file are inputs of the build.
        assert_eq!(p.inputs.len(), 2);

        // The same cluster plans the same bytes; another node gets another instance.
        assert_eq!(plan_of(&c, "two").user_data, p.user_data);
        assert_eq!(plan_of(&c, "two").instance_id, p.instance_id);
        assert_ne!(plan_of(&c, "one").instance_id, p.instance_id);
        assert!(describe(&p).contains("written by cloud-init on first boot"));
        assert!(
            !p.user_data.contains("Environment=KILN_SEED_USER_DATA"),
            "HypriotOS: /boot"
        );
    }

    #[test]
    fn a_raspios_node_gets_network_config_v2_and_a_networkmanager_wifi() {
        let (_dir, c) = cluster("raspios-arm64", SWARM_AND_WIFI);
        let p = plan_of(&c, "two");
        let net: serde_yaml_ng::Value = serde_yaml_ng::from_str(&p.network_config).unwrap();
        let eth0 = &net["network"]["ethernets"]["eth0"];
        assert_eq!(net["network"]["version"].as_u64(), Some(2));
        assert_eq!(eth0["addresses"][0].as_str(), Some("10.0.0.2/24"));
        assert_eq!(eth0["routes"][0]["to"].as_str(), Some("0.0.0.0/0"));
        assert_eq!(eth0["routes"][0]["via"].as_str(), Some("10.0.0.254"));
        // cloud-init's NetworkManager renderer drops `wifis`: the wifi is a keyfile instead.
        assert!(net["network"].get("wifis").is_none());
        assert!(net["network"]["ethernets"].get("wlan0").is_none());
        assert!(p.disk_signature.is_none(), "raspios keeps its PARTUUIDs");
        let keyfile = p
            .first_boot_files
            .iter()
            .find(|f| f.path == NM_WIFI_KEYFILE)
            .expect("a wifi keyfile");
        assert_eq!(
            (keyfile.mode.as_str(), keyfile.owner.as_str()),
            ("0600", "root:root")
        );
        // The derived key, not the passphrase, travels in the seed.
        let psk = wifi::psk_hex("lab", "correct horse battery");
        assert!(p.user_data.contains(&format!("psk={psk}")));
        assert!(!p.user_data.contains("correct horse battery"));
        let cmds: Vec<String> = p.first_boot_commands.iter().map(|c| c.join(" ")).collect();
        assert!(cmds.contains(&"nmcli connection reload".to_string()));
        // The seed scrub finds the seed where Raspberry Pi OS mounts bootfs.
        assert!(
            p.user_data
                .contains("Environment=KILN_SEED_USER_DATA=/boot/firmware/user-data")
        );
        assert!(!cmds.iter().any(|c| c.contains("wpa_supplicant")));
    }

    #[test]
    fn rpi_keys_become_cloud_init_rpi_module_settings() {
        let (_dir, c) = cluster(
            "raspios-arm64",
            "[defaults.rpi]\ninterfaces = { i2c = true, spi = false }\n\n\
             [[node]]\nname = \"one\"\n\n\
             [[node]]\nname = \"two\"\n\
             rpi = { enable_usb_gadget = true, interfaces = { serial = { console = true }, onewire = true } }\n",
        );
        let ud = |node: &str| -> serde_yaml_ng::Value {
            serde_yaml_ng::from_str(&plan_of(&c, node).user_data).unwrap()
        };
        let one = ud("one");
        assert_eq!(one["rpi"]["interfaces"]["i2c"].as_bool(), Some(true));
        assert_eq!(one["rpi"]["interfaces"]["spi"].as_bool(), Some(false));
        assert!(one["rpi"]["interfaces"].get("serial").is_none());
        assert!(one["rpi"].get("enable_usb_gadget").is_none());
        // A node's own rpi table replaces the defaults' whole, as every other key does.
        let two = ud("two");
        assert_eq!(two["rpi"]["enable_usb_gadget"].as_bool(), Some(true));
        let serial = &two["rpi"]["interfaces"]["serial"];
        assert_eq!(
            (serial["console"].as_bool(), serial["hardware"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(two["rpi"]["interfaces"]["onewire"].as_bool(), Some(true));
        assert!(two["rpi"]["interfaces"].get("i2c").is_none());
    }

    #[test]
    fn rpi_keys_are_refused_where_cloud_init_lacks_the_module_or_unknown() {
        for (image, body, want) in [
            (
                "hypriot-rpi",
                "[[node]]\nname = \"one\"\nrpi = { interfaces = { spi = true } }\n",
                "which hypriot-rpi does not have",
            ),
            (
                "raspios-arm64",
                "[[node]]\nname = \"one\"\nrpi = { interfaces = { uart = true } }\n",
                "unknown field `uart`",
            ),
            (
                "raspios-arm64",
                "[[node]]\nname = \"one\"\nrpi = { usb_gadget = true }\n",
                "unknown field `usb_gadget`",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let text =
                format!("[cluster]\nname = \"lab\"\n\n[defaults]\nimage = \"{image}\"\n\n{body}");
            let e = crate::plan::resolve::parse(&dir.path().join("cluster.toml"), text)
                .map(|_| ())
                .unwrap_err();
            assert!(format!("{e:#}").contains(want), "{e:#}");
        }
    }

    #[test]
    fn an_ubuntu_node_gets_its_wifi_in_netplan_wifis() {
        let (_dir, c) = cluster("ubuntu-rpi", SWARM_AND_WIFI);
        let p = plan_of(&c, "one");
        let net: serde_yaml_ng::Value = serde_yaml_ng::from_str(&p.network_config).unwrap();
        let wlan0 = &net["network"]["wifis"]["wlan0"];
        assert_eq!(wlan0["dhcp4"].as_bool(), Some(true));
        assert_eq!(wlan0["regulatory-domain"].as_str(), Some("DE"));
        assert_eq!(
            wlan0["access-points"]["lab"]["password"].as_str(),
            Some(wifi::psk_hex("lab", "correct horse battery").as_str())
        );
        assert!(
            p.disk_signature.is_some(),
            "ubuntu finds its partitions by label"
        );
        assert!(!p.first_boot_files.iter().any(|f| f.why.starts_with("wifi")));
    }

    #[test]
    fn a_rootfs_node_is_planned_before_the_image_is_read() {
        let (_dir, c) = cluster("pmos-google-flame", SWARM_AND_WIFI);
        let p = plan_of(&c, "two");
        assert!(p.partition_files.is_empty() && p.first_boot_files.is_empty());
        assert!(p.user_data.is_empty() && p.inputs.is_empty());
        let r = p.rootfs.as_ref().expect("a rootfs plan");
        assert_eq!(r.identity[0], ("/etc/hostname".into(), "two\n".into()));
        assert!(r.identity[1].1.contains("10.0.0.2\ttwo\n"));
        assert_eq!(
            r.identity[2],
            ("/etc/timezone".into(), "Europe/Berlin\n".into())
        );
        assert_eq!(
            r.localtime.as_deref(),
            Some("/usr/share/zoneinfo/Europe/Berlin")
        );
        assert_eq!(r.users.len(), 1);
        assert_eq!(r.users[0].name, "admin");
        assert!(r.docker_group);
        let services: Vec<_> = r.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(services, ["sshd", "docker"]);
        assert_eq!(r.services[0].units, ["sshd.service", "ssh.service"]);
        assert_eq!(
            r.overlay_services,
            [Service::new("docker", &["docker.service"])]
        );
        // eth0 and wlan0 (the wifi's), each a NetworkManager connection.
        let names: Vec<_> = r.keyfiles.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["kiln-eth0", "lab"]);
        assert!(r.keyfiles[1].text.contains("psk=correct horse battery"));
        assert!(r.network_required);
        let (env, token) = r.swarm.as_ref().expect("a swarm job");
        assert!(env.contains("ROLE=join") && env.contains("MANAGER_ADDR=10.0.0.1"));
        assert_eq!(token.as_deref(), Some("SWMTKN-1-test\n"));
        assert_eq!(r.known_default_passwords, ["147147"]);
        assert_eq!(p.root_files.len(), 1);
        assert_eq!(p.root_files[0].path, "/etc/docker/daemon.json");
        assert_eq!(p.root_files[0].overlay, "docker-daemon");
        assert!(describe(&p).contains("NetworkManager keyfiles for eth0, wlan0"));
    }

    #[test]
    fn a_rootfs_node_refuses_cloud_init_inputs() {
        let (dir, _) = cluster("pmos-google-flame", "[[node]]\nname = \"one\"\n");
        std::fs::write(dir.path().join("frag.yaml"), "packages: [htop]\n").unwrap();
        let text = "[cluster]\nname = \"lab\"\n\n[defaults]\nimage = \"pmos-google-flame\"\n\n\
             [[node]]\nname = \"one\"\nuser_data = \"frag.yaml\"\n"
            .to_string();
        let c = crate::plan::resolve::parse(&dir.path().join("cluster.toml"), text).unwrap();
        let e = plan(&c, &c.nodes[0]).unwrap_err();
        assert!(
            format!("{e:#}").contains("user_data is a cloud-init fragment"),
            "{e:#}"
        );
    }

    #[test]
    fn a_config_drive_node_gets_documents_for_ironic_and_nothing_on_the_image() {
        let (_dir, c) = cluster(
            "metal3-uefi-x86",
            "[[node]]\nname = \"metal-1\"\n\
             network.eno1 = { address = \"10.1.0.5/24\", gateway = \"10.1.0.1\", mac = \"8c:16:45:0a:1b:2c\" }\n",
        );
        let p = plan_of(&c, "metal-1");
        assert!(
            p.partition_files.is_empty(),
            "Ironic writes the config drive"
        );
        assert!(p.disk_signature.is_none());
        assert!(p.user_data.starts_with("#cloud-config\n"));
        let nd: serde_json::Value =
            serde_json::from_str(p.network_data.as_deref().expect("network_data.json")).unwrap();
        assert!(
            nd["links"][0]["ethernet_mac_address"] == "8c:16:45:0a:1b:2c",
            "{nd}"
        );
        // No seed on a FAT, so nothing to scrub.
        assert!(
            !p.first_boot_files
                .iter()
                .any(|f| f.path == seed_scrub::CLEAN_USER_DATA)
        );
        assert!(p.rootfs.is_none());
    }
}
