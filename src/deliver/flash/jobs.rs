//! `kiln flash` as the library carries it out: the request (images or nodes, disks or phones)
//! becomes deliveries — here, one stream to its disks; phones in `phones.rs` — which
//! `delivery::carry_out` takes through refusals, the one question and the writes.
//!
//! A `--node` is stamped and streamed from its cached base (no image file) unless `--out` asks
//! for the build; nodes streamed from the same base are one delivery, so the base is read once
//! for all their cards.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::delivery::{Delivery, carry_out};
use super::image::FlashImage;
use super::request::Request;
use super::{FlashOptions, OpenTarget, Outcome};
use crate::blockdev::{self, BlockDevice, Target};
use crate::build::{BuildOptions, StreamedNode, build_node, stream_node};
use crate::io::progress::{Events, ProgressMode};
use crate::plan::Cluster;
use crate::plan::node::NodeConfig;
use crate::plan::profile::DeliverMethod;
use crate::stamp::customize;
use crate::util::sudo::as_invoking_user;

/// One image going to one or more targets.
struct Job {
    image: JobImage,
    /// Each target with the serial its node is pinned to.
    targets: Vec<(Target, Option<String>)>,
}

/// Where a job's bytes come from.
enum JobImage {
    /// An image file: given, or built into `--out` for a node.
    File(PathBuf),
    /// A node streamed from its cached base, with no image file written.
    Streamed(StreamedNode),
}

impl JobImage {
    /// How the question and the notes name it.
    fn describe(&self) -> String {
        match self {
            JobImage::File(p) => p.display().to_string(),
            JobImage::Streamed(n) => format!("{} (from {})", n.node, n.source.display()),
        }
    }

    /// The file a streamed node reads: jobs sharing it are flashed as one stream.
    fn stream_source(&self) -> Option<&Path> {
        match self {
            JobImage::Streamed(n) => Some(&n.source),
            JobImage::File(_) => None,
        }
    }
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
    let mut disks: Vec<DiskDelivery> = Vec::new();
    for job in plan_jobs(req, cluster.as_ref())? {
        let image = open_image(req, &job)?;
        // Nodes streamed from the same base join one delivery; anything else is one of its own.
        let shared = job.image.stream_source().and_then(|source| {
            disks
                .iter_mut()
                .find(|d| d.jobs[0].0.image.stream_source() == Some(source))
        });
        match shared {
            Some(d) => d.jobs.push((job, image)),
            None => disks.push(DiskDelivery {
                jobs: vec![(job, image)],
                opened: Vec::new(),
                allow_non_removable: req.allow_non_removable,
                authopen: req.authopen,
                verify: req.verifies(),
                eject: !req.no_eject,
            }),
        }
    }
    let disks = disks
        .into_iter()
        .map(|d| Box::new(d) as Box<dyn Delivery>)
        .collect();
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
            image: JobImage::File(image.clone()),
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
        jobs.push(Job {
            image: node_image(req, cluster, n, &opts)?,
            targets: vec![(target, n.serial.clone())],
        });
    }
    Ok(jobs)
}

/// A node's bytes: streamed from its base, or built into `--out` first when that was asked for.
/// Under sudo, either is made as the user who typed the command: root is for the disk only.
fn node_image(
    req: &Request,
    cluster: &Cluster,
    node: &NodeConfig,
    opts: &BuildOptions,
) -> Result<JobImage> {
    let name = &node.name;
    if req.out.is_none() {
        let streamed = as_invoking_user(|| stream_node(cluster, node, opts))
            .with_context(|| format!("stamping node {name}"))?;
        eprintln!(
            "stamped {name}: {} of patches over {}",
            blockdev::human_size(streamed.patches.iter().map(|p| p.bytes.len() as u64).sum()),
            streamed.source.display()
        );
        return Ok(JobImage::Streamed(streamed));
    }
    let artifact = as_invoking_user(|| build_node(cluster, node, opts))
        .with_context(|| format!("building node {name}"))?;
    eprintln!(
        "built {} ({})",
        artifact.image.display(),
        &artifact.sha256[..16]
    );
    Ok(JobImage::File(artifact.image))
}

