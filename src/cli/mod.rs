//! Command-line definitions (clap derive) and dispatch; each verb's handler lives in its own file.

mod build;
mod check;
mod convert;
mod devices;
mod docs;
mod flash;
mod install;
mod plan;
mod run_image;
mod sample;
mod serve;

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

/// The cluster file flag, shared by the verbs that read one (the library's flash request too).
pub use kiln::plan::cluster::ClusterArg;

#[derive(Debug, Subcommand)]
pub enum OciCommand {
    /// Add overlays to an image as one deterministic layer and push the result.
    ///
    /// kiln oci append --from docker://registry.local/node:base --overlay docker-daemon \
    ///     --to docker://registry.local/node:v2
    Append(build::AppendArgs),
}

// Parsed once per run; boxing the big Flash variant would only make the dispatch noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the cluster file and print every node's resolved configuration.
    Check(check::Args),
    /// Show what a build will write for a node: files, where, with which mode.
    Plan(plan::Args),
    /// Build node images: out/<node>.img with .bmap, .sha256sum and .manifest.json.
    Build(build::Args),
    /// OCI images: add overlays to an image as a new layer, without a container engine.
    #[command(subcommand)]
    Oci(OciCommand),
    /// List the disks kiln could write to (removable ones; --all for every disk).
    Devices(devices::Args),
    /// Write an image to disks: commit last, verified, skipping only what a bmap says is unused.
    ///
    /// kiln flash IMAGE DEVICE…          an image file (.img, .zip, .xz, .gz, .zst) to one or more disks
    /// kiln flash --node NODE DEVICE     build the node's image, then write it (one DEVICE per --node)
    /// kiln flash --node PHONE           a phone node: build, then fastboot flash (pinned or only phone)
    /// kiln flash IMAGE --fastboot SERIAL  an image (raw or Android sparse) to a phone's partition
    #[command(verbatim_doc_comment)]
    Flash(flash::Args),
    /// Install an overlay onto a live host over ssh (idempotent; --dry-run shows the steps).
    Install(install::Args),
    /// Serve a directory of images the way Ironic and IPA need them, or check a served image.
    Serve(serve::Args),
    /// Copy built images into a served directory under immutable names (<node>-<sha8>.raw).
    Publish(serve::PublishArgs),
    /// Convert an image: Android sparse for fastboot (RAW/FILL/DONT_CARE from its bmap), or QCOW2.
    Convert(convert::Args),
    /// Boot an image in QEMU with UEFI firmware, optionally with a node's NoCloud seed.
    ///
    /// TCG by default; --kvm uses KVM where a short probe shows it works. --until stops with
    /// success when a console line contains the text; --timeout fails after that many seconds.
    /// --all boots every node of the cluster at once on a private network only they share,
    /// building the images missing from --out first.
    Run(run_image::Args),
    /// Metal3: BareMetalHost manifests for the cluster's bare-metal nodes.
    #[command(subcommand)]
    Metal3(Metal3Command),
    /// Write kiln's sample base image for a profile (the layout of the real image, tiny contents).
    Sample(sample::Args),
    /// Print shell completions.
    Completions(docs::CompletionsArgs),
    /// Print the man page (roff).
    Manpage,
}

#[derive(Debug, Subcommand)]
pub enum Metal3Command {
    /// Print a BareMetalHost and its Secrets (BMC credentials, userData, networkData) for every
    /// bare-metal node, as one YAML stream for `kubectl apply -f -`.
    Manifests(serve::Metal3Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check(a) => check::run(&a.cluster.cluster, a.json),
        Command::Plan(a) => plan::run(&a.cluster.cluster, &a.node, a.json),
        Command::Build(a) => build::run(
            &a.cluster.cluster,
            &a.node,
            a.all,
            a.out,
            build::Source {
                base: a.base.as_deref(),
                base_sha256: a.base_sha256,
                format: a.format,
                insecure: a.insecure,
                engine: a.engine,
            },
        ),
        Command::Oci(OciCommand::Append(a)) => {
            build::oci_append(a.from, a.overlay, a.to, a.insecure, a.arch)
        }
        Command::Sample(a) => sample::run(&a.profile, &a.output),
        Command::Devices(a) => devices::run(a.all, a.json),
        Command::Serve(a) => serve::serve(
            a.dir,
            a.listen,
            a.check,
            kiln::deliver::serve::Limits {
                max_connections: a.max_connections as usize,
                header_timeout: std::time::Duration::from_secs_f64(a.header_timeout),
                stall_timeout: std::time::Duration::from_secs_f64(a.stall_timeout),
            },
        ),
        Command::Publish(a) => serve::publish(&a.node, &a.out, &a.to, a.insecure),
        Command::Run(a) => run_image::run(a),
        Command::Convert(a) => convert::run(
            &a.image,
            a.to,
            &a.output,
            a.max_size.as_deref(),
            a.bmap.as_deref(),
        ),
        Command::Metal3(Metal3Command::Manifests(a)) => serve::metal3_manifests(
            &a.cluster.cluster,
            &a.out,
            &a.image_url,
            a.namespace.as_deref(),
            a.checksum_type.into(),
        ),
        Command::Install(a) => install::run(a),
        Command::Flash(a) => flash::run(a),
        Command::Completions(a) => docs::completions(a.shell),
        Command::Manpage => docs::manpage(),
    }
}
