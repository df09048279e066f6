//! The bootloader an OS image carries, and how the native disk builder puts it on the ESP:
//! systemd-boot (Debian's systemd-boot-efi, Arch, …) or shim + GRUB the way bootupd ships them in
//! bootc images (Fedora, CentOS Stream, RHEL). Both boot the kernel kiln copies to the ESP.

use anyhow::{Result, bail};

use crate::base::unpack::{Kind, Tree};

/// Where bootupd keeps the ESP contents it installs (`bootupctl backend install`).
const BOOTUPD_EFI: &str = "usr/lib/bootupd/updates/EFI";

pub enum Loader {
    /// The image's systemd-boot binary (a path in the tree).
    SystemdBoot(String),
    /// bootupd's `EFI` tree: (path on the ESP, path in the tree) for every file.
    ShimGrub(Vec<(String, String)>),
}

/// What the loader must start: ESP paths of the kernel and initramfs, and the command line.
pub struct BootEntry {
    pub title: String,
    pub version: String,
    pub linux: String,
    pub initrd: Option<String>,
    pub options: String,
    /// The ESP's FAT volume id, for GRUB's `search --fs-uuid`.
    pub esp_volume_id: u32,
}

/// bootupd's tree wins when the image has one: an image that ships bootupd boots that way under
/// bootc-image-builder too, so kiln's disk boots the same chain.
pub fn find(tree: &Tree, efi_arch: &str) -> Result<Loader> {
    let files: Vec<(String, String)> = tree
        .entries
        .keys()
        .filter_map(|p| {
            let rel = p.strip_prefix(BOOTUPD_EFI)?.strip_prefix('/')?;
            let (resolved, m) = tree.resolve(p)?;
            matches!(m.kind, Kind::File | Kind::Hardlink(_))
                .then(|| (format!("EFI/{rel}"), resolved))
        })
        .collect();
    if !files.is_empty() {
        let fallback = format!("EFI/BOOT/BOOT{}.EFI", efi_arch.to_uppercase());
        let has = |pred: &dyn Fn(&str) -> bool| files.iter().any(|(esp, _)| pred(esp));
        if !has(&|e| e.eq_ignore_ascii_case(&fallback)) {
            bail!(
                "the image's bootupd files (/{BOOTUPD_EFI}) have no {fallback}, the path firmware \
                 boots a new disk from; use --engine bootc-image-builder for this image"
            );
        }
        if !has(&|e| is_grub(e)) {
            bail!(
                "the image's bootupd files (/{BOOTUPD_EFI}) hold no GRUB (grub*.efi); kiln knows \
                 shim + GRUB and systemd-boot"
            );
        }
        return Ok(Loader::ShimGrub(files));
    }
    let rel = format!("usr/lib/systemd/boot/efi/systemd-boot{efi_arch}.efi");
    match tree.resolve(&rel) {
        Some((p, m)) if matches!(m.kind, Kind::File | Kind::Hardlink(_)) => {
            Ok(Loader::SystemdBoot(p))
        }
        _ => bail!(
            "the image has no bootloader: neither /{rel} (systemd-boot; Debian's \
             systemd-boot-efi package) nor shim + GRUB in /{BOOTUPD_EFI} (bootupd)"
        ),
    }
}

fn is_grub(esp_path: &str) -> bool {
    let name = esp_path.rsplit('/').next().unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    lower.starts_with("grub") && lower.ends_with(".efi")
}

/// Files the loader puts on the ESP besides the kernel: (ESP path, contents source).
pub enum EspFile {
    /// Copied from this path in the tree.
    FromTree(String),
    Text(String),
}

