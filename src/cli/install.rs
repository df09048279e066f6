//! `kiln install`: put an overlay onto a live host over ssh — idempotent, with `--dry-run`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use kiln::deliver::remote::{self, Facts, ssh::Ssh};
use kiln::plan::node::InputFile;
use kiln::plan::overlay::{self, Overlay};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The overlay (see --list).
    pub overlay: Option<String>,
    /// user@host, as ssh takes it (~/.ssh/config applies).
    #[arg(long, short = 't')]
    pub target: Option<String>,
    /// The overlay's configuration file, installed where its manifest says (mode 0600).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the steps without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// List the overlays kiln knows.
    #[arg(long)]
    pub list: bool,
    /// Extra ssh option, KEY=VALUE (repeatable), e.g. Port=2222.
    #[arg(long = "ssh-option", short = 'o', value_name = "SSH_OPTION")]
    pub ssh_options: Vec<String>,
    /// Install under this directory of the target instead of / (staging; services untouched).
    #[arg(long)]
    pub root: Option<String>,
}

fn dirs() -> Vec<PathBuf> {
    kiln::plan::resolve::search_dirs(Path::new("."), "overlays")
}

pub fn run(a: Args) -> Result<()> {
    if a.list {
        return list();
    }
    let (Some(name), Some(target)) = (a.overlay.as_deref(), a.target.as_deref()) else {
        bail!(
            "usage: kiln install OVERLAY --target user@host [--config FILE] [--dry-run]   (kiln install --list shows overlays)"
        );
    };
    let ov = kiln::plan::cni::overlay_or_folder(name, &dirs())?;
    let ssh = Ssh::new(target, &a.ssh_options)?;

    let facts = probe(&ssh, target)?;
    let sudo = if facts.uid == 0 { "" } else { "sudo -n " };

    let config = read_config(&a, &ov)?;
    let root = a.root.clone().unwrap_or_default();
    let staged = !root.is_empty();
    let files = remote::wanted(&ov, config, &root)?;
    let states = ssh.run(&remote::state_query(&files))?;
    let pkgs = remote::packages_for(&ov, &facts);
    let missing = missing_packages(&ssh, &facts, &pkgs)?;
    let services = service_states(&ssh, &ov, &facts, staged)?;
    let venv = venv_gaps(&ssh, &ov, &root)?;
    let steps = remote::plan(
        &ov,
        &files,
        &facts,
        remote::Observed {
            states: &states,
            missing_packages: missing,
            venv,
            service_states: &services,
        },
        staged,
    );

    if steps.is_empty() {
        println!("{name} on {target}: no changes — everything is in place");
    } else {
        for s in &steps {
            println!("{} {s}", if a.dry_run { "would" } else { "->" });
        }
        if a.dry_run {
            println!("dry run: nothing was changed on {target}");
            return Ok(());
        }
        remote::apply(&ssh, &steps, &files, sudo)?;
        println!(
            "{name} on {target}: {} change{}",
            steps.len(),
            if steps.len() == 1 { "" } else { "s" }
        );
    }
    if a.dry_run {
        return Ok(());
    }
    start_report(&ssh, &ov, &facts, target, &root, sudo)
}

/// `--list`: every overlay kiln knows, with its description and where it was found.
fn list() -> Result<()> {
    for (name, origin) in overlay::list(&dirs()) {
        let o = overlay::load(&name, &dirs())?;
        println!("{name:<18} {}  ({origin})", o.manifest.description);
    }
    Ok(())
}

/// Probes `target` over ssh, refuses anything but Linux, and prints what it found.
fn probe(ssh: &Ssh, target: &str) -> Result<Facts> {
    let facts = Facts::parse(
        &ssh.run(remote::PROBE)
            .with_context(|| format!("probing {target}"))?,
    )?;
    if facts.kernel != "Linux" {
        bail!(
            "{target} runs {:?}; kiln installs overlays on Linux hosts only",
            facts.kernel
        );
    }
    println!(
        "{target}: {} ({}), init {}, python3 {}",
        if facts.os.is_empty() {
            "unknown OS"
        } else {
            &facts.os
        },
        if facts.uid == 0 { "root" } else { "via sudo" },
        if facts.pid1.is_empty() {
            "unknown"
        } else {
            &facts.pid1
        },
        facts.python.as_deref().unwrap_or("missing")
    );
    Ok(facts)
}

/// The `--config` file, read; a note when the overlay takes one and none was given.
fn read_config(a: &Args, ov: &Overlay) -> Result<Option<InputFile>> {
    let config = match &a.config {
        Some(p) => Some(InputFile::new(
            p.display().to_string(),
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None => None,
    };
    if config.is_none() && ov.manifest.config.is_some() && !a.dry_run {
        eprintln!(
            "note: no --config given; {} keeps whatever configuration the target already has",
            ov.manifest
                .config
                .as_ref()
                .map(|c| c.path.as_str())
                .unwrap_or_default()
        );
    }
    Ok(config)
}

/// The overlay's packages the target lacks.
fn missing_packages(ssh: &Ssh, facts: &Facts, pkgs: &[String]) -> Result<Vec<String>> {
    let missing: Vec<String> = match remote::missing_packages_query(facts, pkgs) {
        Some(q) => ssh
            .run(&q)?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    };
    Ok(missing)
}

/// Whether each of the overlay's services is enabled and active (none asked when staged or
/// without systemd).
fn service_states(
    ssh: &Ssh,
    ov: &Overlay,
    facts: &Facts,
    staged: bool,
) -> Result<BTreeMap<String, (bool, bool)>> {
    let mut services = BTreeMap::new();
    if facts.systemd() && !staged {
        for s in &ov.manifest.services {
            let (e, _) = ssh.status(&format!("systemctl is-enabled --quiet '{s}'"))?;
            let (act, _) = ssh.status(&format!("systemctl is-active --quiet '{s}'"))?;
            services.insert(s.clone(), (e == 0, act == 0));
        }
    }
    Ok(services)
}

/// The overlay's venv path and the requirements it lacks, if the overlay has a venv.
fn venv_gaps(ssh: &Ssh, ov: &Overlay, root: &str) -> Result<Option<(String, Vec<String>)>> {
    let venv = match remote::venv_query(ov, root) {
        Some((path, q)) => {
            let freeze = ssh.run(&q)?;
            let want = ov
                .manifest
                .venv
                .as_ref()
                .map(|v| v.requirements.clone())
                .unwrap_or_default();
            Some((path, remote::missing_requirements(&want, &freeze)))
        }
        None => None,
    };
    Ok(venv)
}

/// After the files are in place: says why services were left alone, or runs the health check.
fn start_report(
    ssh: &Ssh,
    ov: &Overlay,
    facts: &Facts,
    target: &str,
    root: &str,
    sudo: &str,
) -> Result<()> {
    let staged = !root.is_empty();
    if !facts.systemd() {
        println!(
            "{target} does not run systemd as PID 1 (PID 1 is {:?}): the files are in place, but kiln did not enable or start {}",
            facts.pid1,
            ov.manifest.services.join(", ")
        );
    } else if staged {
        println!("staged under {root}: services were not enabled or started");
    } else if !ov.manifest.health.is_empty() {
        let (code, _) = ssh.status(&format!(
            "{sudo}{}",
            remote::shell_join(&ov.manifest.health)
        ))?;
        if code != 0 {
            bail!(
                "health check failed on {target}: `{}` exited {code}",
                ov.manifest.health.join(" ")
            );
        }
        println!("health check passed: {}", ov.manifest.health.join(" "));
    }
    Ok(())
}
