//! `kiln flash`: write an image (or a node's freshly built image) to disks, safely.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use kiln::base::BaseRef;
use kiln::blockdev::{self, BlockDevice, Target};
use kiln::build::{BuildOptions, build_node};
use kiln::deliver::flash::events::{Events, ProgressMode};
use kiln::deliver::flash::image::FlashImage;
use kiln::deliver::flash::{self, FlashOptions, OpenTarget, Outcome};
use kiln::plan::profile::DeliverMethod;
use kiln::stamp::customize::{self, BootEdits};

pub struct Args {
    pub positional: Vec<PathBuf>,
    pub nodes: Vec<String>,
    pub cluster: PathBuf,
    pub out: PathBuf,
    pub base: Option<String>,
    pub yes: bool,
    pub verify: bool,
    pub no_eject: bool,
    pub allow_non_removable: bool,
    pub progress: ProgressMode,
    pub bmap: Option<PathBuf>,
    pub edits: BootEdits,
    /// Flash over fastboot to this serial (`tcp:host:port` for network fastboot).
    pub fastboot: Option<String>,
    pub partition: Option<String>,
    pub product: Option<String>,
}

/// One image going to one or more targets.
struct Job {
    image: PathBuf,
    targets: Vec<(Target, Option<String>)>,
}

