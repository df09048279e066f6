//! The one way kiln runs an external tool: the error names the tool, the package that provides it
//! when it is missing, the command line, and the tail of its stderr.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

use anyhow::{Result, bail};

/// Debian package names for the tools kiln uses, for "install X" hints.
fn package_of(tool: &str) -> Option<&'static str> {
    Some(match tool {
        "mke2fs" | "mkfs.ext4" | "debugfs" | "e2fsck" | "dumpe2fs" | "tune2fs" => "e2fsprogs",
        "mkfs.vfat" | "fsck.vfat" => "dosfstools",
        "mcopy" | "mdir" | "mtype" => "mtools",
        "sfdisk" => "fdisk",
        "sgdisk" => "gdisk",
        "qemu-img" => "qemu-utils",
        "qemu-system-x86_64" => "qemu-system-x86",
        "bmaptool" => "bmap-tools",
        "simg2img" | "img2simg" => "android-sdk-libsparse-utils",
        "fastboot" => "fastboot",
        "ssh" | "scp" => "openssh-client",
        _ => return None,
    })
}

/// Whether `tool` is on PATH.
pub fn available(tool: &str) -> bool {
    which(tool).is_some()
}

/// Where `tool` is on PATH (an executable file).
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.is_file()
                && std::fs::metadata(p)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
                    .unwrap_or(false)
        })
}

/// Fails with an install hint unless `tool` is on PATH.
pub fn require(tool: &str) -> Result<()> {
    if available(tool) {
        return Ok(());
    }
    match package_of(tool) {
        Some(pkg) => {
            bail!("{tool} is not installed; install the {pkg} package (apt-get install {pkg})")
        }
        None => bail!("{tool} is not installed"),
    }
}

/// Runs `tool args…`, returning its output; a non-zero exit is an error that carries the
/// command line and the last lines of stderr.
pub fn run<I, S>(tool: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with(Command::new(tool).args(args), tool)
}

/// Runs a prepared command (for environment variables or a working directory).
pub fn run_with(cmd: &mut Command, tool: &str) -> Result<Output> {
    require(tool)?;
    let shown = format!(
        "{} {}",
        tool,
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("running {shown}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!("{shown} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(out)
}
