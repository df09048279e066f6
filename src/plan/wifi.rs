//! wpa_supplicant configuration for a node's wifi.
//!
//! The passphrase is turned into the 256-bit PSK wpa_supplicant derives anyway (PBKDF2-HMAC-SHA1
//! over the SSID, 4096 rounds, as `wpa_passphrase` does), so the plain passphrase is not on the
//! card. `country=` sets the regulatory domain, without which Raspberry Pi radios stay blocked.

use pbkdf2::pbkdf2_hmac;
use sha1::Sha1;

use crate::plan::node::Wifi;

/// The 64-hex-digit PSK for `passphrase` on `ssid` (a 64-hex-digit input is already one).
pub fn psk_hex(ssid: &str, passphrase: &str) -> String {
    if passphrase.len() == 64 && passphrase.bytes().all(|b| b.is_ascii_hexdigit()) {
        return passphrase.to_ascii_lowercase();
    }
    let mut out = [0u8; 32];
    pbkdf2_hmac::<Sha1>(passphrase.as_bytes(), ssid.as_bytes(), 4096, &mut out);
    hex::encode(out)
}

/// An SSID as wpa_supplicant reads it: quoted when plain printable ASCII, hex otherwise, so
/// quotes, backslashes and non-ASCII names need no escaping rules.
fn ssid_value(ssid: &str) -> String {
    if ssid
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        format!("\"{ssid}\"")
    } else {
        hex::encode(ssid.as_bytes())
    }
}

/// The contents of `/etc/wpa_supplicant/wpa_supplicant-wlan0.conf`.
pub fn wpa_supplicant_conf(node: &str, wifi: &Wifi) -> String {
    let mut lines = vec![
        format!("# Written by kiln for node {node}."),
        format!("country={}", wifi.country),
        "ctrl_interface=DIR=/var/run/wpa_supplicant GROUP=netdev".to_string(),
        "update_config=1".to_string(),
        String::new(),
        "network={".to_string(),
        format!("    ssid={}", ssid_value(&wifi.ssid)),
        format!("    psk={}", psk_hex(&wifi.ssid, wifi.psk.expose())),
        "    key_mgmt=WPA-PSK".to_string(),
    ];
    if wifi.hidden {
        lines.push("    scan_ssid=1".to_string());
    }
    lines.push("}".to_string());
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_matches_the_ieee_test_vector() {
        // IEEE 802.11i-2004, H.4.3 test vector 1.
        assert_eq!(
            psk_hex("IEEE", "password"),
            "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
        );
    }

    #[test]
    fn odd_ssids_are_written_in_hex() {
        assert_eq!(ssid_value("ceil"), "\"ceil\"");
        assert_eq!(ssid_value("a\"b"), "612262");
    }
}
