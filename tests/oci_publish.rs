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
