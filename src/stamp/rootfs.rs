//! Configuring a node by writing straight into its ext4 root: for images without cloud-init
//! (postmarketOS phones), everything a node is becomes files, links and account entries before
//! the image is flashed.
//!
//! What the image already is decides the details, and is read from it rather than assumed: OpenRC
//! or systemd (which symlink enables a service), the accounts in /etc/passwd, /etc/group and
//! /etc/shadow (uids, groups, whether a user still has a release's well-known password), and which
//! services are installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::fs::ext4_write::{self, Entry};
use crate::plan::node::User;
use crate::plan::password;
use crate::plan::stamp_plan::{RootFile, RootfsPlan, SWARM_SCRIPT, SWARM_UNIT, Service, StampPlan};

/// How services are enabled in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    OpenRc,
    Systemd,
}

/// The parts of the image the plan depends on.
struct ImageFacts {
    init: Init,
    present: BTreeSet<String>,
    passwd: String,
    group: String,
    shadow: String,
}

const PROBES: &[&str] = &[
    "/sbin/openrc",
    "/usr/lib/systemd/systemd",
    "/lib/systemd/systemd",
    "/etc/init.d/sshd",
    "/etc/init.d/docker",
    "/etc/init.d/local",
    "/usr/lib/systemd/system/sshd.service",
    "/usr/lib/systemd/system/ssh.service",
    "/lib/systemd/system/ssh.service",
    "/usr/lib/systemd/system/docker.service",
    "/lib/systemd/system/docker.service",
    "/bin/bash",
    "/bin/ash",
    "/bin/sh",
    "/etc/NetworkManager",
];

fn facts(image: &Path, offset: u64) -> Result<ImageFacts> {
    let st = ext4_write::stat_all(image, offset, PROBES)?;
    let present: BTreeSet<String> = st.keys().cloned().collect();
    let init = if present.contains("/sbin/openrc") {
        Init::OpenRc
    } else if present.contains("/usr/lib/systemd/systemd")
        || present.contains("/lib/systemd/systemd")
    {
        Init::Systemd
    } else {
        bail!(
            "the image's root has neither OpenRC (/sbin/openrc) nor systemd; kiln cannot enable services in it"
        );
    };
    let text = |p: &str| -> Result<String> {
        let b =
            ext4_write::read(image, offset, p)?.with_context(|| format!("the image has no {p}"))?;
        String::from_utf8(b).with_context(|| format!("{p} in the image is not text"))
    };
    Ok(ImageFacts {
        init,
        present,
        passwd: text("/etc/passwd")?,
        group: text("/etc/group")?,
        shadow: text("/etc/shadow")?,
    })
}

fn file(path: &str, bytes: impl Into<Vec<u8>>, meta: Option<(u32, u32, u32)>) -> Entry {
    Entry::File {
        path: path.into(),
        bytes: bytes.into(),
        meta,
    }
}

/// `name:…` lines of a colon-separated database, by name.
fn by_name(db: &str) -> BTreeMap<String, Vec<String>> {
    db.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<String> = l.split(':').map(str::to_string).collect();
            (f[0].clone(), f)
        })
        .collect()
}

fn join_db(order: &[String], rows: &BTreeMap<String, Vec<String>>) -> String {
    order
        .iter()
        .filter_map(|n| rows.get(n))
        .map(|f| f.join(":") + "\n")
        .collect()
}

fn names_in_order(db: &str) -> Vec<String> {
    db.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(':').next().map(str::to_string))
        .collect()
}

