//! `kiln run`: boot an image in QEMU to see it work — UEFI firmware, the serial console on the
//! terminal or in a log, optionally a node's NoCloud seed, and `--until TEXT` to stop with success
//! when a line appears (what tests and CI want).
//!
//! The image is opened with `snapshot=on` unless `--persist`: a test boot never changes the build.
//! The guest gets a NIC on an empty QEMU hub, so it has an interface to configure and no way off
//! the host — or, when the whole cluster runs (`run_cluster`), a NIC on kiln's private hub.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::disk::PartitionSlice;
use crate::fs::fat;
use crate::util::cmd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    X86_64,
    Aarch64,
}

pub struct RunOptions {
    pub image: PathBuf,
    pub arch: Arch,
    /// A NoCloud seed image (vfat labelled CIDATA) attached as a second disk.
    pub seed: Option<PathBuf>,
    pub until: Option<String>,
    pub timeout: Option<Duration>,
    pub log: Option<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub persist: bool,
    /// Try KVM first (it is used only if a short probe boot works).
    pub kvm: bool,
    /// A NIC on a Unix-socket hub instead of an empty QEMU hub.
    pub nic: Option<Nic>,
}

/// A NIC joined to a hub that speaks QEMU's stream netdev framing on a Unix socket.
#[derive(Debug, Clone)]
pub struct Nic {
    pub socket: PathBuf,
    pub mac: String,
}

/// Firmware code and variable-store templates, where Debian's ovmf / qemu-efi-aarch64 put them.
fn firmware(arch: Arch) -> Result<(PathBuf, PathBuf)> {
    let candidates: &[(&str, &str)] = match arch {
        Arch::X86_64 => &[
            (
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            ),
            (
                "/usr/share/OVMF/OVMF_CODE.fd",
                "/usr/share/OVMF/OVMF_VARS.fd",
            ),
        ],
        Arch::Aarch64 => &[(
            "/usr/share/AAVMF/AAVMF_CODE.fd",
            "/usr/share/AAVMF/AAVMF_VARS.fd",
        )],
    };
    for (code, vars) in candidates {
        if Path::new(code).exists() && Path::new(vars).exists() {
            return Ok((code.into(), vars.into()));
        }
    }
    bail!(
        "no UEFI firmware for {arch:?} (Debian: apt install {})",
        match arch {
            Arch::X86_64 => "ovmf",
            Arch::Aarch64 => "qemu-efi-aarch64",
        }
    )
}

