//! Judging Metal3 manifests as BMO reads them: PyYAML parses the stream (Secrets decoded), and
//! tests/python/bmo_schema.py validates it against BMO's own CRD from ../shared.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{repo, skip};

/// Parses a YAML stream with PyYAML and decodes every Secret's data, so the test reads the
/// manifests the way kubectl would, not through kiln's own serde.
pub fn parse_yaml_stream(text: &str) -> Vec<Value> {
    let script = r#"
import base64, json, sys, yaml
docs = list(yaml.safe_load_all(sys.stdin))
for d in docs:
    if d.get("kind") == "Secret":
        d["decoded"] = {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
print(json.dumps(docs))
"#;
    let out = python_with_stdin(Command::new("/usr/bin/python3").args(["-c", script]), text);
    assert!(out.status.success(), "PyYAML could not parse the manifests");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// BMO's BareMetalHost CRD, read where it sits beside the clone (`../shared`), never copied into
/// the project. None (test skipped, or failed under KILN_REQUIRE_TOOLS=1) when it or the Python
/// judge's libraries are absent.
pub fn bmo_crd() -> Option<PathBuf> {
    let crd = repo().join("../shared/fixtures/metal3/metal3.io_baremetalhosts.yaml");
    if !crd.is_file() {
        skip(&format!("BMO's CRD is not at {}", crd.display()));
        return None;
    }
    let libs = Command::new("/usr/bin/python3")
        .args(["-c", "import jsonschema, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !libs {
        skip("python3-jsonschema and python3-yaml are not installed");
        return None;
    }
    Some(crd)
}

/// Runs tests/python/bmo_schema.py (strict structural validation against the CRD, Secrets as
/// core/v1 defines them, the references BMO follows) on a manifest stream.
pub fn bmo_judge(crd: &Path, manifests: &str) -> (bool, String) {
    let out = python_with_stdin(
        Command::new("/usr/bin/python3")
            .arg(repo().join("tests/python/bmo_schema.py"))
            .arg(crd),
        manifests,
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs `cmd` with `input` on its stdin and its stdout captured.
fn python_with_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
