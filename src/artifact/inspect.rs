//! What OpenStack's image format inspector says about an image: the format it detects and the
//! safety checks it fails. ironic-python-agent and Ironic refuse an image on either.
//!
//! The rules are oslo.utils' (`oslo_utils/imageutils/format_inspector.py`): every inspector looks
//! at the head of the file; more than one match is refused ("matched multiple potential
//! formats"), none is `raw`. An MBR or GPT disk is `gpt` (0x55AA at 510, unless it is a FAT boot
//! sector); its four MBR entries must have boot flag 0x00 or 0x80, a protective 0xEE entry must
//! be the only entry, start at CHS 0/2/0 and LBA 1 (a hybrid MBR fails), and some entry must
//! exist. A qcow2 must be version 2 or 3, without a backing file, without an external data file
//! and without incompatible feature bits beyond the four oslo knows (bits 0–3; extended L2, bit
//! 4, fails). QED is banned. IPA then permits only `raw`, `gpt` and `qcow2`
//! (`[DEFAULT]permitted_image_formats`). This is an emulation: the tests run oslo's own code on
//! the same files and compare.

/// How much of the head the inspectors need: the VHDX header region ends at 256 KiB.
pub const HEAD_LEN: usize = 256 * 1024;

/// The formats ironic-python-agent permits by default.
pub const IPA_PERMITTED: &[&str] = &["raw", "gpt", "qcow2"];

/// The inspector's verdict on one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// oslo's format name (`raw`, `gpt`, `qcow2`, `vmdk`, …); several when the head matches
    /// more than one format, which IPA refuses.
    pub formats: Vec<&'static str>,
    /// The safety checks the detected format fails, in oslo's words.
    pub violations: Vec<&'static str>,
}

impl Inspection {
    /// The one detected format, or None when several matched.
    pub fn format(&self) -> Option<&'static str> {
        match self.formats.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Why IPA refuses the image, or None when it accepts it.
    pub fn ipa_refusal(&self) -> Option<String> {
        let Some(format) = self.format() else {
            return Some(format!(
                "the head matches several formats ({}); IPA refuses such an image",
                self.formats.join(", ")
            ));
        };
        if !self.violations.is_empty() {
            return Some(format!(
                "a {format} image that fails the format inspector's safety checks: {}",
                self.violations.join("; ")
            ));
        }
        if !IPA_PERMITTED.contains(&format) {
            return Some(format!(
                "format {format}: IPA permits only {}",
                IPA_PERMITTED.join(", ")
            ));
        }
        None
    }
}

/// Inspects the head of an image (up to [`HEAD_LEN`] bytes; a shorter slice is the whole file).
pub fn inspect(head: &[u8]) -> Inspection {
    let mut formats = Vec::new();
    let mut violations = Vec::new();
    let full = |n: usize| head.len() >= n;
    if full(512) && head.starts_with(b"QFI\xfb") {
        formats.push("qcow2");
        violations.extend(qcow2_violations(head));
    }
    if full(512) && head.starts_with(b"QED\0") {
        formats.push("qed");
        violations.push("This file format is not allowed");
    }
    if head.starts_with(b"conectix") {
        formats.push("vhd");
    }
    if full(32) && head.starts_with(b"vhdxfile") {
        formats.push("vhdx");
    }
    if is_vmdk(head) {
        formats.push("vmdk");
    }
    if full(512) && head[0x40..0x44] == 0xBEDA_107Fu32.to_le_bytes() {
        formats.push("vdi");
    }
    if full(34 * 1024) && [&b"CD001"[..], b"NSR02", b"NSR03"].contains(&&head[32769..32774]) {
        formats.push("iso");
    }
    if full(512) && head[510..512] == [0x55, 0xAA] && !(head[0x10] == 2 && head[0x15] == 0xF8) {
        formats.push("gpt");
        violations.extend(mbr_violation(&head[..512]));
    }
    if full(592) && head.starts_with(b"LUKS\xba\xbe") {
        formats.push("luks");
    }
    if formats.is_empty() {
        formats.push("raw");
    }
    if formats.len() > 1 {
        violations.clear();
    }
    Inspection {
        formats,
        violations,
    }
}

