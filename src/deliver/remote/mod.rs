//! Installing an overlay onto a live host over the system `ssh` and `scp`, so `~/.ssh/config`,
//! agents and jump hosts work as they do for the user.
//!
//! Plan, then apply: kiln probes the target (OS, init system, Python), asks it for the digest and
//! mode of every file the overlay owns, and computes the steps — uploads, mode changes, packages,
//! services — as plain data. `--dry-run` prints them; otherwise they are applied, and a second run
//! finds nothing to do and says so.

pub mod ssh;

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Context, Result, bail};

use crate::plan::node::InputFile;
use crate::plan::overlay::{Overlay, parse_mode};
use ssh::Ssh;

/// What the target is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub kernel: String,
    pub os: String,
    pub os_like: String,
    pub pid1: String,
    pub python: Option<String>,
    pub uid: u32,
}

impl Facts {
    pub fn parse(text: &str) -> Result<Facts> {
        let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| kv.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
        Ok(Facts {
            kernel: get("kernel"),
            os: get("os"),
            os_like: get("os_like"),
            pid1: get("pid1"),
            python: Some(get("python")).filter(|p| !p.is_empty()),
            uid: get("uid")
                .parse()
                .context("the target did not report its uid")?,
        })
    }

    pub fn systemd(&self) -> bool {
        self.pid1 == "systemd"
    }

    fn family(&self) -> Option<&'static str> {
        let all = format!("{} {}", self.os, self.os_like);
        if all
            .split_whitespace()
            .any(|w| w == "debian" || w == "ubuntu" || w == "raspbian")
        {
            Some("debian")
        } else if all
            .split_whitespace()
            .any(|w| w == "alpine" || w == "postmarketos")
        {
            Some("alpine")
        } else {
            None
        }
    }
}

/// The shell snippet that reports `Facts`.
pub const PROBE: &str = "echo kernel=$(uname -s); . /etc/os-release 2>/dev/null; echo os=$ID; echo os_like=$ID_LIKE; \
echo pid1=$(cat /proc/1/comm 2>/dev/null); echo python=$(command -v python3); echo uid=$(id -u)";

/// One file the overlay puts on the target, with where it goes under `--root`.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub path: String,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    pub content: InputFile,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Upload {
        path: String,
        mode: u32,
        owner: String,
        group: String,
        why: &'static str,
    },
    SetMode {
        path: String,
        mode: u32,
        owner: String,
        group: String,
    },
    InstallPackages {
        manager: &'static str,
        packages: Vec<String>,
    },
    /// Create (or complete) a Python venv with pinned requirements.
    Venv {
        path: String,
        requirements: Vec<String>,
    },
    DaemonReload,
    Enable(String),
    Restart(String),
    Start(String),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Upload {
                path,
                mode,
                owner,
                group,
                why,
            } => write!(f, "upload {path} ({mode:04o} {owner}:{group}, {why})"),
            Step::SetMode {
                path,
                mode,
                owner,
                group,
            } => write!(f, "set {path} to {mode:04o} {owner}:{group}"),
            Step::InstallPackages { manager, packages } => {
                write!(f, "install packages with {manager}: {}", packages.join(" "))
            }
            Step::Venv { path, requirements } => {
                write!(f, "python venv {path} with {}", requirements.join(" "))
            }
            Step::DaemonReload => write!(f, "systemctl daemon-reload"),
            Step::Enable(s) => write!(f, "systemctl enable {s}"),
            Step::Restart(s) => write!(f, "systemctl restart {s}"),
            Step::Start(s) => write!(f, "systemctl start {s}"),
        }
    }
}

