//! stamp — the third stage: the plan applied to image files without mounting: cloud-init seeds
//! on the boot FAT, files on an ext4 root, hypriot `flash`'s edits, a layer on an OCI image.

pub mod apply;
pub mod customize;
pub mod oci_append;
pub mod rootfs;
