//! `kiln serve` and `kiln publish`.

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