/// The files to put in place: the overlay's, and the user's config file if given.
pub fn wanted(overlay: &Overlay, config: Option<InputFile>, root: &str) -> Result<Vec<Wanted>> {
    let prefix = root.trim_end_matches('/');
    let mut v: Vec<Wanted> = overlay
        .files
        .iter()
        .map(|f| Wanted {
            path: format!("{prefix}{}", f.target),
            mode: f.mode,
            owner: f.owner.clone(),
            group: f.group.clone(),
            content: f.content.clone(),
        })
        .collect();
    if let Some(cfg) = config {
        let target = overlay
            .manifest
            .config
            .as_ref()
            .with_context(|| format!("overlay {} takes no --config", overlay.name))?;
        v.push(Wanted {
            path: format!("{prefix}{}", target.path),
            mode: parse_mode(&target.mode)?,
            owner: target.owner.clone(),
            group: target.group.clone(),
            content: cfg,
        });
    }
    for w in &v {
        if w.path.contains(['\'', '\n', '\\'])
            || w.owner.contains(['\'', ' '])
            || w.group.contains(['\'', ' '])
        {
            bail!(
                "{} cannot be installed safely over ssh (quotes or newlines in its name or owner)",
                w.path
            );
        }
    }
    Ok(v)
}

/// The shell snippet that reports `<sha256> <mode>:<owner>:<group> <path>` (or `- - <path>`).
pub fn state_query(files: &[Wanted]) -> String {
    let list: Vec<String> = files.iter().map(|w| format!("'{}'", w.path)).collect();
    format!(
        "for f in {}; do if [ -f \"$f\" ]; then printf '%s %s %s\\n' \"$(sha256sum < \"$f\" | cut -d' ' -f1)\" \"$(stat -c %a:%U:%G \"$f\")\" \"$f\"; else printf -- '- - %s\\n' \"$f\"; fi; done",
        list.join(" ")
    )
}

/// Computes the steps from the target's facts and file states.
/// The venv's path under `root`, and the shell snippet that lists what is installed in it.
pub fn venv_query(overlay: &Overlay, root: &str) -> Option<(String, String)> {
    let v = overlay.manifest.venv.as_ref()?;
    let path = format!("{}{}", root.trim_end_matches('/'), v.path);
    let q = format!(
        "if [ -x '{path}/bin/python' ]; then '{path}/bin/python' -m pip freeze --all 2>/dev/null; fi"
    );
    Some((path, q))
}

/// Requirements (`name==version`) that `pip freeze` output lacks; names compare as pip does.
pub fn missing_requirements(wanted: &[String], freeze: &str) -> Vec<String> {
    let norm = |s: &str| s.trim().to_ascii_lowercase().replace(['_', '.'], "-");
    let have: std::collections::BTreeSet<String> = freeze.lines().map(norm).collect();
    wanted
        .iter()
        .filter(|r| !have.contains(&norm(r)))
        .cloned()
        .collect()
}

pub struct Observed<'a> {
    pub states: &'a str,
    pub missing_packages: Vec<String>,
    /// The venv path and the requirements it lacks.
    pub venv: Option<(String, Vec<String>)>,
    pub service_states: &'a BTreeMap<String, (bool, bool)>,
}

pub fn plan(
    overlay: &Overlay,
    files: &[Wanted],
    facts: &Facts,
    seen: Observed,
    staged: bool,
) -> Vec<Step> {
    let Observed {
        states,
        missing_packages,
        venv,
        service_states,
    } = seen;
    let mut steps = Vec::new();
    let (mut changed_any, units_changed) = file_steps(files, states, &mut steps);
    if !missing_packages.is_empty() {
        let manager = if facts.family() == Some("alpine") {
            "apk"
        } else {
            "apt-get"
        };
        steps.push(Step::InstallPackages {
            manager,
            packages: missing_packages,
        });
    }
    if let Some((path, missing)) = venv
        && !missing.is_empty()
    {
        let all = overlay
            .manifest
            .venv
            .as_ref()
            .map(|v| v.requirements.clone())
            .unwrap_or_default();
        steps.push(Step::Venv {
            path,
            requirements: all,
        });
        changed_any = true;
    }
    if facts.systemd() && !staged {
        service_steps(
            overlay,
            service_states,
            units_changed,
            changed_any,
            &mut steps,
        );
    }
    steps
}

