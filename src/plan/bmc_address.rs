//! BMC addresses as the Metal3 baremetal-operator (BMO) accepts them in `spec.bmc.address`.
//!
//! The rules are BMO's, taken from `pkg/hardwareutils/bmc` (`access.go`: `GetParsedURL`,
//! `NewAccessDetails`, `checkDNSValid`; the `RegisterFactory` calls in `ipmi.go`, `redfish.go`,
//! `redfish_virtualmedia.go`, `redfish_https.go`, `idrac_virtualmedia.go`) and its host webhook
//! (`internal/webhooks/metal3.io/v1alpha1/baremetalhost_validation.go`, which runs both
//! `NewAccessDetails` and `GetParsedURL`), at commit 02aa5059e3482f9dc3b5115c3a45cec4b000ae16.
//!
//! BMO parses with Go's `net/url`, whose quirks decide what passes (`ipmi:host` is an opaque URL
//! BMO re-reads as `ipmi://host`; a bare `host:port` fails to parse and becomes IPMI), so the
//! part of `url.Parse` those paths reach is written out here. No Rust URL crate parses the way Go
//! does (the `url` crate follows WHATWG, which accepts `_` in host names and lower-cases hosts).
//!
//! One rule is kiln's own: the host must not be empty. BMO lets `redfish:///…` through, but
//! Ironic then has nothing to connect to.

use std::net::IpAddr;

/// The schemes BMO registers a driver for: `RegisterFactory(name, factory, extensions)` maps
/// `name` and `name+<extension>` for each extension.
const DRIVERS: &[(&str, &[&str])] = &[
    ("ipmi", &[]),
    ("libvirt", &[]),
    ("redfish", &["http", "https"]),
    ("ilo5-redfish", &["http", "https"]),
    ("idrac-redfish", &["http", "https"]),
    ("redfish-virtualmedia", &["http", "https"]),
    ("ilo5-virtualmedia", &["http", "https"]),
    ("redfish-uefihttp", &["http", "https"]),
    ("idrac-virtualmedia", &["http", "https"]),
];

/// Whether BMO has a driver for `scheme` (already lower-cased, as Go's parser leaves it).
pub fn known_scheme(scheme: &str) -> bool {
    DRIVERS.iter().any(|(name, exts)| {
        scheme == *name
            || scheme
                .strip_prefix(name)
                .and_then(|s| s.strip_prefix('+'))
                .is_some_and(|ext| exts.contains(&ext))
    })
}

/// A BMC address as BMO reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcAddress {
    /// The driver's scheme, lower-cased (`redfish+http`, `ipmi`, …).
    pub scheme: String,
    /// Host name or IP address, without brackets or port.
    pub host: String,
    /// The port, empty when none is given.
    pub port: String,
    pub path: String,
}

/// Why BMO (or kiln) refuses an address; the texts follow BMO's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BmcAddressError {
    #[error("missing BMC address")]
    Missing,
    #[error("failed to parse BMC address information: {0}")]
    Parse(String),
    #[error("failed to parse BMC address information: BMC address hostname/IP : [{0}] is invalid")]
    Hostname(String),
    #[error("Unknown BMC type '{scheme}' for address {address}")]
    UnknownType { scheme: String, address: String },
    #[error("the address names no host")]
    NoHost,
}

/// Parses `address` as BMO's webhook does (`GetParsedURL`, then the driver registry).
pub fn parse(address: &str) -> Result<BmcAddress, BmcAddressError> {
    if address.is_empty() {
        return Err(BmcAddressError::Missing);
    }
    let url = parsed_url(address)?;
    if !known_scheme(&url.scheme) {
        return Err(BmcAddressError::UnknownType {
            scheme: url.scheme,
            address: address.to_string(),
        });
    }
    let (host, port) = split_host_port(&url.host);
    if host.is_empty() {
        return Err(BmcAddressError::NoHost);
    }
    Ok(BmcAddress {
        scheme: url.scheme,
        host: host.to_string(),
        port: port.to_string(),
        path: url.path,
    })
}

