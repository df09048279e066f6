//! `kiln flash` as the library carries it out: the request (images or nodes, disks or phones)
//! becomes jobs, every refusal is checked for every target, one question is asked, and only then
//! is anything written. A `--node` is stamped and streamed from its cached base (no image file)
//! unless `--out` asks for the build; nodes streamed from the same base share one read of it.
//! The binary parses flags into a `Request` (`request.rs`) and calls `run`; phones go on in
//! `phones.rs`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::confirm::confirm;
use super::image::FlashImage;
use super::request::Request;
use super::{FlashOptions, OpenTarget, Outcome};
use crate::blockdev::{self, BlockDevice, Target};
use crate::build::{BuildOptions, StreamedNode, build_node, stream_node};
use crate::io::progress::Events;
use crate::plan::Cluster;
use crate::plan::node::NodeConfig;
use crate::plan::profile::DeliverMethod;
use crate::stamp::customize;

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
}

/// Carries out a flash request, disks or phones.
pub fn run(req: &Request) -> Result<()> {
    // The cluster is read once, for every decision that needs it.
    let cluster = if req.nodes.is_empty() {
        None
    } else {
        Some(crate::plan::load(&req.cluster)?)
    };
    if req.fastboot.is_some() || delivers_by_fastboot(req, cluster.as_ref())? {
        return super::phones::run(req, cluster.as_ref());
    }
    if !req.edits.is_empty() && !req.nodes.is_empty() {
        bail!(
            "--hostname, --userdata, --metadata, --bootconf and --file customise an image file; a --node's image comes from its cluster file"
        );
    }
    let jobs = plan_jobs(req, cluster.as_ref())?;
    let images = jobs
        .iter()
        .map(|job| open_image(req, job))
        .collect::<Result<Vec<_>>>()?;
    check_refusals(req, &jobs, &images)?;
    if req.authopen && !cfg!(target_os = "macos") {
        bail!("--authopen is macOS's administrator dialog; here, run kiln with sudo");
    }
    // Permission is asked before the question, so a user without it loses nothing (no unmount).
    for job in &jobs {
        for (t, _) in &job.targets {
            if let Target::Device(d) = t {
                blockdev::check_access(d, req.authopen)?;
            }
        }
    }
    let (lines, mounted) = describe(&jobs);
    confirm(req.yes, &lines, &mounted, "disks")?;
    let opened = reopen(&jobs, req.authopen)?;
    // Every descriptor is closed when this returns: only then may a card be ejected.
    let outcomes = flash_fleet(req, &jobs, &images, opened);
    let events = Events::new(req.progress, None);
    if !req.no_eject {
        eject_written(&jobs, &outcomes, &events);
    }
    for o in &outcomes {
        let result = match &o.result {
            Ok(d) => Ok((d.written, d.verified)),
            Err(e) => Err(e.as_str()),
        };
        events.result(&o.path, result);
    }
    super::summary(&outcomes)
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
fn node_image(
    req: &Request,
    cluster: &Cluster,
    node: &NodeConfig,
    opts: &BuildOptions,
) -> Result<JobImage> {
    let name = &node.name;
    if req.out.is_none() {
        let streamed =
            stream_node(cluster, node, opts).with_context(|| format!("stamping node {name}"))?;
        eprintln!(
            "stamped {name}: {} of patches over {}",
            blockdev::human_size(streamed.patches.iter().map(|p| p.bytes.len() as u64).sum()),
            streamed.source.display()
        );
        return Ok(JobImage::Streamed(streamed));
    }
    let artifact =
        build_node(cluster, node, opts).with_context(|| format!("building node {name}"))?;
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

/// Every refusal for every target, before anything is asked or written.
fn check_refusals(req: &Request, jobs: &[Job], images: &[FlashImage]) -> Result<()> {
    let mut problems = Vec::new();
    for (job, img) in jobs.iter().zip(images) {
        for (t, pinned) in &job.targets {
            if let Target::Device(d) = t {
                for r in blockdev::refusals(d, img.size, req.allow_non_removable, pinned.as_deref())
                {
                    problems.push(format!("refusing {}: {r}", d.describe()));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

/// The lines of the question (image → target) and the partitions to unmount.
fn describe(jobs: &[Job]) -> (Vec<String>, Vec<(String, String)>) {
    let mut mounted = Vec::new();
    let mut lines = Vec::new();
    for job in jobs {
        for (t, _) in &job.targets {
            match t {
                Target::Device(d) => {
                    lines.push(format!("  {} → {}", job.image.describe(), d.describe()));
                    mounted.extend(d.all_mountpoints());
                }
                Target::File(p) => {
                    lines.push(format!("  {} → file {}", job.image.describe(), p.display()))
                }
            }
        }
    }
    (lines, mounted)
}

/// Opens every target, re-checking each device first: the disk confirmed must be the disk written.
fn reopen(jobs: &[Job], authopen: bool) -> Result<Vec<Vec<OpenTarget>>> {
    let mut opened = Vec::new();
    for job in jobs {
        let mut v = Vec::new();
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
            v.push(OpenTarget::open(t, authopen)?);
        }
        opened.push(v);
    }
    Ok(opened)
}

/// Ejects every card written without error, now that its descriptors are closed.
fn eject_written(jobs: &[Job], outcomes: &[Outcome], events: &Events) {
    let targets = jobs.iter().flat_map(|j| j.targets.iter().map(|(t, _)| t));
    for (t, o) in targets.zip(outcomes) {
        if let (Target::Device(d), Ok(_)) = (t, &o.result)
            && blockdev::eject::wanted(d, false)
        {
            events.note(&o.path, &blockdev::eject::eject_closed(d));
        }
    }
}

fn same_disk(a: &BlockDevice, b: &BlockDevice) -> bool {
    a.devno == b.devno && a.size == b.size && a.serial == b.serial && a.model == b.model
}

/// Every stream in its own thread, decoded once for all its targets: an image file for the
/// targets of its job, a cached base for every node streamed from it. Outcomes come back in the
/// order of the jobs and their targets.
fn flash_fleet(
    req: &Request,
    jobs: &[Job],
    images: &[FlashImage],
    opened: Vec<Vec<OpenTarget>>,
) -> Vec<Outcome> {
    let opts = FlashOptions { verify: req.verify };
    // Jobs that stream from the same base file share a group; any other job is a group of one.
    let mut groups: Vec<(Option<&Path>, Vec<usize>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let source = match &job.image {
            JobImage::Streamed(n) => Some(n.source.as_path()),
            JobImage::File(_) => None,
        };
        match groups
            .iter_mut()
            .find(|(s, _)| source.is_some() && *s == source)
        {
            Some((_, members)) => members.push(i),
            None => groups.push((source, vec![i])),
        }
    }
    // Each target, tagged with its job and its place in the job, under its group.
    let mut opened: Vec<Option<Vec<OpenTarget>>> = opened.into_iter().map(Some).collect();
    let mut outcomes: Vec<((usize, usize), Outcome)> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter()
            .map(|(_, members)| {
                let shared: Vec<&FlashImage> = members.iter().map(|&j| &images[j]).collect();
                let mut tags = Vec::new();
                let mut targets = Vec::new();
                for (v, &j) in members.iter().enumerate() {
                    for (k, t) in opened[j].take().unwrap_or_default().into_iter().enumerate() {
                        tags.push((j, k));
                        targets.push((v, t));
                    }
                }
                let (opts, progress) = (&opts, req.progress);
                scope.spawn(move || {
                    let events = Events::new(progress, shared[0].size);
                    let out = super::flash_shared(&shared, targets, opts, &events);
                    tags.into_iter().zip(out).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("flash thread panicked"))
            .collect()
    });
    outcomes.sort_by_key(|(tag, _)| *tag);
    outcomes.into_iter().map(|(_, o)| o).collect()
}
