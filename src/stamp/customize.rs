//! hypriot `flash`'s customisations, for users coming from it: `--hostname`, `--userdata`,
//! `--metadata`, `--bootconf` (config.txt) and `--file`, applied to the image's first partition (the
//! boot FAT) copy-on-write, as patches the writer applies on the way to the disk. The image file
//! itself is never changed.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_yaml_ng::Value;

use crate::disk;
use crate::disk::patch::Patch;
use crate::fs::fat::{self, FatVolume};

/// hypriot `flash`'s boot-partition edits, as `kiln flash` takes them (its flags are defined here).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct BootEdits {
    /// hypriot flash: set the hostname in the boot partition's user-data (and meta-data).
    #[arg(long)]
    pub hostname: Option<String>,
    /// hypriot flash: copy this file to the boot partition as user-data.
    #[arg(long, short = 'u')]
    pub userdata: Option<PathBuf>,
    /// hypriot flash: copy this file to the boot partition as meta-data.
    #[arg(long, short = 'm')]
    pub metadata: Option<PathBuf>,
    /// hypriot flash: copy this file to the boot partition as config.txt.
    #[arg(long, short = 'C')]
    pub bootconf: Option<PathBuf>,
    /// hypriot flash: copy this file to the boot partition (repeatable).
    #[arg(long = "file", short = 'F', value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

impl BootEdits {
    pub fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.userdata.is_none()
            && self.metadata.is_none()
            && self.bootconf.is_none()
            && self.files.is_empty()
    }
}

/// Reads a file named on the command line for the boot partition: a regular file (a FIFO or
/// /dev/zero is refused, not waited on), no larger than any boot partition.
fn read(p: &Path) -> Result<Vec<u8>> {
    crate::util::input::read_capped(p, 256 << 20, &p.display().to_string())
}

/// Sets `key: value` in a YAML mapping document, keeping a leading `#cloud-config` line.
fn set_key(doc: &[u8], key: &str, value: &str) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(doc).context("the document is not UTF-8")?;
    let mut v: Value = serde_yaml_ng::from_str(text).context("the document is not YAML")?;
    let map = match &mut v {
        Value::Mapping(m) => m,
        Value::Null => {
            v = Value::Mapping(Default::default());
            v.as_mapping_mut().expect("just made")
        }
        _ => bail!("the document is not a YAML mapping"),
    };
    map.insert(Value::String(key.into()), Value::String(value.into()));
    let header = if text.starts_with("#cloud-config") {
        "#cloud-config\n"
    } else {
        ""
    };
    Ok(format!("{header}{}", serde_yaml_ng::to_string(&v)?).into_bytes())
}

/// An image's customisation: the edited first partition as a patch, and the byte ranges its FAT
/// now uses (for the bmap).
pub struct Customized {
    pub patches: Vec<Patch>,
    pub used: Vec<(u64, u64)>,
}

pub fn patches(raw: &Path, edits: &BootEdits) -> Result<Customized> {
    if let Some(h) = &edits.hostname
        && !crate::plan::resolve::valid_hostname(h)
    {
        bail!("--hostname {h:?} is not a valid host name");
    }
    let mut f = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let part = boot_partition(&mut f, raw)?;
    let mut cur = disk::CowDevice::new(
        disk::PartitionSlice::new(f.try_clone()?, part.start, part.size),
        part.size,
    );
    {
        let probe = FatVolume::on(&mut cur, fat::fat_datetime(0))?;
        let when = probe
            .newest_root_timestamp()
            .unwrap_or_else(|| fat::fat_datetime(0));
        drop(probe);
        let vol = FatVolume::on(&mut cur, when)?;
        apply_edits(&vol, edits)?;
        vol.close()?;
    }
    let whole = disk::Partition {
        start: 0,
        ..part.clone()
    };
    let used = fat::used_ranges(&mut cur, &whole)?
        .into_iter()
        .map(|(s, l)| (part.start + s, l))
        .collect();
    Ok(Customized {
        patches: cur
            .into_runs()
            .into_iter()
            .map(|(offset, bytes)| Patch {
                offset: part.start + offset,
                bytes,
            })
            .collect(),
        used,
    })
}

/// Partition 1 of the image, which must hold a FAT filesystem.
fn boot_partition(f: &mut File, raw: &Path) -> Result<disk::Partition> {
    let layout = disk::read_layout(f, 512)?;
    let part = layout
        .partition(1)
        .context("the image has no partition 1 to customise")?
        .clone();
    if crate::fs::detect(f, &part)? != Some(crate::plan::profile::FsKind::Vfat) {
        bail!(
            "partition 1 of {} is not a FAT boot partition; --hostname/--userdata need one",
            raw.display()
        );
    }
    Ok(part)
}

/// Writes the edits onto the boot volume: user-data and meta-data (with the hostname set in
/// both), config.txt and the extra files.
fn apply_edits<T: fatfs::ReadWriteSeek>(vol: &FatVolume<T>, edits: &BootEdits) -> Result<()> {
    let mut user_data = match &edits.userdata {
        Some(p) => Some(read(p)?),
        None => vol.read_file("user-data")?,
    };
    let mut meta_data = match &edits.metadata {
        Some(p) => Some(read(p)?),
        None => vol.read_file("meta-data")?,
    };
    if let Some(h) = &edits.hostname {
        with_hostname(&mut user_data, &mut meta_data, h)?;
    }
    if edits.userdata.is_some() || edits.hostname.is_some() {
        vol.write_file("user-data", user_data.as_deref().unwrap_or_default())?;
    }
    if let Some(md) = &meta_data
        && (edits.metadata.is_some() || edits.hostname.is_some())
    {
        vol.write_file("meta-data", md)?;
    }
    if let Some(p) = &edits.bootconf {
        vol.write_file("config.txt", &read(p)?)?;
    }
    for p in &edits.files {
        let name = p
            .file_name()
            .context("--file needs a file name")?
            .to_string_lossy()
            .into_owned();
        vol.write_file(&name, &read(p)?)?;
    }
    Ok(())
}

/// Sets the host name `h` in `user-data` (a minimal one if there is none) and in `meta-data`
/// (if there is one).
fn with_hostname(
    user_data: &mut Option<Vec<u8>>,
    meta_data: &mut Option<Vec<u8>>,
    h: &str,
) -> Result<()> {
    let ud = user_data
        .take()
        .unwrap_or_else(|| b"#cloud-config\n".to_vec());
    *user_data = Some(set_key(&ud, "hostname", h).context("setting the hostname in user-data")?);
    if let Some(md) = meta_data.take() {
        *meta_data =
            Some(set_key(&md, "local-hostname", h).context("setting local-hostname in meta-data")?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_set_and_the_header_kept() {
        let out = set_key(
            b"#cloud-config\nhostname: black-pearl\nusers: []\n",
            "hostname",
            "ceil-9",
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("#cloud-config\n"));
        assert!(text.contains("hostname: ceil-9"));
        assert!(text.contains("users: []"));
    }
}
