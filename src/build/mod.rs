//! `kiln build` for one node: plan → base → stamp → artifact.
//!
//! The node's plan is computed (and so validated) before any image is read; the base is copied
//! to a hidden temporary file in the output directory, stamped, mapped and hashed there, and only
//! then renamed into place with its bmap, checksum and manifest. A failure at any step removes the
//! temporaries: `out/` never holds half an image.

pub mod bib;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::artifact::bmap::Bmap;
use crate::artifact::manifest::{Entry, Manifest, sha256sum_line};
use crate::artifact::writer;
use crate::base::cache::Cache;
use crate::base::{self, BaseImage, BaseRef};
use crate::disk::patch::Patch;
use crate::fs::ext4_write;
use crate::plan::Cluster;
use crate::plan::node::NodeConfig;
use crate::plan::profile::{PartitionRole, Profile, ProfileOrigin};
use crate::plan::seed_scrub;
use crate::plan::stamp_plan::{self as plan, StampPlan};
use crate::stamp::{apply, rootfs};
use crate::util::fsutil::{TempGuard, temp_beside, write_atomic};

pub struct BuildOptions {
    pub out_dir: PathBuf,
    pub base: BaseRef,
    pub base_sha256: Option<String>,
    /// What the image is written as (raw unless asked otherwise).
    pub format: OutputFormat,
    /// Plain HTTP for an OCI registry without TLS.
    pub insecure: bool,
}

/// The image file a build leaves in `out/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// A raw disk image with a bmap: `<node>.img`, or `<node>.raw` when built from an OCI image.
    #[default]
    Raw,
    /// QCOW2 (no backing file, zero clusters unallocated): `<node>.qcow2`.
    Qcow2,
}

/// The files a build produced.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub node: String,
    pub image: PathBuf,
    pub bmap: PathBuf,
    pub sha256sum: PathBuf,
    pub manifest: PathBuf,
    pub sha256: String,
    pub mapped_bytes: u64,
    pub image_size: u64,
}

/// Where a node's build lands in `out/`.
struct OutputPaths {
    image: PathBuf,
    bmap: PathBuf,
    sha256sum: PathBuf,
    manifest: PathBuf,
    /// The config-drive documents beside the image: (manifest role, path, text).
    side_files: Vec<(&'static str, PathBuf, String)>,
}

impl OutputPaths {
    fn new(opts: &BuildOptions, what: &NodeBuild) -> Self {
        let (out_dir, node, plan) = (&opts.out_dir, &what.node.name, what.plan);
        let ext = match (opts.format, opts.base.oci_image(what.profile).is_some()) {
            (OutputFormat::Qcow2, _) => "qcow2",
            (OutputFormat::Raw, true) => "raw",
            (OutputFormat::Raw, false) => "img",
        };
        // Config-drive images carry no per-node files; the documents Ironic's config drive will
        // hold are build outputs beside the image (`kiln metal3 manifests` renders the same ones).
        let mut side_files = Vec::new();
        if let Some(network_data) = &plan.network_data {
            side_files.push((
                "user-data",
                out_dir.join(format!("{node}.user-data")),
                plan.user_data.clone(),
            ));
            side_files.push((
                "network-data",
                out_dir.join(format!("{node}.network_data.json")),
                network_data.clone(),
            ));
        }
        OutputPaths {
            image: out_dir.join(format!("{node}.{ext}")),
            bmap: out_dir.join(format!("{node}.{ext}.bmap")),
            sha256sum: out_dir.join(format!("{node}.{ext}.sha256sum")),
            manifest: out_dir.join(format!("{node}.manifest.json")),
            side_files,
        }
    }
}

/// A stamped node ready to be written: the file its bytes are read from (the base, or a working
/// copy whose root was edited) and the patches over it.
struct StampedNode {
    source: PathBuf,
    stamped: apply::Stamped,
    /// Whether `source` is a working copy (and its root differs from the base).
    edits_root: bool,
}

/// The written image (still under its temporary name) and its map.
struct WrittenImage {
    tmp: PathBuf,
    bmap: crate::artifact::bmap::Bmap,
    sha256: String,
    size: u64,
    /// Converted to QCOW2 (which maps its own clusters: no bmap beside it).
    qcow2: bool,
}

/// What one node's build reads: its configuration, profile and plan.
#[derive(Clone, Copy)]
struct NodeBuild<'a> {
    cluster: &'a Cluster,
    node: &'a NodeConfig,
    profile: &'a Profile,
    origin: &'a ProfileOrigin,
    plan: &'a StampPlan,
}

