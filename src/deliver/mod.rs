//! deliver — the last stage: each target has its own door. Flash a block device, fastboot a
//! phone, serve over HTTP, publish to an OCI registry, write Metal3 manifests, install on a live
//! host over ssh, or boot the image in QEMU.

pub mod fastboot;
pub mod flash;
pub mod metal3;
pub mod publish;
pub mod remote;
pub mod run;
pub mod run_cluster;
pub mod serve;
