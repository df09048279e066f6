//! Image references in skopeo's transport syntax: `docker://host/name:tag`, `oci:<dir>[:<tag>]`,
//! `oci-archive:<file>[:<tag>]`, `docker-archive:<file>`.

use std::path::PathBuf;

use anyhow::{Result, bail};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A registry reference without the `docker://` prefix (`host[:port]/name[:tag|@digest]`).
    Registry(String),
    /// An OCI image layout directory, and the `org.opencontainers.image.ref.name` to pick.
    Layout { dir: PathBuf, tag: Option<String> },
    /// A tar of an OCI image layout.
    OciArchive { file: PathBuf, tag: Option<String> },
    /// A `docker save` tarball.
    DockerArchive { file: PathBuf },
}

impl ImageRef {
    /// Whether `s` names an OCI image (has one of the transport prefixes).
    pub fn is_oci(s: &str) -> bool {
        ["docker://", "oci:", "oci-archive:", "docker-archive:"]
            .iter()
            .any(|p| s.starts_with(p))
    }

    pub fn parse(s: &str) -> Result<ImageRef> {
        if let Some(r) = s.strip_prefix("docker://") {
            if r.is_empty() || r.contains("://") {
                bail!("{s:?} is not a registry reference (docker://host/name:tag)");
            }
            return Ok(ImageRef::Registry(r.to_string()));
        }
        if let Some(r) = s.strip_prefix("oci-archive:") {
            let (file, tag) = split_tag(r);
            return Ok(ImageRef::OciArchive { file, tag });
        }
        if let Some(r) = s.strip_prefix("oci:") {
            let (dir, tag) = split_tag(r);
            return Ok(ImageRef::Layout { dir, tag });
        }
        if let Some(r) = s.strip_prefix("docker-archive:") {
            // `docker-archive:file[:name:tag]`: kiln reads the first image of the archive.
            let file = r.split_once(':').map_or(r, |(f, _)| f);
            return Ok(ImageRef::DockerArchive {
                file: PathBuf::from(file),
            });
        }
        bail!(
            "{s:?} is not an image reference; use docker://host/name:tag, oci:DIR[:TAG], \
             oci-archive:FILE[:TAG] or docker-archive:FILE"
        )
    }
}

/// `path[:tag]`, where a tag never contains `/` (so `oci:./dir` and `oci:/a/b:v1` both work).
fn split_tag(s: &str) -> (PathBuf, Option<String>) {
    match s.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !p.is_empty() && !t.is_empty() => {
            (PathBuf::from(p), Some(t.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Registry(r) => write!(f, "docker://{r}"),
            ImageRef::Layout { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                tag.iter().try_for_each(|t| write!(f, ":{t}"))
            }
            ImageRef::OciArchive { file, tag } => {
                write!(f, "oci-archive:{}", file.display())?;
                tag.iter().try_for_each(|t| write!(f, ":{t}"))
            }
            ImageRef::DockerArchive { file } => write!(f, "docker-archive:{}", file.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports() {
        assert_eq!(
            ImageRef::parse("docker://127.0.0.1:5000/node:base").unwrap(),
            ImageRef::Registry("127.0.0.1:5000/node:base".into())
        );
        assert_eq!(
            ImageRef::parse("oci:/srv/img:v1").unwrap(),
            ImageRef::Layout {
                dir: "/srv/img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:./img").unwrap(),
            ImageRef::Layout {
                dir: "./img".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("docker-archive:a.tar").unwrap(),
            ImageRef::DockerArchive {
                file: "a.tar".into()
            }
        );
        assert!(ImageRef::parse("registry.local/node:base").is_err());
        assert!(ImageRef::is_oci("oci-archive:x.tar"));
        assert!(!ImageRef::is_oci("https://example.org/x.img"));
    }
}
