//! `kiln flash` to phones: each job's image becomes Android sparse pieces and a `Delivery` that
//! finds and checks its phone before the one question, then sends the pieces with
//! `deliver/fastboot.rs`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::delivery::Delivery;
use super::image::FlashImage;
use super::request::Request;
use super::{Done, Outcome};
use crate::build::build_node;
use crate::deliver::fastboot;
use crate::io::progress::{Events, ProgressMode};
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

/// Every phone job as a delivery: built (for nodes) and made sparse, not yet looked for.
pub fn deliveries(req: &Request, cluster: Option<&Cluster>) -> Result<Vec<Box<dyn Delivery>>> {
    if !req.edits.is_empty() {
        bail!(
            "--hostname, --userdata, --metadata, --bootconf and --file customise SD-card images, not phones"
        );
    }
    let jobs = match cluster {
        None => vec![image_job(req)?],
        Some(cluster) => node_jobs(req, cluster)?,
    };
    Ok(jobs
        .into_iter()
        .map(|job| Box::new(PhoneDelivery { job, phone: None }) as Box<dyn Delivery>)
        .collect())
}

/// One image to one phone, over fastboot.
struct PhoneDelivery {
    job: PhoneJob,
    /// Found and checked by `refusals`, before the question.
    phone: Option<fastboot::Phone>,
}

impl Delivery for PhoneDelivery {
    /// The phone is there, it is the profile's product and its partition holds the image.
    fn refusals(&mut self) -> Vec<String> {
        let job = &self.job;
        let found = fastboot::find(job.serial.as_deref()).and_then(|phone| {
            phone.check(job.product.as_deref(), &job.partition, job.raw_size)?;
            Ok(phone)
        });
        match found {
            Ok(phone) => {
                self.phone = Some(phone);
                Vec::new()
            }
            Err(e) => vec![format!("{e:#}")],
        }
    }

    fn describe(&self) -> Vec<String> {
        let serial = self.phone.as_ref().map_or("?", |p| p.serial.as_str());
        vec![format!(
            "  {} → partition {} of phone {serial}",
            self.job.label, self.job.partition
        )]
    }

    /// Sends the sparse pieces, then reboots the phone. Nothing can be read back over fastboot;
    /// the bootloader checks each piece as it writes it.
    fn deliver(self: Box<Self>, progress: ProgressMode) -> Vec<Outcome> {
        let Some(phone) = self.phone else {
            return Vec::new();
        };
        let job = &self.job;
        let events = Events::new(progress, None);
        let started = Instant::now();
        events.fastboot_begin(&phone.serial);
        let sent = phone.flash(&job.partition, &job.files, &|line| {
            events.fastboot_line(&phone.serial, line)
        });
        events.fastboot_end();
        let result = sent.and_then(|()| phone.reboot()).map(|()| {
            println!(
                "{}: {} flashed to {} and rebooted",
                phone.serial, job.label, job.partition
            );
            Done {
                written: job.raw_size,
                verified: false,
                seconds: started.elapsed().as_secs_f64(),
                detail: Some(format!("{} written, rebooted", job.partition)),
            }
        });
        vec![Outcome {
            path: PathBuf::from(&phone.serial),
            result: result.map_err(|e| format!("{e:#}")),
        }]
    }
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
        let simg = opts.out_dir.join(format!("{node}.simg"));
        // Under sudo, built as the user who typed the command (util/sudo.rs says why).
        let (artifact, files) = crate::util::sudo::as_invoking_user(|| {
            let artifact =
                build_node(cluster, n, &opts).with_context(|| format!("building node {node}"))?;
            let bmap = std::fs::read_to_string(&artifact.bmap)?;
            let bmap = crate::artifact::bmap::Bmap::parse(&bmap)?;
            let files = crate::artifact::android_sparse::convert(
                &artifact.image,
                Some(&bmap),
                &simg,
                None,
            )?;
            Ok((artifact, files))
        })?;
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
