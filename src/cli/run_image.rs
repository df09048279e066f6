//! `kiln run`: boot an image in QEMU, with a node's NoCloud seed if asked.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use kiln::deliver::run::{Arch, RunOptions};
use kiln::plan::profile::ProvisionMethod;
use kiln::plan::stamp_plan;

pub struct Args {
    pub image: PathBuf,
    pub seed: Option<String>,
    pub cluster: PathBuf,
    pub until: Option<String>,
    pub timeout: Option<u64>,
    pub log: Option<PathBuf>,
    pub arch: Arch,
    pub memory: u32,
    pub cpus: u32,
    pub persist: bool,
    pub kvm: bool,
}

pub fn run(a: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let seed = match &a.seed {
        None => None,
        Some(node) => {
            let cluster = kiln::plan::load(&a.cluster)?;
            let n = cluster.node(node)?;
            let (profile, _) = cluster.profile_of(n);
            if profile.provision.method == ProvisionMethod::Rootfs {
                bail!(
                    "node {node} uses {} (no cloud-init); its configuration is in its image",
                    profile.name
                );
            }
            let p =
                stamp_plan::plan(&cluster, n).with_context(|| format!("planning node {node}"))?;
            let path = tmp.path().join("seed.img");
            kiln::deliver::run::make_seed(
                &path,
                &[
                    ("user-data", p.user_data.as_bytes()),
                    ("meta-data", p.meta_data.as_bytes()),
                    ("network-config", p.network_config.as_bytes()),
                ],
            )?;
            Some(path)
        }
    };
    kiln::deliver::run::run(&RunOptions {
        image: a.image,
        arch: a.arch,
        seed,
        until: a.until,
        timeout: a.timeout.map(Duration::from_secs),
        log: a.log,
        memory_mib: a.memory,
        cpus: a.cpus,
        persist: a.persist,
        kvm: a.kvm,
    })
}
