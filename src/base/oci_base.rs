//! A base disk made from an OCI image: pulled, unpacked and assembled by the native disk builder
//! once per (image digest, disk layout, SOURCE_DATE_EPOCH), then kept in the cache like any
//! decompressed base, so building six nodes from one image assembles one disk.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::BaseImage;
use super::cache::Cache;
use crate::base::assemble::{self, DiskPlan};
use crate::base::unpack;
use crate::oci::{self, ImageRef, PullOptions};
use crate::plan::profile::Profile;
use crate::util::fsutil::temp_beside;

pub fn prepare(reference: &str, profile: &Profile, insecure: bool) -> Result<BaseImage> {
    let r = ImageRef::parse(reference)?;
    let build = &profile.disk.build;
    let image = oci::pull(
        &r,
        &PullOptions {
            insecure,
            arch: build.oci_arch().to_string(),
        },
    )?;
    let epoch = match crate::util::epoch::source_date_epoch()? {
        Some(e) => e,
        None => image.created()?.unwrap_or(0),
    };
    let plan = DiskPlan {
        esp_mib: build.esp_mib,
        root_free_mib: build.root_free_mib,
        tail_free_mib: build.tail_free_mib,
        kernel_args: build.kernel_args.clone(),
        efi_arch: build.efi_arch().to_string(),
    };
    let key = hex::encode(Sha256::digest(
        format!(
            "{}\0{plan:?}\0{epoch}\0{}",
            image.manifest_digest,
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    ));
    let cache = Cache::open()?;
    let dest = cache
        .root
        .join("images")
        .join(format!("oci-{}.raw", &key[..32]));
    if !dest.is_file() {
        let staging = cache
            .root
            .join("oci")
            .join(format!("stage-{}", std::process::id()));
        let tmp = temp_beside(&dest);
        let made = (|| -> Result<()> {
            let layers: Vec<_> = image.layers.iter().map(|l| l.path.clone()).collect();
            let started = std::time::Instant::now();
            let mut tree = unpack::unpack(&layers, &staging, epoch)?;
            let unpacked = started.elapsed();
            let a = assemble::assemble(&mut tree, &image.manifest_digest, epoch, &plan, &tmp)?;
            eprintln!(
                "assembled {} ({}, kernel {}, {} MiB{}): unpack {:.2} s, root ext4 {} MiB {:.2} s, \
                 total {:.2} s",
                r,
                image.platform(),
                a.kernel_version,
                a.size >> 20,
                if a.cloud_init { ", cloud-init" } else { "" },
                unpacked.as_secs_f64(),
                a.root_bytes >> 20,
                a.ext4_time.as_secs_f64(),
                started.elapsed().as_secs_f64(),
            );
            Ok(())
        })();
        crate::util::fsutil::make_writable(&staging);
        let _ = std::fs::remove_dir_all(&staging);
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("building a disk from {r}"));
        }
        std::fs::rename(&tmp, &dest)?;
    }
    Ok(BaseImage {
        raw: dest,
        source_sha256: image
            .manifest_digest
            .trim_start_matches("sha256:")
            .to_string(),
        description: format!("{r}@{}", image.manifest_digest),
    })
}
