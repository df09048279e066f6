//! `kiln flash` as the library carries it out: the request (images or nodes, disks or phones)
//! becomes deliveries — here, one image to its disks; phones in `phones.rs` — which
//! `delivery::carry_out` takes through refusals, the one question and the writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::delivery::{Delivery, carry_out};
use super::image::FlashImage;
use super::request::Request;
use super::{FlashOptions, OpenTarget, Outcome};
use crate::blockdev::{self, BlockDevice, Target};
use crate::build::build_node;
use crate::io::progress::{Events, ProgressMode};
use crate::plan::Cluster;
use crate::plan::profile::DeliverMethod;
use crate::stamp::customize;
use crate::util::sudo::as_invoking_user;

/// One image going to one or more targets.
struct Job {
    image: PathBuf,
    /// Each target with the serial its node is pinned to.
    targets: Vec<(Target, Option<String>)>,
}

/// Carries out a flash request, disks or phones.
pub fn run(req: &Request) -> Result<()> {
    // A --node's download and decompression report as the flash does.
    crate::io::progress::set_mode(req.progress);
    // The cluster is read once, for every decision that needs it.
    let cluster = if req.nodes.is_empty() {
        None
    } else {
        Some(crate::plan::load(req.cluster_file())?)
    };
    if req.fastboot.is_some() || delivers_by_fastboot(req, cluster.as_ref())? {
        let phones = super::phones::deliveries(req, cluster.as_ref())?;
        return carry_out(phones, req.yes, "partitions", req.progress);
    }
    if !req.edits.is_empty() && !req.nodes.is_empty() {
        bail!(
            "--hostname, --userdata, --metadata, --bootconf and --file customise an image file; a --node's image comes from its cluster file"
        );
    }
    if req.authopen && !cfg!(target_os = "macos") {
        bail!("--authopen is macOS's administrator dialog; here, run kiln with sudo");
    }
    let mut disks: Vec<Box<dyn Delivery>> = Vec::new();
    for job in plan_jobs(req, cluster.as_ref())? {
        let image = open_image(req, &job.image)?;
        disks.push(Box::new(DiskDelivery {
            job,
            image,
            opened: Vec::new(),
            allow_non_removable: req.allow_non_removable,
            authopen: req.authopen,
            verify: req.verifies(),
            eject: !req.no_eject,
        }));
    }
    carry_out(disks, req.yes, "disks", req.progress)
}

/// Whether the `--node`s are phones (their profile delivers over fastboot).
fn delivers_by_fastboot(req: &Request, cluster: Option<&Cluster>) -> Result<bool> {
    let Some(cluster) = cluster else {
        return Ok(false);
    };
    let mut kinds = Vec::new();
    for node in &req.nodes {
        let n = cluster.node(node)?;
        kinds.push(cluster.profile_of(n).0.deliver.method == DeliverMethod::Fastboot);
    }
    if kinds.iter().any(|k| *k) && !kinds.iter().all(|k| *k) {
        bail!("flash phones (fastboot) and disks in separate runs");
    }
    Ok(kinds[0])
}

/// Which image goes to which disks: the one image given, or each node's, built now.
fn plan_jobs(req: &Request, cluster: Option<&Cluster>) -> Result<Vec<Job>> {
    let Some(cluster) = cluster else {
        let [image, devices @ ..] = req.positional.as_slice() else {
            bail!(
                "give an image and at least one target: kiln flash IMAGE DEVICE…, or kiln flash --node NODE DEVICE"
            );
        };
        if devices.is_empty() {
            bail!("no target given: kiln flash {} /dev/sdX", image.display());
        }
        let targets = devices
            .iter()
            .map(|d| Ok((blockdev::resolve(d)?, None)))
            .collect::<Result<_>>()?;
        return Ok(vec![Job {
            image: image.clone(),
            targets,
        }]);
    };
    if req.positional.len() != req.nodes.len() {
        bail!(
            "{} node(s) but {} target(s): give one target per --node, in the same order",
            req.nodes.len(),
            req.positional.len()
        );
    }
    let opts = req.build_options();
    let mut jobs = Vec::new();
    for (node, dev) in req.nodes.iter().zip(&req.positional) {
        let n = cluster.node(node)?;
        let target = blockdev::resolve(dev)?;
        // Under sudo, built as the user who typed the command: root is for the disk only.
        let artifact = as_invoking_user(|| build_node(cluster, n, &opts))
            .with_context(|| format!("building node {node}"))?;
        eprintln!(
            "built {} ({})",
            artifact.image.display(),
            &artifact.sha256[..16]
        );
        jobs.push(Job {
            image: artifact.image,
            targets: vec![(target, n.serial.clone())],
        });
    }
    Ok(jobs)
}