/// Uploads for the files whose contents differ from `states` (the target's `state_query`
/// output), mode changes for the rest that need them; returns whether any file changed, and
/// whether a systemd unit did.
fn file_steps(files: &[Wanted], states: &str, steps: &mut Vec<Step>) -> (bool, bool) {
    let found: BTreeMap<&str, (&str, &str)> = states
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let (h, m, p) = (it.next()?, it.next()?, it.next()?);
            Some((p, (h, m)))
        })
        .collect();
    let mut changed_any = false;
    let mut units_changed = false;
    for w in files {
        let want_meta = format!("{:o}:{}:{}", w.mode, w.owner, w.group);
        match found.get(w.path.as_str()) {
            Some((h, m)) if *h == w.content.sha256 => {
                if *m != want_meta {
                    steps.push(Step::SetMode {
                        path: w.path.clone(),
                        mode: w.mode,
                        owner: w.owner.clone(),
                        group: w.group.clone(),
                    });
                }
            }
            other => {
                let why = if matches!(other, Some(("-", _)) | None) {
                    "new"
                } else {
                    "changed"
                };
                steps.push(Step::Upload {
                    path: w.path.clone(),
                    mode: w.mode,
                    owner: w.owner.clone(),
                    group: w.group.clone(),
                    why,
                });
                changed_any = true;
                units_changed |= w.path.contains("/systemd/");
            }
        }
    }
    (changed_any, units_changed)
}

/// A daemon-reload if units changed; then each service enabled, and restarted if anything changed
/// or started if it is not running.
fn service_steps(
    overlay: &Overlay,
    service_states: &BTreeMap<String, (bool, bool)>,
    units_changed: bool,
    changed_any: bool,
    steps: &mut Vec<Step>,
) {
    if units_changed {
        steps.push(Step::DaemonReload);
    }
    for svc in &overlay.manifest.services {
        let (enabled, active) = service_states.get(svc).copied().unwrap_or((false, false));
        if !enabled {
            steps.push(Step::Enable(svc.clone()));
        }
        if changed_any {
            steps.push(Step::Restart(svc.clone()));
        } else if !active {
            steps.push(Step::Start(svc.clone()));
        }
    }
}

/// The packages the overlay needs on this target's family.
pub fn packages_for(overlay: &Overlay, facts: &Facts) -> Vec<String> {
    match facts.family() {
        Some("alpine") => overlay.manifest.packages.alpine.clone(),
        Some("debian") => overlay.manifest.packages.debian.clone(),
        _ => Vec::new(),
    }
}

/// The shell snippet that prints the packages of `list` that are not installed.
pub fn missing_packages_query(facts: &Facts, list: &[String]) -> Option<String> {
    if list.is_empty() {
        return None;
    }
    let names = list.join(" ");
    match facts.family() {
        Some("debian") => Some(format!(
            "for p in {names}; do dpkg-query -W -f='${{Status}}' \"$p\" 2>/dev/null | grep -q 'install ok installed' || echo \"$p\"; done"
        )),
        Some("alpine") => Some(format!(
            "for p in {names}; do apk info -e \"$p\" >/dev/null 2>&1 || echo \"$p\"; done"
        )),
        _ => None,
    }
}

/// Runs `steps` on the target. Uploads go through a private temporary directory and `install`,
/// so a file is replaced whole, with its mode and owner, or not at all.
pub fn apply(ssh: &Ssh, steps: &[Step], files: &[Wanted], sudo: &str) -> Result<()> {
    let uploads: Vec<&Wanted> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Upload { path, .. } => files.iter().find(|w| &w.path == path),
            _ => None,
        })
        .collect();
    if !uploads.is_empty() {
        let tmp = ssh.run("umask 077 && mktemp -d")?.trim().to_string();
        let local = tempfile::tempdir()?;
        let mut names = Vec::new();
        for (i, w) in uploads.iter().enumerate() {
            let name = format!("f{i}");
            std::fs::write(local.path().join(&name), &w.content.bytes)?;
            names.push(local.path().join(&name));
        }
        ssh.copy(&names, &tmp)?;
        let mut script = String::from("set -e\n");
        for (i, w) in uploads.iter().enumerate() {
            script.push_str(&format!(
                "{sudo}install -D -m {:04o} -o '{}' -g '{}' '{tmp}/f{i}' '{}'\n",
                w.mode, w.owner, w.group, w.path
            ));
        }
        script.push_str(&format!("rm -rf '{tmp}'\n"));
        ssh.run(&script).context("installing the uploaded files")?;
    }
    for s in steps {
        let cmd = match s {
            Step::Upload { .. } => continue,
            Step::SetMode {
                path,
                mode,
                owner,
                group,
            } => {
                format!("{sudo}chmod {mode:04o} '{path}' && {sudo}chown '{owner}:{group}' '{path}'")
            }
            Step::InstallPackages {
                manager: "apk",
                packages,
            } => format!("{sudo}apk add --no-cache {}", packages.join(" ")),
            Step::InstallPackages { packages, .. } => {
                format!(
                    "{sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y -q {}",
                    packages.join(" ")
                )
            }
            Step::Venv { path, requirements } => format!(
                "{sudo}python3 -m venv '{path}' && {sudo}'{path}/bin/pip' install -q --disable-pip-version-check {}",
                shell_join(requirements)
            ),
            Step::DaemonReload => format!("{sudo}systemctl daemon-reload"),
            Step::Enable(u) => format!("{sudo}systemctl enable '{u}'"),
            Step::Restart(u) => format!("{sudo}systemctl restart '{u}'"),
            Step::Start(u) => format!("{sudo}systemctl start '{u}'"),
        };
        ssh.run(&cmd)
            .with_context(|| format!("on the target: {s}"))?;
    }
    Ok(())
}

