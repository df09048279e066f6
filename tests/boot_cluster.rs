//! Issue 22's proof by booting: examples/cni-dev's three nodes, built from the Debian test image in
//! the HypriotOS layout (tests/fixtures/make-debian-hypriot-layout.sh, cached in
//! target/kiln-test-cache), booted together by `kiln run --all` under TCG on kiln's private hub.
//! Each node's console must show, from the example's first-boot report, that it reached the other
//! two at their static addresses and that /etc/cni/net.d and /opt/cni/bin hold the folder's files
//! with their modes and digests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

const FILES: &[&str] = &[
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/OVMF/OVMF_VARS_4M.fd",
    "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
    "/usr/lib/cni/bridge",
];
const NODES: &[(&str, &str)] = &[
    ("cni-master1", "192.168.10.10"),
    ("cni-worker1", "192.168.10.11"),
    ("cni-worker2", "192.168.10.12"),
];

fn prerequisites() -> bool {
    let missing: Vec<&&str> = FILES.iter().filter(|f| !Path::new(f).exists()).collect();
    if !have_tools(BOOT_TOOLS) {
        return false;
    }
    if !missing.is_empty() || !is_root() {
        return skip(&format!(
            "cluster boot test: missing {missing:?} (ovmf, systemd-boot-efi, \
             containernetworking-plugins), root: {}",
            is_root()
        ));
    }
    true
}

/// The Debian HypriotOS-layout image the single-node boot test uses, built once per cache.
fn debian_image() -> PathBuf {
    cached_image("debian-hypriot-layout", "make-debian-hypriot-layout.sh")
}

/// The `CNI-DEV-REPORT` lines of a console (a line may start after getty's prompt).
fn report(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let l = l.trim_end_matches('\r');
            l.find("CNI-DEV-REPORT ").map(|i| l[i + 15..].to_string())
        })
        .collect()
}

#[test]
fn the_cni_dev_cluster_boots_together_and_each_node_reaches_the_other_two() {
    if !prerequisites() {
        return;
    }
    let base = debian_image();
    let dir = tempfile::tempdir().unwrap();
    let cluster = example_cluster("cni-dev", dir.path());
    let example = cluster.parent().unwrap().to_path_buf();
    run(Command::new("sh").arg(example.join("fill-cni-bin.sh")));
    let out = dir.path().join("out");
    let started = Instant::now();
    let run_out = kiln(&dir.path().join("cache"))
        .args(["run", "--all", "--cluster"])
        .arg(&cluster)
        .arg("--base")
        .arg(&base)
        .arg("--out")
        .arg(&out)
        .args(["--memory", "512", "--cpus", "1"])
        .args(["--until", "CNI-DEV-REPORT-END", "--timeout", "1800"])
        .output()
        .unwrap();
    let elapsed = started.elapsed().as_secs();
    let stderr = String::from_utf8_lossy(&run_out.stderr);
    eprintln!("kiln run --all took {elapsed} s:\n{stderr}");
    assert!(run_out.status.success(), "kiln run --all failed:\n{stderr}");
    let digest = |sub: &str, name: &str| {
        sha256_hex(&std::fs::read(example.join("cni").join(sub).join(name)).unwrap())[..16]
            .to_string()
    };
    for (node, addr) in NODES {
        let log = std::fs::read_to_string(out.join(format!("{node}.console.log"))).unwrap();
        let lines = report(&log);
        let tail = last_lines(&log, 40);
        assert!(
            lines
                .iter()
                .any(|l| l == &format!("node={node} addr={addr}")),
            "{node}: {lines:?}\n{tail}"
        );
        for (peer, peer_addr) in NODES.iter().filter(|(p, _)| p != node) {
            assert!(
                lines.contains(&format!("ping {peer_addr} ok")),
                "{node} did not reach {peer} at {peer_addr}: {lines:?}\n{tail}"
            );
        }
        for (sub, target, mode) in [
            ("conf", "/etc/cni/net.d", "644"),
            ("bin", "/opt/cni/bin", "755"),
        ] {
            for e in std::fs::read_dir(example.join("cni").join(sub)).unwrap() {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let want_prefix = format!("file {mode} root:root ");
                let want_suffix = format!(" {target}/{name} {}", digest(sub, &name));
                assert!(
                    lines
                        .iter()
                        .any(|l| l.starts_with(&want_prefix) && l.ends_with(&want_suffix)),
                    "{node}: no {want_prefix}…{want_suffix} in {lines:?}"
                );
            }
        }
    }
}