/// Opens a job's image with its bmap, and the boot edits as patches on the way to the disk.
fn open_image(req: &Request, job: &Job) -> Result<FlashImage> {
    let image = match &job.image {
        JobImage::File(p) => p.as_path(),
        JobImage::Streamed(n) => {
            return Ok(FlashImage::streamed(
                &n.source,
                n.size,
                n.bmap.clone(),
                n.patches.clone(),
            ));
        }
    };
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

/// One stream to its disks and files, through the commit-last write loop: an image file to its
/// targets, or every node streamed from one base to its card (each with its own patches).
struct DiskDelivery {
    /// The jobs sharing the stream, each with its image (the same file, its own patches).
    jobs: Vec<(Job, FlashImage)>,
    /// Filled by `open`, after the question: each target with the index of its job.
    opened: Vec<(usize, OpenTarget)>,
    allow_non_removable: bool,
    authopen: bool,
    verify: bool,
    eject: bool,
}

impl DiskDelivery {
    /// Every target, with its job's image and its pinned serial, in the order of the jobs.
    fn targets(&self) -> impl Iterator<Item = (&JobImage, &FlashImage, &Target, Option<&str>)> {
        self.jobs.iter().flat_map(|(job, img)| {
            job.targets
                .iter()
                .map(move |(t, pinned)| (&job.image, img, t, pinned.as_deref()))
        })
    }

    /// Ejects every card written without error, now that its descriptors are closed.
    fn eject_written(&self, outcomes: &[Outcome], events: &Events) {
        for ((_, _, t, _), o) in self.targets().zip(outcomes) {
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
        for (_, img, t, pinned) in self.targets() {
            let Target::Device(d) = t else { continue };
            for r in blockdev::refusals(d, img.size, self.allow_non_removable, pinned) {
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
        self.targets()
            .map(|(image, _, t, _)| match t {
                Target::Device(d) => format!("  {} → {}", image.describe(), d.describe()),
                Target::File(p) => format!("  {} → file {}", image.describe(), p.display()),
            })
            .collect()
    }

    fn mounted(&self) -> Vec<(String, String)> {
        self.targets()
            .flat_map(|(_, _, t, _)| match t {
                Target::Device(d) => d.all_mountpoints(),
                Target::File(_) => Vec::new(),
            })
            .collect()
    }

    /// Opens every target, re-checking each device first: the disk confirmed must be the disk
    /// written.
    fn open(&mut self) -> Result<()> {
        for (j, (job, _)) in self.jobs.iter().enumerate() {
            for (t, _) in &job.targets {
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
                        // Spotlight, Finder or a re-mount may have taken a volume back since
                        // the question: nothing of the disk may be mounted when it is opened.
                        #[cfg(target_os = "macos")]
                        blockdev::volumes::unmount_until_clear(
                            &blockdev::diskutil::Diskutil,
                            &before.path,
                        )?;
                        now
                    }
                    f => f.clone(),
                };
                self.opened.push((j, OpenTarget::open(t, self.authopen)?));
            }
        }
        Ok(())
    }

    /// Reads the stream once for all its targets; ejects the cards once their descriptors are
    /// closed (the write loop owns and drops them). Outcomes come in the order of `targets`.
    fn deliver(mut self: Box<Self>, progress: ProgressMode) -> Vec<Outcome> {
        let images: Vec<&FlashImage> = self.jobs.iter().map(|(_, img)| img).collect();
        let events = Events::new(progress, images[0].size);
        let opts = FlashOptions {
            verify: self.verify,
        };
        let targets = std::mem::take(&mut self.opened);
        let outcomes = super::flash_shared(&images, targets, &opts, &events);
        if self.eject {
            self.eject_written(&outcomes, &events);
        }
        outcomes
    }
}

fn same_disk(a: &BlockDevice, b: &BlockDevice) -> bool {
    a.devno == b.devno && a.size == b.size && a.serial == b.serial && a.model == b.model
}
