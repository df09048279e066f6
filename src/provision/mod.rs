//! Per-platform stamping: what a node's image must contain (`plan`) and writing it (`stamp`).

pub mod cloud_init;
pub mod network_data;
pub mod password;
pub mod plan;
pub mod rootfs;
pub mod seed_scrub;
pub mod stamp;
pub mod wifi;
