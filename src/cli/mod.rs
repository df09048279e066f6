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
pub enum OciCommand {
    /// Add overlays to an image as one deterministic layer and push the result.
    ///
    /// kiln oci append --from docker://registry.local/node:base --overlay docker-daemon \
    ///     --to docker://registry.local/node:v2
    Append {
        /// The base image (docker://…, oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE).
        #[arg(long)]
        from: String,
        /// An overlay to add (repeatable): a directory in ./overlays or a built-in one.
        #[arg(long, required = true)]
        overlay: Vec<String>,
        /// Where the new image goes: docker://… or oci:DIR[:TAG].
        #[arg(long)]
        to: String,
        /// Plain HTTP for registries without TLS.
        #[arg(long)]
        insecure: bool,
        /// The platform to take from a multi-arch base (OCI names: amd64, arm64).
        #[arg(long, default_value = kiln::oci::image::host_arch())]
        arch: String,
    },
}

// Parsed once per run; boxing the big Flash variant would only make the dispatch noisier.
#[allow(clippy::large_enum_variant)]
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
        /// Write the image as raw (with a bmap) or as QCOW2.
        #[arg(long, value_enum, default_value_t)]
        format: kiln::build::OutputFormat,
        /// Reach an OCI registry over plain HTTP (a local registry without TLS).
        #[arg(long)]
        insecure: bool,
        /// Who turns an OCI image into a disk: kiln itself, or bootc-image-builder under podman.
        #[arg(long, value_enum, default_value_t)]
        engine: build::Engine,
    },
    /// OCI images: add overlays to an image as a new layer, without a container engine.
    #[command(subcommand)]
    Oci(OciCommand),
    /// List the disks kiln could write to (removable ones; --all for every disk).
    Devices {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write an image to disks: commit last, verified, skipping only what a bmap says is unused.
    ///
    /// kiln flash IMAGE DEVICE…          an image file (.img, .zip, .xz, .gz, .zst) to one or more disks
    /// kiln flash --node NODE DEVICE     build the node's image, then write it (one DEVICE per --node)
    /// kiln flash --node PHONE           a phone node: build, then fastboot flash (pinned or only phone)
    /// kiln flash IMAGE --fastboot SERIAL  an image (raw or Android sparse) to a phone's partition
    #[command(verbatim_doc_comment)]
    Flash(flash::Args),
    /// Install an overlay onto a live host over ssh (idempotent; --dry-run shows the steps).
    Install {
        /// The overlay (see --list).
        overlay: Option<String>,
        /// user@host, as ssh takes it (~/.ssh/config applies).
        #[arg(long, short = 't')]
        target: Option<String>,
        /// The overlay's configuration file, installed where its manifest says (mode 0600).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the steps without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// List the overlays kiln knows.
        #[arg(long)]
        list: bool,
        /// Extra ssh option, KEY=VALUE (repeatable), e.g. Port=2222.
        #[arg(long = "ssh-option", short = 'o')]
        ssh_option: Vec<String>,
        /// Install under this directory of the target instead of / (staging; services untouched).
        #[arg(long)]
        root: Option<String>,
    },
    /// Serve a directory of images the way Ironic and IPA need them, or check a served image.
    Serve {
        /// The directory to serve.
        dir: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Instead of serving: replay what Ironic and IPA do with this image URL.
        #[arg(long, value_name = "URL", conflicts_with = "dir")]
        check: Option<String>,
        /// Connections open at once (lowered to fit the descriptor limit); beyond it a new
        /// connection closes the oldest one that has no request in progress.
        #[arg(long, value_name = "N", env = "KILN_SERVE_MAX_CONNECTIONS",
              default_value_t = kiln::deliver::serve::connections::DEFAULT_MAX_CONNECTIONS,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_connections: u32,
        /// Seconds a client may take to send a request head; also how long a keep-alive
        /// connection may stay idle. Never limits a download in progress.
        #[arg(long, value_name = "SECS", env = "KILN_SERVE_HEADER_TIMEOUT",
              default_value_t = kiln::deliver::serve::connections::DEFAULT_HEADER_TIMEOUT.as_secs_f64(),
              value_parser = positive_seconds)]
        header_timeout: f64,
        /// Seconds a download may go without the client acknowledging any data before it is
        /// dropped. A slow download that progresses is never cut.
        #[arg(long, value_name = "SECS", env = "KILN_SERVE_STALL_TIMEOUT",
              default_value_t = kiln::deliver::serve::connections::DEFAULT_STALL_TIMEOUT.as_secs_f64(),
              value_parser = positive_seconds)]
        stall_timeout: f64,
    },
    /// Copy built images into a served directory under immutable names (<node>-<sha8>.raw).
    Publish {
        /// The node(s) to publish.
        #[arg(long, required = true)]
        node: Vec<String>,
        /// Where the builds are.
        #[arg(long, short = 'o', default_value = "out")]
        out: PathBuf,
        /// The served directory, or an OCI repository `oci://REGISTRY/REPO[:TAG]` (the image is
        /// pushed as a disk-image artifact, tagged `<node>-<sha8>` unless TAG is given).
        #[arg(long)]
        to: PathBuf,
        /// Plain HTTP to the registry (a local one).
        #[arg(long)]
        insecure: bool,
    },
    /// Convert an image: Android sparse for fastboot (RAW/FILL/DONT_CARE from its bmap), or QCOW2.
    Convert {
        /// The raw image (its `.bmap` beside it is used when present).
        image: PathBuf,
        /// The output format.
        #[arg(long, value_enum)]
        to: convert::Target,
        /// Where to write it.
        output: PathBuf,
        /// Split into pieces of at most this size (bytes, or with K/M/G), e.g. a device's
        /// max-download-size; pieces are named OUTPUT-stem.1.simg, .2.simg, …
        #[arg(long)]
        max_size: Option<String>,
        /// The image's block map (default: IMAGE.bmap if present).
        #[arg(long)]
        bmap: Option<PathBuf>,
    },
    /// Boot an image in QEMU with UEFI firmware, optionally with a node's NoCloud seed.
    ///
    /// TCG by default; --kvm uses KVM where a short probe shows it works. --until stops with
    /// success when a console line contains the text; --timeout fails after that many seconds.
    Run {
        /// The image (raw or qcow2); opened read-only (snapshot) unless --persist.
        image: PathBuf,
        /// Attach a NoCloud seed (user-data, meta-data, network-config) for this node.
        #[arg(long, value_name = "NODE")]
        seed: Option<String>,
        #[command(flatten)]
        cluster: ClusterArg,
        /// Stop with success when the serial console prints this text.
        #[arg(long)]
        until: Option<String>,
        /// Give up (and fail) after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Write the serial console here instead of the terminal.
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "x86-64")]
        arch: kiln::deliver::run::Arch,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1536)]
        memory: u32,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Let the guest write to the image.
        #[arg(long)]
        persist: bool,
        /// Use KVM if it works here (checked by a short probe); TCG otherwise, and by default.
        #[arg(long)]
        kvm: bool,
    },
    /// Metal3: BareMetalHost manifests for the cluster's bare-metal nodes.
    #[command(subcommand)]
    Metal3(Metal3Command),
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