fn image_format(path: &Path) -> Result<&'static str> {
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .read(&mut head)?;
    Ok(if n == 4 && &head == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// Writes a NoCloud seed: a small FAT volume labelled CIDATA with the given files.
pub fn make_seed(dest: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    const SIZE: u64 = 4 << 20;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    f.set_len(SIZE)?;
    {
        let mut slice = PartitionSlice::new(f.try_clone()?, 0, SIZE);
        fatfs::format_volume(
            &mut slice,
            fatfs::FormatVolumeOptions::new()
                .volume_label(*b"CIDATA     ")
                .volume_id(0x6b696c6e),
        )
        .context("formatting the seed")?;
    }
    let part = crate::disk::Partition {
        index: 1,
        start: 0,
        size: SIZE,
        type_code: "0x0c".into(),
        name: None,
        guid: None,
    };
    let vol = fat::FatVolume::open(f, &part, fat::fat_datetime(0))?;
    for (name, bytes) in files {
        vol.write_file(name, bytes)?;
    }
    vol.close()
}

/// Whether KVM really runs a guest here: /dev/kvm can exist and still fail at the first guest
/// instruction ("KVM internal error"), which leaves QEMU paused rather than exited. The probe
/// boots the firmware alone for two seconds and watches for that.
fn kvm_works(bin: &str, code: &Path, vars: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let child = cmd::spawn(
        Command::new(bin)
            .args([
                "-accel",
                "kvm",
                "-m",
                "256",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-serial", "none", "-monitor", "none"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,snapshot=on,file={}",
                vars.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        bin,
    );
    let Ok(mut child) = child else { return false };
    std::thread::sleep(Duration::from_secs(2));
    let exited = matches!(child.try_wait(), Ok(Some(_)));
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).ok();
    }
    !exited && !err.contains("KVM internal error") && !err.contains("failed to initialize kvm")
}

fn qemu_command(o: &RunOptions, vars: &Path, code: &Path) -> Result<Command> {
    let (bin, machine) = match o.arch {
        Arch::X86_64 => ("qemu-system-x86_64", None),
        Arch::Aarch64 => ("qemu-system-aarch64", Some("virt")),
    };
    cmd::require(bin)?;
    let mut c = Command::new(bin);
    if let Some(m) = machine {
        c.args(["-machine", m, "-cpu", "max"]);
    }
    // TCG unless KVM was asked for and a probe shows it works.
    if o.kvm && o.arch == Arch::X86_64 && kvm_works(bin, code, vars) {
        c.args(["-accel", "kvm"]);
    } else {
        if o.kvm {
            eprintln!("note: KVM does not work here; booting with TCG (slower)");
        }
        c.args(["-accel", "tcg"]);
    }
    c.args(["-m", &o.memory_mib.to_string(), "-smp", &o.cpus.to_string()]);
    c.args(["-nodefaults", "-display", "none"]);
    c.arg("-drive").arg(format!(
        "if=pflash,format=raw,readonly=on,file={}",
        code.display()
    ));
    c.arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    c.arg("-drive").arg(format!(
        "file={},format={},if=virtio{}",
        o.image.display(),
        image_format(&o.image)?,
        if o.persist { "" } else { ",snapshot=on" }
    ));
    if let Some(seed) = &o.seed {
        c.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            seed.display()
        ));
    }
    match &o.nic {
        None => c.args([
            "-netdev",
            "hubport,id=n0,hubid=0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ]),
        Some(nic) => c
            .arg("-netdev")
            .arg(format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                nic.socket.display()
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={}", nic.mac)),
    };
    Ok(c)
}

/// Boots the image. Without `until` the console is interactive and the run ends with QEMU; with
/// it, the run succeeds when the text appears and fails at the timeout.
pub fn run(o: &RunOptions) -> Result<()> {
    if !o.image.is_file() {
        bail!("{} is not an image file", o.image.display());
    }
    let tmp = tempfile::tempdir()?;
    let mut qemu = prepared_command(o, &tmp.path().join("vars.fd"))?;
    let bin = qemu.get_program().to_string_lossy().into_owned();

    if o.until.is_none() && o.log.is_none() {
        return interactive(&mut qemu, &bin);
    }

    qemu.args(["-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd::spawn(&mut qemu, &bin).context("starting qemu")?;
    let (rx, reader) = console_lines(child.stdout.take().expect("piped"));
    let (outcome, tail) = watch_console(o, &rx)?;
    let _ = child.kill();
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).ok();
    }
    let _ = reader.join();
    match (outcome, &o.until) {
        (Ok(()), _) => Ok(()),
        (Err(_), None) if status.success() => Ok(()),
        (Err(why), until) => bail!(
            "{why}{}; last console lines:\n{}{}",
            until
                .as_ref()
                .map(|u| format!(" before {u:?} appeared"))
                .unwrap_or_default(),
            tail.join("\n"),
            if err.trim().is_empty() {
                String::new()
            } else {
                format!("\nqemu: {}", err.trim())
            }
        ),
    }
}

/// The QEMU command for `o`, with a fresh copy of the firmware's variable store at `vars`.
pub(crate) fn prepared_command(o: &RunOptions, vars: &Path) -> Result<Command> {
    let (code, vars_template) = firmware(o.arch)?;
    std::fs::copy(&vars_template, vars)
        .with_context(|| format!("copying {} to {}", vars_template.display(), vars.display()))?;
    qemu_command(o, vars, &code)
}

/// Interactive: the serial console and QEMU's monitor (Ctrl-A X quits) on this terminal.
fn interactive(qemu: &mut Command, bin: &str) -> Result<()> {
    qemu.args(["-serial", "mon:stdio"]);
    let status = cmd::spawn(qemu, bin).context("starting qemu")?.wait()?;
    if !status.success() {
        bail!("qemu exited with {status}");
    }
    Ok(())
}

/// The guest's console output, line by line, read on its own thread.
pub(crate) fn console_lines(out: ChildStdout) -> (mpsc::Receiver<String>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf).into_owned();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, reader)
}

/// Copies console lines to the log (or the terminal) until `--until` appears, the timeout passes
/// or QEMU exits; returns which, and the last 30 lines.
fn watch_console(
    o: &RunOptions,
    rx: &mpsc::Receiver<String>,
) -> Result<(std::result::Result<(), String>, Vec<String>)> {
    let mut log = match &o.log {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let started = Instant::now();
    let mut tail: Vec<String> = Vec::new();
    let outcome = loop {
        if let Some(t) = o.timeout
            && started.elapsed() > t
        {
            break Err(format!("{} s passed", t.as_secs()));
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                match &mut log {
                    Some(f) => f.write_all(line.as_bytes())?,
                    None => {
                        print!("{line}");
                        std::io::stdout().flush().ok();
                    }
                }
                tail.push(line.trim_end().to_string());
                if tail.len() > 30 {
                    tail.remove(0);
                }
                if let Some(u) = &o.until
                    && line.contains(u.as_str())
                {
                    break Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err("qemu exited".to_string());
            }
        }
    };
    Ok((outcome, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_is_a_cidata_fat_that_mtools_reads() {
        if !crate::util::cmd::available("mtype") {
            eprintln!("SKIPPED: mtools missing");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed.img");
        make_seed(
            &seed,
            &[
                ("user-data", b"#cloud-config\n"),
                ("meta-data", b"instance-id: x\n"),
            ],
        )
        .unwrap();
        let label = Command::new("mlabel")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-i"])
            .arg(&seed)
            .arg("::")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&label.stdout).contains("CIDATA"));
        let ud = Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&seed)
            .arg("::user-data")
            .output()
            .unwrap();
        assert_eq!(ud.stdout, b"#cloud-config\n");
    }
}
