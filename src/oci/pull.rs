//! `pull`: one image reference, wherever it points (registry, layout, archive), into a verified
//! [`Image`].

use anyhow::{Context, Result};

use super::blobs::BlobStore;
use super::image::{Image, PullOptions};
use super::reference::ImageRef;
use super::{layout, registry};

/// Pulls `reference` into the blob cache (or verifies it in place, for an image layout).
pub fn pull(reference: &ImageRef, opts: &PullOptions) -> Result<Image> {
    let store = BlobStore::open()?;
    let image = match reference {
        ImageRef::Registry(r) => registry::pull(r, opts, &store),
        ImageRef::Layout { dir, tag } => layout::read_layout(dir, tag.as_deref(), opts),
        ImageRef::OciArchive { file, tag } => {
            layout::read_oci_archive(file, tag.as_deref(), opts, &store)
        }
        ImageRef::DockerArchive { file } => layout::read_docker_archive(file, &store),
    }
    .with_context(|| format!("pulling {reference}"))?;
    Ok(Image {
        reference: reference.to_string(),
        ..image
    })
}