/// BMO's `GetParsedURL`.
fn parsed_url(address: &str) -> Result<GoUrl, BmcAddressError> {
    let url = match go_parse(address) {
        Err(e) => {
            // Not a URL, but maybe `host:port`: Go's `net.SplitHostPort` decides.
            if address.contains(':') && net_split_host_port(address).is_err() {
                return Err(BmcAddressError::Parse(e));
            }
            GoUrl {
                scheme: "ipmi".into(),
                host: address.into(),
                ..GoUrl::default()
            }
        }
        Ok(u) if !u.opaque.is_empty() => {
            go_parse(&address.replacen(':', "://", 1)).map_err(BmcAddressError::Parse)?
        }
        Ok(u) if u.scheme.is_empty() && split_host_port(&u.host).0.is_empty() => {
            go_parse(&format!("ipmi://{address}")).map_err(BmcAddressError::Parse)?
        }
        Ok(u) => u,
    };
    let host = split_host_port(&url.host).0;
    if !dns_valid(host) {
        return Err(BmcAddressError::Hostname(host.to_string()));
    }
    Ok(url)
}

/// BMO's `checkDNSValid`: empty, an IP address, or dot-separated labels of 1–63 letters, digits
/// and inner hyphens (no trailing dot, no underscore).
fn dns_valid(host: &str) -> bool {
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.is_empty() || host.parse::<IpAddr>().is_ok() || host.split('.').all(label)
}

#[derive(Debug, Default)]
struct GoUrl {
    scheme: String,
    opaque: String,
    /// `host[:port]` as Go's `URL.Host` holds it (brackets kept).
    host: String,
    path: String,
}

/// The part of Go's `net/url.Parse` a BMC address reaches (`parse` with `viaRequest` false).
fn go_parse(raw: &str) -> Result<GoUrl, String> {
    let (raw, fragment) = raw.split_once('#').unwrap_or((raw, ""));
    if raw.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("net/url: invalid control character in URL".into());
    }
    check_escapes(fragment)?;
    let (scheme, rest) = go_scheme(raw)?;
    let scheme = scheme.to_ascii_lowercase();
    let rest = if rest.ends_with('?') && rest.matches('?').count() == 1 {
        &rest[..rest.len() - 1]
    } else {
        rest.split_once('?').map_or(rest, |(r, _)| r)
    };
    if !rest.starts_with('/') {
        if !scheme.is_empty() {
            return Ok(GoUrl {
                scheme,
                opaque: rest.into(),
                ..GoUrl::default()
            });
        }
        if rest.split('/').next().is_some_and(|seg| seg.contains(':')) {
            return Err("first path segment in URL cannot contain colon".into());
        }
    }
    let mut url = GoUrl {
        scheme,
        ..GoUrl::default()
    };
    let mut path = rest;
    if (!url.scheme.is_empty() || !rest.starts_with("///")) && rest.starts_with("//") {
        let after = &rest[2..];
        let (authority, p) = after.find('/').map_or((after, ""), |i| after.split_at(i));
        url.host = go_authority(authority)?;
        path = p;
    }
    check_escapes(path)?;
    url.path = path.into();
    Ok(url)
}

/// Go's `getScheme`.
fn go_scheme(raw: &str) -> Result<(&str, &str), String> {
    for (i, c) in raw.bytes().enumerate() {
        match c {
            b'a'..=b'z' | b'A'..=b'Z' => {}
            b'0'..=b'9' | b'+' | b'-' | b'.' if i > 0 => {}
            b':' if i == 0 => return Err("missing protocol scheme".into()),
            b':' => return Ok((&raw[..i], &raw[i + 1..])),
            _ => return Ok(("", raw)),
        }
    }
    Ok(("", raw))
}

/// Go's `parseAuthority`: the host (user info is checked and dropped).
fn go_authority(authority: &str) -> Result<String, String> {
    let (userinfo, host) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let host = go_host(host)?;
    if let Some(u) = userinfo {
        let valid = u
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:~!$&'()*+,;=%@".contains(c));
        if !valid {
            return Err("net/url: invalid userinfo".into());
        }
        check_escapes(u)?;
    }
    Ok(host)
}

