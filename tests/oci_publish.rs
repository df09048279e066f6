//! `kiln publish --to oci://…`: a build's image pushed as a disk-image artifact to Debian's
//! docker-registry on loopback, judged by skopeo (the manifest as the registry stores it) and by
//! Ironic's own OCI code (PyPI `ironic`, in the venv scripts/setup.sh makes), which must pick it,
//! name its disk format and size, and download the very bytes the build hashed.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn ironic_python() -> Option<std::path::PathBuf> {
    let venv = std::env::var_os("KILN_IRONIC_VENV").unwrap_or("/opt/kiln-ironic-venv".into());
    let python = Path::new(&venv).join("bin/python");
    python.is_file().then_some(python)
}

/// Builds edge-1 of the edgelab example on kiln's sample base, as `format`.
fn built(dir: &Path, format: &str) -> std::path::PathBuf {
    let cluster = example_cluster("edgelab", dir);
    let out = dir.join(format!("out-{format}"));
    run(build_command(
        &dir.join("cache"),
        &cluster,
        "edge-1",
        "sample".as_ref(),
        &out,
    )
    .args(["--format", format]));
    out
}

fn sha256_of(sum_file: &Path) -> String {
    std::fs::read_to_string(sum_file).unwrap()[..64].to_string()
}

#[test]
fn a_published_artifact_is_what_ironic_deploys() {
    if !have_tools(&["docker-registry", "skopeo", "mke2fs", "debugfs"]) {
        return;
    }
    let Some(python) = ironic_python() else {
        skip("no Ironic venv (/opt/kiln-ironic-venv; scripts/setup.sh makes it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let target = format!("oci://{}/lab/images", registry.addr);
    for (format, disktype) in [("raw", "raw"), ("qcow2", "qcow2")] {
        let out = built(dir.path(), format);
        let sum_file = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".sha256sum"))
            .unwrap()
            .path();
        let sha = sha256_of(&sum_file);
        let image = out.join(sum_file.file_stem().unwrap());
        let size = std::fs::metadata(&image).unwrap().len();
        let publish = |extra: &[&str]| {
            let mut c = kiln(&dir.path().join("cache"));
            c.args(["publish", "--node", "edge-1", "--out"])
                .arg(&out)
                .args(["--to", &target, "--insecure"])
                .args(extra);
            c.output().unwrap()
        };
        let o = publish(&[]);
        let said = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let url = format!("{target}:edge-1-{}", &sha[..8]);
        assert_eq!(said.trim(), format!("pushed {url}"));
        // Again: the tag already names this image; nothing is pushed.
        let again = publish(&[]);
        assert_eq!(
            String::from_utf8_lossy(&again.stdout).trim(),
            format!("already pushed {url}")
        );

        // The registry's own view, through skopeo.
        let raw = stdout(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &url.replace("oci://", "docker://"),
        ]));
        let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(entry["annotations"]["disktype"], disktype, "{raw}");
        assert_eq!(entry["platform"]["architecture"], "amd64", "{raw}");

        // Ironic's selection and download.
        let judged = stdout(
            Command::new(&python)
                .arg(repo().join("tests/fixtures/ironic-oci-resolve.py"))
                .arg(&url)
                .arg("x86_64"),
        );
        let info: serde_json::Value = serde_json::from_str(judged.trim()).unwrap();
        assert_eq!(info["image_disk_format"], disktype, "{judged}");
        assert_eq!(info["image_size"], size, "{judged}");
        assert_eq!(info["image_checksum"], sha.as_str(), "{judged}");
        assert_eq!(info["image_compression_type"], serde_json::Value::Null);
        assert_eq!(info["downloaded_sha256"], sha.as_str(), "{judged}");
        assert_eq!(info["downloaded_bytes"], size, "{judged}");
    }

    // A tag that names another image is never moved.
    let out = dir.path().join("out-raw");
    let o = kiln(&dir.path().join("cache"))
        .args(["publish", "--node", "edge-1", "--out"])
        .arg(&out)
        .args(["--to", &format!("{target}:stable"), "--insecure"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let qcow = dir.path().join("out-qcow2");
    let o = kiln(&dir.path().join("cache"))
        .args(["publish", "--node", "edge-1", "--out"])
        .arg(&qcow)
        .args(["--to", &format!("{target}:stable"), "--insecure"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("already names another image"),
        "{err}"
    );
}

/// `kiln metal3 manifests --image-url oci://…`: hosts that name the pushed tags, without a
/// checksum (BMO refuses one for oci://), with an `ociAuthSecretName` Secret when kiln has the
/// registry's credentials; BMO's CRD accepts them.
#[test]
fn metal3_hosts_name_the_pushed_artifacts() {
    if !have_tools(&["mke2fs", "debugfs"]) {
        return;
    }
    let Some(crd) = common::bmo::bmo_crd() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = bootc_cluster(dir.path());
    // edge-2 is deployed by Ironic from a bootc container image: nothing of kiln's is built.
    let mut text = std::fs::read_to_string(&cluster).unwrap();
    text.push_str(
        "\n[[node]]\nname = \"edge-2\"\nboot_mac = \"52:54:00:0e:d9:02\"\nbootc_image = \"registry.lab:5000/edge/node:v1\"\n",
    );
    std::fs::write(&cluster, &text).unwrap();
    let out = dir.path().join("out");
    build(
        &dir.path().join("cache"),
        &cluster,
        "edge-1",
        "sample".as_ref(),
        &out,
    );
    let check = stdout(
        kiln(&dir.path().join("cache"))
            .arg("check")
            .arg("--cluster")
            .arg(&cluster),
    );
    assert!(
        check.contains("bootc image oci://registry.lab:5000/edge/node:v1")
            && check.contains("Ironic 35"),
        "{check}"
    );
    let sha = sha256_of(&out.join("edge-1.img.sha256sum"));
    let manifests = |auth_file: Option<&Path>| {
        let mut c = kiln(&dir.path().join("cache"));
        c.args(["metal3", "manifests", "--cluster"])
            .arg(&cluster)
            .arg("--out")
            .arg(&out)
            .args(["--image-url", "oci://registry.lab:5000/lab/images"])
            .env("HOME", dir.path())
            .env_remove("DOCKER_CONFIG")
            .env_remove("XDG_RUNTIME_DIR");
        match auth_file {
            Some(f) => c.env("REGISTRY_AUTH_FILE", f),
            None => c.env_remove("REGISTRY_AUTH_FILE"),
        };
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };

    let anonymous = manifests(None);
    let docs = common::bmo::parse_yaml_stream(&anonymous);
    let image = &docs[0]["spec"]["image"];
    assert_eq!(
        image["url"],
        format!("oci://registry.lab:5000/lab/images:edge-1-{}", &sha[..8])
    );
    assert!(
        image.get("checksum").is_none() && image.get("ociAuthSecretName").is_none(),
        "{image}"
    );
    let bootc = docs
        .iter()
        .find(|d| d["kind"] == "BareMetalHost" && d["metadata"]["name"] == "edge-2")
        .unwrap();
    assert_eq!(
        bootc["spec"]["image"],
        serde_json::json!({"url": "oci://registry.lab:5000/edge/node:v1"})
    );
    let (ok, said) = common::bmo::bmo_judge(&crd, &anonymous);
    assert!(ok, "BMO's CRD refuses the oci:// hosts:\n{said}");

    // Not a registry reference: refused at its line.
    std::fs::write(
        &cluster,
        text.replace("registry.lab:5000/edge/node:v1", "node v1"),
    )
    .unwrap();
    let o = kiln(&dir.path().join("cache"))
        .arg("check")
        .arg("--cluster")
        .arg(&cluster)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a registry image reference"),
        "{err}"
    );
    std::fs::write(&cluster, &text).unwrap();

    // With credentials for that registry (as `skopeo login` writes them), a dockerconfigjson
    // Secret BMO can read them from.
    let auth = dir.path().join("auth.json");
    std::fs::write(
        &auth,
        r#"{"auths": {"registry.lab:5000": {"auth": "bGFiOnMzY3JldA=="}}}"#,
    )
    .unwrap();
    let with_auth = manifests(Some(&auth));
    let docs = common::bmo::parse_yaml_stream(&with_auth);
    assert_eq!(
        docs[0]["spec"]["image"]["ociAuthSecretName"],
        "edge-1-registry-secret"
    );
    let secret = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "edge-1-registry-secret")
        .unwrap();
    assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
    let config: serde_json::Value =
        serde_json::from_str(secret["decoded"][".dockerconfigjson"].as_str().unwrap()).unwrap();
    assert_eq!(
        config["auths"]["registry.lab:5000"]["auth"],
        "bGFiOnMzY3JldA=="
    );
    let (ok, said) = common::bmo::bmo_judge(&crd, &with_auth);
    assert!(
        ok,
        "BMO's CRD refuses the host with its registry Secret:\n{said}"
    );
}
