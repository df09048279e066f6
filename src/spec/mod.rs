//! Cluster files and image profiles: parse, validate, resolve, derive ids.

pub mod bmc_address;
pub mod cluster;
pub mod diag;
pub mod ids;
pub mod node;
pub mod overlay;
pub mod profile;
pub mod resolve;

pub use resolve::{Cluster, load};
