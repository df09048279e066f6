//! From a parsed cluster file to one explicit `NodeConfig` per node.
//!
//! Resolution applies `[defaults]` under each `[[node]]`, reads secrets and referenced files,
//! checks every value (hostnames, addresses, prefixes, duplicates, swarm roles) and collects all
//! problems with their file:line before any image is touched.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ipnet::IpNet;

use super::cluster::{ClusterFile, InterfaceSpec, NodeSettings, SecretRef, SwarmSection, UserSpec};
use super::diag::{KeyPath, SourceText, SpecError, SpecErrors};
use super::ids;
use super::node::{
    BareMetal, InputFile, Interface, NodeConfig, RpiSpec, Secret, SwarmRole, User, UserData, Wifi,
};
use super::overlay::{self, Overlay};
use super::profile::{self, Profile, ProfileOrigin};
use crate::keypath;

/// A loaded and validated cluster file.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub seed: String,
    pub file: InputFile,
    /// The directory of the cluster file; relative paths in it are relative to this.
    pub dir: PathBuf,
    pub nodes: Vec<NodeConfig>,
    pub profiles: BTreeMap<String, (Profile, ProfileOrigin)>,
}

impl Cluster {
    pub fn node(&self, name: &str) -> Result<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            format!(
                "no node named {name:?} in {} (nodes: {})",
                self.file.path,
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    pub fn profile_of(&self, node: &NodeConfig) -> &(Profile, ProfileOrigin) {
        &self.profiles[&node.image]
    }

    /// Where overlays are looked up for this cluster.
    pub fn overlay_dirs(&self) -> Vec<PathBuf> {
        search_dirs(&self.dir, "overlays")
    }
}

/// `<cluster dir>/<sub>` then `./<sub>` (once, if they are the same directory).
pub fn search_dirs(cluster_dir: &Path, sub: &str) -> Vec<PathBuf> {
    let mut dirs = vec![cluster_dir.join(sub)];
    let cwd = PathBuf::from(sub);
    let same = match (dirs[0].canonicalize(), cwd.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        dirs.push(cwd);
    }
    // An installed kiln finds the repository's directories through KILN_HOME as well.
    if let Some(home) = std::env::var_os("KILN_HOME") {
        dirs.push(PathBuf::from(home).join(sub));
    }
    dirs
}

/// Reads, parses and resolves the cluster file at `path`.
pub fn load(path: &Path) -> Result<Cluster> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading cluster file {} (give another with --cluster)",
            path.display()
        )
    })?;
    parse(path, text)
}

/// Parses and resolves `text` as the cluster file at `path` (relative paths in it are relative to
/// `path`'s directory).
pub fn parse(path: &Path, text: String) -> Result<Cluster> {
    let source = SourceText::new(path, text.clone());
    let parsed: ClusterFile = toml::from_str(&text).map_err(|e| source.from_toml(&e))?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut r = Resolver {
        source: &source,
        dir: &dir,
        errors: Vec::new(),
        profiles: BTreeMap::new(),
    };
    let nodes = r.resolve(&parsed);
    if !r.errors.is_empty() {
        // A problem in [defaults] shows up once per node; report it once.
        let mut seen = BTreeSet::new();
        r.errors
            .retain(|e| seen.insert((e.line, e.column, e.message.clone())));
        return Err(SpecErrors(r.errors).into());
    }
    let profiles = r.profiles;
    Ok(Cluster {
        name: parsed.cluster.name.clone(),
        seed: parsed
            .cluster
            .seed
            .clone()
            .unwrap_or_else(|| parsed.cluster.name.clone()),
        file: InputFile::new(path.display().to_string(), text.into_bytes()),
        dir,
        nodes,
        profiles,
    })
}

/// One node's settings over `[defaults]`: a setting comes from the node when it sets it, else from
/// the defaults, and an error about it points at the table it came from.
#[derive(Clone, Copy)]
struct Layered<'f> {
    /// The node's index among the `[[node]]` tables.
    i: usize,
    node: &'f NodeSettings,
    defaults: &'f NodeSettings,
}

/// A node's interface specs by name, each with where it is written.
type InterfaceSpecs = BTreeMap<String, (InterfaceSpec, KeyPath)>;