/// Quotes an argv for the remote shell.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pid1: &str) -> Facts {
        Facts::parse(&format!(
            "kernel=Linux\nos=debian\nos_like=\npid1={pid1}\npython=/usr/bin/python3\nuid=0\n"
        ))
        .unwrap()
    }

    fn overlay() -> Overlay {
        crate::plan::overlay::load("docker-daemon", &[]).unwrap()
    }

    #[test]
    fn nothing_to_do_when_everything_matches() {
        let o = overlay();
        let files = wanted(&o, None, "").unwrap();
        let states: String = files
            .iter()
            .map(|w| format!("{} {:o}:root:root {}\n", w.content.sha256, w.mode, w.path))
            .collect();
        let services = o
            .manifest
            .services
            .iter()
            .map(|s| (s.clone(), (true, true)))
            .collect();
        assert!(
            plan(
                &o,
                &files,
                &facts("systemd"),
                Observed {
                    states: &states,
                    missing_packages: vec![],
                    venv: None,
                    service_states: &services,
                },
                false
            )
            .is_empty()
        );
    }

    #[test]
    fn changes_and_missing_files_are_uploaded_and_services_restarted() {
        let o = overlay();
        let files = wanted(&o, None, "/stage").unwrap();
        assert!(files[0].path.starts_with("/stage/etc/docker/"));
        let states = format!("- - {}\n", files[0].path);
        let none = BTreeMap::new();
        let steps = plan(
            &o,
            &files,
            &facts("systemd"),
            Observed {
                states: &states,
                missing_packages: vec!["docker.io".into()],
                venv: None,
                service_states: &none,
            },
            false,
        );
        assert!(matches!(&steps[0], Step::Upload { why: "new", .. }));
        assert!(steps.contains(&Step::InstallPackages {
            manager: "apt-get",
            packages: vec!["docker.io".into()]
        }));
        assert!(steps.contains(&Step::Restart("docker.service".into())));
        // Without systemd as PID 1 there is nothing to enable or start.
        let steps = plan(
            &o,
            &files,
            &facts("init"),
            Observed {
                states: &states,
                missing_packages: vec![],
                venv: None,
                service_states: &none,
            },
            false,
        );
        assert!(steps.iter().all(|s| matches!(s, Step::Upload { .. })));
    }

    #[test]
    fn venv_requirements_compare_as_pip_names_them() {
        let freeze = "Flask==3.1.3\nsushy_tools==2.2.0\nplugp100==6.0.2\n";
        let want = vec![
            "sushy-tools==2.2.0".to_string(),
            "plugp100==6.0.2".to_string(),
            "sushy==5.14.0".to_string(),
        ];
        assert_eq!(missing_requirements(&want, freeze), vec!["sushy==5.14.0"]);
        assert!(missing_requirements(&want[..2], freeze).is_empty());
    }

    #[test]
    fn quoting() {
        assert_eq!(
            shell_join(&["a b".into(), "it's".into()]),
            "'a b' 'it'\\''s'"
        );
    }
}
