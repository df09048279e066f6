//! OCI images as kiln's input: references in skopeo's transport syntax, pulled into a blob cache
//! verified by digest, unpacked into a root tree, and extended with an overlay layer (`kiln oci
//! append`) without a container engine.

pub mod artifact;
pub mod blobs;
pub mod credentials;
pub mod image;
pub mod layer;
pub mod layout;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;

pub use image::{Image, PullOptions};
pub use pull::pull;
pub use reference::ImageRef;
