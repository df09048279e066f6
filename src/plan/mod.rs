//! plan — the first stage: cluster files and image profiles parsed, validated and resolved into
//! one explicit configuration per node, every id derived, and the stamp plan made from it — with
//! every document a node gets (cloud-init, network_data.json, NetworkManager keyfiles, wifi)
//! rendered here, as data, before any image is read.

pub mod bmc_address;
pub mod cloud_init;
pub mod cluster;
pub mod cni;
pub mod diag;
pub mod ids;
pub mod input_file;
pub mod network_data;
pub mod nm_keyfile;
pub mod node;
pub mod overlay;
pub mod password;
pub mod profile;
pub mod resolve;
pub mod seed_scrub;
pub mod stamp_plan;
pub mod wifi;

pub use resolve::{Cluster, load};
