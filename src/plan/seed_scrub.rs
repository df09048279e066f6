//! The NoCloud seed without its secrets, and the first-boot step that puts it on the boot FAT.
//!
//! The seed's user-data has to carry the wifi PSK, a swarm join token and password hashes to the
//! node, and on HypriotOS it lives on the boot FAT, which has no permissions: left there, every
//! local user reads them for the life of the card. They cannot stay off the FAT (cloud-init reads
//! the seed from there; writing them into the ext4 root instead would fork the one cloud-init flow
//! every HypriotOS node uses), so they leave it after first use: cloud-init writes this clean
//! document to `/etc/kiln/seed/user-data`, and `kiln-seed-scrub.service`, ordered after
//! cloud-final, overwrites the seed's user-data with it (and scrubs cloud-init's cached copies).
//! meta-data keeps its instance-id, so the next boot is the same instance and no per-instance
//! module runs again.
//!
//! What stays is what cloud-init applies on every boot (hostname, `manage_etc_hosts`,
//! `preserve_hostname`, a fragment's `bootcmd`) and, for the reader, the users and timezone.
//! What goes: `write_files` and `runcmd` (per-instance, already done), password hashes and every
//! other key of a user fragment (kiln cannot tell which of them are secret).

use anyhow::Result;
use serde_yaml_ng::{Mapping, Value};

use super::cloud_init::{CloudConfig, WriteFile, render_user_data};

pub const SCRUB_SCRIPT: &str = include_str!("../../scripts/kiln-seed-scrub.sh");
pub const SCRUB_UNIT: &str = include_str!("../../scripts/kiln-seed-scrub.service");
/// Where cloud-init puts the clean user-data, for the scrub step to copy onto the seed.
pub const CLEAN_USER_DATA: &str = "/etc/kiln/seed/user-data";
pub const SCRUB_UNIT_NAME: &str = "kiln-seed-scrub.service";

/// The user-data the seed keeps after first boot: `config` without the per-instance and secret
/// parts, plus the fragment's `bootcmd` (which cloud-init runs on every boot).
pub fn clean_user_data(config: &CloudConfig, fragment: Option<&Mapping>) -> Result<String> {
    let mut clean = config.clone();
    clean.write_files.clear();
    clean.runcmd.clear();
    for u in &mut clean.users {
        u.passwd = None;
    }
    let bootcmd = fragment
        .and_then(|f| f.get("bootcmd"))
        .map(|b| Mapping::from_iter([(Value::from("bootcmd"), b.clone())]));
    let body = render_user_data(&clean, bootcmd)?;
    Ok(body.replacen(
        "#cloud-config\n",
        "#cloud-config\n# Written by kiln after first boot: the seed was consumed and its secrets \
         (wifi PSK, tokens, password hashes, files, commands) removed; instance-id is unchanged.\n",
        1,
    ))
}

/// The scrub unit for a seed mounted at `seed_dir`: the shipped unit as it is for HypriotOS's
/// `/boot` (the script's default), else with the seed's path in its environment (Raspberry Pi OS
/// and Ubuntu mount the boot FAT at `/boot/firmware`).
fn scrub_unit(seed_dir: &str) -> String {
    if seed_dir == "/boot" {
        return SCRUB_UNIT.to_string();
    }
    SCRUB_UNIT.replacen(
        "[Service]\n",
        &format!("[Service]\nEnvironment=KILN_SEED_USER_DATA={seed_dir}/user-data\n"),
        1,
    )
}

/// The files cloud-init writes for the scrub step: the clean document, the script, its unit.
pub fn first_boot_files(clean_user_data: &str, seed_dir: &str) -> Vec<WriteFile> {
    vec![
        WriteFile::new(
            CLEAN_USER_DATA,
            clean_user_data.as_bytes(),
            0o644,
            "root",
            "root",
        ),
        WriteFile::new(
            "/usr/local/sbin/kiln-seed-scrub",
            SCRUB_SCRIPT.as_bytes(),
            0o755,
            "root",
            "root",
        ),
        WriteFile::new(
            &format!("/etc/systemd/system/{SCRUB_UNIT_NAME}"),
            scrub_unit(seed_dir).as_bytes(),
            0o644,
            "root",
            "root",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::cloud_init::{CloudUser, parse_fragment};

    #[test]
    fn the_unit_names_a_seed_outside_boot() {
        assert_eq!(scrub_unit("/boot"), SCRUB_UNIT);
        let unit = scrub_unit("/boot/firmware");
        assert!(
            unit.contains("[Service]\nEnvironment=KILN_SEED_USER_DATA=/boot/firmware/user-data\n"),
            "{unit}"
        );
    }

    #[test]
    fn the_clean_document_keeps_identity_and_drops_secrets() {
        let config = CloudConfig {
            hostname: "ceil-two".into(),
            manage_etc_hosts: true,
            preserve_hostname: false,
            timezone: Some("Europe/Berlin".into()),
            ssh_pwauth: true,
            users: vec![CloudUser {
                name: "admin".into(),
                groups: None,
                sudo: None,
                shell: "/bin/bash".into(),
                lock_passwd: false,
                passwd: Some("$6$salt$HASHSECRET".into()),
                ssh_authorized_keys: vec!["ssh-ed25519 AAAA k".into()],
            }],
            write_files: vec![WriteFile::new(
                "/etc/kiln/swarm.token",
                b"SWMTKN-1-secret\n",
                0o600,
                "root",
                "root",
            )],
            runcmd: vec![vec!["echo".into(), "once".into()]],
            rpi: None,
        };
        let frag = parse_fragment(b"bootcmd: [[echo, every]]\nchpasswd: {list: 'pi:FRAGSECRET'}\n")
            .unwrap();
        let text = clean_user_data(&config, Some(&frag)).unwrap();
        for secret in [
            "HASHSECRET",
            "SWMTKN",
            "FRAGSECRET",
            "once",
            "write_files",
            "runcmd",
        ] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        let back: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(back["hostname"].as_str(), Some("ceil-two"));
        assert_eq!(back["users"][0]["name"].as_str(), Some("admin"));
        assert_eq!(back["bootcmd"][0][1].as_str(), Some("every"));
        assert!(text.starts_with("#cloud-config\n"));
    }
}
