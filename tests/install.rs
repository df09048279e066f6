//! `kiln install` against a real sshd on loopback, started by the test with throwaway keys; and
//! the same overlay baked into a built image.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd(dir: &Path) -> Option<Sshd> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !is_root() || !sshd.exists() || !have_tools(&["ssh", "scp", "ssh-keygen"]) {
        skip("install tests need root, sshd, ssh and scp");
        return None;
    }
    for (name, _) in [("host", ()), ("client", ())] {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(name)));
    }
    std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).unwrap();
    std::fs::set_permissions(
        dir.join("authorized_keys"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {}\nSubsystem sftp internal-sftp\n",
            dir.join("host").display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut child = Command::new(sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(Sshd {
                child,
                port,
                key: dir.join("client"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("sshd did not start");
}

fn install(sshd: &Sshd, cache: &Path, args: &[&str]) -> std::process::Output {
    let mut c = kiln(cache);
    c.arg("install")
        .args(args)
        .args(["--target", "root@127.0.0.1"]);
    for o in [
        format!("Port={}", sshd.port),
        format!("IdentityFile={}", sshd.key.display()),
        "StrictHostKeyChecking=no".to_string(),
        "UserKnownHostsFile=/dev/null".to_string(),
        "LogLevel=ERROR".to_string(),
    ] {
        c.arg("--ssh-option").arg(o);
    }
    c.current_dir(repo()).output().unwrap()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_over_ssh_is_idempotent_and_dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sshd) = start_sshd(dir.path()) else {
        return;
    };
    let cache = dir.path().join("cache");
    let stage = dir.path().join("target-root");
    let stage_s = stage.display().to_string();
    let cfg = dir.path().join("dash.json");
    std::fs::write(&cfg, r#"{"handler_id": "kiln", "allowed_dash_ids": ["dash01"], "provision_command": ["/bin/true"]}"#).unwrap();
    let cfg_s = cfg.display().to_string();
    let args = ["mqtt-handler", "--root", &stage_s, "--config", &cfg_s];
    let dry_run = [
        "mqtt-handler",
        "--root",
        &stage_s,
        "--config",
        &cfg_s,
        "--dry-run",
    ];

    // A dry run first: it lists the uploads and writes nothing.
    let o = install(&sshd, &cache, &dry_run);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("would upload") && out.contains("dash_handler.py"),
        "{out}"
    );
    assert!(!stage.exists(), "--dry-run created files");

    // The real run puts every file in place with its mode.
    let o = install(&sshd, &cache, &args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let handler = stage.join("usr/local/lib/kiln/dash-handler/dash_handler.py");
    assert_eq!(mode_of(&handler), 0o755);
    assert_eq!(
        mode_of(&stage.join("etc/systemd/system/kiln-dash-handler.service")),
        0o644
    );
    assert_eq!(mode_of(&stage.join("etc/kiln/dash-handler.json")), 0o600);
    assert_eq!(
        std::fs::read(&handler).unwrap(),
        std::fs::read(
            repo()
                .join("overlays/mqtt-handler/root/usr/local/lib/kiln/dash-handler/dash_handler.py")
        )
        .unwrap()
    );
    assert_eq!(
        std::fs::read(stage.join("etc/kiln/dash-handler.json")).unwrap(),
        std::fs::read(&cfg).unwrap()
    );
    // The installed handler accepts the installed config.
    run(Command::new("/usr/bin/python3")
        .arg(&handler)
        .arg("--check")
        .arg("--config")
        .arg(stage.join("etc/kiln/dash-handler.json")));

    // A second run changes nothing and says so.
    let o = install(&sshd, &cache, &args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(out.contains("no changes"), "{out}");

    // Drift is found: a changed mode is fixed, a changed file re-uploaded; --dry-run only reports.
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(stage.join("etc/kiln/dash-handler.example.json"), "tampered").unwrap();
    let o = install(&sshd, &cache, &dry_run);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("would set") && out.contains("would upload") && out.contains("changed"),
        "{out}"
    );
    assert_eq!(mode_of(&handler), 0o600);
    let o = install(&sshd, &cache, &args);
    assert!(o.status.success());
    assert_eq!(mode_of(&handler), 0o755);
    assert_ne!(
        std::fs::read(stage.join("etc/kiln/dash-handler.example.json")).unwrap(),
        b"tampered"
    );
}

#[test]
fn install_without_systemd_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sshd) = start_sshd(dir.path()) else {
        return;
    };
    // This machine's PID 1 is not systemd in the test environment; kiln must not pretend.
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if pid1.trim() == "systemd" {
        eprintln!("SKIPPED: PID 1 is systemd here");
        return;
    }
    let stage = dir.path().join("root2");
    let o = install(
        &sshd,
        &dir.path().join("cache"),
        &["docker-daemon", "--root", &stage.display().to_string()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stage.join("etc/docker/daemon.json").exists());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("does not run systemd as PID 1")
            && out.contains("did not enable or start docker.service"),
        "{out}"
    );
}

#[test]
fn install_list_and_bad_targets() {
    let dir = tempfile::tempdir().unwrap();
    let o = kiln(&dir.path().join("cache"))
        .args(["install", "--list"])
        .current_dir(repo())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        out.contains("mqtt-handler") && out.contains("docker-daemon"),
        "{out}"
    );
    let o = kiln(&dir.path().join("cache"))
        .args(["install", "no-such-overlay", "--target", "x@y"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no overlay named"));
}

#[test]
fn a_node_with_the_overlay_gets_the_same_files_in_its_image() {
    if !have_tools(&["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "mtype"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hypriot_fixture(dir.path());
    let cluster = example_cluster("ceil", dir.path());
    // The example's router carries the handler.
    let text = std::fs::read_to_string(&cluster).unwrap();
    assert!(text.contains("overlays = [\"docker-daemon\", \"mqtt-handler\"]"));
    let out = dir.path().join("out");
    run(kiln(&dir.path().join("cache"))
        .args(["build", "--node", "ceil-router", "--cluster"])
        .arg(&cluster)
        .arg("--base")
        .arg(&base)
        .arg("--out")
        .arg(&out));
    let ud = String::from_utf8(mtype(&out.join("ceil-router.img"), 1 << 20, "user-data")).unwrap();
    let doc: serde_json::Value = serde_json::to_value(serde_yaml_from(&ud)).unwrap();
    let files = doc["write_files"].as_array().unwrap();
    for (path, mode, src) in [
        (
            "/usr/local/lib/kiln/dash-handler/dash_handler.py",
            "0755",
            "root/usr/local/lib/kiln/dash-handler/dash_handler.py",
        ),
        (
            "/etc/systemd/system/kiln-dash-handler.service",
            "0644",
            "root/etc/systemd/system/kiln-dash-handler.service",
        ),
    ] {
        let f = files
            .iter()
            .find(|f| f["path"] == path)
            .unwrap_or_else(|| panic!("{path} missing from write_files"));
        assert_eq!(f["permissions"], mode);
        let want = std::fs::read_to_string(repo().join("overlays/mqtt-handler").join(src)).unwrap();
        assert_eq!(
            f["content"].as_str().unwrap(),
            want,
            "{path} differs from the overlay"
        );
    }
    let runcmd = doc["runcmd"].to_string();
    assert!(runcmd.contains("kiln-dash-handler.service"), "{runcmd}");
}

/// Parses YAML with Python's yaml module (an independent reader) into JSON.
fn serde_yaml_from(text: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ud.yaml");
    std::fs::write(&p, text).unwrap();
    let out = stdout(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg("import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))")
            .arg(&p),
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn install_sushy_builds_its_venv_and_the_installed_emulator_serves_the_systems() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sshd) = start_sshd(dir.path()) else {
        return;
    };
    if !have_tools(&["curl"]) {
        return;
    }
    let cache = dir.path().join("cache");
    let stage = dir.path().join("target-root");
    let stage_s = stage.display().to_string();
    std::fs::write(
        dir.path().join("tapo.credentials"),
        "lab@example.org\nsecret\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("amt.password"), "Amt-Passw0rd!\n").unwrap();
    // Nothing answers on port 9: the pollers log errors; listing systems needs no device.
    let cfg = dir.path().join("sushy.conf");
    std::fs::write(
        &cfg,
        format!(
            "KILN_POWER_POLL_INTERVAL = 3600\nKILN_STATE_FILE = {:?}\nKILN_SYSTEMS = [\n\
             {{\"name\": \"edge-1\", \"power\": {{\"type\": \"tapo\", \"host\": \"127.0.0.1:9\", \"credentials_file\": {:?}}}}},\n\
             {{\"name\": \"edge-4\", \"power\": {{\"type\": \"amt\", \"host\": \"127.0.0.1:9\", \"password_file\": {:?}}}}},\n]\n",
            dir.path().join("state.json").display().to_string(),
            dir.path().join("tapo.credentials").display().to_string(),
            dir.path().join("amt.password").display().to_string(),
        ),
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    // `sushy` is the overlay's alias for sushy-baremetal.
    let args = ["sushy", "--root", &stage_s, "--config", &cfg_s];
    let o = install(&sshd, &cache, &args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("python venv"), "{out}");
    let python = stage.join("opt/kiln/sushy/bin/python");
    let freeze = stdout(Command::new(&python).args(["-m", "pip", "freeze"]));
    assert!(
        freeze.contains("sushy-tools==2.2.0") || freeze.contains("sushy_tools==2.2.0"),
        "{freeze}"
    );
    assert!(freeze.contains("plugp100==6.0.2"), "{freeze}");
    let launcher = stage.join("usr/local/lib/kiln/sushy-baremetal/kiln-sushy-emulator");
    assert_eq!(mode_of(&launcher), 0o755);
    assert_eq!(mode_of(&stage.join("etc/kiln/sushy.conf")), 0o600);

    // A second run finds the venv complete and everything in place.
    let o = install(&sshd, &cache, &args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("no changes"), "{out}");

    // The installed emulator accepts the installed configuration, starts, and lists the systems.
    run(Command::new(&python)
        .arg(&launcher)
        .args(["--check", "--config"])
        .arg(stage.join("etc/kiln/sushy.conf")));
    let port = free_port();
    let mut emu = Command::new(&python)
        .arg(&launcher)
        .arg("--config")
        .arg(stage.join("etc/kiln/sushy.conf"))
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut listing = String::new();
    for _ in 0..100 {
        let o = Command::new("curl")
            .args([
                "-sf",
                &format!("http://127.0.0.1:{port}/redfish/v1/Systems"),
            ])
            .output()
            .unwrap();
        if o.status.success() {
            listing = String::from_utf8_lossy(&o.stdout).into_owned();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = emu.kill();
    let _ = emu.wait();
    let doc: serde_json::Value = serde_json::from_str(&listing).expect("a Systems collection");
    assert_eq!(doc["Members@odata.count"], 2, "{listing}");
}

/// Issue 22: a CNI folder, named by its path, goes onto a live host like an overlay — conf/ to
/// /etc/cni/net.d (0644), bin/ to /opt/cni/bin (0755) — and a second run changes nothing.
#[test]
fn a_cni_folder_installs_by_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sshd) = start_sshd(dir.path()) else {
        return;
    };
    let cni = loopback_cni_folder(dir.path());
    let stage = dir.path().join("live-root");
    let args = [
        cni.to_str().unwrap().to_string(),
        "--root".into(),
        stage.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = install(&sshd, &dir.path().join("cache"), &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        mode_of(&stage.join("etc/cni/net.d/99-loopback.conf")),
        0o644
    );
    assert_eq!(mode_of(&stage.join("opt/cni/bin/loopback")), 0o755);
    let again = install(&sshd, &dir.path().join("cache"), &args);
    let out = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && out.contains("no changes"),
        "{out}"
    );
    // A broken folder is refused before the host is touched.
    std::fs::write(cni.join("conf/99-loopback.conf"), "{").unwrap();
    let bad = install(&sshd, &dir.path().join("cache"), &args);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("99-loopback.conf"),
        "{err}"
    );
}
