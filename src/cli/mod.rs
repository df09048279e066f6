//! Command-line definitions (clap derive) and dispatch; each verb's handler lives in its own file.

mod build;
mod check;
mod docs;
mod plan;
mod sample;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build, customise, flash and serve the OS images of small clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The cluster file, shared by the verbs that read one.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArg {
    /// The cluster file.
    #[arg(
        long,
        short = 'c',
        default_value = "cluster.toml",
        env = "KILN_CLUSTER"
    )]
    pub cluster: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the cluster file and print every node's resolved configuration.
    Check {
        #[command(flatten)]
        cluster: ClusterArg,
        /// Print the resolved configuration as JSON (secrets shown as digests).
        #[arg(long)]
        json: bool,
    },
    /// Show what a build will write for a node: files, where, with which mode.
    Plan {
        #[command(flatten)]
        cluster: ClusterArg,
        /// The node to plan.
        #[arg(long)]
        node: String,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build node images: out/<node>.img with .bmap, .sha256sum and .manifest.json.
    Build {
        #[command(flatten)]
        cluster: ClusterArg,
        /// A node to build (repeatable).
        #[arg(long, required_unless_present = "all")]
        node: Vec<String>,
        /// Build every node of the cluster.
        #[arg(long, conflicts_with = "node")]
        all: bool,
        /// Output directory.
        #[arg(long, short = 'o', default_value = "out")]
        out: PathBuf,
        /// The base image instead of the profile's: a path, an http(s) URL, or `sample` for kiln's
        /// built-in sample with the profile's layout (offline).
        #[arg(long)]
        base: Option<String>,
        /// Expected sha256 of --base.
        #[arg(long)]
        base_sha256: Option<String>,
    },
    /// Write kiln's sample base image for a profile (the layout of the real image, tiny contents).
    Sample {
        /// The image profile.
        #[arg(long, default_value = "hypriot-rpi")]
        profile: String,
        /// Where to write the image.
        output: PathBuf,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Manpage,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check { cluster, json } => check::run(&cluster.cluster, json),
        Command::Plan {
            cluster,
            node,
            json,
        } => plan::run(&cluster.cluster, &node, json),
        Command::Build {
            cluster,
            node,
            all,
            out,
            base,
            base_sha256,
        } => build::run(
            &cluster.cluster,
            &node,
            all,
            out,
            base.as_deref(),
            base_sha256,
        ),
        Command::Sample { profile, output } => sample::run(&profile, &output),
        Command::Completions { shell } => docs::completions(shell),
        Command::Manpage => docs::manpage(),
    }
}
