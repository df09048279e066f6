//! `kiln plan`: what a build will write for one node, where, and with which mode.

use std::path::Path;

use anyhow::Result;

use super::ClusterArg;
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

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// The node to plan.
    #[arg(long)]
    pub node: String,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}