/// QcowInspector's checks: backing_file, data_file, unknown_features (all are run).
fn qcow2_violations(h: &[u8]) -> Vec<&'static str> {
    let be64 = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_be_bytes(b)
    };
    let version = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let incompatible = be64(72);
    let mut v = Vec::new();
    if be64(8) != 0 {
        v.push("Image has a backing file");
    }
    // Incompatible feature bit 2 is "external data file". oslo reads it whatever the version.
    if incompatible & 0b100 != 0 {
        v.push("Image has data_file set");
    }
    match version {
        2 => {}
        // oslo knows bits 0-3 (dirty, corrupt, external data file, compression type).
        3 if incompatible & !0b1111 == 0 => {}
        3 => v.push("Unknown QCOW2 features found"),
        _ => v.push("Unsupported qcow2 version"),
    }
    v
}

/// GPTInspector's check_mbr_partitions: the first violation, as oslo raises it.
fn mbr_violation(mbr: &[u8]) -> Option<&'static str> {
    let mut used = Vec::new();
    let mut found_gpt = false;
    for i in 0..4 {
        let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
        if e[0] != 0x00 && e[0] != 0x80 {
            return Some(match i {
                0 => "MBR PTE 0 has invalid boot flag",
                1 => "MBR PTE 1 has invalid boot flag",
                2 => "MBR PTE 2 has invalid boot flag",
                _ => "MBR PTE 3 has invalid boot flag",
            });
        }
        let os_type = e[4];
        if os_type != 0 {
            used.push(i);
        }
        if os_type == 0xEE {
            found_gpt = true;
            if e[1..4] != [0x00, 0x02, 0x00] {
                return Some("GPT MBR has invalid start CHS");
            }
            if u32::from_le_bytes([e[8], e[9], e[10], e[11]]) != 1 {
                return Some("GPT MBR has invalid start LBA");
            }
        }
    }
    if found_gpt && used != [0] {
        return Some("GPT MBR defines invalid extra partitions");
    }
    if used.is_empty() {
        return Some("GPT MBR has no partitions defined");
    }
    None
}

/// VMDKInspector's match: a sparse extent header, or a text descriptor with a createType.
fn is_vmdk(head: &[u8]) -> bool {
    if head.len() < 64 {
        return false;
    }
    if head.starts_with(b"KDMV") {
        return true;
    }
    let text = head[..64]
        .iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace() || b == b' ');
    if !text {
        return false;
    }
    let desc = &head[..head.len().min((1 << 20) - 1)];
    let desc = desc.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(desc)
        .to_ascii_lowercase()
        .contains("createtype=\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2(version: u32, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    #[test]
    fn qcow2_versions_and_feature_bits() {
        assert_eq!(inspect(&qcow2(3, 0)).ipa_refusal(), None);
        assert_eq!(inspect(&qcow2(2, 0)).ipa_refusal(), None);
        // Dirty and corrupt bits are known to oslo.
        assert_eq!(inspect(&qcow2(3, 0b11)).violations, Vec::<&str>::new());
        assert_eq!(
            inspect(&qcow2(1, 0)).violations,
            ["Unsupported qcow2 version"]
        );
        assert_eq!(
            inspect(&qcow2(4, 0)).violations,
            ["Unsupported qcow2 version"]
        );
        assert_eq!(
            inspect(&qcow2(3, 1 << 4)).violations,
            ["Unknown QCOW2 features found"]
        );
        assert_eq!(
            inspect(&qcow2(3, 0b100)).violations,
            ["Image has data_file set"]
        );
        let mut backed = qcow2(3, 0);
        backed[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        assert_eq!(inspect(&backed).violations, ["Image has a backing file"]);
    }

    #[test]
    fn mbr_rules() {
        let mut mbr = vec![0u8; 512];
        mbr[510..].copy_from_slice(&[0x55, 0xAA]);
        assert_eq!(
            inspect(&mbr).violations,
            ["GPT MBR has no partitions defined"]
        );
        // A protective MBR as sgdisk writes it.
        mbr[446..462].copy_from_slice(&[
            0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        assert_eq!(inspect(&mbr).format(), Some("gpt"));
        assert_eq!(inspect(&mbr).ipa_refusal(), None);
        // Hybrid: a second entry beside the protective one.
        mbr[462..478].copy_from_slice(&[0, 0, 0, 0, 0x83, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0]);
        assert_eq!(
            inspect(&mbr).violations,
            ["GPT MBR defines invalid extra partitions"]
        );
        mbr[462..478].fill(0);
        mbr[446] = 0x81;
        assert_eq!(
            inspect(&mbr).violations,
            ["MBR PTE 0 has invalid boot flag"]
        );
        // A FAT boot sector is not an MBR.
        let mut fat = vec![0u8; 512];
        fat[510..].copy_from_slice(&[0x55, 0xAA]);
        fat[0x10] = 2;
        fat[0x15] = 0xF8;
        assert_eq!(inspect(&fat).format(), Some("raw"));
    }
}
