//! `kiln flash`: its flags, parsed into a `deliver::flash::Request`; the library does the rest.

use std::path::PathBuf;

use anyhow::Result;

use kiln::deliver::flash::{self, Request};
use kiln::io::progress::ProgressMode;
use kiln::stamp::customize::BootEdits;

use super::ClusterArg;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// IMAGE then DEVICE…, or only DEVICE… with --node. Plain files are valid targets.
    /// Phones: IMAGE with --fastboot SERIAL, or --node alone (or with its serial).
    args: Vec<PathBuf>,
    /// Build and flash this node (repeatable; one device per node, in order).
    #[arg(long)]
    node: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArg,
    /// Also build --node images into this directory and flash those files (default: stream each
    /// node from its cached base, writing no image file; phones' builds go to `out`).
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// Base image for --node builds (path, URL or `sample`).
    #[arg(long)]
    base: Option<String>,
    /// Do not ask for confirmation (mounted partitions of the targets are unmounted).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Read back and compare what was written (the default).
    #[arg(long, overrides_with = "no_verify")]
    verify: bool,
    /// Skip the read-back.
    #[arg(long)]
    no_verify: bool,
    /// Leave cards and USB disks attached after the write (by default they are ejected).
    #[arg(long)]
    no_eject: bool,
    /// Allow disks the kernel does not call removable (USB SSDs, NVMe, loop devices).
    #[arg(long)]
    allow_non_removable: bool,
    /// macOS: without root, open the disk through the system's administrator dialog
    /// (/usr/libexec/authopen), as Raspberry Pi Imager does, instead of needing sudo.
    #[arg(long)]
    authopen: bool,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
    /// The image's block map (default: IMAGE.bmap beside the image, if present).
    #[arg(long)]
    bmap: Option<PathBuf>,
    /// hypriot flash: set the hostname in the boot partition's user-data (and meta-data).
    #[arg(long)]
    hostname: Option<String>,
    /// hypriot flash: copy this file to the boot partition as user-data.
    #[arg(long, short = 'u')]
    userdata: Option<PathBuf>,
    /// hypriot flash: copy this file to the boot partition as meta-data.
    #[arg(long, short = 'm')]
    metadata: Option<PathBuf>,
    /// hypriot flash: copy this file to the boot partition as config.txt.
    #[arg(long, short = 'C')]
    bootconf: Option<PathBuf>,
    /// hypriot flash: copy this file to the boot partition (repeatable).
    #[arg(long, short = 'F')]
    file: Vec<PathBuf>,
    /// Flash a phone over fastboot: its serial (`tcp:host:port` for network fastboot).
    /// Phone nodes (fastboot profiles) use this, their pinned serial, or the one phone found.
    #[arg(long, value_name = "SERIAL")]
    fastboot: Option<String>,
    /// fastboot: the partition to flash (default: the profile's, else userdata).
    #[arg(long)]
    partition: Option<String>,
    /// fastboot: the product the phone must report (default: the profile's).
    #[arg(long)]
    product: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    flash::run(&Request {
        positional: a.args,
        nodes: a.node,
        cluster: a.cluster.cluster,
        out: a.out,
        base: a.base,
        yes: a.yes,
        verify: !a.no_verify,
        no_eject: a.no_eject,
        allow_non_removable: a.allow_non_removable,
        authopen: a.authopen,
        progress: a.progress,
        bmap: a.bmap,
        edits: BootEdits {
            hostname: a.hostname,
            userdata: a.userdata,
            metadata: a.metadata,
            bootconf: a.bootconf,
            files: a.file,
        },
        fastboot: a.fastboot,
        partition: a.partition,
        product: a.product,
    })
}