/// Plans `node` and hands what its build reads to `f`: the one start of a build and a stream.
fn planned<T>(
    cluster: &Cluster,
    node: &NodeConfig,
    f: impl FnOnce(&NodeBuild) -> Result<T>,
) -> Result<T> {
    let (profile, origin) = cluster.profile_of(node);
    let plan = plan::plan(cluster, node).with_context(|| format!("planning node {}", node.name))?;
    f(&NodeBuild {
        cluster,
        node,
        profile,
        origin,
        plan: &plan,
    })
}

pub fn build_node(cluster: &Cluster, node: &NodeConfig, opts: &BuildOptions) -> Result<Artifact> {
    planned(cluster, node, |what| build_planned(what, opts))
}

fn build_planned(what: &NodeBuild, opts: &BuildOptions) -> Result<Artifact> {
    let node = what.node;
    let base = prepare_base(what, opts)?;
    prepare_out_dir(&opts.out_dir)?;
    let paths = OutputPaths::new(opts, what);
    let mut guard = TempGuard::default();
    let stamped = stamp_node(what, &base, &opts.out_dir, &mut guard)?;
    let report = &stamped.stamped.report;
    if let Some(why) = &report.kept_signature_because {
        eprintln!("note: {}: {why}", node.name);
    }
    let written = write_image(&stamped, &base, &paths, opts.format, &mut guard)?;
    let sum_line = sha256sum_line(&written.sha256, &file_name(&paths.image));
    let manifest = manifest(what, &base, report, &paths, &written, &sum_line)?;
    publish(&paths, &written, &sum_line, &manifest, guard)?;
    Ok(Artifact {
        node: node.name.clone(),
        image: paths.image,
        bmap: paths.bmap,
        sha256sum: paths.sha256sum,
        manifest: paths.manifest,
        sha256: written.sha256,
        mapped_bytes: written.bmap.mapped_blocks() * written.bmap.block_size,
        image_size: written.size,
    })
}

/// The node's base image, checked against its profile before anything is copied, and the output
/// directory made ready for it.
fn prepare_base(what: &NodeBuild, opts: &BuildOptions) -> Result<BaseImage> {
    let base = base::prepare(
        &opts.base,
        what.profile,
        opts.base_sha256.as_deref(),
        opts.insecure,
    )
    .with_context(|| format!("preparing the base image for node {}", what.node.name))?;
    // Refuse a base that is not what the profile promises before copying anything.
    apply::check_layout(&base.raw, what.profile)?;
    Ok(base)
}

/// The output directory, made, with what killed builds left in it swept away.
fn prepare_out_dir(out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    crate::util::fsutil::sweep_stale_temporaries(out_dir);
    Ok(())
}

/// A node ready to be streamed to a disk without an image file: the file its bytes are read from
/// (the cached base, or a working copy when its root was edited), the patches laid over it on the
/// way, and the map of the blocks that hold data — the same bytes and the same map `build_node`
/// would write to `out/`.
pub struct StreamedNode {
    pub node: String,
    pub source: PathBuf,
    pub size: u64,
    pub patches: Vec<Patch>,
    pub bmap: Bmap,
    /// Removes the working copy (if any) when the node is dropped, after the flash.
    _work: TempGuard,
}

/// Plans and stamps `node` for streaming (`kiln flash --node` without `--out`): nothing is
/// written to `opts.out_dir` unless the node's root must be edited in a working copy there.
pub fn stream_node(
    cluster: &Cluster,
    node: &NodeConfig,
    opts: &BuildOptions,
) -> Result<StreamedNode> {
    planned(cluster, node, |what| stream_planned(what, opts))
}

