//! `kiln serve`, `kiln publish` and `kiln metal3 manifests`: what a Metal3 lab needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
