//! stamp — the third stage: the per-node edits, made on image files without mounting: cloud-init
//! seeds on the boot FAT, files on an ext4 root, a layer on an OCI image.

pub mod apply;
pub mod cloud_init;
pub mod customize;
pub mod network_data;
pub mod oci_append;
pub mod password;
pub mod rootfs;
pub mod seed_scrub;
pub mod wifi;
