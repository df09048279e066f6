//! Registries through oci-client: token and basic auth (credentials from `credentials`),
//! HTTPS, or plain HTTP for a local registry with `--insecure`; multi-arch indexes resolved to the
//! wanted platform; every blob verified and cached by digest.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::{Client, Reference};

use super::blobs::{BlobStore, digest_of};
use super::image::{Image, PullOptions};
use super::manifest::{
    MediaType, accept, is_index_document, parse_index, parse_manifest, pick_platform,
};

pub fn parse_reference(r: &str) -> Result<Reference> {
    r.parse::<Reference>()
        .with_context(|| format!("{r:?} is not a registry reference (host/name:tag)"))
}

fn client(reference: &Reference, insecure: bool) -> Client {
    Client::new(client_config(reference, insecure))
}

fn client_config(reference: &Reference, insecure: bool) -> ClientConfig {
    let protocol = if insecure {
        ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    ClientConfig {
        protocol,
        // kiln resolves indexes itself, to name the platforms on offer when one is missing.
        platform_resolver: None,
        ..Default::default()
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Explains the usual ways a registry request fails.
fn hint(e: oci_client::errors::OciDistributionError, what: &str, insecure: bool) -> anyhow::Error {
    let text = e.to_string();
    // Authorization first: its messages carry the URL too.
    let extra = if text.contains("401")
        || text.contains("nauthorized")
        || text.contains("Not authorized")
        || text.contains("denied")
    {
        " (the registry wants credentials: log in with `skopeo login`, `podman login` or \
         `docker login`; kiln reads $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, \
         ~/.config/containers/auth.json and ~/.docker/config.json, and the credential helpers \
         they name)"
    } else if text.contains("http://")
        || text.contains("https://")
        || text.contains("error sending request")
    {
        if insecure {
            " (is the registry running and reachable?)"
        } else {
            " (a local registry without TLS needs --insecure)"
        }
    } else {
        ""
    };
    anyhow::anyhow!("{what}: {text}{extra}")
}

/// Pulls `r` into the blob store.
pub fn pull(r: &str, opts: &PullOptions, store: &BlobStore) -> Result<Image> {
    let reference = parse_reference(r)?;
    let client = client(&reference, opts.insecure);
    let auth = super::credentials::auth_for(reference.resolve_registry());
    let accept = accept();
    let accept: Vec<&str> = accept.iter().map(String::as_str).collect();
    runtime()?.block_on(async {
        let (mut bytes, mut digest) = client
            .pull_manifest_raw(&reference, &auth, &accept)
            .await
            .map_err(|e| hint(e, "fetching the manifest", opts.insecure))?;
        let mut target = reference.clone();
        for _ in 0..4 {
            if !is_index_document(&bytes)? {
                break;
            }
            let (d, _) = pick_platform(&parse_index(&bytes, "the image index")?, &opts.arch)?;
            target = Reference::with_digest(
                reference.resolve_registry().to_string(),
                reference.repository().to_string(),
                d,
            );
            (bytes, digest) = client
                .pull_manifest_raw(&target, &auth, &accept)
                .await
                .map_err(|e| hint(e, "fetching the platform manifest", opts.insecure))?;
        }
        if digest_of(&bytes) != digest {
            bail!("the registry's manifest does not match its digest {digest}");
        }
        store.put_bytes(&bytes)?;
        let manifest = parse_manifest(&bytes, &digest)?;
        let wanted: Vec<String> = std::iter::once(manifest.config())
            .chain(manifest.layers())
            .map(|d| d.digest().to_string())
            .collect();
        for d in &wanted {
            if store.has(d) {
                continue;
            }
            let tmp = store.temp(d)?;
            let file = tokio::fs::File::create(&tmp).await?;
            let fetched = client.pull_blob(&target, d.as_str(), file).await;
            if let Err(e) = fetched {
                let _ = std::fs::remove_file(&tmp);
                return Err(hint(e, &format!("fetching blob {d}"), opts.insecure));
            }
            store.admit(&tmp, d, &format!("blob {d}"))?;
        }
        Image::from_manifest(&bytes, digest, &mut |d| store.path(d))
    })
}

/// Pushes blobs (skipping those the registry has) and then the manifest under `r`'s tag.
pub fn push(
    r: &str,
    insecure: bool,
    blobs: &[(String, PathBuf)],
    manifest: &[u8],
) -> Result<String> {
    let reference = parse_reference(r)?;
    let client = client(&reference, insecure);
    let auth = super::credentials::auth_for(reference.resolve_registry());
    runtime()?.block_on(async {
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| hint(e, "authenticating for push", insecure))?;
        for (digest, path) in blobs {
            let exists = client
                .blob_exists(&reference, digest)
                .await
                .map_err(|e| hint(e, "asking for a blob", insecure))?;
            if exists {
                continue;
            }
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            client
                .push_blob(&reference, data, digest)
                .await
                .map_err(|e| hint(e, &format!("pushing blob {digest}"), insecure))?;
        }
        push_manifest(
            &client,
            &reference,
            manifest,
            &MediaType::ImageManifest,
            insecure,
        )
        .await?;
        Ok(digest_of(manifest))
    })
}

/// Whether a registry error says the tag or repository does not exist (yet).
fn not_found(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
    match e {
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|x| matches!(x.code, C::ManifestUnknown | C::NameUnknown)),
        E::ServerError { code: 404, .. } | E::ImageManifestNotFoundError(_) => true,
        _ => false,
    }
}

/// What `r`'s tag names now (index or manifest bytes), or `None` when it names nothing.
pub fn fetch_tag(r: &str, insecure: bool) -> Result<Option<Vec<u8>>> {
    let reference = parse_reference(r)?;
    let client = client(&reference, insecure);
    let auth = super::credentials::auth_for(reference.resolve_registry());
    runtime()?.block_on(async {
        match client
            .pull_manifest_raw(
                &reference,
                &auth,
                &[
                    MediaType::ImageIndex.as_ref(),
                    MediaType::ImageManifest.as_ref(),
                ],
            )
            .await
        {
            Ok((bytes, _)) => Ok(Some(bytes.to_vec())),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(hint(e, &format!("looking up {r}"), insecure)),
        }
    })
}

/// Pushes a disk image as an artifact under `r`'s tag: the image streamed from `image` (a 2 GiB
/// image is never held in memory), the empty config, the manifest by its digest, then the index
/// under the tag. Blobs the registry has are not sent again.
pub fn push_disk(
    r: &str,
    insecure: bool,
    image: &std::path::Path,
    artifact: &super::artifact::DiskArtifact,
    manifest: &[u8],
    index: &[u8],
) -> Result<()> {
    use super::artifact::EMPTY_CONFIG;
    let reference = parse_reference(r)?;
    // One streamed PUT per blob, as skopeo does: chunked uploads cost a request per chunk (twice
    // the time for a 2 GiB image on loopback, bench/oci-push.sh).
    let client = Client::new(ClientConfig {
        use_monolithic_push: true,
        ..client_config(&reference, insecure)
    });
    let auth = super::credentials::auth_for(reference.resolve_registry());
    runtime()?.block_on(async {
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| hint(e, "authenticating for push", insecure))?;
        let has = |digest: String| {
            let (client, reference) = (&client, &reference);
            async move {
                client
                    .blob_exists(reference, &digest)
                    .await
                    .map_err(|e| hint(e, "asking for a blob", insecure))
            }
        };
        if !has(artifact.digest.clone()).await? {
            let file = tokio::fs::File::open(image)
                .await
                .with_context(|| format!("opening {}", image.display()))?;
            let stream = futures_util::TryStreamExt::map_err(
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
                oci_client::errors::OciDistributionError::IoError,
            );
            client
                .push_blob_stream(&reference, stream, &artifact.digest, Some(artifact.size))
                .await
                .map_err(|e| hint(e, &format!("pushing {}", image.display()), insecure))?;
        }
        let empty = digest_of(EMPTY_CONFIG);
        if !has(empty.clone()).await? {
            client
                .push_blob(&reference, EMPTY_CONFIG.to_vec(), &empty)
                .await
                .map_err(|e| hint(e, "pushing the empty config", insecure))?;
        }
        let by_digest = parse_reference(&format!(
            "{}/{}@{}",
            reference.registry(),
            reference.repository(),
            digest_of(manifest)
        ))?;
        push_manifest(
            &client,
            &by_digest,
            manifest,
            &MediaType::ImageManifest,
            insecure,
        )
        .await?;
        push_manifest(&client, &reference, index, &MediaType::ImageIndex, insecure).await
    })
}

/// Pushes a manifest or index of `media_type` under `reference` (a tag or a digest).
async fn push_manifest(
    client: &Client,
    reference: &Reference,
    bytes: &[u8],
    media_type: &MediaType,
    insecure: bool,
) -> Result<()> {
    client
        .push_manifest_raw(
            reference,
            bytes.to_vec(),
            media_type
                .as_ref()
                .parse()
                .expect("media types are valid header values"),
        )
        .await
        .map_err(|e| hint(e, &format!("pushing {media_type} to {reference}"), insecure))?;
    Ok(())
}