/// Opens a job's image with its bmap, and the boot edits as patches on the way to the disk.
fn open_image(req: &Request, image: &Path) -> Result<FlashImage> {
    let bmap = if req.nodes.is_empty() {
        req.bmap.as_deref()
    } else {
        None
    };
    let mut img = FlashImage::open(image, bmap)?;
    if !req.edits.is_empty() {
        // The boot FAT is edited in memory: a compressed image is decompressed once into the
        // cache, and the edits travel with the stream as patches.
        let raw = crate::base::prepare_raw(image)?;
        let c = customize::patches(&raw, &req.edits)?;
        let bmap = img.bmap_path.clone();
        img = FlashImage::open(&raw, bmap.as_deref())?.with_patches(c.patches, &c.used);
    }
    if img.bmap.is_none() {
        eprintln!(
            "note: no bmap for {}; every block will be written",
            image.display()
        );
    }
    Ok(img)
}

/// One image to its disks and files, through the commit-last write loop.
struct DiskDelivery {
    job: Job,
    image: FlashImage,
    /// Filled by `open`, after the question.
    opened: Vec<OpenTarget>,
    allow_non_removable: bool,
    authopen: bool,
    verify: bool,
    eject: bool,
}

impl DiskDelivery {
    fn devices(&self) -> impl Iterator<Item = (&BlockDevice, Option<&str>)> {
        self.job.targets.iter().filter_map(|(t, pinned)| match t {
            Target::Device(d) => Some((&**d, pinned.as_deref())),
            Target::File(_) => None,
        })
    }

    /// Ejects every card written without error, now that its descriptors are closed.
    fn eject_written(&self, outcomes: &[Outcome], events: &Events) {
        for ((t, _), o) in self.job.targets.iter().zip(outcomes) {
            if let (Target::Device(d), Ok(_)) = (t, &o.result)
                && blockdev::eject::wanted(d, false)
            {
                events.note(&o.path, &blockdev::eject::eject_closed(d));
            }
        }
    }
}

impl Delivery for DiskDelivery {
    fn refusals(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for (d, pinned) in self.devices() {
            for r in blockdev::refusals(d, self.image.size, self.allow_non_removable, pinned) {
                problems.push(format!("refusing {}: {r}", d.describe()));
            }
            // Permission is asked before the question, so a user without it loses nothing (no
            // unmount).
            if let Err(e) = blockdev::check_access(d, self.authopen) {
                problems.push(format!("{e:#}"));
            }
        }
        problems
    }

    fn describe(&self) -> Vec<String> {
        let image = self.job.image.display();
        self.job
            .targets
            .iter()
            .map(|(t, _)| match t {
                Target::Device(d) => format!("  {image} → {}", d.describe()),
                Target::File(p) => format!("  {image} → file {}", p.display()),
            })
            .collect()
    }

    fn mounted(&self) -> Vec<(String, String)> {
        self.devices()
            .flat_map(|(d, _)| d.all_mountpoints())
            .collect()
    }

    /// Opens every target, re-checking each device first: the disk confirmed must be the disk
    /// written.
    fn open(&mut self) -> Result<()> {
        for (t, _) in &self.job.targets {
            let t = match t {
                Target::Device(before) => {
                    let now = blockdev::resolve(Path::new(&before.path))?;
                    match &now {
                        Target::Device(d) if same_disk(before, d) => {}
                        _ => bail!(
                            "{} changed since it was confirmed (unplugged or replaced?); nothing was written",
                            before.path
                        ),
                    }
                    // Spotlight, Finder or a re-mount may have taken a volume back since the
                    // question: nothing of the disk may be mounted when it is opened.
                    #[cfg(target_os = "macos")]
                    blockdev::volumes::unmount_until_clear(
                        &blockdev::diskutil::Diskutil,
                        &before.path,
                    )?;
                    now
                }
                f => f.clone(),
            };
            self.opened.push(OpenTarget::open(t, self.authopen)?);
        }
        Ok(())
    }

    /// Decodes the image once for all its targets; ejects the cards once their descriptors are
    /// closed (the write loop owns and drops them).
    fn deliver(mut self: Box<Self>, progress: ProgressMode) -> Vec<Outcome> {
        let events = Events::new(progress, self.image.size);
        let opts = FlashOptions {
            verify: self.verify,
        };
        let targets = std::mem::take(&mut self.opened);
        let outcomes = super::flash(&self.image, targets, &opts, &events);
        if self.eject {
            self.eject_written(&outcomes, &events);
        }
        outcomes
    }
}

fn same_disk(a: &BlockDevice, b: &BlockDevice) -> bool {
    a.devno == b.devno && a.size == b.size && a.serial == b.serial && a.model == b.model
}
