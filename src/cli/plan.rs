//! `kiln plan`: what a build will write for one node, where, and with which mode.

use std::path::Path;

use anyhow::Result;

use kiln::plan::stamp_plan;

pub fn run(cluster_path: &Path, node: &str, json: bool) -> Result<()> {
    let cluster = kiln::plan::load(cluster_path)?;
    let n = cluster.node(node)?;
    let p = stamp_plan::plan(&cluster, n)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", stamp_plan::describe(&p));
    }
    Ok(())
}