/// Go's `parseHost`, and `unescape(host, encodeHost)`.
fn go_host(host: &str) -> Result<String, String> {
    if host.starts_with('[') {
        let i = host.rfind(']').ok_or("missing ']' in host")?;
        let colon_port = &host[i + 1..];
        if !valid_optional_port(colon_port) {
            return Err(format!("invalid port {colon_port:?} after host"));
        }
        let literal = &host[1..i];
        if !literal.contains("%25") && literal.parse::<IpAddr>().is_err() {
            return Err(format!("invalid host: {literal:?} is not an IP address"));
        }
    } else if let Some(i) = host.rfind(':') {
        let colon_port = &host[i..];
        if !valid_optional_port(colon_port) {
            return Err(format!("invalid port {colon_port:?} after host"));
        }
    }
    let bytes = host.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'%' {
            let hex = host
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
            match hex {
                // In a host only non-ASCII bytes (and %25, the zone's) may be escaped.
                Some(h) if h.as_bytes()[0] >= b'8' || h == "25" => i += 3,
                _ => {
                    let esc = host.get(i..(i + 3).min(host.len())).unwrap_or("%");
                    return Err(format!("invalid URL escape {esc:?}"));
                }
            }
            continue;
        }
        let allowed =
            c >= 0x80 || c.is_ascii_alphanumeric() || b"!$&'()*+,;=:[]<>\"-_.~".contains(&c);
        if !allowed {
            return Err(format!("invalid character {:?} in host name", c as char));
        }
        i += 1;
    }
    Ok(host.to_string())
}

/// Every `%` starts a two-digit hex escape (Go's `unescape` in the other modes).
fn check_escapes(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let ok = b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        if !ok {
            let esc = s.get(i..(i + 3).min(s.len())).unwrap_or("%");
            return Err(format!("invalid URL escape {esc:?}"));
        }
    }
    Ok(())
}

/// Go's `validOptionalPort`: empty, or `:` and digits.
fn valid_optional_port(p: &str) -> bool {
    p.is_empty()
        || p.strip_prefix(':')
            .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
}

/// Go's `URL.Hostname()` and `URL.Port()` (net/url's `splitHostPort`).
fn split_host_port(host_port: &str) -> (&str, &str) {
    let (mut host, mut port) = (host_port, "");
    if let Some(i) = host_port.rfind(':')
        && valid_optional_port(&host_port[i..])
    {
        (host, port) = (&host_port[..i], &host_port[i + 1..]);
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        host = inner;
    }
    (host, port)
}

