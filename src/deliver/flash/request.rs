//! What `kiln flash` was asked to do: the flags, defined once here (clap derives the parser from
//! this struct), so a new flag is one field and the library reads the same data the user typed.

use std::path::PathBuf;

use crate::base::BaseRef;
use crate::build::BuildOptions;
use crate::io::progress::ProgressMode;
use crate::plan::cluster::ClusterArg;
use crate::stamp::customize::BootEdits;

/// What `kiln flash` was asked to do.
#[derive(Debug, clap::Args)]
pub struct Request {
    /// IMAGE then DEVICE…, or only DEVICE… with --node. Plain files are valid targets.
    /// Phones: IMAGE with --fastboot SERIAL, or --node alone (or with its serial).
    #[arg(value_name = "ARGS")]
    pub positional: Vec<PathBuf>,
    /// Build and flash this node (repeatable; one device per node, in order).
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Also build --node images into this directory and flash those files (default: stream each
    /// node from its cached base, writing no image file; phones' builds go to `out`).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Base image for --node builds (path, URL or `sample`).
    #[arg(long)]
    pub base: Option<String>,
    /// Do not ask for confirmation (mounted partitions of the targets are unmounted).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Read back and compare what was written (the default).
    #[arg(long, overrides_with = "no_verify")]
    verify: bool,
    /// Skip the read-back.
    #[arg(long)]
    pub no_verify: bool,
    /// Leave cards and USB disks attached after the write (by default they are ejected).
    #[arg(long)]
    pub no_eject: bool,
    /// Allow disks the kernel does not call removable (USB SSDs, NVMe, loop devices).
    #[arg(long)]
    pub allow_non_removable: bool,
    /// macOS: without root, open the disk through the system's administrator dialog
    /// (/usr/libexec/authopen), as Raspberry Pi Imager does, instead of needing sudo.
    #[arg(long)]
    pub authopen: bool,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// The image's block map (default: IMAGE.bmap beside the image, if present).
    #[arg(long)]
    pub bmap: Option<PathBuf>,
    #[command(flatten)]
    pub edits: BootEdits,
    /// Flash a phone over fastboot: its serial (`tcp:host:port` for network fastboot).
    /// Phone nodes (fastboot profiles) use this, their pinned serial, or the one phone found.
    #[arg(long, value_name = "SERIAL")]
    pub fastboot: Option<String>,
    /// fastboot: the partition to flash (default: the profile's, else userdata).
    #[arg(long)]
    pub partition: Option<String>,
    /// fastboot: the product the phone must report (default: the profile's).
    #[arg(long)]
    pub product: Option<String>,
}

impl Request {
    /// Whether what was written is read back (`--verify` is the default; `--no-verify` skips).
    pub fn verifies(&self) -> bool {
        !self.no_verify
    }

    /// The cluster file `--node` names its nodes in.
    pub fn cluster_file(&self) -> &std::path::Path {
        &self.cluster.cluster
    }

    /// The output directory: `--out`, else `out` (phones' builds, a streamed node's working copy).
    pub(super) fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| PathBuf::from("out"))
    }

    /// How `--node` builds are made.
    pub(super) fn build_options(&self) -> BuildOptions {
        BuildOptions {
            out_dir: self.out_dir(),
            base: BaseRef::parse(self.base.as_deref()),
            base_sha256: None,
            format: Default::default(),
            insecure: false,
        }
    }
}
