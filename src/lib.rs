//! kiln builds, customises, flashes and serves the OS images of small clusters.
//!
//! The library holds every stage of the one flow — `spec` (cluster file and profiles), `source`
//! (base images), `provision` (what a node gets), `disk` and `fs` (edits without mounting),
//! `format` (artifacts) and `build` (the pipeline). The binary in `main.rs` is only the CLI.

pub mod bib;
pub mod blockdev;
pub mod build;
pub mod disk;
pub mod fastboot;
pub mod flash;
pub mod format;
pub mod fs;
pub mod io;
pub mod metal3;
pub mod oci;
pub mod provision;
pub mod remote;
pub mod run;
pub mod serve;
pub mod source;
pub mod spec;
pub mod util;