fn stream_planned(what: &NodeBuild, opts: &BuildOptions) -> Result<StreamedNode> {
    let node = what.node;
    let base = prepare_base(what, opts)?;
    let mut work = TempGuard::default();
    if edits_root(what) {
        prepare_out_dir(&opts.out_dir)?;
    }
    let stamped = stamp_node(what, &base, &opts.out_dir, &mut work)?;
    if let Some(why) = &stamped.stamped.report.kept_signature_because {
        eprintln!("note: {}: {why}", node.name);
    }
    let size = std::fs::metadata(&stamped.source)
        .with_context(|| format!("reading the size of {}", stamped.source.display()))?
        .len();
    let bmap = Bmap::from_byte_ranges_split(
        size,
        &stamped.stamped.used,
        &partition_boundaries(&stamped.stamped.report),
    );
    Ok(StreamedNode {
        node: node.name.clone(),
        source: stamped.source,
        size,
        patches: stamped.stamped.patches,
        bmap,
        _work: work,
    })
}

/// Whether the node's root filesystem is edited (in a working copy of the base, by e2fsprogs)
/// rather than only its boot partition in memory: a rootfs plan, or overlays that a cloud-init
/// profile writes into the root.
fn edits_root(what: &NodeBuild) -> bool {
    // Overlays into the root of a cloud-init image (and a CNI folder, which always goes there)
    // are root files of the plan.
    what.plan.rootfs.is_some() || !what.plan.root_files.is_empty()
}

/// Partition starts and ends: bmap ranges never span them, so an untouched partition maps the
/// same ranges in every build on a base (`write_image` reuses their checksums).
fn partition_boundaries(report: &apply::StampReport) -> Vec<u64> {
    report
        .layout_before
        .partitions
        .iter()
        .flat_map(|p| [p.start, p.end()])
        .collect()
}

fn digest(s: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()))
}

/// Stamps the plan onto the base. Nodes whose root is edited get a working copy of the base
/// (e2fsprogs edits in place); the others are stamped in memory, to be written over the base in
/// one pass.
fn stamp_node(
    what: &NodeBuild,
    base: &BaseImage,
    out_dir: &Path,
    guard: &mut TempGuard,
) -> Result<StampedNode> {
    let NodeBuild {
        node,
        profile,
        plan,
        ..
    } = *what;
    let rootfs = plan.rootfs.is_some();
    if !edits_root(what) {
        let stamped = apply::stamp(&base.raw, profile, plan)
            .with_context(|| format!("stamping node {}", node.name))?;
        return Ok(StampedNode {
            source: base.raw.clone(),
            stamped,
            edits_root: false,
        });
    }
    let work = guard.track(out_dir.join(format!(".{}.work", node.name)));
    let (layout, root, epoch) = work_copy(&base.raw, &work, profile)?;
    for path in &plan.root_must_have {
        if ext4_write::read(&work, root.start, path)?.is_none() {
            bail!(
                "node {}: the cluster file's cni.image_plugins says the image has {path}, and it \
                 does not; put the plugin in the CNI folder's bin/ instead",
                node.name
            );
        }
    }
    let entries = if rootfs {
        rootfs::entries(plan, &work, root.start)
            .with_context(|| format!("configuring node {}", node.name))?
    } else {
        rootfs::overlay_entries(plan, &work, root.start)?
    };
    ext4_write::apply(&work, root.start, &entries, epoch)
        .with_context(|| format!("writing node {}'s files into its root", node.name))?;
    let stamped = if rootfs {
        apply::unstamped(&work, layout)?
    } else {
        apply::stamp(&work, profile, plan)
            .with_context(|| format!("stamping node {}", node.name))?
    };
    Ok(StampedNode {
        source: work,
        stamped,
        edits_root: true,
    })
}

