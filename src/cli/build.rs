//! `kiln build`: build one, several or all nodes of a cluster.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};

use kiln::build::{BuildOptions, build_node};
use kiln::source::BaseRef;

pub fn run(
    cluster_path: &Path,
    nodes: &[String],
    all: bool,
    out: PathBuf,
    base: Option<&str>,
    base_sha256: Option<String>,
) -> Result<()> {
    let cluster = kiln::spec::load(cluster_path)?;
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
        base: BaseRef::parse(base),
        base_sha256,
    };
    let mut failed = Vec::new();
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
                failed.push(node.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} node(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
