//! What `kiln flash` was asked to do, as the binary's flags become it: plain data, so the library
//! never sees clap.

use std::path::PathBuf;

use crate::base::BaseRef;
use crate::build::BuildOptions;
use crate::io::progress::ProgressMode;
use crate::stamp::customize::BootEdits;

/// What `kiln flash` was asked to do.
pub struct Request {
    /// IMAGE then DEVICE…, or only the targets with `nodes`.
    pub positional: Vec<PathBuf>,
    pub nodes: Vec<String>,
    pub cluster: PathBuf,
    /// Where `--node` builds go, when asked for: without it, nodes are streamed from their base
    /// and no image file is written.
    pub out: Option<PathBuf>,
    pub base: Option<String>,
    pub yes: bool,
    pub verify: bool,
    pub no_eject: bool,
    pub allow_non_removable: bool,
    /// macOS: open raw disks through the administrator dialog (`/usr/libexec/authopen`)
    /// instead of needing root.
    pub authopen: bool,
    pub progress: ProgressMode,
    pub bmap: Option<PathBuf>,
    pub edits: BootEdits,
    /// Flash over fastboot to this serial (`tcp:host:port` for network fastboot).
    pub fastboot: Option<String>,
    pub partition: Option<String>,
    pub product: Option<String>,
}

impl Request {
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