/// The entries that make a rootfs node's plan out of the image at `root_offset` in `image`.
pub fn entries(plan: &StampPlan, image: &Path, root_offset: u64) -> Result<Vec<Entry>> {
    let r = plan
        .rootfs
        .as_ref()
        .with_context(|| format!("node {} is not planned for a rootfs image", plan.node))?;
    let f = facts(image, root_offset)?;
    let mut out = Vec::new();

    // Identity.
    for (path, text) in &r.identity {
        out.push(file(path, text.as_str(), None));
    }
    if let Some(zone) = &r.localtime {
        out.push(Entry::Symlink {
            path: "/etc/localtime".into(),
            target: zone.clone(),
        });
    }

    // Accounts.
    let (accounts, homes) = accounts(r, &plan.profile, &f)?;
    out.extend(accounts);
    out.extend(homes);

    // Services.
    for s in &r.services {
        out.push(enable(s, &f)?);
    }

    // Networks, as NetworkManager keyfiles.
    if f.present.contains("/etc/NetworkManager") {
        out.push(Entry::Dir {
            path: "/etc/NetworkManager/system-connections".into(),
            mode: 0o700,
            uid: 0,
            gid: 0,
        });
        for k in &r.keyfiles {
            out.push(file(
                &format!(
                    "/etc/NetworkManager/system-connections/{}.nmconnection",
                    k.name
                ),
                k.text.as_str(),
                Some((0o600, 0, 0)),
            ));
        }
    } else if r.network_required {
        bail!(
            "the image has no NetworkManager (/etc/NetworkManager), so kiln cannot configure its network"
        );
    }

    // The swarm, as a first-boot job.
    if let Some((env, token)) = &r.swarm {
        out.extend(swarm(env, token.as_deref(), &f)?);
    }

    // Overlays, written into the root with their modes and owners, their services enabled.
    out.extend(owned_files(&plan.root_files, &f.passwd, &f.group)?);
    for s in &r.overlay_services {
        out.push(enable(s, &f)?);
    }
    Ok(out)
}

/// The link that enables `service` at boot, by the image's init.
fn enable(service: &Service, f: &ImageFacts) -> Result<Entry> {
    let svc = &service.name;
    match f.init {
        Init::OpenRc => {
            let script = format!("/etc/init.d/{svc}");
            if !f.present.contains(&script) {
                bail!(
                    "the image has no {script}; install {svc} in it (pmbootstrap install --add …)"
                );
            }
            Ok(Entry::Symlink {
                path: format!("/etc/runlevels/default/{svc}"),
                target: script,
            })
        }
        Init::Systemd => {
            for unit in &service.units {
                for dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
                    let p = format!("{dir}/{unit}");
                    if f.present.contains(&p) {
                        return Ok(Entry::Symlink {
                            path: format!("/etc/systemd/system/multi-user.target.wants/{unit}"),
                            target: p,
                        });
                    }
                }
            }
            bail!("the image has no {} unit", service.units.join(" or "))
        }
    }
}

/// Root files as entries, owners resolved through the image's own accounts.
fn owned_files(files: &[RootFile], passwd: &str, group: &str) -> Result<Vec<Entry>> {
    let pw = by_name(passwd);
    let gr = by_name(group);
    files
        .iter()
        .map(|of| {
            let name = &of.overlay;
            let uid = id_of(&pw, &of.owner, 2)
                .with_context(|| format!("overlay {name}: no user {} in the image", of.owner))?;
            let gid = id_of(&gr, &of.group, 2)
                .with_context(|| format!("overlay {name}: no group {} in the image", of.group))?;
            Ok(file(&of.path, of.bytes.clone(), Some((of.mode, uid, gid))))
        })
        .collect()
}

/// The plan's root files for a cloud-init image whose profile puts overlays into the root
/// (services are still enabled by cloud-init on first boot).
pub fn overlay_entries(plan: &StampPlan, image: &Path, root_offset: u64) -> Result<Vec<Entry>> {
    // A root without account files still has root (uid 0), which is all most overlays need.
    let text = |p: &str| -> Result<String> {
        Ok(
            String::from_utf8_lossy(&ext4_write::read(image, root_offset, p)?.unwrap_or_default())
                .into_owned(),
        )
    };
    owned_files(
        &plan.root_files,
        &text("/etc/passwd")?,
        &text("/etc/group")?,
    )
}