impl<'f> Layered<'f> {
    /// The setting `key` (read from a table by `field`), and where it came from.
    fn get<T>(
        &self,
        key: &str,
        field: impl Fn(&'f NodeSettings) -> &'f Option<T>,
    ) -> (Option<&'f T>, KeyPath) {
        match field(self.node) {
            Some(v) => (Some(v), keypath!["node", self.i, key]),
            None => (field(self.defaults).as_ref(), keypath!["defaults", key]),
        }
    }

    /// The node's interfaces: those of `[defaults]`, replaced by the node's of the same name.
    fn interfaces(&self) -> InterfaceSpecs {
        let mut specs = InterfaceSpecs::new();
        for (table, base) in [
            (&self.defaults.network, keypath!["defaults", "network"]),
            (&self.node.network, keypath!["node", self.i, "network"]),
        ] {
            for (ifname, spec) in table.iter().flatten() {
                specs.insert(ifname.clone(), (spec.clone(), child(&base, ifname)));
            }
        }
        specs
    }
}

/// `path` with one more segment.
fn child(path: &KeyPath, seg: impl crate::plan::diag::IntoSeg) -> KeyPath {
    let mut p = path.clone();
    p.push(seg.into_seg());
    p
}

struct Resolver<'a> {
    source: &'a SourceText,
    dir: &'a Path,
    errors: Vec<SpecError>,
    profiles: BTreeMap<String, (Profile, ProfileOrigin)>,
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
pub fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_username(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && s.len() <= 32
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

fn valid_crypt_hash(s: &str) -> bool {
    ["$6$", "$5$", "$y$", "$2b$", "$2y$"]
        .iter()
        .any(|p| s.starts_with(p))
        && s.len() > 20
        && !s.contains(char::is_whitespace)
        && !s.contains(':')
}

fn valid_timezone(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b))
}

/// A MAC address as `aa:bb:cc:dd:ee:ff` (or with dashes, any case), normalised to lower case
/// with colons, as Ironic and cloud-init compare them.
pub fn normalize_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    (parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit())))
    .then(|| parts.join(":").to_ascii_lowercase())
}

/// Secrets are a password, a PSK, a token: a few hundred bytes at most.
const MAX_SECRET: u64 = 64 << 10;
/// user-data fragments and boot files: cloud-init documents and config.txt are kilobytes.
const MAX_INPUT_FILE: u64 = 1 << 20;

