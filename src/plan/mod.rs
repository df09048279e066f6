//! plan — the first stage: cluster files and image profiles parsed, validated and resolved into
//! one explicit configuration per node, every id derived, and the stamp plan made from it.

pub mod bmc_address;
pub mod cluster;
pub mod diag;
pub mod ids;
pub mod node;
pub mod overlay;
pub mod profile;
pub mod resolve;
pub mod stamp_plan;

pub use resolve::{Cluster, load};