fn id_of(db: &BTreeMap<String, Vec<String>>, name: &str, field: usize) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    match db.get(name) {
        Some(row) => row.get(field)?.parse().ok(),
        None if name == "root" => Some(0),
        None => None,
    }
}

/// A colon-separated account database (/etc/passwd, /etc/group, /etc/shadow): its rows by name,
/// and the names in file order (new accounts go at the end).
struct Db {
    rows: BTreeMap<String, Vec<String>>,
    order: Vec<String>,
}

impl Db {
    fn parse(text: &str) -> Db {
        Db {
            rows: by_name(text),
            order: names_in_order(text),
        }
    }

    fn add(&mut self, row: Vec<String>) {
        self.order.push(row[0].clone());
        self.rows.insert(row[0].clone(), row);
    }

    fn text(&self) -> String {
        join_db(&self.order, &self.rows)
    }
}

/// /etc/passwd, /etc/group and /etc/shadow with the node's users, and their homes and keys.
fn accounts(r: &RootfsPlan, profile: &str, f: &ImageFacts) -> Result<(Vec<Entry>, Vec<Entry>)> {
    let mut pw = Db::parse(&f.passwd);
    let mut gr = Db::parse(&f.group);
    let mut sh = Db::parse(&f.shadow);
    let mut homes = Vec::new();
    let used_ids: BTreeSet<u32> = pw
        .rows
        .values()
        .chain(gr.rows.values())
        .filter_map(|r| r.get(2)?.parse().ok())
        .collect();
    let mut free_ids = (10000..).filter(|i| !used_ids.contains(i));

    for u in &r.users {
        let (uid, gid, home) = match pw.rows.get(&u.name) {
            Some(r) => (
                r[2].parse::<u32>()?,
                r[3].parse::<u32>()?,
                r.get(5)
                    .cloned()
                    .unwrap_or_else(|| format!("/home/{}", u.name)),
            ),
            None => {
                let id = free_ids.next().context("no free user id in the image")?;
                let home = add_account(&mut pw, &mut gr, u, id, f);
                homes.push(Entry::Dir {
                    path: home.clone(),
                    mode: 0o700,
                    uid: id,
                    gid: id,
                });
                (id, id, home)
            }
        };
        // Groups: the listed ones that exist, wheel for sudo (doas on postmarketOS), docker.
        let mut want: Vec<&str> = u.groups.iter().map(String::as_str).collect();
        if u.sudo {
            want.push("wheel");
        }
        if r.docker_group {
            want.push("docker");
        }
        join_groups(&mut gr, &u.name, &want);
        set_password(&mut sh, u);
        if !u.ssh_authorized_keys.is_empty() {
            homes.push(Entry::Dir {
                path: format!("{home}/.ssh"),
                mode: 0o700,
                uid,
                gid,
            });
            homes.push(file(
                &format!("{home}/.ssh/authorized_keys"),
                u.ssh_authorized_keys.join("\n") + "\n",
                Some((0o600, uid, gid)),
            ));
        }
    }
    refuse_known_passwords(&sh, r, profile)?;

    let accounts = vec![
        file("/etc/passwd", pw.text(), None),
        file("/etc/group", gr.text(), None),
        file("/etc/shadow", sh.text(), None),
    ];
    Ok((accounts, homes))
}

/// Adds `u` to passwd (with a shell the image has) and its own group; returns its home.
fn add_account(pw: &mut Db, gr: &mut Db, u: &User, id: u32, f: &ImageFacts) -> String {
    let shell = [u.shell.as_str(), "/bin/ash", "/bin/sh"]
        .into_iter()
        .find(|s| f.present.contains(*s))
        .unwrap_or("/bin/sh")
        .to_string();
    let home = format!("/home/{}", u.name);
    pw.add(vec![
        u.name.clone(),
        "x".into(),
        id.to_string(),
        id.to_string(),
        u.name.clone(),
        home.clone(),
        shell,
    ]);
    if !gr.rows.contains_key(&u.name) {
        gr.add(vec![
            u.name.clone(),
            "x".into(),
            id.to_string(),
            String::new(),
        ]);
    }
    home
}