/// Whether `full` (after resolving symlinks) lies under `dir` or under a directory in
/// KILN_ALLOW_PATHS.
fn confined(dir: &Path, full: &Path) -> Result<()> {
    let real = full.canonicalize()?;
    let allowed: Vec<PathBuf> = std::iter::once(dir.to_path_buf())
        .chain(
            std::env::var_os("KILN_ALLOW_PATHS")
                .map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    if allowed.iter().any(|d| real.starts_with(d)) {
        return Ok(());
    }
    anyhow::bail!(
        "it resolves to {}, outside {}",
        real.display(),
        dir.canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .display()
    )
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Resolver<'_> {
    fn err(&mut self, path: KeyPath, message: impl Into<String>, hint: Option<&str>) {
        self.errors.push(self.source.error_at(&path, message, hint));
    }

    /// Reads a file the cluster file names: a regular file, under the cluster file's directory
    /// (or a directory the user allowed with KILN_ALLOW_PATHS), at most `cap` bytes. A cluster
    /// file from elsewhere must not be able to put the host's /etc/shadow on a card.
    fn read_file(&mut self, path: KeyPath, rel: &str, what: &str, cap: u64) -> Option<InputFile> {
        let full = self.dir.join(rel);
        let read = confined(self.dir, &full)
            .and_then(|()| crate::util::input::read_capped(&full, cap, what));
        match read {
            Ok(bytes) => Some(InputFile::new(full.display().to_string(), bytes)),
            Err(e) => {
                self.err(
                    path,
                    format!("cannot read {what} {}: {e:#}", full.display()),
                    Some(
                        "paths are relative to the cluster file's directory and stay inside it; \
                         to allow another directory, set KILN_ALLOW_PATHS=DIR[:DIR…]",
                    ),
                );
                None
            }
        }
    }

    fn secret(&mut self, path: KeyPath, r: &SecretRef, what: &str) -> Option<Secret> {
        match (&r.file, &r.env) {
            (Some(file), None) => {
                let f = self.read_file(path.clone(), file, what, MAX_SECRET)?;
                match String::from_utf8(f.bytes) {
                    // A trailing newline is how editors save files, never part of the secret.
                    Ok(s) => Some(Secret::new(s.trim_end_matches(['\n', '\r']).to_string())),
                    Err(_) => {
                        self.err(path, format!("{what} file {file} is not UTF-8 text"), None);
                        None
                    }
                }
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    self.err(
                        path,
                        format!("{what}: environment variable {var} is not set"),
                        Some("export it, or use { file = \"…\" } instead"),
                    );
                    None
                }
            },
            _ => {
                self.err(
                    path,
                    format!("{what} needs exactly one of `file` or `env`"),
                    Some("write { file = \"secrets/x\" } or { env = \"VAR\" }"),
                );
                None
            }
        }
    }

    fn resolve(&mut self, f: &ClusterFile) -> Vec<NodeConfig> {
        let seed = f
            .cluster
            .seed
            .clone()
            .unwrap_or_else(|| f.cluster.name.clone());
        if f.cluster.name.trim().is_empty() {
            self.err(
                keypath!["cluster", "name"],
                "the cluster name is empty",
                None,
            );
        }
        for (key, set) in f.defaults.per_node_keys() {
            if set {
                self.err(
                    keypath!["defaults", key],
                    format!("`{key}` is per node and cannot be a default"),
                    Some("move it into a [[node]] table"),
                );
            }
        }
        if f.nodes.is_empty() {
            self.err(
                keypath!["cluster"],
                "the cluster has no [[node]] tables",
                None,
            );
        }
        let users = self.users(f);
        let mut nodes = Vec::new();
        let mut names = BTreeSet::new();
        let mut addresses: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut macs: BTreeMap<String, String> = BTreeMap::new();
        for (i, n) in f.nodes.iter().enumerate() {
            let Some(name) = n.name.clone() else {
                self.err(keypath!["node", i], "this [[node]] has no `name`", None);
                continue;
            };
            if !valid_hostname(&name) || name.contains('.') {
                self.err(
                    keypath!["node", i, "name"],
                    format!("node name {name:?} is not a valid host name label"),
                    Some("use lower-case letters, digits and inner hyphens, at most 63 characters"),
                );
            }
            if !names.insert(name.clone()) {
                self.err(
                    keypath!["node", i, "name"],
                    format!("node {name:?} is defined twice"),
                    None,
                );
            }
            if let Some(node) = self.node(f, i, n, &name, &seed, &users) {
                self.check_unique(i, &node, &mut addresses, &mut macs);
                nodes.push(node);
            }
        }
        self.swarm(f, &mut nodes);
        nodes
    }

    /// Refuses a static address or MAC address that an earlier node already has.
    fn check_unique(
        &mut self,
        i: usize,
        node: &NodeConfig,
        addresses: &mut BTreeMap<IpAddr, String>,
        macs: &mut BTreeMap<String, String>,
    ) {
        for (ifname, iface) in &node.network {
            if let Some(ip) = iface.static_ip()
                && let Some(other) = addresses.insert(ip, node.name.clone())
            {
                self.err(
                    keypath!["node", i, "network", ifname, "address"],
                    format!("address {ip} is already used by node {other}"),
                    None,
                );
            }
        }
        // Two machines with one MAC would fight over one DHCP lease and one BMH.
        let node_macs = node
            .macs
            .iter()
            .map(|(k, m)| (keypath!["node", i, "network", k, "mac"], m.clone()))
            .chain(
                node.bare_metal
                    .iter()
                    .map(|b| (keypath!["node", i, "boot_mac"], b.boot_mac.clone())),
            );
        for (path, mac) in node_macs {
            match macs.get(&mac) {
                Some(other) if other != &node.name => self.err(
                    path,
                    format!("MAC address {mac} is already node {other}'s"),
                    None,
                ),
                _ => {
                    macs.insert(mac, node.name.clone());
                }
            }
        }
    }

    fn users(&mut self, f: &ClusterFile) -> Vec<(UserSpec, Option<Secret>)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (i, u) in f.users.iter().enumerate() {
            if !valid_username(&u.name) {
                self.err(
                    keypath!["users", i, "name"],
                    format!("user name {:?} is not a valid Linux user name", u.name),
                    Some("start with a lower-case letter or '_', then letters, digits, '_' or '-'"),
                );
            }
            if !seen.insert(u.name.clone()) {
                self.err(
                    keypath!["users", i, "name"],
                    format!("user {:?} is defined twice", u.name),
                    None,
                );
            }
            if let Some(h) = &u.password_hash
                && !valid_crypt_hash(h)
            {
                self.err(
                    keypath!["users", i, "password_hash"],
                    "password_hash is not a crypt(3) hash ($6$…, $5$…, $y$…)",
                    Some("make one with `mkpasswd -m sha-512`, or use password = { file = \"…\" }"),
                );
            }
            if u.password_hash.is_some() && u.password.is_some() {
                self.err(
                    keypath!["users", i, "password"],
                    "set either password or password_hash, not both",
                    None,
                );
            }
            let plain = u
                .password
                .as_ref()
                .and_then(|p| self.secret(keypath!["users", i, "password"], p, "password"));
            if let Some(p) = &plain
                && p.expose().is_empty()
            {
                self.err(
                    keypath!["users", i, "password"],
                    "the password file is empty",
                    None,
                );
            }
            for (k, key) in u.ssh_authorized_keys.iter().enumerate() {
                self.check_ssh_key(keypath!["users", i, "ssh_authorized_keys", k], key);
            }
            out.push((u.clone(), plain));
        }
        for (k, key) in f.cluster.ssh_authorized_keys.iter().enumerate() {
            self.check_ssh_key(keypath!["cluster", "ssh_authorized_keys", k], key);
        }
        out
    }

    fn check_ssh_key(&mut self, path: KeyPath, key: &str) {
        let mut parts = key.split_whitespace();
        let kind = parts.next().unwrap_or("");
        let body = parts.next().unwrap_or("");
        let known =
            kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
        if !known || body.len() < 16 || key.contains('\n') {
            self.err(
                path,
                "this is not an OpenSSH public key line (`ssh-ed25519 AAAA… comment`)",
                Some("paste the contents of ~/.ssh/id_ed25519.pub"),
            );
        }
    }

    fn profile(&mut self, path: KeyPath, name: &str) -> bool {
        if self.profiles.contains_key(name) {
            return true;
        }
        match profile::load(name, &search_dirs(self.dir, "images")) {
            Ok(p) => {
                self.profiles.insert(name.to_string(), p);
                true
            }
            Err(e) => {
                self.err(
                    path,
                    format!("{e:#}"),
                    Some("profiles live in images/<name>.toml"),
                );
                false
            }
        }
    }

    fn node(
        &mut self,
        f: &ClusterFile,
        i: usize,
        n: &NodeSettings,
        name: &str,
        seed: &str,
        users: &[(UserSpec, Option<Secret>)],
    ) -> Option<NodeConfig> {
        let l = Layered {
            i,
            node: n,
            defaults: &f.defaults,
        };
        let before = self.errors.len();
        let hostname = self.hostname(i, n, name);
        let (image, profile) = self.image(l, name)?;
        let timezone = self.timezone(l);
        let specs = l.interfaces();
        let mut network = self.network(&specs);
        let wifi = self.wifi(l, &mut network);
        let (overlays, loaded_overlays) = self.overlays(l);
        let cni = self.cni(l);
        let cni_image_plugins = l
            .get("cni", |s| &s.cni)
            .0
            .map(|c| c.image_plugins.clone())
            .unwrap_or_default();
        let user_data = self.user_data(l);
        let boot_files = self.boot_files(l);
        let (macs, mtus) = self.links(&specs);
        let bare_metal = self.bare_metal(l, name);
        let rpi = self.rpi(l, &profile);
        let docker = l
            .get("docker", |s| &s.docker)
            .0
            .copied()
            .unwrap_or(profile.provision.docker_preinstalled);
        let node_users = self.node_users(f, name, seed, users, &profile, docker);

        if self.errors.len() > before {
            return None;
        }
        Some(NodeConfig {
            name: name.to_string(),
            hostname,
            image,
            timezone,
            docker,
            users: node_users,
            network,
            wifi,
            swarm: None,
            overlays,
            loaded_overlays,
            cni,
            cni_image_plugins,
            user_data,
            boot_files,
            serial: n.serial.clone(),
            macs,
            mtus,
            rpi,
            bare_metal,
        })
    }

    /// The `rpi` settings, for profiles whose cloud-init has the Raspberry Pi module.
    fn rpi(&mut self, l: Layered, profile: &Profile) -> Option<RpiSpec> {
        let (rpi, at) = l.get("rpi", |s| &s.rpi);
        if rpi.is_some() && !profile.provision.rpi_module {
            self.err(
                at,
                format!(
                    "rpi settings need cloud-init's Raspberry Pi module, which {} does not have",
                    profile.name
                ),
                Some("use a Raspberry Pi OS profile (raspios-arm64, raspios-armhf), or remove rpi"),
            );
        }
        rpi.cloned()
    }

    /// The node's host name: its own, else its name.
    fn hostname(&mut self, i: usize, n: &NodeSettings, name: &str) -> String {
        let hostname = n.hostname.clone().unwrap_or_else(|| name.to_string());
        if n.hostname.is_some() && !valid_hostname(&hostname) {
            self.err(
                keypath!["node", i, "hostname"],
                format!("hostname {hostname:?} is not a valid host name"),
                Some("letters, digits and inner hyphens; dots separate labels"),
            );
        }
        hostname
    }

    /// The node's image profile, loaded.
    fn image(&mut self, l: Layered, name: &str) -> Option<(String, Profile)> {
        match l.get("image", |s| &s.image) {
            (Some(img), at) => {
                if !self.profile(at, img) {
                    return None;
                }
                Some((img.clone(), self.profiles[img].0.clone()))
            }
            (None, _) => {
                self.err(
                    keypath!["node", l.i],
                    format!("node {name} has no image profile"),
                    Some("set image = \"hypriot-rpi\" in [defaults] or in the node"),
                );
                None
            }
        }
    }

    fn timezone(&mut self, l: Layered) -> Option<String> {
        let (tz, at) = l.get("timezone", |s| &s.timezone);
        if let Some(tz) = tz
            && !valid_timezone(tz)
        {
            self.err(
                at,
                format!("timezone {tz:?} is not a tz database name"),
                Some("for example \"Europe/Berlin\" or \"UTC\""),
            );
        }
        tz.cloned()
    }

    /// The interfaces of the node's specs (eth0 with DHCP when it names none).
    fn network(&mut self, specs: &InterfaceSpecs) -> BTreeMap<String, Interface> {
        let mut network = BTreeMap::new();
        for (ifname, (spec, base)) in specs {
            if !valid_ifname(ifname) {
                self.err(
                    base.clone(),
                    format!("{ifname:?} is not an interface name"),
                    None,
                );
                continue;
            }
            if let Some(iface) = self.interface(base, ifname, spec) {
                network.insert(ifname.clone(), iface);
            }
        }
        if network.is_empty() {
            network.insert("eth0".to_string(), Interface::Dhcp);
        }
        network
    }

    /// The node's wifi; it adds wlan0 (DHCP) to `network` unless the node configures it.
    fn wifi(&mut self, l: Layered, network: &mut BTreeMap<String, Interface>) -> Option<Wifi> {
        let (w, at) = l.get("wifi", |s| &s.wifi);
        let w = w?;
        let country = match &w.country {
            Some(c) if c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
                Some(c.to_ascii_uppercase())
            }
            Some(c) => {
                self.err(
                    child(&at, "country"),
                    format!("{c:?} is not a two-letter country code"),
                    None,
                );
                None
            }
            None => {
                self.err(
                    at.clone(),
                    "wifi needs a country code",
                    Some("add country = \"DE\" (ISO 3166); the radio stays blocked without one"),
                );
                None
            }
        };
        if w.ssid.is_empty() || w.ssid.len() > 32 {
            self.err(child(&at, "ssid"), "an SSID is 1 to 32 bytes", None);
        }
        let psk = self.secret(child(&at, "psk"), &w.psk, "wifi psk");
        if let Some(p) = &psk {
            let s = p.expose();
            let hex64 = s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
            if !(hex64 || (8..=63).contains(&s.len())) {
                self.err(
                    child(&at, "psk"),
                    format!(
                        "a WPA passphrase is 8 to 63 characters (this one has {})",
                        s.len()
                    ),
                    None,
                );
            }
        }
        if !network.contains_key("wlan0") {
            network.insert("wlan0".to_string(), Interface::Dhcp);
        }
        Some(Wifi {
            ssid: w.ssid.clone(),
            psk: psk?,
            country: country?,
            hidden: w.hidden,
        })
    }

    /// The node's overlay names and the overlays, each loaded (and so checked) here, once.
    fn overlays(&mut self, l: Layered) -> (Vec<String>, Vec<Overlay>) {
        let (names, at) = l.get("overlays", |s| &s.overlays);
        let names = names.cloned().unwrap_or_default();
        let dirs = search_dirs(self.dir, "overlays");
        let mut loaded = Vec::new();
        for (k, o) in names.iter().enumerate() {
            match overlay::load(o, &dirs) {
                Ok(o) => loaded.push(o),
                Err(e) => self.err(child(&at, k), format!("{e:#}"), None),
            }
        }
        (names, loaded)
    }

    /// The node's CNI folder, confined like every file the cluster file names, loaded and checked.
    fn cni(&mut self, l: Layered) -> Option<Overlay> {
        let (spec, at) = l.get("cni", |s| &s.cni);
        let spec = spec?;
        let full = self.dir.join(&spec.dir);
        let loaded = confined(self.dir, &full)
            .with_context(|| format!("CNI folder {}", full.display()))
            .and_then(|()| super::cni::load(&full, &spec.image_plugins));
        match loaded {
            Ok(o) => Some(o),
            Err(e) => {
                self.err(
                    child(&at, "dir"),
                    format!("{e:#}"),
                    Some("conf/ holds .conf/.conflist files, bin/ the plugins they name"),
                );
                None
            }
        }
    }

    /// The node's `#cloud-config` fragment, read and parsed here, once.
    fn user_data(&mut self, l: Layered) -> Option<UserData> {
        let (rel, at) = l.get("user_data", |s| &s.user_data);
        let rel = rel?;
        let file = self.read_file(at.clone(), rel, "user-data fragment", MAX_INPUT_FILE)?;
        match crate::plan::cloud_init::parse_fragment(&file.bytes) {
            Ok(fragment) => Some(UserData { file, fragment }),
            Err(e) => {
                self.err(at, format!("user-data fragment {rel}: {e:#}"), None);
                None
            }
        }
    }

    /// The boot-partition files the node replaces, read, by their name there.
    fn boot_files(&mut self, l: Layered) -> BTreeMap<String, InputFile> {
        let (boot, at) = l.get("boot", |s| &s.boot);
        let boot = boot.cloned().unwrap_or_default();
        let mut files = BTreeMap::new();
        for (file_name, rel, key) in [
            ("config.txt", &boot.config_txt, "config_txt"),
            ("cmdline.txt", &boot.cmdline_txt, "cmdline_txt"),
        ] {
            if let Some(rel) = rel
                && let Some(f) = self.read_file(child(&at, key), rel, file_name, MAX_INPUT_FILE)
            {
                files.insert(file_name.to_string(), f);
            }
        }
        files
    }

    /// The MAC addresses and MTUs the node's interfaces give, by interface name.
    fn links(
        &mut self,
        specs: &InterfaceSpecs,
    ) -> (BTreeMap<String, String>, BTreeMap<String, u32>) {
        let mut macs = BTreeMap::new();
        let mut mtus = BTreeMap::new();
        for (ifname, (spec, base)) in specs {
            match spec.mtu {
                // 68: the least an IPv4 link may carry (RFC 791); 65535: the Linux maximum.
                Some(m) if (68..=65535).contains(&m) => {
                    mtus.insert(ifname.clone(), m);
                }
                Some(m) => self.err(
                    child(base, "mtu"),
                    format!("mtu {m} is outside 68..65535"),
                    Some("1500 for plain Ethernet, 9000 for jumbo frames"),
                ),
                None => {}
            }
            if let Some(m) = &spec.mac {
                match normalize_mac(m) {
                    Some(mac) => {
                        macs.insert(ifname.clone(), mac);
                    }
                    None => self.err(
                        child(base, "mac"),
                        format!("{m:?} is not a MAC address"),
                        Some("six hex pairs, for example 8c:16:45:0a:1b:2c"),
                    ),
                }
            }
        }
        (macs, mtus)
    }

    /// The node's Metal3 settings: its BMC (from the node or `[defaults]`), boot MAC, root device
    /// hints and power policy. Nodes without a BMC are not bare-metal hosts.
    fn bare_metal(&mut self, l: Layered, name: &str) -> Option<BareMetal> {
        let (bmc, at) = l.get("bmc", |s| &s.bmc);
        let n = l.node;
        let Some(bmc) = bmc else {
            if n.boot_mac.is_some()
                || n.root_device_hints.is_some()
                || n.online.is_some()
                || n.bootc_image.is_some()
            {
                self.err(
                    keypath!["node", l.i],
                    format!("node {name} has bare-metal settings but no bmc"),
                    Some("add bmc = { address = \"redfish+http://…\", username = \"…\", password = { file = \"…\" } }"),
                );
            }
            return None;
        };
        let address = bmc.address.replace("{name}", name);
        // Metal3's baremetal-operator is the judge: its webhook refuses the host otherwise.
        if let Err(e) = super::bmc_address::parse(&address) {
            self.err(
                child(&at, "address"),
                format!("{address:?} is not a BMC address Metal3 accepts: {e}"),
                Some("for a sushy-tools emulator: redfish+http://<host>:8000/redfish/v1/Systems/{name}"),
            );
        }
        if bmc.username.is_empty() {
            self.err(child(&at, "username"), "the BMC username is empty", None);
        }
        let password = self.secret(child(&at, "password"), &bmc.password, "BMC password");
        let boot_mac = self.boot_mac(l, name);
        let (hints, hints_at) = l.get("root_device_hints", |s| &s.root_device_hints);
        let hints = hints.cloned().unwrap_or_default();
        if let Some(dev) = &hints.device_name
            && !dev.starts_with("/dev/")
        {
            self.err(
                child(&hints_at, "device_name"),
                format!("device_name {dev:?} is not a /dev path"),
                Some("for example /dev/nvme0n1 or /dev/disk/by-path/…"),
            );
        }
        let bootc_image = self.bootc_image(l);
        Some(BareMetal {
            bootc_image,
            bmc_address: address,
            bmc_username: bmc.username.clone(),
            bmc_password: password?,
            disable_certificate_verification: bmc.disable_certificate_verification,
            boot_mac: boot_mac?,
            root_device_hints: hints,
            online: l.get("online", |s| &s.online).0.copied().unwrap_or(true),
        })
    }

    /// A bare-metal node's boot MAC (its own: `[defaults]` cannot give one).
    fn boot_mac(&mut self, l: Layered, name: &str) -> Option<String> {
        let Some(m) = &l.node.boot_mac else {
            self.err(
                keypath!["node", l.i],
                format!("bare-metal node {name} needs boot_mac"),
                Some("the MAC address of the NIC it network-boots from, e.g. boot_mac = \"8c:16:45:0a:1b:2c\""),
            );
            return None;
        };
        let mac = normalize_mac(m);
        if mac.is_none() {
            self.err(
                keypath!["node", l.i, "boot_mac"],
                format!("{m:?} is not a MAC address"),
                Some("six hex pairs, for example 8c:16:45:0a:1b:2c"),
            );
        }
        mac
    }

    /// The bootc container image Ironic installs, as `oci://registry/repo:tag`.
    fn bootc_image(&mut self, l: Layered) -> Option<String> {
        let (r, at) = l.get("bootc_image", |s| &s.bootc_image);
        let r = r?;
        let bare = r
            .trim_start_matches("oci://")
            .trim_start_matches("docker://");
        match crate::oci::registry::parse_reference(bare) {
            Ok(_) if bare.contains('/') => Some(format!("oci://{bare}")),
            _ => {
                self.err(
                    at,
                    format!("{r:?} is not a registry image reference"),
                    Some("registry/repository:tag, e.g. bootc_image = \"registry.lab:5000/edge/node:v1\""),
                );
                None
            }
        }
    }

    fn interface(
        &mut self,
        base: &KeyPath,
        ifname: &str,
        spec: &InterfaceSpec,
    ) -> Option<Interface> {
        let key = |k: &str| base.iter().cloned().chain(keypath![k]).collect::<KeyPath>();
        match (spec.dhcp, &spec.address) {
            (Some(true), None) => {
                if spec.gateway.is_some() {
                    self.err(
                        key("gateway"),
                        format!("{ifname} uses DHCP; a gateway needs a static address"),
                        None,
                    );
                }
                Some(Interface::Dhcp)
            }
            (Some(true), Some(_)) => {
                self.err(
                    key("address"),
                    format!("{ifname}: choose dhcp = true or a static address, not both"),
                    None,
                );
                None
            }
            (_, None) => {
                self.err(
                    base.clone(),
                    format!("{ifname} needs `dhcp = true` or an `address`"),
                    Some("for example { address = \"11.0.0.101/25\", gateway = \"11.0.0.1\" }"),
                );
                None
            }
            (_, Some(addr)) => {
                let net: IpNet = match addr.parse() {
                    Ok(n) => n,
                    Err(_) => {
                        let hint = if addr.parse::<IpAddr>().is_ok() {
                            "add the prefix length, for example 11.0.0.101/25"
                        } else {
                            "write the address with its prefix, for example 11.0.0.101/25"
                        };
                        self.err(
                            key("address"),
                            format!("{addr:?} is not an address with a prefix"),
                            Some(hint),
                        );
                        return None;
                    }
                };
                let host_part_ok = match net {
                    IpNet::V4(n) if n.prefix_len() < 31 => {
                        n.addr() != n.network() && n.addr() != n.broadcast()
                    }
                    _ => true,
                };
                if !host_part_ok {
                    self.err(
                        key("address"),
                        format!(
                            "{addr} is the network or broadcast address of its subnet, not a host"
                        ),
                        None,
                    );
                }
                let gateway = self.gateway(base, net, spec.gateway.as_deref());
                let dns = self.dns(base, &spec.dns);
                Some(Interface::Static {
                    address: net,
                    gateway,
                    dns,
                })
            }
        }
    }

    /// A static interface's gateway, which must be on its subnet and not its own address.
    fn gateway(&mut self, base: &KeyPath, net: IpNet, gateway: Option<&str>) -> Option<IpAddr> {
        let key = |k: &str| child(base, k);
        let g = gateway?;
        match g.parse::<IpAddr>() {
            Ok(ip) if net.contains(&ip) && ip != net.addr() => Some(ip),
            Ok(ip) if ip == net.addr() => {
                self.err(
                    key("gateway"),
                    format!("gateway {ip} is the node's own address"),
                    None,
                );
                None
            }
            Ok(ip) => {
                self.err(
                    key("gateway"),
                    format!(
                        "gateway {ip} is outside {} — the node could not reach it",
                        net.trunc()
                    ),
                    None,
                );
                None
            }
            Err(_) => {
                self.err(key("gateway"), format!("{g:?} is not an IP address"), None);
                None
            }
        }
    }

    /// A static interface's DNS servers.
    fn dns(&mut self, base: &KeyPath, servers: &[String]) -> Vec<IpAddr> {
        let mut dns = Vec::new();
        for (k, s) in servers.iter().enumerate() {
            match s.parse::<IpAddr>() {
                Ok(ip) => dns.push(ip),
                Err(_) => self.err(
                    child(&child(base, "dns"), k),
                    format!("DNS server {s:?} is not an IP address"),
                    None,
                ),
            }
        }
        dns
    }

    fn node_users(
        &mut self,
        f: &ClusterFile,
        node: &str,
        seed: &str,
        users: &[(UserSpec, Option<Secret>)],
        profile: &Profile,
        docker: bool,
    ) -> Vec<User> {
        let cluster_keys = &f.cluster.ssh_authorized_keys;
        let extra_groups = |mut g: Vec<String>| {
            if docker && !g.iter().any(|x| x == "docker") {
                g.push("docker".into());
            }
            g
        };
        if users.is_empty() {
            // No users listed: the image's own user, reachable only with the cluster's keys.
            return vec![User {
                name: profile.provision.default_user.clone(),
                groups: extra_groups(vec![]),
                sudo: true,
                shell: "/bin/bash".into(),
                ssh_authorized_keys: cluster_keys.clone(),
                password_hash: None,
            }];
        }
        users
            .iter()
            .map(|(u, plain)| {
                let mut keys = cluster_keys.clone();
                keys.extend(u.ssh_authorized_keys.iter().cloned());
                keys.dedup();
                let password_hash = u.password_hash.clone().or_else(|| {
                    plain.as_ref().map(|p| {
                        crate::plan::password::sha512_crypt(
                            p.expose(),
                            &ids::crypt_salt(seed, node, &u.name),
                        )
                    })
                });
                User {
                    name: u.name.clone(),
                    groups: extra_groups(u.groups.clone()),
                    sudo: u.sudo.unwrap_or(true),
                    shell: u.shell.clone().unwrap_or_else(|| "/bin/bash".into()),
                    ssh_authorized_keys: keys,
                    password_hash,
                }
            })
            .collect()
    }

    /// Gives each node its swarm role, once every node's addresses are known.
    fn swarm(&mut self, f: &ClusterFile, nodes: &mut [NodeConfig]) {
        let Some(s) = &f.swarm else {
            return;
        };
        let member = |f: &ClusterFile, name: &str| {
            let n = f.nodes.iter().find(|n| n.name.as_deref() == Some(name));
            n.and_then(|n| n.swarm).or(f.defaults.swarm).unwrap_or(true)
        };
        let members: Vec<String> = nodes
            .iter()
            .filter(|n| member(f, &n.name))
            .map(|n| n.name.clone())
            .collect();
        if s.managers.is_empty() {
            if !members.is_empty() {
                self.err(
                    keypath!["swarm", "managers"],
                    format!(
                        "swarm nodes ({}) have no manager to join",
                        members.join(", ")
                    ),
                    Some("name at least one node in managers = [\"…\"]"),
                );
            }
            return;
        }
        for (k, m) in s.managers.iter().enumerate() {
            if !nodes.iter().any(|n| &n.name == m)
                && !f
                    .nodes
                    .iter()
                    .any(|n| n.name.as_deref() == Some(m.as_str()))
            {
                self.err(
                    keypath!["swarm", "managers", k],
                    format!("manager {m:?} is not a node of this cluster"),
                    None,
                );
                return;
            }
        }
        let first = &s.managers[0];
        let first_ip = nodes
            .iter()
            .find(|n| &n.name == first)
            .and_then(|n| n.network.values().find_map(Interface::static_ip));
        let manager_addr = match (&s.advertise_addr, first_ip) {
            (Some(a), _) => {
                if a.parse::<IpAddr>().is_err() && !valid_hostname(a) {
                    self.err(
                        keypath!["swarm", "advertise_addr"],
                        format!("{a:?} is not an address or host name"),
                        None,
                    );
                }
                a.clone()
            }
            (None, Some(ip)) => ip.to_string(),
            (None, None) => {
                self.err(
                    keypath!["swarm"],
                    format!("the first manager {first} has no static address to advertise"),
                    Some("set advertise_addr in [swarm], or give the manager a static address"),
                );
                return;
            }
        };
        let has_workers = members.iter().any(|m| !s.managers.contains(m));
        let (token, manager_token) = self.swarm_tokens(s, has_workers);
        assign_swarm_roles(nodes, s, &members, &manager_addr, token, manager_token);
    }

    /// The worker and manager join tokens, where the swarm needs them.
    fn swarm_tokens(
        &mut self,
        s: &SwarmSection,
        has_workers: bool,
    ) -> (Option<Secret>, Option<Secret>) {
        let token = match &s.token {
            Some(t) => self.secret(keypath!["swarm", "token"], t, "swarm worker token"),
            None if has_workers => {
                self.err(
                    keypath!["swarm"],
                    "swarm workers need the worker join token",
                    Some("token = { file = \"secrets/swarm-worker.token\" } (from `docker swarm join-token -q worker`)"),
                );
                None
            }
            None => None,
        };
        let manager_token = match &s.manager_token {
            Some(t) => self.secret(keypath!["swarm", "manager_token"], t, "swarm manager token"),
            None if s.managers.len() > 1 => {
                self.err(
                    keypath!["swarm", "managers"],
                    "more than one manager needs manager_token for the others to join",
                    None,
                );
                None
            }
            None => None,
        };
        (token, manager_token)
    }
}

