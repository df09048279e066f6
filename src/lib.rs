//! kiln builds, customises, flashes and serves the OS images of small clusters.
//!
//! The folders are the one flow: `plan` (cluster file and profiles, resolved per node) → `base`
//! (downloads, cache, OCI pulls, base disks) → `stamp` (per-node edits without mounting) →
//! `artifact` (raw, bmap, qcow2, sparse, manifest) → `deliver` (flash, fastboot, serve, publish,
//! metal3, ssh install, run). `build` drives the first four for one node. Beneath them:
//! `disk` (partition tables), `fs` (FAT and ext4), `oci` (references, registries, layouts),
//! `blockdev` (devices of the host), `io` and `util`. The binary in `main.rs` is only the CLI.

pub mod artifact;
pub mod base;
pub mod blockdev;
pub mod build;
pub mod deliver;
pub mod disk;
pub mod fs;
pub mod io;
pub mod oci;
pub mod plan;
pub mod stamp;
pub mod util;
