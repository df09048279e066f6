//! `kiln flash`: write an image (or a node's freshly built image) to disks, safely.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use kiln::blockdev::{self, BlockDevice, Target};
use kiln::build::{BuildOptions, build_node};
use kiln::flash::customize::{self, BootEdits};
use kiln::flash::events::{Events, ProgressMode};
use kiln::flash::image::FlashImage;
use kiln::flash::{self, FlashOptions, OpenTarget, Outcome};
use kiln::source::BaseRef;

pub struct Args {
    pub positional: Vec<PathBuf>,
    pub nodes: Vec<String>,
    pub cluster: PathBuf,
    pub out: PathBuf,
    pub base: Option<String>,
    pub yes: bool,
    pub verify: bool,
    pub allow_non_removable: bool,
    pub progress: ProgressMode,
    pub bmap: Option<PathBuf>,
    pub edits: BootEdits,
}

/// One image going to one or more targets.
struct Job {
    image: PathBuf,
    targets: Vec<(Target, Option<String>)>,
}

pub fn run(a: Args) -> Result<()> {
    let jobs = plan_jobs(&a)?;
    let mut images = Vec::new();
    if !a.edits.is_empty() && !a.nodes.is_empty() {
        bail!(
            "--hostname, --userdata, --metadata, --bootconf and --file customise an image file; a --node's image comes from its cluster file"
        );
    }
    for job in &jobs {
        let bmap = if a.nodes.is_empty() {
            a.bmap.as_deref()
        } else {
            None
        };
        let mut img = FlashImage::open(&job.image, bmap)?;
        if !a.edits.is_empty() {
            // The boot FAT is edited in memory: a compressed image is decompressed once into the
            // cache, and the edits travel with the stream as patches.
            let raw = kiln::source::prepare_raw(&job.image)?;
            let c = customize::patches(&raw, &a.edits)?;
            let bmap = img.bmap_path.clone();
            img = FlashImage::open(&raw, bmap.as_deref())?.with_patches(c.patches, &c.used);
        }
        if img.bmap.is_none() {
            eprintln!(
                "note: no bmap for {}; every block will be written",
                job.image.display()
            );
        }
        images.push(img);
    }

    // Safety: every refusal for every target, before anything is asked or written.
    let mut problems = Vec::new();
    for (job, img) in jobs.iter().zip(&images) {
        for (t, pinned) in &job.targets {
            if let Target::Device(d) = t {
                for r in blockdev::refusals(d, img.size, a.allow_non_removable, pinned.as_deref()) {
                    problems.push(format!("refusing {}: {r}", d.describe()));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }

    confirm(&a, &jobs)?;

    // Re-check every device right before opening it: the disk confirmed must be the disk written.
    let mut opened: Vec<Vec<OpenTarget>> = Vec::new();
    for job in &jobs {
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
                    now
                }
                f => f.clone(),
            };
            v.push(OpenTarget::open(t)?);
        }
        opened.push(v);
    }

    // Fleet: every job in its own thread; each decodes its image once for all its targets.
    let opts = FlashOptions { verify: a.verify };
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = images
            .iter()
            .zip(opened)
            .map(|(img, targets)| {
                let opts = &opts;
                let progress = a.progress;
                scope.spawn(move || {
                    let events = Events::new(progress, img.size);
                    flash::flash(img, targets, opts, &events)
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("flash thread panicked"))
            .collect()
    });
    if a.progress == ProgressMode::Json {
        for o in &outcomes {
            let line = match &o.result {
                Ok(d) => {
                    serde_json::json!({"event": "result", "target": o.path.display().to_string(), "ok": true, "written": d.written, "verified": d.verified})
                }
                Err(e) => {
                    serde_json::json!({"event": "result", "target": o.path.display().to_string(), "ok": false, "error": e})
                }
            };
            println!("{line}");
        }
    }
    flash::summary(&outcomes)
}

fn same_disk(a: &BlockDevice, b: &BlockDevice) -> bool {
    a.devno == b.devno && a.size == b.size && a.serial == b.serial && a.model == b.model
}

fn plan_jobs(a: &Args) -> Result<Vec<Job>> {
    if a.nodes.is_empty() {
        let [image, devices @ ..] = a.positional.as_slice() else {
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
    }
    if a.positional.len() != a.nodes.len() {
        bail!(
            "{} node(s) but {} target(s): give one target per --node, in the same order",
            a.nodes.len(),
            a.positional.len()
        );
    }
    let cluster = kiln::spec::load(&a.cluster)?;
    let opts = BuildOptions {
        out_dir: a.out.clone(),
        base: BaseRef::parse(a.base.as_deref()),
        base_sha256: None,
    };
    let mut jobs = Vec::new();
    for (node, dev) in a.nodes.iter().zip(&a.positional) {
        let n = cluster.node(node)?;
        let target = blockdev::resolve(dev)?;
        let artifact =
            build_node(&cluster, n, &opts).with_context(|| format!("building node {node}"))?;
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

fn confirm(a: &Args, jobs: &[Job]) -> Result<()> {
    let mut mounted: Vec<(String, String)> = Vec::new();
    let mut lines = Vec::new();
    for job in jobs {
        for (t, _) in &job.targets {
            match t {
                Target::Device(d) => {
                    lines.push(format!("  {} → {}", job.image.display(), d.describe()));
                    mounted.extend(d.all_mountpoints());
                }
                Target::File(p) => {
                    lines.push(format!("  {} → file {}", job.image.display(), p.display()))
                }
            }
        }
    }
    if !a.yes {
        eprintln!("kiln will overwrite:\n{}", lines.join("\n"));
        if !mounted.is_empty() {
            eprintln!("and first unmount:");
            for (p, m) in &mounted {
                eprintln!("  {p} on {m}");
            }
        }
        eprint!("Everything on these disks will be lost. Continue? [y/N] ");
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        // Piped answers work too (scripts, tests); end of input means no.
        std::io::stdin().lock().read_line(&mut answer).ok();
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            if !mounted.is_empty() {
                bail!(
                    "not confirmed; nothing was written. Mounted partitions: {}",
                    mounted
                        .iter()
                        .map(|(p, m)| format!("{p} on {m}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            bail!("not confirmed; nothing was written");
        }
    }
    for (p, m) in &mounted {
        nix::mount::umount(m.as_str())
            .with_context(|| format!("unmounting {p} from {m} (a program may be using it)"))?;
        eprintln!("unmounted {p} from {m}");
    }
    Ok(())
}
