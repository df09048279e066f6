//! `kiln metal3 manifests`: a BareMetalHost and its Secrets for every bare-metal node.
//!
//! What a Metal3 user writes by hand, derived from the cluster file and the builds: the BMC
//! address and credentials, the boot MAC, root device hints, the image as `kiln publish` names it
//! with its sha256 (or sha512, `--checksum-type`), and the node's cloud-init user-data and
//! OpenStack `network_data.json`, which Ironic puts on the config drive. Secrets carry their
//! values base64-encoded under `data`, as `kubectl get -o yaml` shows them.
//!
//! With an `oci://REGISTRY/REPO` image URL the hosts name the artifacts `kiln publish --to oci://`
//! pushed (tag `<node>-<sha8>`), with no checksum (BMO v0.14+ refuses one: the registry's digests
//! verify the image) and, when kiln has credentials for that registry, an `ociAuthSecretName`
//! naming a `kubernetes.io/dockerconfigjson` Secret (BMO v0.13+).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::artifact::manifest::ChecksumType;
use crate::deliver::publish;
use crate::plan::Cluster;
use crate::plan::network_data;
use crate::plan::node::{BareMetal, NodeConfig};
use crate::plan::profile::DeliverMethod;
use crate::plan::stamp_plan as plan;

pub struct Options<'a> {
    /// Where the builds are (`out/`).
    pub out: &'a Path,
    /// The base URL `kiln serve` (or nginx) serves the published images under, or the
    /// `oci://REGISTRY/REPO` they were pushed to.
    pub image_url: &'a str,
    pub namespace: Option<&'a str>,
    /// The digest written as `image.checksum`.
    pub checksum: ChecksumType,
}

/// The nodes Metal3 provisions: those with a BMC, and every node whose profile is delivered
/// over HTTP (which must then have one).
pub fn bare_metal_nodes(cluster: &Cluster) -> Result<Vec<&NodeConfig>> {
    let mut nodes = Vec::new();
    for node in &cluster.nodes {
        let (profile, _) = cluster.profile_of(node);
        if node.bare_metal.is_some() {
            nodes.push(node);
        } else if profile.deliver.method == DeliverMethod::Http {
            bail!(
                "node {} (image {}) is provisioned by Ironic but has no bmc in {}",
                node.name,
                profile.name,
                cluster.file.path
            );
        }
    }
    if nodes.is_empty() {
        bail!(
            "{} has no bare-metal nodes (give nodes a bmc, boot_mac and root_device_hints)",
            cluster.file.path
        );
    }
    Ok(nodes)
}

fn b64(s: &str) -> String {
    crate::plan::cloud_init::base64(s.as_bytes())
}

fn metadata(name: &str, cluster: &Cluster, namespace: Option<&str>) -> Value {
    let mut m = json!({
        "name": name,
        "labels": {
            "app.kubernetes.io/managed-by": "kiln",
            "kiln.dev/cluster": cluster.name,
        },
    });
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// The manifest documents for one node: BareMetalHost, BMC secret, user-data, network-data.
pub fn node_documents(cluster: &Cluster, node: &NodeConfig, opts: &Options) -> Result<Vec<Value>> {
    let bm = node
        .bare_metal
        .as_ref()
        .with_context(|| format!("node {} has no bmc", node.name))?;
    let plan = plan::plan(cluster, node).with_context(|| format!("planning node {}", node.name))?;
    let network_data = match &plan.network_data {
        Some(n) => n.clone(),
        None => network_data::render(node)?,
    };
    let image_spec = node_image(node, bm, opts)?;
    let ns = opts.namespace;
    let names = SecretNames::of(&node.name);
    let mut host = bare_metal_host(cluster, node, bm, &image_spec.spec, &names, ns)?;
    let secret = |name: &str, data: Value| {
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(name, cluster, ns),
            "type": "Opaque",
            "data": data,
        })
    };
    if let Some((name, _)) = &image_spec.registry_auth {
        host["spec"]["image"]["ociAuthSecretName"] = json!(name);
    }
    let mut docs = vec![host];
    if let Some((name, config)) = &image_spec.registry_auth {
        let mut s = secret(name, json!({ ".dockerconfigjson": b64(config) }));
        s["type"] = json!("kubernetes.io/dockerconfigjson");
        docs.push(s);
    }
    docs.extend([
        secret(
            &names.bmc,
            json!({
                "username": b64(&bm.bmc_username),
                "password": b64(bm.bmc_password.expose()),
            }),
        ),
        secret(
            &names.user_data,
            json!({ "userData": b64(&plan.user_data) }),
        ),
        secret(
            &names.network_data,
            json!({ "networkData": b64(&network_data) }),
        ),
    ]);
    Ok(docs)
}

/// The Secrets a node's BareMetalHost refers to, by name.
struct SecretNames {
    bmc: String,
    user_data: String,
    network_data: String,
}

impl SecretNames {
    fn of(node: &str) -> SecretNames {
        SecretNames {
            bmc: format!("{node}-bmc-secret"),
            user_data: format!("{node}-user-data"),
            network_data: format!("{node}-network-data"),
        }
    }
}

