//! `kiln run`: boot an image in QEMU, with a node's NoCloud seed if asked — or, with `--all`, every
//! node of the cluster at once on a private network (`kiln::deliver::run_cluster`), building the
//! images that are missing first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::ClusterArg;
use std::collections::BTreeMap;

use kiln::base::BaseRef;
use kiln::build::{BuildOptions, OutputFormat, build_node};
use kiln::deliver::run::{Arch, RunOptions};
use kiln::deliver::run_cluster::{ClusterRun, NodeBoot};
use kiln::plan::profile::ProvisionMethod;
use kiln::plan::stamp_plan;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image (raw or qcow2); opened read-only (snapshot) unless --persist.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub image: Option<PathBuf>,
    /// Boot every node of the cluster at once on a private network only they share (NICs joined
    /// by kiln's hub over a Unix socket); images missing from --out are built first.
    #[arg(long, conflicts_with = "seed")]
    pub all: bool,
    /// With --all: where the node images are (and are built to).
    #[arg(long, default_value = "out", requires = "all")]
    pub out: PathBuf,
    /// With --all: the base image for the nodes that have to be built (see kiln build --base).
    #[arg(long, requires = "all")]
    pub base: Option<String>,
    /// With --all: where each node's console goes (<node>.console.log); default: --out.
    #[arg(long, requires = "all")]
    pub log_dir: Option<PathBuf>,
    /// Attach a NoCloud seed (user-data, meta-data, network-config) for this node.
    #[arg(long, value_name = "NODE")]
    pub seed: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Stop with success when the serial console prints this text. With --all, every node must
    /// print it; NODE=TEXT sets one node's text (repeat the flag).
    #[arg(long)]
    pub until: Vec<String>,
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
    if a.all {
        return run_all(a);
    }
    let Some(image) = a.image.clone() else {
        bail!("name an image, or boot the whole cluster with --all");
    };
    if a.until.len() > 1 {
        bail!("one --until for one image (NODE=TEXT is for --all)");
    }
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
        image,
        arch: a.arch,
        seed,
        until: a.until.into_iter().next(),
        timeout: a.timeout.map(Duration::from_secs),
        log: a.log,
        memory_mib: a.memory,
        cpus: a.cpus,
        persist: a.persist,
        kvm: a.kvm,
        nic: None,
    })
}

/// `--all`: builds what is missing, then boots every node on the cluster's private network.
fn run_all(a: Args) -> Result<()> {
    let cluster = kiln::plan::load(&a.cluster.cluster)?;
    if a.kvm {
        eprintln!("note: --all boots with TCG");
    }
    let untils = per_node_until(&cluster, &a.until)?;
    let log_dir = a.log_dir.clone().unwrap_or_else(|| a.out.clone());
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut nodes = Vec::new();
    for node in &cluster.nodes {
        let image = image_of(&cluster, node, &a.out, a.base.as_deref())?;
        nodes.push(NodeBoot {
            name: node.name.clone(),
            image,
            mac: node
                .macs
                .get("eth0")
                .cloned()
                .unwrap_or_else(|| kiln::plan::ids::mac(&cluster.seed, &node.name, "eth0")),
            until: untils.get(&node.name).cloned(),
            log: log_dir.join(format!("{}.console.log", node.name)),
        });
    }
    for n in &nodes {
        eprintln!(
            "{:<14} {}  mac {}  console {}",
            n.name,
            n.image.display(),
            n.mac,
            n.log.display()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    on_ctrl_c(stop.clone());
    kiln::deliver::run_cluster::run(
        &ClusterRun {
            nodes,
            arch: a.arch,
            memory_mib: a.memory,
            cpus: a.cpus,
            persist: a.persist,
            timeout: a.timeout.map(Duration::from_secs),
        },
        &stop,
    )
}

/// `--until TEXT` for every node, `--until NODE=TEXT` for one (the later flag wins).
fn per_node_until(
    cluster: &kiln::plan::Cluster,
    flags: &[String],
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for f in flags {
        match f.split_once('=') {
            Some((node, text)) if cluster.nodes.iter().any(|n| n.name == node) => {
                out.insert(node.to_string(), text.to_string());
            }
            _ => {
                for n in &cluster.nodes {
                    out.insert(n.name.clone(), f.clone());
                }
            }
        }
    }
    Ok(out)
}

/// The node's image in `out`, built there first when it is missing.
fn image_of(
    cluster: &kiln::plan::Cluster,
    node: &kiln::plan::node::NodeConfig,
    out: &Path,
    base: Option<&str>,
) -> Result<PathBuf> {
    for ext in ["img", "qcow2", "raw"] {
        let p = out.join(format!("{}.{ext}", node.name));
        if p.is_file() {
            return Ok(p);
        }
    }
    eprintln!(
        "{:<14} no image in {}: building it",
        node.name,
        out.display()
    );
    let opts = BuildOptions {
        out_dir: out.to_path_buf(),
        base: BaseRef::parse(base),
        base_sha256: None,
        format: OutputFormat::Raw,
        insecure: false,
    };
    let a =
        build_node(cluster, node, &opts).with_context(|| format!("building node {}", node.name))?;
    Ok(a.image)
}

/// Sets `stop` on Ctrl-C (SIGINT), so the run stops every node rather than dying with them
/// half-stopped; tokio's signal handling keeps this free of a hand-written handler.
fn on_ctrl_c(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            eprintln!("\ninterrupted: stopping every node");
            stop.store(true, Ordering::SeqCst);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_for_every_node_unless_it_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[cluster]\nname = \"c\"\n[defaults]\nimage = \"hypriot-rpi\"\n\
                    [[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n";
        let cluster =
            kiln::plan::resolve::parse(&dir.path().join("cluster.toml"), text.into()).unwrap();
        let flags = ["login:".to_string(), "b=x=y done".to_string()];
        let got = per_node_until(&cluster, &flags).unwrap();
        assert_eq!(got["a"], "login:");
        assert_eq!(got["b"], "x=y done");
        // A text with '=' whose prefix is no node is a text for every node.
        let got = per_node_until(&cluster, &["k=v".to_string()]).unwrap();
        assert_eq!((got["a"].as_str(), got["b"].as_str()), ("k=v", "k=v"));
    }
}
