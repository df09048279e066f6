//! Registry credentials where `skopeo login`, `podman login` and `docker login` leave them: the
//! auth files (`auths`, base64 `user:password`) and the credential helpers they name
//! (`credHelpers` per registry, `credsStore` for all), run the way docker runs them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde_json::Value;

use crate::util::cmd;

/// The auth files in the order podman and skopeo read them, then docker's.
fn auth_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(f.into());
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(Path::new(&d).join("containers/auth.json"));
    }
    if let Some(h) = dirs::home_dir() {
        files.push(h.join(".config/containers/auth.json"));
    }
    // docker honours $DOCKER_CONFIG (a directory) before ~/.docker.
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => files.push(Path::new(&d).join("config.json")),
        None => {
            if let Some(h) = dirs::home_dir() {
                files.push(h.join(".docker/config.json"));
            }
        }
    }
    files
}

/// Credentials for `registry` (host[:port]); anonymous when no file or helper has any.
pub fn auth_for(registry: &str) -> RegistryAuth {
    for f in auth_files() {
        if let Some(auth) = auth_from_file(&f, registry) {
            return auth;
        }
    }
    RegistryAuth::Anonymous
}

/// Does an `auths`/`credHelpers` key (`host`, `host/path`, `https://host/v1/`) name `registry`?
fn key_matches(key: &str, registry: &str) -> bool {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k == registry || k.split('/').next() == Some(registry)
}

/// As docker decides: a helper named for this registry, else the default store, else the file's
/// own entry. (An entry left in `auths` beside a store is still tried when the store has nothing:
/// podman writes there even where docker's config names a store.)
fn auth_from_file(file: &Path, registry: &str) -> Option<RegistryAuth> {
    let v: Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    let helper = v["credHelpers"]
        .as_object()
        .and_then(|h| h.iter().find(|(k, _)| key_matches(k, registry)))
        .and_then(|(_, name)| name.as_str())
        .or_else(|| v["credsStore"].as_str())
        .filter(|name| !name.is_empty());
    if let Some(name) = helper
        && let Some(auth) = from_helper(name, registry, file)
    {
        return Some(auth);
    }
    let (_, entry) = v["auths"]
        .as_object()?
        .iter()
        .find(|(k, _)| key_matches(k, registry))?;
    let encoded = entry["auth"].as_str()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some(RegistryAuth::Basic(user.to_string(), pass.to_string()))
}

/// The server name docker hands a helper: its historical URL for Docker Hub, else the host.
fn server_url(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        r => r,
    }
}

/// `docker-credential-NAME get` with the server on stdin, JSON `{Username, Secret}` back. A helper
/// that is missing, fails, or knows nothing of the server gives no credentials (and says why when
/// that is not simply "not found"), so the pull goes on anonymously and a registry that insists
/// gets the login hint.
fn from_helper(name: &str, registry: &str, file: &Path) -> Option<RegistryAuth> {
    let program = format!("docker-credential-{name}");
    let url = server_url(registry);
    let out = cmd::output_with_input(
        Command::new(&program).arg("get"),
        &program,
        Some(url.as_bytes()),
    );
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            // Once per helper and registry: a build asks again for every node and every push.
            static WARNED: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
            let first = WARNED
                .lock()
                .map(|mut w| w.insert((program.clone(), registry.to_string())))
                .unwrap_or(true);
            if first {
                eprintln!(
                    "warning: {} names the credential helper {program}, which cannot run ({e}); \
                     going on without credentials for {registry}",
                    file.display()
                );
            }
            return None;
        }
    };
    if !out.status.success() {
        let text = format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if !text.contains("credentials not found") {
            eprintln!("warning: {program} get {registry} failed: {text}");
        }
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let user = v["Username"].as_str().unwrap_or_default();
    let secret = v["Secret"].as_str().unwrap_or_default();
    if user.is_empty() || secret.is_empty() {
        return None;
    }
    if user == "<token>" {
        // An identity token (OAuth refresh token) is exchanged differently from a password;
        // oci-client cannot do that exchange.
        eprintln!(
            "warning: {program} holds an identity token for {registry}, which kiln cannot use; \
             log in with a username and password (skopeo login)"
        );
        return None;
    }
    Some(RegistryAuth::Basic(user.to_string(), secret.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_an_auth_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.json");
        std::fs::write(
            &f,
            r#"{"auths":{"registry.local:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#,
        )
        .unwrap();
        match auth_from_file(&f, "registry.local:5000") {
            Some(RegistryAuth::Basic(u, p)) => {
                assert_eq!((u.as_str(), p.as_str()), ("alice", "s3cret"))
            }
            other => panic!("{other:?}"),
        }
        assert!(auth_from_file(&f, "other:5000").is_none());
    }

    #[test]
    fn keys_and_hub_names() {
        assert!(key_matches(
            "https://index.docker.io/v1/",
            "index.docker.io"
        ));
        assert!(key_matches("registry.local:5000", "registry.local:5000"));
        assert!(!key_matches("registry.local:5001", "registry.local:5000"));
        assert_eq!(server_url("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(server_url("10.0.0.1:5000"), "10.0.0.1:5000");
    }

    #[test]
    fn a_missing_helper_falls_back_to_the_files_own_entry() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(
            &f,
            r#"{"credsStore":"kiln-test-no-such-helper",
                "auths":{"registry.local:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#,
        )
        .unwrap();
        assert!(matches!(
            auth_from_file(&f, "registry.local:5000"),
            Some(RegistryAuth::Basic(..))
        ));
        assert!(auth_from_file(&f, "other:5000").is_none());
    }
}