/// Go's `net.SplitHostPort`, for its verdict only.
fn net_split_host_port(hp: &str) -> Result<(), &'static str> {
    let i = hp.rfind(':').ok_or("missing port in address")?;
    let (j, k) = if hp.starts_with('[') {
        let end = hp.find(']').ok_or("missing ']' in address")?;
        if end + 1 == hp.len() {
            return Err("missing port in address");
        }
        if end + 1 != i {
            return Err(if hp.as_bytes()[end + 1] == b':' {
                "too many colons in address"
            } else {
                "missing port in address"
            });
        }
        (1, end + 1)
    } else {
        if hp[..i].contains(':') {
            return Err("too many colons in address");
        }
        (0, 0)
    };
    if hp[j..].contains('[') {
        return Err("unexpected '[' in address");
    }
    if hp[k..].contains(']') {
        return Err("unexpected ']' in address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BMO's own tables: `pkg/hardwareutils/bmc/access_test.go` (TestParse: scenario, address,
    /// type, host, port, path or an error; TestStaticDriverInfo, TestDriverInfo and
    /// TestUnknownType inputs) and
    /// `internal/webhooks/metal3.io/v1alpha1/baremetalhost_validation_test.go` (the BMC
    /// addresses of TestValidateCreate), at BMO 02aa5059e. `None` is an address BMO refuses.
    #[allow(clippy::type_complexity)]
    const BMO_TABLE: &[(&str, Option<(&str, &str, &str, &str)>)] = &[
        // access_test.go TestParse
        (
            "libvirt://192.168.122.1:6233/?abc=def",
            Some(("libvirt", "192.168.122.1", "6233", "/")),
        ),
        ("192.168.122.1", Some(("ipmi", "192.168.122.1", "", ""))),
        (
            "my.favoritebmc.com",
            Some(("ipmi", "my.favoritebmc.com", "", "")),
        ),
        (
            "my.examplehost.com",
            Some(("ipmi", "my.examplehost.com", "", "")),
        ),
        ("my-.examplehost.com", None),
        ("[fe80::fc33:62ff:fe33:8xff]:6223", None),
        (
            "192.168.122.1:6233",
            Some(("ipmi", "192.168.122.1", "6233", "")),
        ),
        (
            "[fe80::fc33:62ff:fe83:8a76]:6233",
            Some(("ipmi", "fe80::fc33:62ff:fe83:8a76", "6233", "")),
        ),
        ("[fe80::fc33:62ff:fe83:8a76]", None),
        (
            "ipmi://192.168.122.1:6233",
            Some(("ipmi", "192.168.122.1", "6233", "")),
        ),
        (
            "ipmi:192.168.122.1",
            Some(("ipmi", "192.168.122.1", "", "")),
        ),
        (
            "ipmi:192.168.122.1:6233",
            Some(("ipmi", "192.168.122.1", "6233", "")),
        ),
        (
            "redfish://192.168.122.1",
            Some(("redfish", "192.168.122.1", "", "")),
        ),
        (
            "redfish://192.168.122.1:6233/foo",
            Some(("redfish", "192.168.122.1", "6233", "/foo")),
        ),
        (
            "redfish://[fe80::fc33:62ff:fe83:8a76]",
            Some(("redfish", "fe80::fc33:62ff:fe83:8a76", "", "")),
        ),
        (
            "redfish://[fe80::fc33:62ff:fe83:8a76]:6233/foo",
            Some(("redfish", "fe80::fc33:62ff:fe83:8a76", "6233", "/foo")),
        ),
        (
            "redfish:192.168.122.1",
            Some(("redfish", "192.168.122.1", "", "")),
        ),
        // access_test.go TestStaticDriverInfo
        (
            "libvirt://192.168.122.1",
            Some(("libvirt", "192.168.122.1", "", "")),
        ),
        (
            "redfish-virtualmedia://192.168.122.1",
            Some(("redfish-virtualmedia", "192.168.122.1", "", "")),
        ),
        (
            "redfish-virtualmedia+http://192.168.122.1",
            Some(("redfish-virtualmedia+http", "192.168.122.1", "", "")),
        ),
        (
            "redfish-virtualmedia+https://192.168.122.1",
            Some(("redfish-virtualmedia+https", "192.168.122.1", "", "")),
        ),
        (
            "redfish-uefihttp+https://192.168.122.1",
            Some(("redfish-uefihttp+https", "192.168.122.1", "", "")),
        ),
        (
            "idrac-redfish://192.168.122.1",
            Some(("idrac-redfish", "192.168.122.1", "", "")),
        ),
        (
            "ilo5-virtualmedia://192.168.122.1",
            Some(("ilo5-virtualmedia", "192.168.122.1", "", "")),
        ),
        (
            "ilo5-virtualmedia+http://192.168.122.1",
            Some(("ilo5-virtualmedia+http", "192.168.122.1", "", "")),
        ),
        (
            "ilo5-virtualmedia+https://192.168.122.1",
            Some(("ilo5-virtualmedia+https", "192.168.122.1", "", "")),
        ),
        (
            "idrac-virtualmedia://192.168.122.1",
            Some(("idrac-virtualmedia", "192.168.122.1", "", "")),
        ),
        (
            "idrac-virtualmedia+http://192.168.122.1",
            Some(("idrac-virtualmedia+http", "192.168.122.1", "", "")),
        ),
        (
            "idrac-virtualmedia+https://192.168.122.1",
            Some(("idrac-virtualmedia+https", "192.168.122.1", "", "")),
        ),
        // access_test.go TestDriverInfo
        (
            "ipmi://192.168.122.1?privilegelevel=OPERATOR",
            Some(("ipmi", "192.168.122.1", "", "")),
        ),
        (
            "redfish://192.168.122.1/redfish/v1/foo/bar",
            Some(("redfish", "192.168.122.1", "", "/redfish/v1/foo/bar")),
        ),
        (
            "redfish+http://192.168.122.1/foo/bar",
            Some(("redfish+http", "192.168.122.1", "", "/foo/bar")),
        ),
        (
            "redfish+https://192.168.122.1/foo/bar",
            Some(("redfish+https", "192.168.122.1", "", "/foo/bar")),
        ),
        (
            "redfish://192.168.122.1:8080/foo/bar",
            Some(("redfish", "192.168.122.1", "8080", "/foo/bar")),
        ),
        (
            "redfish://[fe80::fc33:62ff:fe83:8a76]:8080/foo",
            Some(("redfish", "fe80::fc33:62ff:fe83:8a76", "8080", "/foo")),
        ),
        (
            "redfish+https://192.168.122.1/",
            Some(("redfish+https", "192.168.122.1", "", "/")),
        ),
        // access_test.go TestUnknownType
        ("foo://192.168.122.1", None),
        // baremetalhost_validation_test.go
        (
            "redfish://bmc.example.com",
            Some(("redfish", "bmc.example.com", "", "")),
        ),
        ("test:127.0.1.1", None),
        (
            "idrac-virtualmedia+https://192.168.1.1/redfish/v1/Systems/System.Embedded.1",
            Some((
                "idrac-virtualmedia+https",
                "192.168.1.1",
                "",
                "/redfish/v1/Systems/System.Embedded.1",
            )),
        ),
        (
            "ipmi://host-0.example.com.org:6223",
            Some(("ipmi", "host-0.example.com.org", "6223", "")),
        ),
        (
            "ipmi://baremetalhost",
            Some(("ipmi", "baremetalhost", "", "")),
        ),
        (
            "ipmi://[fe80::fc33:62ff:fe83:8a76]:6233",
            Some(("ipmi", "fe80::fc33:62ff:fe83:8a76", "6233", "")),
        ),
        ("ipmi://-host.example.com.org", None),
        ("ipmi://host+1.example.com.org", None),
        ("[@]host.example.com", None),
        ("ipm:host.example.com:6223", None),
        ("ipmi://[fe80::fc33:62ff:fe33:8xff]:6223", None),
    ];

    #[test]
    fn bmo_test_tables() {
        for (address, want) in BMO_TABLE {
            let got = parse(address);
            match want {
                None => assert!(got.is_err(), "{address}: BMO refuses it, kiln gave {got:?}"),
                Some((scheme, host, port, path)) => {
                    let a = got.unwrap_or_else(|e| panic!("{address}: BMO accepts it, kiln: {e}"));
                    assert_eq!(
                        (
                            a.scheme.as_str(),
                            a.host.as_str(),
                            a.port.as_str(),
                            a.path.as_str()
                        ),
                        (*scheme, *host, *port, *path),
                        "{address}"
                    );
                }
            }
        }
    }

    /// The cases of issue 16, each decided by the BMO code named beside it.
    #[test]
    fn drivers_bmo_removed_and_host_names_it_refuses() {
        let refused = [
            // No RegisterFactory for these any more.
            "idrac://10.0.0.5",
            "ilo4://10.0.0.5",
            "ilo5://10.0.0.5",
            "irmc://10.0.0.5",
            // checkDNSValid's label pattern.
            "redfish://bmc_1.lab/redfish/v1/Systems/1",
            "redfish://bmc.lab./redfish/v1/Systems/1",
            // url.Parse: "invalid port", then net.SplitHostPort: "too many colons".
            "redfish://host:abc/redfish/v1/Systems/1",
            // url.Parse: invalid character " " in host name.
            "redfish://bmc 1.lab/redfish/v1/Systems/1",
            // kiln's own rule: no host at all.
            "redfish:///redfish/v1/Systems/1",
            "",
        ];
        for a in refused {
            assert!(parse(a).is_err(), "{a:?} accepted");
        }
        let accepted = [
            "libvirt://192.168.122.1:6233/",
            "idrac-redfish+http://10.0.0.5/redfish/v1/Systems/System.Embedded.1",
            "idrac-redfish+https://10.0.0.5/redfish/v1/Systems/System.Embedded.1",
            "idrac-virtualmedia+http://10.0.0.5/redfish/v1/Systems/System.Embedded.1",
            "idrac-virtualmedia+https://10.0.0.5/redfish/v1/Systems/System.Embedded.1",
            "ilo5-redfish+http://10.0.0.5/redfish/v1/Systems/1",
            "ilo5-redfish+https://10.0.0.5/redfish/v1/Systems/1",
            "ilo5-virtualmedia+http://10.0.0.5/redfish/v1/Systems/1",
            "ilo5-virtualmedia+https://10.0.0.5/redfish/v1/Systems/1",
            "redfish-uefihttp+http://10.0.0.5/redfish/v1/Systems/1",
            "redfish-uefihttp+https://10.0.0.5/redfish/v1/Systems/1",
            // Go lower-cases the scheme.
            "Redfish+HTTP://10.20.0.2:8000/redfish/v1/Systems/edge-1",
        ];
        for a in accepted {
            assert!(parse(a).is_ok(), "{a:?} refused: {:?}", parse(a));
        }
        assert_eq!(
            parse("irmc://10.0.0.5").unwrap_err().to_string(),
            "Unknown BMC type 'irmc' for address irmc://10.0.0.5"
        );
    }
}