/// Every file the ESP needs for `loader` to start `entry`.
pub fn esp_files(loader: &Loader, efi_arch: &str, entry: &BootEntry) -> Vec<(String, EspFile)> {
    let mut out = Vec::new();
    // The Boot Loader Specification entry: systemd-boot reads it, and so does the blscfg
    // command of Fedora's GRUB; the grub.cfg below does not need it.
    let entry_name = format!("kiln-{}.conf", entry.version);
    let mut bls = format!(
        "title   {}\nversion {}\nlinux   /{}\n",
        entry.title, entry.version, entry.linux
    );
    if let Some(initrd) = &entry.initrd {
        bls.push_str(&format!("initrd  /{initrd}\n"));
    }
    bls.push_str(&format!("options {}\n", entry.options));
    out.push((format!("loader/entries/{entry_name}"), EspFile::Text(bls)));
    match loader {
        Loader::SystemdBoot(p) => {
            // The removable-media path, so a fresh machine boots it with no NVRAM entry.
            let fallback = format!("EFI/BOOT/BOOT{}.EFI", efi_arch.to_uppercase());
            out.push((fallback, EspFile::FromTree(p.clone())));
            out.push((
                format!("EFI/systemd/systemd-boot{efi_arch}.efi"),
                EspFile::FromTree(p.clone()),
            ));
            out.push((
                "loader/loader.conf".into(),
                EspFile::Text(format!("default {entry_name}\ntimeout 0\n")),
            ));
        }
        Loader::ShimGrub(files) => {
            for (esp, src) in files {
                out.push((esp.clone(), EspFile::FromTree(src.clone())));
            }
            // GRUB reads grub.cfg from its own directory (its prefix, or $cmdpath where the
            // prefix does not exist); one beside every GRUB binary covers shim's fallback path
            // and the vendor directory.
            let mut dirs: Vec<&str> = files
                .iter()
                .filter(|(esp, _)| is_grub(esp))
                .filter_map(|(esp, _)| esp.rsplit_once('/').map(|(d, _)| d))
                .collect();
            dirs.sort();
            dirs.dedup();
            let cfg = grub_cfg(entry);
            for d in dirs {
                out.push((format!("{d}/grub.cfg"), EspFile::Text(cfg.clone())));
            }
        }
    }
    out
}

/// A grub.cfg with one entry that boots kiln's kernel from the ESP.
fn grub_cfg(entry: &BootEntry) -> String {
    let id = entry.esp_volume_id;
    let mut cfg = format!(
        "# Written by kiln: boot the kernel on this ESP.\n\
         set timeout=0\n\
         set default=0\n\
         search --no-floppy --fs-uuid --set=root {:04x}-{:04x}\n\
         menuentry '{}' {{\n\
         \tlinux /{} {}\n",
        id >> 16,
        id & 0xffff,
        entry.title.replace('\'', ""),
        entry.linux,
        entry.options
    );
    if let Some(initrd) = &entry.initrd {
        cfg.push_str(&format!("\tinitrd /{initrd}\n"));
    }
    cfg.push_str("}\n");
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_searches_the_esp_by_its_fat_serial() {
        let cfg = grub_cfg(&BootEntry {
            title: "Fedora Linux 41 (it's)".into(),
            version: "6.11.4-301.fc41.x86_64".into(),
            linux: "kiln/6.11.4-301.fc41.x86_64/linux".into(),
            initrd: Some("kiln/6.11.4-301.fc41.x86_64/initrd".into()),
            options: "root=PARTUUID=x rw".into(),
            esp_volume_id: 0x1a2b_3c4d,
        });
        assert!(cfg.contains("--set=root 1a2b-3c4d\n"), "{cfg}");
        assert!(cfg.contains("menuentry 'Fedora Linux 41 (its)' {"), "{cfg}");
        assert!(cfg.contains(
            "\tlinux /kiln/6.11.4-301.fc41.x86_64/linux root=PARTUUID=x rw\n\
             \tinitrd /kiln/6.11.4-301.fc41.x86_64/initrd\n}\n"
        ));
    }

    #[test]
    fn grub_binaries_are_recognised_by_name() {
        assert!(is_grub("EFI/fedora/grubx64.efi"));
        assert!(is_grub("EFI/BOOT/grubaa64.EFI"));
        assert!(!is_grub("EFI/fedora/shimx64.efi"));
        assert!(!is_grub("EFI/fedora/grub.cfg"));
    }
}
