//! Identifiers that must be unique per node and stable per build, derived instead of random.
//!
//! Every derived value is a hash of the cluster seed, the node name and what the value is for, so
//! rebuilding a node gives the same disk signature, UUIDs and salts, and two nodes never collide.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Namespace for kiln's version-5 UUIDs (itself a v5 UUID of "kiln" in the URL namespace).
fn namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://kiln.invalid/ids")
}

/// 32 bytes for `purpose` of `node` in the cluster seeded with `seed`.
pub fn derive(seed: &str, node: &str, purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    // NUL separators keep ("ab","c") and ("a","bc") apart.
    for part in ["kiln", purpose, seed, node] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

/// A non-zero MBR disk signature (a zero signature means "none" to some firmware).
pub fn disk_signature(seed: &str, node: &str) -> u32 {
    let b = derive(seed, node, "mbr-disk-signature");
    let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if v == 0 { 0x6b696c6e } else { v }
}

/// A locally administered unicast MAC for interface `ifname` of `node` (`02:…`), for a node whose
/// cluster file gives none: stable across runs, and distinct per node.
pub fn mac(seed: &str, node: &str, ifname: &str) -> String {
    let b = derive(seed, &format!("{node}\0{ifname}"), "mac-address");
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// A version-5 UUID for `purpose` (GPT GUIDs, filesystem UUIDs, NetworkManager connections).
pub fn uuid(seed: &str, node: &str, purpose: &str) -> Uuid {
    let name = format!("{seed}\0{node}\0{purpose}");
    Uuid::new_v5(&namespace(), name.as_bytes())
}

/// The cloud-init instance-id: the node name plus a digest of its resolved configuration, so a
/// changed configuration is a new instance (cloud-init runs again) and an unchanged one is not.
pub fn instance_id(seed: &str, node: &str, config_digest: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(derive(seed, node, "cloud-init-instance-id"));
    h.update(config_digest);
    let d = h.finalize();
    format!("{node}-{}", &hex::encode(d)[..12])
}

/// Raw bytes for a crypt(3) salt; 12 bytes encode to the 16 characters SHA-crypt uses.
pub fn crypt_salt(seed: &str, node: &str, user: &str) -> [u8; 12] {
    let d = derive(seed, &format!("{node}\0{user}"), "crypt-salt");
    let mut out = [0u8; 12];
    out.copy_from_slice(&d[..12]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_values_are_stable_and_distinct() {
        assert_eq!(
            disk_signature("ceil", "ceil-one"),
            disk_signature("ceil", "ceil-one")
        );
        assert_ne!(
            disk_signature("ceil", "ceil-one"),
            disk_signature("ceil", "ceil-two")
        );
        assert_ne!(
            disk_signature("ceil", "ceil-one"),
            disk_signature("other", "ceil-one")
        );
        assert_ne!(uuid("s", "n", "a"), uuid("s", "n", "b"));
        assert_eq!(uuid("s", "n", "a").get_version_num(), 5);
    }

    #[test]
    fn macs_are_locally_administered_unicast_stable_and_per_node() {
        let m = mac("cni-dev", "cni-master1", "eth0");
        assert_eq!(m, mac("cni-dev", "cni-master1", "eth0"));
        assert_ne!(m, mac("cni-dev", "cni-worker1", "eth0"));
        assert!(m.starts_with("02:") && m.len() == 17, "{m}");
    }

    #[test]
    fn instance_id_follows_the_configuration() {
        let a = instance_id("ceil", "ceil-one", b"config-1");
        assert_eq!(a, instance_id("ceil", "ceil-one", b"config-1"));
        assert_ne!(a, instance_id("ceil", "ceil-one", b"config-2"));
        assert!(a.starts_with("ceil-one-"));
    }

    #[test]
    fn salts_differ_per_node_and_user() {
        assert_ne!(
            crypt_salt("c", "n1", "admin"),
            crypt_salt("c", "n2", "admin")
        );
        assert_ne!(
            crypt_salt("c", "n1", "admin"),
            crypt_salt("c", "n1", "root")
        );
    }
}