/// Makes `user` a member of each of `groups` the image has.
fn join_groups(gr: &mut Db, user: &str, groups: &[&str]) {
    for g in groups {
        if let Some(row) = gr.rows.get_mut(*g) {
            while row.len() < 4 {
                row.push(String::new());
            }
            let mut members: Vec<String> = row[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            if !members.iter().any(|m| m == user) {
                members.push(user.to_string());
            }
            row[3] = members.join(",");
        }
    }
}

/// The user's shadow entry: the cluster's hash, or locked (keys only).
fn set_password(sh: &mut Db, u: &User) {
    let hash = u.password_hash.clone().unwrap_or_else(|| "!".into());
    if !sh.rows.contains_key(&u.name) {
        sh.add(vec![
            u.name.clone(),
            String::new(),
            "0".into(),
            "0".into(),
            "99999".into(),
            "7".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    if let Some(row) = sh.rows.get_mut(&u.name) {
        row[1] = hash;
    }
}

/// A release's well-known password must not survive on a user the cluster file leaves alone.
fn refuse_known_passwords(sh: &Db, r: &RootfsPlan, profile: &str) -> Result<()> {
    let listed: BTreeSet<&str> = r.users.iter().map(|u| u.name.as_str()).collect();
    for (name, row) in &sh.rows {
        if listed.contains(name.as_str()) {
            continue;
        }
        let Some(hash) = row.get(1) else { continue };
        for known in &r.known_default_passwords {
            if password::matches(known, hash) == Some(true) {
                bail!(
                    "the image's user {name:?} still has the {profile} default password {known:?}; kiln will not build a node \
                     with a well-known password. Add it to the cluster file with a password: \
                     [[users]] name = \"{name}\", password_hash = \"$6$…\" (or password = {{ file = … }})"
                );
            }
        }
    }
    Ok(())
}

/// The swarm job's files: the env and token the plan made, the helper, and what starts it.
fn swarm(env: &str, token: Option<&str>, f: &ImageFacts) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    if let Some(token) = token {
        out.push(file("/etc/kiln/swarm.token", token, Some((0o600, 0, 0))));
    }
    out.insert(
        0,
        Entry::Dir {
            path: "/etc/kiln".into(),
            mode: 0o700,
            uid: 0,
            gid: 0,
        },
    );
    out.push(file("/etc/kiln/swarm.env", env, Some((0o600, 0, 0))));
    out.push(file(
        "/usr/local/sbin/kiln-swarm",
        SWARM_SCRIPT,
        Some((0o755, 0, 0)),
    ));
    match f.init {
        Init::OpenRc => {
            // local.d runs at the end of boot; the job goes to the background so boot finishes.
            out.push(file(
                "/etc/local.d/kiln-swarm.start",
                "#!/bin/sh\n# Written by kiln: join the Docker swarm (once; see /usr/local/sbin/kiln-swarm).\n\
                 /usr/local/sbin/kiln-swarm >>/var/log/kiln-swarm.log 2>&1 &\n",
                Some((0o755, 0, 0)),
            ));
            if !f.present.contains("/etc/init.d/local") {
                bail!(
                    "the image has no /etc/init.d/local (OpenRC's local service) for the swarm job"
                );
            }
            out.push(Entry::Symlink {
                path: "/etc/runlevels/default/local".into(),
                target: "/etc/init.d/local".into(),
            });
        }
        Init::Systemd => {
            out.push(file(
                "/etc/systemd/system/kiln-swarm.service",
                SWARM_UNIT,
                Some((0o644, 0, 0)),
            ));
            out.push(Entry::Symlink {
                path: "/etc/systemd/system/multi-user.target.wants/kiln-swarm.service".into(),
                target: "/etc/systemd/system/kiln-swarm.service".into(),
            });
        }
    }
    Ok(out)
}