/// The image the node is provisioned with: its bootc container, or kiln's published build.
fn node_image(node: &NodeConfig, bm: &BareMetal, opts: &Options) -> Result<ImageSpec> {
    Ok(match &bm.bootc_image {
        // Ironic deploys the container itself: there is nothing of kiln's to point at.
        Some(url) => ImageSpec {
            spec: json!({ "url": url }),
            registry_auth: registry_auth(node, url),
        },
        None => {
            let image = publish::built_image(&node.name, opts.out).with_context(|| {
                format!(
                    "node {} has no build in {} — run `kiln build --node {}` first",
                    node.name,
                    opts.out.display(),
                    node.name
                )
            })?;
            image_spec(node, &image, opts)?
        }
    })
}

/// The BareMetalHost: its BMC, boot MAC, root device hints, `image` and the Secrets it uses.
fn bare_metal_host(
    cluster: &Cluster,
    node: &NodeConfig,
    bm: &BareMetal,
    image: &Value,
    names: &SecretNames,
    ns: Option<&str>,
) -> Result<Value> {
    let reference = |name: &str| {
        let mut r = json!({ "name": name });
        if let Some(ns) = ns {
            r["namespace"] = json!(ns);
        }
        r
    };
    Ok(json!({
        "apiVersion": "metal3.io/v1alpha1",
        "kind": "BareMetalHost",
        "metadata": metadata(&node.name, cluster, ns),
        "spec": {
            "online": bm.online,
            "bootMode": "UEFI",
            "bootMACAddress": bm.boot_mac,
            "bmc": {
                "address": bm.bmc_address,
                "credentialsName": names.bmc,
                "disableCertificateVerification": bm.disable_certificate_verification,
            },
            "rootDeviceHints": root_device_hints(&bm.root_device_hints)?,
            "image": image,
            "userData": reference(&names.user_data),
            "networkData": reference(&names.network_data),
        },
    }))
}

/// A host's `spec.image`, and the registry credentials Secret (name, docker config JSON) it
/// names, if any.
struct ImageSpec {
    spec: Value,
    registry_auth: Option<(String, String)>,
}

/// The dockerconfigjson Secret for an `oci://` image, when kiln has basic credentials for its
/// registry (the auth files `skopeo login` / `docker login` write): BMO reads them through
/// `ociAuthSecretName` and hands Ironic `user:password`.
fn registry_auth(node: &NodeConfig, url: &str) -> Option<(String, String)> {
    let registry = url
        .trim_start_matches("oci://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    match crate::oci::credentials::auth_for(&registry) {
        oci_client::secrets::RegistryAuth::Basic(user, password) => {
            let config = json!({"auths": {registry: {"auth": b64(&format!("{user}:{password}"))}}});
            Some((format!("{}-registry-secret", node.name), config.to_string()))
        }
        _ => None,
    }
}

fn image_spec(node: &NodeConfig, image: &publish::BuiltImage, opts: &Options) -> Result<ImageSpec> {
    if opts.image_url.starts_with("oci://") {
        let (repo, tag) = publish::parse_oci_target(opts.image_url)?;
        if tag.is_some() {
            bail!(
                "--image-url {} names a tag; give the repository (oci://REGISTRY/REPO): each node's tag is <node>-<sha8>, as `kiln publish --to oci://` pushes it",
                opts.image_url
            );
        }
        let url = format!(
            "oci://{repo}:{}",
            publish::published_tag(&node.name, &image.sha256)
        );
        return Ok(ImageSpec {
            spec: json!({ "url": url, "format": image.format }),
            registry_auth: registry_auth(node, &url),
        });
    }
    let url = format!(
        "{}/{}",
        opts.image_url.trim_end_matches('/'),
        image.published_name(&node.name)
    );
    // The build manifest records the sha256; any other digest is computed from the image.
    let checksum = match opts.checksum {
        ChecksumType::Sha256 => image.sha256.clone(),
        other => other.digest_file(&image.path).with_context(|| {
            format!("computing the {} of {}", other.name(), image.path.display())
        })?,
    };
    Ok(ImageSpec {
        spec: json!({
            "url": url,
            "checksum": checksum,
            "checksumType": opts.checksum.name(),
            "format": image.format,
        }),
        registry_auth: None,
    })
}

/// Ironic's hint names are camelCase in a BareMetalHost.
fn root_device_hints(h: &crate::plan::node::RootDeviceHints) -> Result<Value> {
    let snake = serde_json::to_value(h)?;
    let mut out = serde_json::Map::new();
    for (k, v) in snake.as_object().into_iter().flatten() {
        let camel: String = k
            .split('_')
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    w.to_string()
                } else {
                    w[..1].to_uppercase() + &w[1..]
                }
            })
            .collect();
        out.insert(camel, v.clone());
    }
    Ok(Value::Object(out))
}

/// All bare-metal nodes' documents as one multi-document YAML stream.
pub fn manifests(cluster: &Cluster, opts: &Options) -> Result<String> {
    let mut text = String::new();
    // Every node is checked before anything is printed, so a missing build never leaves half a
    // stream on stdout.
    let mut problems = Vec::new();
    let mut docs = Vec::new();
    for node in bare_metal_nodes(cluster)? {
        match node_documents(cluster, node, opts) {
            Ok(d) => docs.extend(d),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml_ng::to_string(&d)?);
    }
    Ok(text)
}