/// Writes the stamped node to a temporary image in `out/` with its bmap (and converts it to
/// QCOW2 when asked).
fn write_image(
    node: &StampedNode,
    base: &BaseImage,
    paths: &OutputPaths,
    format: OutputFormat,
    guard: &mut TempGuard,
) -> Result<WrittenImage> {
    let tmp_image = guard.track(temp_beside(&paths.image.with_extension("raw-tmp")));
    let stamped = &node.stamped;
    // Range checksums of partitions this node leaves untouched are the same for every node built
    // on this base; remember them so the next build hashes only what changed. (Not for nodes
    // whose root was edited: it differs from the base without a patch to say where.)
    let sums_path = Cache::open()?
        .root
        .join("images")
        .join(format!("{}.range-sums.json", base.source_sha256));
    let known = if node.edits_root {
        BTreeMap::new()
    } else {
        load_sums(&sums_path)
    };
    let boundaries = partition_boundaries(&stamped.report);
    let (bmap, sha256) = writer::write_image(
        &node.source,
        &stamped.patches,
        &tmp_image,
        &stamped.used,
        &boundaries,
        &known,
    )
    .with_context(|| format!("writing {}", tmp_image.display()))?;
    if node.edits_root {
        let _ = std::fs::remove_file(&node.source);
    } else {
        store_sums(&sums_path, &writer::reusable_sums(&bmap, &stamped.patches));
    }
    if format != OutputFormat::Qcow2 {
        return Ok(WrittenImage {
            tmp: tmp_image,
            size: bmap.image_size,
            bmap,
            sha256,
            qcow2: false,
        });
    }
    // QCOW2: the raw image converted (only what the bmap maps is read); the raw goes away.
    let q = guard.track(temp_beside(&paths.image));
    crate::artifact::qcow2::convert(&tmp_image, Some(&bmap), &q)
        .with_context(|| format!("writing {}", q.display()))?;
    let _ = std::fs::remove_file(&tmp_image);
    Ok(WrittenImage {
        sha256: crate::base::cache::sha256_file(&q)?,
        size: std::fs::metadata(&q)?.len(),
        tmp: q,
        bmap,
        qcow2: true,
    })
}

/// The build manifest: what went in and what came out.
fn manifest(
    what: &NodeBuild,
    base: &BaseImage,
    report: &apply::StampReport,
    paths: &OutputPaths,
    written: &WrittenImage,
    sum_line: &str,
) -> Result<Manifest> {
    Ok(Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        node: what.node.name.clone(),
        profile: what.profile.name.clone(),
        source_date_epoch: crate::util::epoch::source_date_epoch()?,
        fat_timestamp: report.fat_timestamp.clone(),
        disk_signature: report.disk_signature.clone(),
        instance_id: what.plan.instance_id.clone(),
        inputs: manifest_inputs(what, base),
        outputs: manifest_outputs(paths, written, sum_line),
    })
}

/// What a build read: the base, the cluster file, the profile, the plan's files, kiln's scripts.
fn manifest_inputs(what: &NodeBuild, base: &BaseImage) -> Vec<Entry> {
    let NodeBuild {
        cluster,
        node,
        origin,
        plan,
        ..
    } = *what;
    let mut inputs = vec![
        Entry {
            role: "base-image".into(),
            path: base.description.clone(),
            sha256: base.source_sha256.clone(),
            size: None,
        },
        Entry {
            role: "cluster-file".into(),
            path: cluster.file.path.clone(),
            sha256: cluster.file.sha256.clone(),
            size: None,
        },
        Entry {
            role: "profile".into(),
            path: origin.describe(),
            sha256: digest(origin.text()),
            size: None,
        },
    ];
    for f in &plan.inputs {
        inputs.push(Entry {
            role: "file".into(),
            path: f.path.clone(),
            sha256: f.sha256.clone(),
            size: Some(f.bytes.len() as u64),
        });
    }
    let scrubs_seed = plan
        .first_boot_files
        .iter()
        .any(|f| f.path == seed_scrub::CLEAN_USER_DATA);
    for (name, text, used) in [
        (
            "scripts/kiln-swarm.sh",
            plan::SWARM_SCRIPT,
            node.swarm.is_some(),
        ),
        (
            "scripts/kiln-swarm.service",
            plan::SWARM_UNIT,
            node.swarm.is_some(),
        ),
        (
            "scripts/kiln-seed-scrub.sh",
            seed_scrub::SCRUB_SCRIPT,
            scrubs_seed,
        ),
        (
            "scripts/kiln-seed-scrub.service",
            seed_scrub::SCRUB_UNIT,
            scrubs_seed,
        ),
    ] {
        if used {
            inputs.push(Entry {
                role: "script".into(),
                path: name.into(),
                sha256: digest(text),
                size: None,
            });
        }
    }
    inputs
}

