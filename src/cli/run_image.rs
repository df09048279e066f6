//! `kiln run`: boot an image in QEMU, with a node's NoCloud seed if asked.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::ClusterArg;
use kiln::deliver::run::{Arch, RunOptions};
use kiln::plan::profile::ProvisionMethod;
use kiln::plan::stamp_plan;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image (raw or qcow2); opened read-only (snapshot) unless --persist.
    pub image: PathBuf,
    /// Attach a NoCloud seed (user-data, meta-data, network-config) for this node.
    #[arg(long, value_name = "NODE")]
    pub seed: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Stop with success when the serial console prints this text.
    #[arg(long)]
    pub until: Option<String>,
    /// Give up (and fail) after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Write the serial console here instead of the terminal.
    #[arg(long)]
    pub log: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "x86-64")]
    pub arch: Arch,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1536)]
    pub memory: u32,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Let the guest write to the image.
    #[arg(long)]
    pub persist: bool,
    /// Use KVM if it works here (checked by a short probe); TCG otherwise, and by default.
    #[arg(long)]
    pub kvm: bool,
}

pub fn run(a: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let seed = match &a.seed {
        None => None,
        Some(node) => {
            let cluster = kiln::plan::load(&a.cluster.cluster)?;
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