/// Gives each swarm node its role: the first manager inits, the others join `manager_addr` with
/// their token.
fn assign_swarm_roles(
    nodes: &mut [NodeConfig],
    s: &SwarmSection,
    members: &[String],
    manager_addr: &str,
    token: Option<Secret>,
    manager_token: Option<Secret>,
) {
    let first = &s.managers[0];
    for node in nodes.iter_mut() {
        if !members.contains(&node.name) && !s.managers.contains(&node.name) {
            continue;
        }
        // Each node advertises its own static address, or its first interface when on DHCP
        // (dockerd accepts an interface name there).
        let own = node
            .network
            .iter()
            .find_map(|(_, i)| i.static_ip().map(|ip| ip.to_string()))
            .or_else(|| node.network.keys().next().cloned())
            .unwrap_or_else(|| "eth0".into());
        if &node.name == first {
            let advertise_addr = s.advertise_addr.clone().unwrap_or(own);
            node.swarm = Some(SwarmRole::Init { advertise_addr });
        } else {
            let as_manager = s.managers.contains(&node.name);
            let t = if as_manager {
                manager_token.clone()
            } else {
                token.clone()
            };
            if let Some(token) = t {
                node.swarm = Some(SwarmRole::Join {
                    manager_addr: manager_addr.to_string(),
                    advertise_addr: own,
                    as_manager,
                    token,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(valid_hostname("ceil-one"));
        assert!(valid_hostname("a.example.org"));
        assert!(!valid_hostname("-bad"));
        assert!(!valid_hostname("under_score"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname(&"a".repeat(64)));
    }

    #[test]
    fn usernames_and_hashes() {
        assert!(valid_username("admin"));
        assert!(!valid_username("Admin"));
        assert!(!valid_username("1admin"));
        assert!(valid_crypt_hash("$6$abcdefgh$0123456789abcdefghijklmnop"));
        assert!(!valid_crypt_hash("hunter2"));
    }
}
