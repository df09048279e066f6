//! `kiln build`: build one, several or all nodes of a cluster.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};

use super::ClusterArg;
use kiln::base::BaseRef;
use kiln::build::{BuildOptions, OutputFormat, build_node};

/// Who makes the disk from an OCI image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Engine {
    /// kiln's native builder: unprivileged, no container engine, reproducible.
    #[default]
    Kiln,
    /// bootc-image-builder under rootful podman (the reference engine).
    BootcImageBuilder,
}

/// Where the base comes from and what is written.
pub struct Source<'a> {
    pub base: Option<&'a str>,
    pub base_sha256: Option<String>,
    pub format: OutputFormat,
    pub insecure: bool,
    pub engine: Engine,
}

pub fn run(
    cluster_path: &Path,
    nodes: &[String],
    all: bool,
    out: PathBuf,
    src: Source,
) -> Result<()> {
    let cluster = kiln::plan::load(cluster_path)?;
    let selected: Vec<_> = if all {
        cluster.nodes.iter().collect()
    } else {
        nodes
            .iter()
            .map(|n| cluster.node(n))
            .collect::<Result<_>>()?
    };
    let opts = BuildOptions {
        out_dir: out,
        base: BaseRef::parse(src.base),
        base_sha256: src.base_sha256,
        format: src.format,
        insecure: src.insecure,
    };
    if src.engine == Engine::BootcImageBuilder {
        return run_bib(&cluster, &selected, &opts);
    }
    let mut failed = Vec::new();
    // Said once after every node was tried: the same full disk fails them all.
    let mut full_disk = None;
    for node in selected {
        let started = Instant::now();
        match build_node(&cluster, node, &opts) {
            Ok(a) => println!(
                "{:<14} {}  {} MiB ({} MiB mapped)  sha256 {}  {:.1} s",
                a.node,
                a.image.display(),
                a.image_size >> 20,
                a.mapped_bytes >> 20,
                &a.sha256[..16],
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("error: {}: {e:#}", node.name);
                full_disk = full_disk.or_else(|| {
                    let cache = kiln::base::cache::Cache::location().unwrap_or_default();
                    kiln::util::diskfull::hint(
                        &e,
                        &[("output", &opts.out_dir), ("cache", &cache)],
                        true,
                    )
                });
                failed.push(node.name.clone());
            }
        }
    }
    if let Some(h) = full_disk {
        eprintln!("hint: {h}");
    }
    if !failed.is_empty() {
        bail!("{} node(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

fn run_bib(
    cluster: &kiln::plan::Cluster,
    nodes: &[&kiln::plan::node::NodeConfig],
    opts: &BuildOptions,
) -> Result<()> {
    std::fs::create_dir_all(&opts.out_dir)?;
    for node in nodes {
        let (profile, _) = cluster.profile_of(node);
        let reference = match (&opts.base, opts.base.oci_image(profile)) {
            (_, Some(r)) => r.to_string(),
            // bootc-image-builder builds only from OCI images: a profile's URL does not stand in.
            (BaseRef::Profile, None) => match &profile.source.oci {
                Some(r) => r.clone(),
                None => bail!(
                    "--engine bootc-image-builder builds from an OCI image; profile {} names \
                     none (give one with --base docker://…)",
                    profile.name
                ),
            },
            (_, None) => {
                bail!("--engine bootc-image-builder needs an OCI image as --base (docker://…)")
            }
        };
        let made = kiln::build::bib::build(cluster, node, &reference, &opts.out_dir, opts.format)?;
        println!("{:<14} {}", node.name, made.display());
    }
    Ok(())
}

/// `kiln oci append`.
pub fn oci_append(
    from: String,
    overlays: Vec<String>,
    to: String,
    insecure: bool,
    arch: String,
) -> Result<()> {
    let opts = kiln::stamp::oci_append::AppendOptions {
        from,
        to: to.clone(),
        overlays,
        overlay_dirs: kiln::plan::resolve::search_dirs(Path::new("."), "overlays"),
        insecure,
        arch,
    };
    let a = kiln::stamp::oci_append::append(&opts)?;
    println!(
        "{to}  manifest {}  new layer {} ({} files)",
        a.manifest_digest, a.layer_digest, a.files
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// A node to build (repeatable).
    #[arg(long, required_unless_present = "all")]
    pub node: Vec<String>,
    /// Build every node of the cluster.
    #[arg(long, conflicts_with = "node")]
    pub all: bool,
    /// Output directory.
    #[arg(long, short = 'o', default_value = "out")]
    pub out: PathBuf,
    /// The base image instead of the profile's: a path, an http(s) URL, or `sample` for kiln's
    /// built-in sample with the profile's layout (offline).
    #[arg(long)]
    pub base: Option<String>,
    /// Expected sha256 of --base.
    #[arg(long)]
    pub base_sha256: Option<String>,
    /// Write the image as raw (with a bmap) or as QCOW2.
    #[arg(long, value_enum, default_value_t)]
    pub format: kiln::build::OutputFormat,
    /// Reach an OCI registry over plain HTTP (a local registry without TLS).
    #[arg(long)]
    pub insecure: bool,
    /// Who turns an OCI image into a disk: kiln itself, or bootc-image-builder under podman.
    #[arg(long, value_enum, default_value_t)]
    pub engine: Engine,
}

#[derive(Debug, clap::Args)]
pub struct AppendArgs {
    /// The base image (docker://…, oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE).
    #[arg(long)]
    pub from: String,
    /// An overlay to add (repeatable): a directory in ./overlays or a built-in one.
    #[arg(long, required = true)]
    pub overlay: Vec<String>,
    /// Where the new image goes: docker://… or oci:DIR[:TAG].
    #[arg(long)]
    pub to: String,
    /// Plain HTTP for registries without TLS.
    #[arg(long)]
    pub insecure: bool,
    /// The platform to take from a multi-arch base (OCI names: amd64, arm64).
    #[arg(long, default_value = kiln::oci::image::host_arch())]
    pub arch: String,
}
