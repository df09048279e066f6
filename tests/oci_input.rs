//! Bad OCI input gets a clear error and leaves nothing behind: a corrupt blob, an unknown
//! transport, an image without a kernel; and --engine bootc-image-builder without podman.
//! Images are small layouts packed by tests/fixtures/oci-pack.py (Python's tarfile, not kiln).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tiny root (with or without a kernel) as an OCI layout tagged `base`.
fn layout(dir: &Path, with_kernel: bool) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd/boot/efi")).unwrap();
    std::fs::write(root.join("etc/os-release"), "PRETTY_NAME=\"Tiny\"\n").unwrap();
    std::fs::write(
        root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        b"MZ not really",
    )
    .unwrap();
    if with_kernel {
        std::fs::write(root.join("boot/vmlinuz-6.1.0-1-amd64"), b"kernel").unwrap();
        std::fs::write(root.join("boot/initrd.img-6.1.0-1-amd64"), b"initrd").unwrap();
    }
    let out = dir.join("layout");
    run(Command::new("python3")
        .arg(repo().join("tests/fixtures/oci-pack.py"))
        .arg(&root)
        .arg(&out)
        .arg("base"));
    out
}

/// The layer of a one-layer layout: its largest blob.
fn layer_blob(lay: &Path) -> PathBuf {
    std::fs::read_dir(lay.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path()
}

fn build(dir: &Path, base: &str, extra: &[&str]) -> std::process::Output {
    kiln(&dir.join("cache"))
        .args(["build", "--node", "edge-1", "--cluster"])
        .arg(bootc_cluster(dir))
        .args(["--base", base, "--out"])
        .arg(dir.join("out"))
        .args(extra)
        .output()
        .unwrap()
}

fn assert_no_image(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir.join("out"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "out/ holds {left:?}");
}

#[test]
fn a_corrupt_layer_blob_is_refused_by_digest() {
    if !have_tools(&["python3", "mke2fs", "debugfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    // Flip a byte in the (largest) blob: the layer.
    let blob = layer_blob(&lay);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let o = build(dir.path(), &format!("oci:{}:base", lay.display()), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not match its digest"), "{err}");
    assert_no_image(dir.path());
}

#[test]
fn an_image_without_a_kernel_says_what_to_install() {
    if !have_tools(&["python3", "mke2fs", "debugfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), false);
    let o = build(dir.path(), &format!("oci:{}:base", lay.display()), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no kernel") && err.contains("linux-image"),
        "{err}"
    );
    assert_no_image(dir.path());
    // Nothing half-made is left in the cache either.
    let stage = dir.path().join("cache/oci");
    let leftovers: Vec<_> = std::fs::read_dir(&stage)
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name() != "blobs")
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_missing_tag_and_an_unknown_transport_are_named() {
    if !have_tools(&["python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    let o = build(dir.path(), &format!("oci:{}:nope", lay.display()), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no image tagged \"nope\""),
        "{err}"
    );
    let o = build(dir.path(), "docker://127.0.0.1:9/none:tag", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--insecure"), "{err}");
    assert_no_image(dir.path());
}

#[test]
fn bootc_image_builder_engine_without_podman_says_so_config_only() {
    if which("podman").is_some() {
        eprintln!("SKIPPED: podman is installed; this test is about its absence");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = build(
        dir.path(),
        "docker://registry.local:5000/edge/node:v2",
        &["--engine", "bootc-image-builder", "--format", "qcow2"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs podman"), "{err}");
    assert_no_image(dir.path());
}

#[test]
fn oci_archive_and_docker_archive_made_by_skopeo_build() {
    if !have_tools(&["python3", "skopeo", "mke2fs", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    for (transport, file) in [
        ("oci-archive", "img.oci.tar"),
        ("docker-archive", "img.docker.tar"),
    ] {
        let archive = dir.path().join(file);
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &format!("oci:{}:base", lay.display()),
            &format!("{transport}:{}", archive.display()),
        ]));
        let out = dir.path().join(format!("out-{transport}"));
        let o = kiln(&dir.path().join("cache"))
            .args(["build", "--node", "edge-1", "--cluster"])
            .arg(bootc_cluster(dir.path()))
            .args([
                "--base",
                &format!("{transport}:{}", archive.display()),
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let raw = out.join("edge-1.raw");
        assert_fsck_clean(
            "e2fsck",
            format!("{}?offset={}", raw.display(), 257u64 << 20),
        );
    }
}

/// A kiln command whose only registry credentials are `auth_file` (no ~/.docker, no
/// $XDG_RUNTIME_DIR/containers): what a user has after `skopeo login --authfile`.
fn kiln_with_auth(dir: &Path, auth_file: &Path) -> Command {
    let mut c = kiln(&dir.join("cache"));
    c.current_dir(dir)
        .env("HOME", dir)
        .env_remove("XDG_RUNTIME_DIR")
        .env("REGISTRY_AUTH_FILE", auth_file);
    c
}

/// A registry behind a token server that lets `builder`/`s3cret` in, holding the tiny image as
/// `edge/tiny:base`; the registry and the image's reference.
fn token_registry(d: &Path) -> (Registry, String) {
    let reg = Registry::start_with(
        d,
        Some(TokenAuth {
            user: "builder",
            password: "s3cret",
        }),
    );
    let lay = layout(d, true);
    let base = reg.push_layout_as(&lay, "base", "edge/tiny:base", Some("builder:s3cret"));
    (reg, base)
}

#[test]
fn a_token_auth_registry_needs_a_login_then_pulls_and_pushes() {
    if !have_tools(&[
        "python3",
        "openssl",
        "docker-registry",
        "skopeo",
        "mke2fs",
        "debugfs",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (reg, base) = token_registry(d);
    let build_with = |auth: &Path| {
        kiln_with_auth(d, auth)
            .args(["build", "--node", "edge-1", "--insecure", "--cluster"])
            .arg(bootc_cluster(d))
            .args(["--base", &base, "--out"])
            .arg(d.join("out"))
            .output()
            .unwrap()
    };

    // No credentials, then a wrong password: refused, with the way to log in, and nothing built.
    let o = build_with(&d.join("no-such-auth.json"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("log in"), "{err}");
    let wrong = d.join("wrong.json");
    std::fs::write(
        &wrong,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YnVpbGRlcjpub3BlCg=="}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let o = build_with(&wrong);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("log in"), "{err}");
    assert_no_image(d);

    // `skopeo login` (through the token server) writes the file kiln reads.
    let auth = d.join("auth.json");
    run(Command::new("skopeo")
        .args(["login", "--tls-verify=false", "--authfile"])
        .arg(&auth)
        .args(["-u", "builder", "-p", "s3cret", &reg.addr]));
    let o = build_with(&auth);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.join("out/edge-1.raw").is_file());
    let granted = |action: &str| {
        reg.token_requests().iter().any(|r| {
            r["user"] == "builder"
                && r["granted"].as_array().unwrap().iter().any(|g| {
                    g["name"] == "edge/tiny"
                        && g["actions"].as_array().unwrap().iter().any(|a| a == action)
                })
        })
    };
    assert!(granted("pull"), "{:?}", reg.token_requests());

    // A push: `kiln oci append` to a new tag, read back by skopeo with the same credentials.
    let ov = d.join("overlays/stamp");
    std::fs::create_dir_all(ov.join("root/etc/kiln")).unwrap();
    std::fs::write(ov.join("overlay.toml"), "description = \"a stamp\"\n").unwrap();
    std::fs::write(ov.join("root/etc/kiln/stamp"), "appended\n").unwrap();
    let o = kiln_with_auth(d, &auth)
        .args(["oci", "append", "--insecure", "--from", &base])
        .args(["--overlay", "stamp", "--to", &format!("{base}-v2")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(granted("push"), "{:?}", reg.token_requests());
    let inspect = |tag: &str| -> serde_json::Value {
        serde_json::from_str(&stdout(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            "builder:s3cret",
            &format!("{base}{tag}"),
        ])))
        .unwrap()
    };
    let layers = |v: &serde_json::Value| v["Layers"].as_array().unwrap().len();
    assert_eq!(layers(&inspect("-v2")), layers(&inspect("")) + 1);
}

/// A gpg key without a passphrase and a `pass` store under `dir`, as `docker-credential-pass`
/// needs them; the environment for the helper (and for kiln, which runs it).
fn pass_store(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let gnupg = dir.join("gnupg");
    std::fs::create_dir_all(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let env = vec![
        ("GNUPGHOME", gnupg),
        ("PASSWORD_STORE_DIR", dir.join("password-store")),
    ];
    let with_env = |c: &mut Command| {
        for (k, v) in &env {
            c.env(k, v);
        }
    };
    let mut gen_key = Command::new("gpg");
    gen_key.args(["--batch", "--passphrase", "", "--quick-gen-key"]);
    gen_key.args(["kiln-test@example.invalid", "default", "default", "never"]);
    with_env(&mut gen_key);
    run(&mut gen_key);
    let mut init = Command::new("pass");
    init.args(["init", "kiln-test@example.invalid"]);
    with_env(&mut init);
    run(&mut init);
    env
}

#[test]
fn docker_credential_helpers_give_the_login() {
    if !have_tools(&[
        "python3",
        "openssl",
        "docker-registry",
        "mke2fs",
        "debugfs",
        "gpg",
        "pass",
        "docker-credential-pass",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (reg, base) = token_registry(d);
    // `docker login` with a credsStore keeps the password in the helper's store, not the file.
    let env = pass_store(d);
    let mut store = Command::new("docker-credential-pass");
    store.arg("store").envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = store.stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!(
            r#"{{"ServerURL":"{}","Username":"builder","Secret":"s3cret"}}"#,
            reg.addr
        )
        .as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let docker = d.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let build_with = |config: &str| {
        std::fs::write(docker.join("config.json"), config).unwrap();
        kiln_with_auth(d, &d.join("no-such-auth.json"))
            .env("DOCKER_CONFIG", &docker)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["build", "--node", "edge-1", "--insecure", "--cluster"])
            .arg(bootc_cluster(d))
            .args(["--base", &base, "--out"])
            .arg(d.join("out"))
            .output()
            .unwrap()
    };

    // A helper that is not installed: said, and the registry's refusal comes with the login hint.
    let o = build_with(&format!(
        r#"{{"credHelpers":{{"{}":"kiln-no-such-helper"}}}}"#,
        reg.addr
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("docker-credential-kiln-no-such-helper") && err.contains("log in"),
        "{err}"
    );
    assert_no_image(d);

    // The store named for every registry: the build pulls with the helper's credentials.
    let before = reg.token_requests().len();
    let o = build_with(r#"{"credsStore":"pass"}"#);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.join("out/edge-1.raw").is_file());
    let requests = reg.token_requests();
    assert!(
        requests[before..].iter().any(|r| r["user"] == "builder"
            && r["granted"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["name"] == "edge/tiny")),
        "kiln's requests: {:?}",
        &requests[before..]
    );
    let mut stop_agent = Command::new("gpgconf");
    stop_agent
        .args(["--kill", "gpg-agent"])
        .envs(env.iter().map(|(k, v)| (k, v)));
    let _ = stop_agent.status();
}

#[test]
fn bootupd_files_without_a_fallback_loader_are_named() {
    if !have_tools(&["python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lay = layout(d, true);
    // A layer with GRUB in a vendor directory but nothing at EFI/BOOT/BOOTX64.EFI.
    let top = d.join("top");
    std::fs::create_dir_all(top.join("usr/lib/bootupd/updates/EFI/fedora")).unwrap();
    std::fs::write(
        top.join("usr/lib/bootupd/updates/EFI/fedora/grubx64.efi"),
        b"MZ grub",
    )
    .unwrap();
    run(Command::new("python3")
        .arg(repo().join("tests/fixtures/oci-pack.py"))
        .arg(&top)
        .arg(&lay)
        .args(["grub-only", "--on", "base"]));
    let o = build(d, &format!("oci:{}:grub-only", lay.display()), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no EFI/BOOT/BOOTX64.EFI"),
        "{err}"
    );
    assert_no_image(d);
}

// Hostile layers and layouts (issue 20): each is refused with its name, promptly, and nothing
// is left in out/ — or, for a GNU sparse member, unpacked to exactly the bytes tar stored.

/// Stacks `layer_tar` (a tar made by GNU tar or Python, as it is) on the `base` image of `lay`,
/// tagged `tag`.
fn stack(lay: &Path, layer_tar: &Path, tag: &str, created: Option<&str>) {
    let mut c = Command::new("python3");
    c.arg(repo().join("tests/fixtures/oci-pack.py"))
        .arg("-")
        .arg(lay)
        .arg(tag)
        .args(["--on", "base", "--layer-tar"])
        .arg(layer_tar);
    if let Some(t) = created {
        c.args(["--created", t]);
    }
    run(&mut c);
}

/// Runs a build that must fail within a minute, and returns its stderr.
fn refused_promptly(dir: &Path, base: &str) -> String {
    let o = output_within_a_minute(
        kiln(&dir.join("cache"))
            .args(["build", "--node", "edge-1", "--cluster"])
            .arg(bootc_cluster(dir))
            .args(["--base", base, "--out"])
            .arg(dir.join("out")),
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "not a clean refusal:\n{err}");
    assert_no_image(dir);
    err
}

/// A tar made by Python's tarfile: `body` runs with the open archive as `t`.
fn python_tar(dir: &Path, name: &str, body: &str) -> PathBuf {
    let tar = dir.join(name);
    run(Command::new("python3").arg("-c").arg(format!(
        "import tarfile\nwith tarfile.open({:?}, 'w') as t:\n    {body}\n",
        tar.display().to_string()
    )));
    tar
}

/// A file with a hole: 3 MiB of nothing, then data.
fn sparse_source(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("opt")).unwrap();
    let f = src.join("opt/sparse.bin");
    let file = std::fs::File::create(&f).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_at(b"head", 0).unwrap();
    file.write_at(b"data after a 3 MiB hole", 3 << 20).unwrap();
    src
}

#[test]
fn a_gnu_sparse_member_is_expanded_and_a_posix_one_refused_by_name() {
    if !have_tools(&["python3", "mke2fs", "debugfs", "tar", "sfdisk"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    let src = sparse_source(dir.path());
    for (format, tag) in [("gnu", "gnu"), ("posix", "posix")] {
        let tar = dir.path().join(format!("{format}.tar"));
        run(Command::new("tar")
            .args(["--sparse", &format!("--format={format}"), "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(&src)
            .arg("opt/sparse.bin"));
        stack(&lay, &tar, tag, None);
    }

    let err = refused_promptly(dir.path(), &format!("oci:{}:posix", lay.display()));
    assert!(
        err.contains("opt/sparse.bin") && err.contains("POSIX sparse"),
        "{err}"
    );

    let o = build(dir.path(), &format!("oci:{}:gnu", lay.display()), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = dir.path().join("out/edge-1.raw");
    let table = sfdisk_json(&img);
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    let root = parts.last().unwrap()["start"].as_u64().unwrap() * 512;
    let dumped = dir.path().join("dumped.bin");
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /opt/sparse.bin {}", dumped.display()))
        .arg(format!("{}?offset={root}", img.display())));
    assert_eq!(
        sha256_hex(&std::fs::read(&dumped).unwrap()),
        sha256_hex(&std::fs::read(src.join("opt/sparse.bin")).unwrap()),
        "the unpacked file differs from the one tar stored"
    );
}

#[test]
fn an_empty_whiteout_is_refused_and_deletes_nothing() {
    if !have_tools(&["python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    let tar = python_tar(dir.path(), "wh.tar", "t.addfile(tarfile.TarInfo('.wh.'))");
    stack(&lay, &tar, "wh", None);
    let err = refused_promptly(dir.path(), &format!("oci:{}:wh", lay.display()));
    assert!(
        err.contains("whiteout") && err.contains("names no file"),
        "{err}"
    );
}

#[test]
fn a_blob_that_is_a_device_or_a_fifo_is_refused_without_hanging() {
    if !have_tools(&["python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    let blob = layer_blob(&lay);
    std::fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &blob).unwrap();
    let err = refused_promptly(dir.path(), &format!("oci:{}:base", lay.display()));
    assert!(err.contains("character device"), "{err}");
    std::fs::remove_file(&blob).unwrap();
    nix::unistd::mkfifo(&blob, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = refused_promptly(dir.path(), &format!("oci:{}:base", lay.display()));
    assert!(err.contains("a FIFO"), "{err}");
}

/// Rewrites the `base` manifest of `lay` with its first layer listed `n` times.
fn repeat_layers(lay: &Path, n: usize) {
    run(Command::new("python3").arg("-c").arg(format!(
        r#"
import hashlib, json, os
lay = {lay:?}
idx = json.load(open(os.path.join(lay, "index.json")))
entry = idx["manifests"][0]
blob = lambda d: os.path.join(lay, "blobs", "sha256", d[7:])
m = json.load(open(blob(entry["digest"])))
m["layers"] = [m["layers"][0]] * {n}
data = json.dumps(m).encode()
digest = "sha256:" + hashlib.sha256(data).hexdigest()
open(blob(digest), "wb").write(data)
entry["digest"], entry["size"] = digest, len(data)
json.dump(idx, open(os.path.join(lay, "index.json"), "w"))
"#,
        lay = lay.display().to_string()
    )));
}

#[test]
fn too_many_layers_and_oversized_manifests_are_refused() {
    if !have_tools(&["python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    repeat_layers(&lay, 5000);
    let err = refused_promptly(dir.path(), &format!("oci:{}:base", lay.display()));
    assert!(err.contains("5000 layers"), "{err}");
    repeat_layers(&lay, 200_000);
    let err = refused_promptly(dir.path(), &format!("oci:{}:base", lay.display()));
    assert!(
        err.contains("the image manifest") && err.contains("4 MiB"),
        "{err}"
    );
}

#[test]
fn a_created_date_past_2106_is_refused_not_wrapped() {
    if !have_tools(&["python3"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(dir.path(), true);
    let tar = python_tar(dir.path(), "empty.tar", "pass");
    stack(&lay, &tar, "future", Some("3000-01-01T00:00:00Z"));
    let err = refused_promptly(dir.path(), &format!("oci:{}:future", lay.display()));
    assert!(err.contains("after 2106"), "{err}");
    stack(&lay, &tar, "nonsense", Some("99999999999-01-01T00:00:00Z"));
    let err = refused_promptly(dir.path(), &format!("oci:{}:nonsense", lay.display()));
    assert!(err.contains("not an RFC 3339 time"), "{err}");
}