pub fn run(a: Args) -> Result<()> {
    if a.fastboot.is_some() || nodes_deliver_by_fastboot(&a)? {
        return run_fastboot(&a);
    }
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
            let raw = kiln::base::prepare_raw(&job.image)?;
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
    let opts = FlashOptions {
        verify: a.verify,
        no_eject: a.no_eject,
    };
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
    let cluster = kiln::plan::load(&a.cluster)?;
    let opts = BuildOptions {
        out_dir: a.out.clone(),
        base: BaseRef::parse(a.base.as_deref()),
        base_sha256: None,
        format: Default::default(),
        insecure: false,
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
    unmount(&mounted)
}

#[cfg(target_os = "linux")]
fn unmount(mounted: &[(String, String)]) -> Result<()> {
    for (p, m) in mounted {
        nix::mount::umount(m.as_str())
            .with_context(|| format!("unmounting {p} from {m} (a program may be using it)"))?;
        eprintln!("unmounted {p} from {m}");
    }
    Ok(())
}

/// macOS: `diskutil unmountDisk` once per disk, which takes every volume of it (APFS ones too).
#[cfg(target_os = "macos")]
fn unmount(mounted: &[(String, String)]) -> Result<()> {
    let mut disks: Vec<String> = mounted
        .iter()
        .map(|(p, _)| blockdev::diskutil::whole_disk_of(p))
        .collect();
    disks.dedup();
    for d in disks {
        blockdev::diskutil::unmount_disk(&d)?;
        eprintln!("unmounted every volume of {d}");
    }
    Ok(())
}

/// Whether the `--node`s are phones (their profile delivers over fastboot).
fn nodes_deliver_by_fastboot(a: &Args) -> Result<bool> {
    if a.nodes.is_empty() {
        return Ok(false);
    }
    let cluster = kiln::plan::load(&a.cluster)?;
    let mut kinds = Vec::new();
    for node in &a.nodes {
        let n = cluster.node(node)?;
        kinds.push(cluster.profile_of(n).0.deliver.method == DeliverMethod::Fastboot);
    }
    if kinds.iter().any(|k| *k) && !kinds.iter().all(|k| *k) {
        bail!("flash phones (fastboot) and disks in separate runs");
    }
    Ok(kinds[0])
}

/// One image going to one phone.
struct PhoneJob {
    label: String,
    files: Vec<PathBuf>,
    raw_size: u64,
    partition: String,
    product: Option<String>,
    serial: Option<String>,
}

fn run_fastboot(a: &Args) -> Result<()> {
    if !a.edits.is_empty() {
        bail!(
            "--hostname, --userdata, --metadata, --bootconf and --file customise SD-card images, not phones"
        );
    }
    let mut jobs = Vec::new();
    if a.nodes.is_empty() {
        let [image] = a.positional.as_slice() else {
            bail!(
                "usage: kiln flash IMAGE --fastboot SERIAL [--partition userdata] [--product NAME]"
            );
        };
        let (files, raw_size) = match kiln::deliver::fastboot::sparse_expanded_size(image)? {
            Some(size) => (vec![image.clone()], size),
            None => {
                let raw = kiln::base::prepare_raw(image)?;
                let size = std::fs::metadata(&raw)?.len();
                let dest = kiln::base::cache::Cache::open()?
                    .root
                    .join("images")
                    .join(format!("{}.simg", kiln::base::cache::sha256_file(&raw)?));
                let bmap = FlashImage::open(image, a.bmap.as_deref())?.bmap;
                let files =
                    kiln::artifact::android_sparse::convert(&raw, bmap.as_ref(), &dest, None)?;
                (files, size)
            }
        };
        jobs.push(PhoneJob {
            label: image.display().to_string(),
            files,
            raw_size,
            partition: a.partition.clone().unwrap_or_else(|| "userdata".into()),
            product: a.product.clone(),
            serial: a.fastboot.clone(),
        });
    } else {
        if a.positional.len() > a.nodes.len() {
            bail!("more phones than --node: give at most one serial per node, in the same order");
        }
        let cluster = kiln::plan::load(&a.cluster)?;
        let opts = BuildOptions {
            out_dir: a.out.clone(),
            base: BaseRef::parse(a.base.as_deref()),
            base_sha256: None,
            format: Default::default(),
            insecure: false,
        };
        for (i, node) in a.nodes.iter().enumerate() {
            let n = cluster.node(node)?;
            let (profile, _) = cluster.profile_of(n);
            let artifact =
                build_node(&cluster, n, &opts).with_context(|| format!("building node {node}"))?;
            let bmap =
                kiln::artifact::bmap::Bmap::parse(&std::fs::read_to_string(&artifact.bmap)?)?;
            let simg = a.out.join(format!("{node}.simg"));
            let files =
                kiln::artifact::android_sparse::convert(&artifact.image, Some(&bmap), &simg, None)?;
            eprintln!(
                "built {} ({}) and {}",
                artifact.image.display(),
                &artifact.sha256[..16],
                simg.display()
            );
            let serial = a
                .positional
                .get(i)
                .map(|p| p.display().to_string())
                .or_else(|| (a.nodes.len() == 1).then(|| a.fastboot.clone()).flatten())
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
                partition: a
                    .partition
                    .clone()
                    .or_else(|| profile.deliver.partition.clone())
                    .unwrap_or_else(|| "userdata".into()),
                product: a
                    .product
                    .clone()
                    .or_else(|| profile.deliver.product.clone()),
                serial,
            });
        }
    }

    // Every phone is found and checked before the first byte goes to any of them.
    let mut phones = Vec::new();
    for job in &jobs {
        let phone = kiln::deliver::fastboot::find(job.serial.as_deref())?;
        phone.check(job.product.as_deref(), &job.partition, job.raw_size)?;
        phones.push(phone);
    }
    if !a.yes {
        eprintln!("kiln will overwrite:");
        for (job, phone) in jobs.iter().zip(&phones) {
            eprintln!(
                "  {} → partition {} of phone {}",
                job.label, job.partition, phone.serial
            );
        }
        eprint!("Everything on these partitions will be lost. Continue? [y/N] ");
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            bail!("not confirmed; nothing was written");
        }
    }
    let json = a.progress == ProgressMode::Json;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for (job, phone) in jobs.iter().zip(&phones) {
        // A bar over fastboot's own steps: "Sending sparse 'userdata' 2/5 (…)", "Writing …".
        let bar = (a.progress == ProgressMode::Auto && tty).then(|| {
            let b = indicatif::ProgressBar::new(1);
            b.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(phone.serial.clone());
            b
        });
        let report = |line: &str| {
            if line.is_empty() {
                return;
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "fastboot", "target": phone.serial, "line": line})
                );
            } else if let Some(b) = &bar {
                if let Some((i, n)) = sparse_step(line) {
                    b.set_length(n);
                    b.set_position(i - 1);
                }
                if line.starts_with("Writing") && line.contains("OKAY") {
                    b.inc(1);
                }
                b.set_message(line.split("  ").next().unwrap_or(line).to_string());
            } else if a.progress != ProgressMode::None {
                eprintln!("  {}: {line}", phone.serial);
            }
        };
        phone.flash(&job.partition, &job.files, &report)?;
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        phone.reboot()?;
        println!(
            "{}: {} flashed to {} and rebooted",
            phone.serial, job.label, job.partition
        );
    }
    Ok(())
}

/// `i/n` from fastboot's "Sending sparse 'userdata' 2/5 (1024 KB)".
fn sparse_step(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("Sending sparse ")?;
    let frac = rest.split_whitespace().nth(1)?;
    let (i, n) = frac.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}