#[derive(Debug, Subcommand)]
pub enum Metal3Command {
    /// Print a BareMetalHost and its Secrets (BMC credentials, userData, networkData) for every
    /// bare-metal node, as one YAML stream for `kubectl apply -f -`.
    Manifests {
        #[command(flatten)]
        cluster: ClusterArg,
        /// Where the builds are.
        #[arg(long, short = 'o', default_value = "out")]
        out: PathBuf,
        /// The URL the published images are served under (`kiln serve`), e.g. http://infra:8080,
        /// or the OCI repository `kiln publish --to` pushed them to, e.g. oci://registry/lab/images.
        #[arg(long)]
        image_url: String,
        /// The namespace of the BareMetalHosts and Secrets.
        #[arg(long)]
        namespace: Option<String>,
        /// The digest written as `image.checksum` (with `image.checksumType`).
        #[arg(long, value_enum, default_value_t = ChecksumArg::Sha256)]
        checksum_type: ChecksumArg,
    },
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
            format,
            insecure,
            engine,
        } => build::run(
            &cluster.cluster,
            &node,
            all,
            out,
            build::Source {
                base: base.as_deref(),
                base_sha256,
                format,
                insecure,
                engine,
            },
        ),
        Command::Oci(OciCommand::Append {
            from,
            overlay,
            to,
            insecure,
            arch,
        }) => build::oci_append(from, overlay, to, insecure, arch),
        Command::Sample { profile, output } => sample::run(&profile, &output),
        Command::Devices { all, json } => devices::run(all, json),
        Command::Serve {
            dir,
            listen,
            check,
            max_connections,
            header_timeout,
            stall_timeout,
        } => serve::serve(
            dir,
            listen,
            check,
            kiln::deliver::serve::Limits {
                max_connections: max_connections as usize,
                header_timeout: std::time::Duration::from_secs_f64(header_timeout),
                stall_timeout: std::time::Duration::from_secs_f64(stall_timeout),
            },
        ),
        Command::Publish {
            node,
            out,
            to,
            insecure,
        } => serve::publish(&node, &out, &to, insecure),
        Command::Run {
            image,
            seed,
            cluster,
            until,
            timeout,
            log,
            arch,
            memory,
            cpus,
            persist,
            kvm,
        } => run_image::run(run_image::Args {
            image,
            seed,
            cluster: cluster.cluster,
            until,
            timeout,
            log,
            arch,
            memory,
            cpus,
            persist,
            kvm,
        }),
        Command::Convert {
            image,
            to,
            output,
            max_size,
            bmap,
        } => convert::run(&image, to, &output, max_size.as_deref(), bmap.as_deref()),
        Command::Metal3(Metal3Command::Manifests {
            cluster,
            out,
            image_url,
            namespace,
            checksum_type,
        }) => serve::metal3_manifests(
            &cluster.cluster,
            &out,
            &image_url,
            namespace.as_deref(),
            checksum_type.into(),
        ),
        Command::Install {
            overlay,
            target,
            config,
            dry_run,
            list,
            ssh_option,
            root,
        } => install::run(install::Args {
            overlay,
            target,
            config,
            dry_run,
            list,
            ssh_options: ssh_option,
            root,
        }),
        Command::Flash(a) => flash::run(a),
        Command::Completions { shell } => docs::completions(shell),
        Command::Manpage => docs::manpage(),
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
