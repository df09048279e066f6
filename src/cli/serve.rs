//! `kiln serve`, `kiln publish` and `kiln metal3 manifests`: what a Metal3 lab needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::ClusterArg;
use anyhow::{Result, bail};

pub fn serve(
    dir: Option<PathBuf>,
    listen: SocketAddr,
    check: Option<String>,
    limits: kiln::deliver::serve::Limits,
) -> Result<()> {
    if let Some(url) = check {
        let problems = kiln::deliver::serve::check::check(&url)?;
        if problems.is_empty() {
            println!("{url}: Ironic and IPA would accept this image");
            return Ok(());
        }
        for p in &problems {
            println!("FAIL {p}");
        }
        bail!(
            "{url}: {} problem(s) Ironic or IPA would trip over",
            problems.len()
        );
    }
    let Some(dir) = dir else {
        bail!("usage: kiln serve DIR [--listen ADDR], or kiln serve --check URL");
    };
    kiln::deliver::serve::run(&dir, listen, limits)
}

pub fn publish(nodes: &[String], out: &Path, to: &Path, insecure: bool) -> Result<()> {
    if let Some(target) = to.to_str().filter(|t| t.starts_with("oci://")) {
        let (repo, tag) = kiln::deliver::publish::parse_oci_target(target)?;
        if tag.is_some() && nodes.len() > 1 {
            bail!(
                "{target} names one tag; publish several nodes to oci://REGISTRY/REPO (tags <node>-<sha8>)"
            );
        }
        for node in nodes {
            let image = kiln::deliver::publish::built_image(node, out)?;
            let (profile, _) = kiln::plan::profile::load(
                &image.profile,
                &kiln::plan::resolve::search_dirs(Path::new("."), "images"),
            )?;
            let p = kiln::deliver::publish::publish_oci(
                node,
                out,
                &repo,
                tag.as_deref(),
                insecure,
                profile.disk.build.oci_arch(),
            )?;
            println!(
                "{} {}",
                if p.fresh { "pushed" } else { "already pushed" },
                p.url
            );
        }
        return Ok(());
    }
    for node in nodes {
        let (path, fresh) = kiln::deliver::publish::publish(node, out, to)?;
        println!(
            "{} {}",
            if fresh {
                "published"
            } else {
                "already published"
            },
            path.display()
        );
    }
    Ok(())
}

pub fn metal3_manifests(
    cluster: &Path,
    out: &Path,
    image_url: &str,
    namespace: Option<&str>,
    checksum: kiln::artifact::manifest::ChecksumType,
) -> Result<()> {
    if !["http://", "https://", "oci://"]
        .iter()
        .any(|s| image_url.starts_with(s))
    {
        bail!("--image-url {image_url:?} must be an http://, https:// or oci:// URL");
    }
    let cluster = kiln::plan::load(cluster)?;
    let text = kiln::deliver::metal3::manifests(
        &cluster,
        &kiln::deliver::metal3::Options {
            out,
            image_url,
            namespace,
            checksum,
        },
    )?;
    print!("{text}");
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to serve.
    pub dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Instead of serving: replay what Ironic and IPA do with this image URL.
    #[arg(long, value_name = "URL", conflicts_with = "dir")]
    pub check: Option<String>,
    /// Connections open at once (lowered to fit the descriptor limit); beyond it a new
    /// connection closes the oldest one that has no request in progress.
    #[arg(long, value_name = "N", env = "KILN_SERVE_MAX_CONNECTIONS",
          default_value_t = kiln::deliver::serve::connections::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a client may take to send a request head; also how long a keep-alive
    /// connection may stay idle. Never limits a download in progress.
    #[arg(long, value_name = "SECS", env = "KILN_SERVE_HEADER_TIMEOUT",
          default_value_t = kiln::deliver::serve::connections::DEFAULT_HEADER_TIMEOUT.as_secs_f64(),
          value_parser = positive_seconds)]
    pub header_timeout: f64,
    /// Seconds a download may go without the client acknowledging any data before it is
    /// dropped. A slow download that progresses is never cut.
    #[arg(long, value_name = "SECS", env = "KILN_SERVE_STALL_TIMEOUT",
          default_value_t = kiln::deliver::serve::connections::DEFAULT_STALL_TIMEOUT.as_secs_f64(),
          value_parser = positive_seconds)]
    pub stall_timeout: f64,
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The node(s) to publish.
    #[arg(long, required = true)]
    pub node: Vec<String>,
    /// Where the builds are.
    #[arg(long, short = 'o', default_value = "out")]
    pub out: PathBuf,
    /// The served directory, or an OCI repository `oci://REGISTRY/REPO[:TAG]` (the image is
    /// pushed as a disk-image artifact, tagged `<node>-<sha8>` unless TAG is given).
    #[arg(long)]
    pub to: PathBuf,
    /// Plain HTTP to the registry (a local one).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Debug, clap::Args)]
pub struct Metal3Args {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Where the builds are.
    #[arg(long, short = 'o', default_value = "out")]
    pub out: PathBuf,
    /// The URL the published images are served under (`kiln serve`), e.g. http://infra:8080,
    /// or the OCI repository `kiln publish --to` pushed them to, e.g. oci://registry/lab/images.
    #[arg(long)]
    pub image_url: String,
    /// The namespace of the BareMetalHosts and Secrets.
    #[arg(long)]
    pub namespace: Option<String>,
    /// The digest written as `image.checksum` (with `image.checksumType`).
    #[arg(long, value_enum, default_value_t = ChecksumArg::Sha256)]
    pub checksum_type: ChecksumArg,
}

/// A digest Ironic verifies images with.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ChecksumArg {
    Sha256,
    Sha512,
}

impl From<ChecksumArg> for kiln::artifact::manifest::ChecksumType {
    fn from(a: ChecksumArg) -> Self {
        match a {
            ChecksumArg::Sha256 => Self::Sha256,
            ChecksumArg::Sha512 => Self::Sha512,
        }
    }
}

/// A number of seconds above zero and at most a day (a `Duration` can hold it).
fn positive_seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 86_400.0 => Ok(secs),
        _ => Err(format!(
            "{s}: not a number of seconds above 0 and at most 86400"
        )),
    }
}
