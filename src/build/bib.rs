//! `kiln build --engine bootc-image-builder`: the reference engine, where podman exists.
//!
//! kiln writes bootc-image-builder's `config.toml` from the node's users, ssh keys and the
//! profile's kernel arguments, runs the builder under rootful podman, and collects `disk.raw` or
//! `disk.qcow2` into `out/` with kiln's checksum and manifest. Without podman it says so and
//! stops before doing anything.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::artifact::manifest::{Entry, Manifest, sha256sum_line};
use crate::build::OutputFormat;
use crate::plan::Cluster;
use crate::plan::node::NodeConfig;
use crate::util::fsutil::write_atomic;

/// The builder image kiln runs (override with `$KILN_BIB_IMAGE`).
pub const DEFAULT_IMAGE: &str = "quay.io/centos-bootc/bootc-image-builder:latest";

/// bootc-image-builder's config.toml for `node`.
pub fn config_toml(node: &NodeConfig, kernel_args: &[String]) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = String::from("# Written by kiln for bootc-image-builder.\n");
    for u in &node.users {
        out.push_str(&format!(
            "\n[[customizations.user]]\nname = {}\n",
            q(&u.name)
        ));
        if let Some(h) = &u.password_hash {
            out.push_str(&format!("password = {}\n", q(h)));
        }
        if !u.ssh_authorized_keys.is_empty() {
            // One `key` per user: bootc-image-builder takes a newline-separated list.
            out.push_str(&format!("key = {}\n", q(&u.ssh_authorized_keys.join("\n"))));
        }
        let mut groups = u.groups.clone();
        if u.sudo && !groups.iter().any(|g| g == "wheel") {
            groups.push("wheel".into());
        }
        if !groups.is_empty() {
            let list: Vec<String> = groups.iter().map(|g| q(g)).collect();
            out.push_str(&format!("groups = [{}]\n", list.join(", ")));
        }
    }
    if !kernel_args.is_empty() {
        out.push_str(&format!(
            "\n[customizations.kernel]\nappend = {}\n",
            q(&kernel_args.join(" "))
        ));
    }
    out
}

/// The podman command line that runs the builder.
pub fn command(image_ref: &str, config: &Path, output: &Path, format: OutputFormat) -> Vec<String> {
    let bib = std::env::var("KILN_BIB_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.to_string());
    let image = image_ref.strip_prefix("docker://").unwrap_or(image_ref);
    let ty = match format {
        OutputFormat::Raw => "raw",
        OutputFormat::Qcow2 => "qcow2",
    };
    [
        "podman",
        "run",
        "--rm",
        "--privileged",
        "--pull=newer",
        "--security-opt",
        "label=type:unconfined_t",
        "-v",
        &format!("{}:/config.toml:ro", config.display()),
        "-v",
        &format!("{}:/output", output.display()),
        "-v",
        "/var/lib/containers/storage:/var/lib/containers/storage",
        &bib,
        "--type",
        ty,
        "--rootfs",
        "ext4",
        image,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Builds `node` with bootc-image-builder.
pub fn build(
    cluster: &Cluster,
    node: &NodeConfig,
    image_ref: &str,
    out_dir: &Path,
    format: OutputFormat,
) -> Result<PathBuf> {
    let (profile, _) = cluster.profile_of(node);
    if !crate::util::cmd::available("podman") {
        bail!(
            "--engine bootc-image-builder needs podman, which is not installed (or not on PATH); \
             install podman and run kiln as root, or use kiln's native builder (drop --engine)"
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "bootc-image-builder runs under rootful podman: run kiln as root for --engine bootc-image-builder"
        );
    }
    let work = out_dir.join(format!(".{}.bib", node.name));
    std::fs::create_dir_all(work.join("output"))?;
    let config = work.join("config.toml");
    std::fs::write(&config, config_toml(node, &profile.disk.build.kernel_args))?;
    let image = image_ref.strip_prefix("docker://").unwrap_or(image_ref);
    crate::util::cmd::run("podman", ["pull", image])?;
    let argv = command(image_ref, &config, &work.join("output"), format);
    crate::util::cmd::run(&argv[0], &argv[1..])?;
    let (sub, ext) = match format {
        OutputFormat::Raw => ("image/disk.raw", "raw"),
        OutputFormat::Qcow2 => ("qcow2/disk.qcow2", "qcow2"),
    };
    let made = work.join("output").join(sub);
    let dest = out_dir.join(format!("{}.{ext}", node.name));
    std::fs::rename(&made, &dest)
        .with_context(|| format!("collecting {} (did the builder fail?)", made.display()))?;
    let sha = crate::base::cache::sha256_file(&dest)?;
    let name = dest
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let sum = sha256sum_line(&sha, &name);
    write_atomic(&out_dir.join(format!("{name}.sha256sum")), sum.as_bytes())?;
    let manifest = Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        node: node.name.clone(),
        profile: profile.name.clone(),
        source_date_epoch: None,
        fat_timestamp: String::new(),
        disk_signature: None,
        instance_id: String::new(),
        inputs: vec![Entry {
            role: "oci-image".into(),
            path: image_ref.into(),
            sha256: String::new(),
            size: None,
        }],
        outputs: vec![Entry {
            role: "image".into(),
            path: name,
            sha256: sha,
            size: Some(std::fs::metadata(&dest)?.len()),
        }],
    };
    write_atomic(
        &out_dir.join(format!("{}.manifest.json", node.name)),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "x\n").unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(
            &path,
            r#"
[cluster]
name = "c"
seed = "c"
[[users]]
name = "admin"
groups = ["adm"]
sudo = true
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnExampleKeyReplaceMeWithYourOwnKey0001 a@b", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnExampleKeyReplaceMeWithYourOwnKey0002 c@d"]
[defaults]
image = "bootc-uefi-x86"
bmc = { address = "redfish+http://127.0.0.1:8000/redfish/v1/Systems/{name}", username = "u", password = { file = "pw" } }
[[node]]
name = "edge-1"
boot_mac = "52:54:00:00:00:01"
"#,
        )
        .unwrap();
        crate::plan::load(&path)
            .unwrap()
            .node("edge-1")
            .unwrap()
            .clone()
    }

    // These check what kiln hands to bootc-image-builder; the builder itself needs podman, which
    // this machine does not have, so nothing here runs it.
    #[test]
    fn bib_config_only_users_keys_groups_kernel_args() {
        let text = config_toml(&node(), &["console=ttyS0,115200".into()]);
        let v: toml::Value = toml::from_str(&text).unwrap();
        let user = &v["customizations"]["user"][0];
        assert_eq!(user["name"].as_str(), Some("admin"));
        let keys = user["key"].as_str().unwrap();
        assert_eq!(keys.lines().count(), 2, "{keys}");
        let groups: Vec<&str> = user["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap())
            .collect();
        assert_eq!(groups, ["adm", "wheel"]);
        assert_eq!(
            v["customizations"]["kernel"]["append"].as_str(),
            Some("console=ttyS0,115200")
        );
    }

    #[test]
    fn bib_command_line_only() {
        let argv = command(
            "docker://registry.local:5000/edge/node:v2",
            Path::new("/w/config.toml"),
            Path::new("/w/output"),
            OutputFormat::Qcow2,
        );
        let line = argv.join(" ");
        assert!(line.starts_with("podman run --rm --privileged"), "{line}");
        assert!(line.contains("-v /w/config.toml:/config.toml:ro"), "{line}");
        assert!(
            line.contains("--type qcow2 --rootfs ext4 registry.local:5000/edge/node:v2"),
            "{line}"
        );
    }
}