/// What a build wrote: the image, its bmap (raw only), its checksum, the config-drive documents.
fn manifest_outputs(paths: &OutputPaths, written: &WrittenImage, sum_line: &str) -> Vec<Entry> {
    let mut outputs = vec![Entry {
        role: "image".into(),
        path: file_name(&paths.image),
        sha256: written.sha256.clone(),
        size: Some(written.size),
    }];
    // A bmap describes a raw image; a QCOW2 maps its own clusters.
    if !written.qcow2 {
        let xml = written.bmap.to_xml();
        outputs.push(Entry {
            role: "bmap".into(),
            path: file_name(&paths.bmap),
            sha256: digest(&xml),
            size: Some(xml.len() as u64),
        });
    }
    outputs.push(Entry {
        role: "sha256sum".into(),
        path: file_name(&paths.sha256sum),
        sha256: digest(sum_line),
        size: Some(sum_line.len() as u64),
    });
    for (role, path, text) in &paths.side_files {
        outputs.push(Entry {
            role: (*role).into(),
            path: file_name(path),
            sha256: digest(text),
            size: Some(text.len() as u64),
        });
    }
    outputs
}

/// Publishes the build: the image first, its manifest last, each by an atomic rename.
fn publish(
    paths: &OutputPaths,
    written: &WrittenImage,
    sum_line: &str,
    manifest: &Manifest,
    mut guard: TempGuard,
) -> Result<()> {
    std::fs::rename(&written.tmp, &paths.image)
        .with_context(|| format!("renaming into {}", paths.image.display()))?;
    guard.disarm();
    if written.qcow2 {
        let _ = std::fs::remove_file(&paths.bmap);
    } else {
        write_atomic(&paths.bmap, written.bmap.to_xml().as_bytes())?;
    }
    write_atomic(&paths.sha256sum, sum_line.as_bytes())?;
    for (role, path, text) in &paths.side_files {
        // user-data holds password hashes and tokens: readable by its owner only.
        if *role == "user-data" {
            crate::util::fsutil::write_private(path, text.as_bytes())?;
        } else {
            write_atomic(path, text.as_bytes())?;
        }
    }
    write_atomic(&paths.manifest, &serde_json::to_vec_pretty(manifest)?)
}

fn load_sums(path: &Path) -> BTreeMap<(u64, u64), String> {
    let raw: BTreeMap<String, String> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    raw.into_iter()
        .filter_map(|(k, v)| {
            let (a, b) = k.split_once('-')?;
            Some(((a.parse().ok()?, b.parse().ok()?), v))
        })
        .collect()
}

/// Best effort: a cache that cannot be written only costs the next build some hashing.
fn store_sums(path: &Path, sums: &BTreeMap<(u64, u64), String>) {
    let raw: BTreeMap<String, &String> = sums
        .iter()
        .map(|((a, b), v)| (format!("{a}-{b}"), v))
        .collect();
    if let Ok(json) = serde_json::to_vec(&raw) {
        let _ = write_atomic(path, &json);
    }
}

/// Copies the base to `work` for in-place edits of its root; returns its layout, the root
/// partition and the timestamp for what is written (SOURCE_DATE_EPOCH, else the root's mkfs time).
fn work_copy(
    base: &Path,
    work: &Path,
    profile: &crate::plan::profile::Profile,
) -> Result<(crate::disk::DiskLayout, crate::disk::Partition, i64)> {
    crate::artifact::sparse::copy(base, work)
        .with_context(|| format!("copying the base to {}", work.display()))?;
    let layout = apply::check_layout(work, profile)?;
    let root_index = profile
        .partition(PartitionRole::Root)
        .context("the profile writes into the root but names no root partition")?
        .index;
    let root = layout
        .partition(root_index)
        .context("root partition vanished")?
        .clone();
    let epoch = match crate::util::epoch::source_date_epoch()? {
        Some(e) => e,
        None => ext4_created(work, root.start)?,
    };
    Ok((layout, root, epoch))
}

/// The ext4 superblock's creation time (s_mkfs_time): a fixed date for a given base image, used
/// for the files kiln writes when SOURCE_DATE_EPOCH is not set.
fn ext4_created(image: &Path, offset: u64) -> Result<i64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image)?;
    let mut b = [0u8; 4];
    f.seek(SeekFrom::Start(offset + 1024 + 0x108))?;
    f.read_exact(&mut b)?;
    Ok(i64::from(u32::from_le_bytes(b)))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
