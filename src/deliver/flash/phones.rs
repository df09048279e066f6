//! `kiln flash` to phones: each job's image becomes Android sparse pieces, every phone is found
//! and checked, one question is asked, then `deliver/fastboot.rs` sends the pieces.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::confirm::confirm;
use super::image::FlashImage;
use super::request::Request;
use crate::build::build_node;
use crate::deliver::fastboot;
use crate::io::progress::Events;
use crate::plan::Cluster;

/// One image going to one phone.
struct PhoneJob {
    label: String,
    files: Vec<PathBuf>,
    raw_size: u64,
    partition: String,
    product: Option<String>,
    serial: Option<String>,
}

/// Flashes every phone job: plan, find and check every phone, ask once, write.
pub fn run(req: &Request, cluster: Option<&Cluster>) -> Result<()> {
    if !req.edits.is_empty() {
        bail!(
            "--hostname, --userdata, --metadata, --bootconf and --file customise SD-card images, not phones"
        );
    }
    let jobs = match cluster {
        None => vec![image_job(req)?],
        Some(cluster) => node_jobs(req, cluster)?,
    };
    // Every phone is found and checked before the first byte goes to any of them.
    let mut phones = Vec::new();
    for job in &jobs {
        let phone = fastboot::find(job.serial.as_deref())?;
        phone.check(job.product.as_deref(), &job.partition, job.raw_size)?;
        phones.push(phone);
    }
    let lines: Vec<String> = jobs
        .iter()
        .zip(&phones)
        .map(|(job, phone)| {
            format!(
                "  {} → partition {} of phone {}",
                job.label, job.partition, phone.serial
            )
        })
        .collect();
    confirm(req.yes, &lines, &[], "partitions")?;
    let events = Events::new(req.progress, None);
    for (job, phone) in jobs.iter().zip(&phones) {
        events.fastboot_begin(&phone.serial);
        phone.flash(&job.partition, &job.files, &|line| {
            events.fastboot_line(&phone.serial, line)
        })?;
        events.fastboot_end();
        phone.reboot()?;
        println!(
            "{}: {} flashed to {} and rebooted",
            phone.serial, job.label, job.partition
        );
    }
    Ok(())
}

/// `kiln flash IMAGE --fastboot SERIAL`: a sparse image as it is, anything else converted.
fn image_job(req: &Request) -> Result<PhoneJob> {
    let [image] = req.positional.as_slice() else {
        bail!("usage: kiln flash IMAGE --fastboot SERIAL [--partition userdata] [--product NAME]");
    };
    let (files, raw_size) = match fastboot::sparse_expanded_size(image)? {
        Some(size) => (vec![image.clone()], size),
        None => {
            let raw = crate::base::prepare_raw(image)?;
            let size = std::fs::metadata(&raw)?.len();
            let dest = crate::base::cache::Cache::open()?
                .root
                .join("images")
                .join(format!("{}.simg", crate::base::cache::sha256_file(&raw)?));
            let bmap = FlashImage::open(image, req.bmap.as_deref())?.bmap;
            let files = crate::artifact::android_sparse::convert(&raw, bmap.as_ref(), &dest, None)?;
            (files, size)
        }
    };
    Ok(PhoneJob {
        label: image.display().to_string(),
        files,
        raw_size,
        partition: req.partition.clone().unwrap_or_else(|| "userdata".into()),
        product: req.product.clone(),
        serial: req.fastboot.clone(),
    })
}

/// `kiln flash --node PHONE…`: each node built, made sparse, and matched to its phone.
fn node_jobs(req: &Request, cluster: &Cluster) -> Result<Vec<PhoneJob>> {
    if req.positional.len() > req.nodes.len() {
        bail!("more phones than --node: give at most one serial per node, in the same order");
    }
    let opts = req.build_options();
    let mut jobs = Vec::new();
    for (i, node) in req.nodes.iter().enumerate() {
        let n = cluster.node(node)?;
        let (profile, _) = cluster.profile_of(n);
        let artifact =
            build_node(cluster, n, &opts).with_context(|| format!("building node {node}"))?;
        let bmap = crate::artifact::bmap::Bmap::parse(&std::fs::read_to_string(&artifact.bmap)?)?;
        let simg = opts.out_dir.join(format!("{node}.simg"));
        let files =
            crate::artifact::android_sparse::convert(&artifact.image, Some(&bmap), &simg, None)?;
        eprintln!(
            "built {} ({}) and {}",
            artifact.image.display(),
            &artifact.sha256[..16],
            simg.display()
        );
        let serial = req
            .positional
            .get(i)
            .map(|p| p.display().to_string())
            .or_else(|| {
                (req.nodes.len() == 1)
                    .then(|| req.fastboot.clone())
                    .flatten()
            })
            .or_else(|| n.serial.clone());
        if let (Some(s), Some(pinned)) = (&serial, &n.serial)
            && s != pinned
        {
            bail!("node {node} is pinned to phone {pinned}, not {s}; nothing was written");
        }
        jobs.push(PhoneJob {
            label: format!("node {node}"),
            files,
            raw_size: artifact.image_size,
            partition: req
                .partition
                .clone()
                .or_else(|| profile.deliver.partition.clone())
                .unwrap_or_else(|| "userdata".into()),
            product: req
                .product
                .clone()
                .or_else(|| profile.deliver.product.clone()),
            serial,
        });
    }
    Ok(jobs)
}
