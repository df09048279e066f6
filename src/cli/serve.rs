//! `kiln serve`, `kiln publish` and `kiln metal3 manifests`: what a Metal3 lab needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

pub fn serve(dir: Option<PathBuf>, listen: SocketAddr, check: Option<String>) -> Result<()> {
    if let Some(url) = check {
        let problems = kiln::serve::check::check(&url)?;
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
    kiln::serve::run(&dir, listen)
}

pub fn publish(nodes: &[String], out: &Path, to: &Path) -> Result<()> {
    for node in nodes {
        let (path, fresh) = kiln::serve::publish::publish(node, out, to)?;
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
    checksum: kiln::format::manifest::ChecksumType,
) -> Result<()> {
    if !(image_url.starts_with("http://") || image_url.starts_with("https://")) {
        bail!("--image-url {image_url:?} must be an http:// or https:// URL");
    }
    let cluster = kiln::spec::load(cluster)?;
    let text = kiln::metal3::manifests(
        &cluster,
        &kiln::metal3::Options {
            out,
            image_url,
            namespace,
            checksum,
        },
    )?;
    print!("{text}");
    Ok(())
}
