//! The one way kiln runs an external tool: the error names the tool, the package that provides it
//! when it is missing, the command line, and the tail of its stderr.

use std::ffi::OsStr;
use std::process::{Child, Command, Output, Stdio};

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
    let out = output(cmd, tool)?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}",
            shown(cmd, tool),
            out.status,
            stderr_tail(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a prepared command to its end and returns its output whatever its exit status, for
/// callers that read a non-zero exit themselves (ssh's 255, eject's "cannot eject"). Only a tool
/// that is missing or cannot start is an error.
pub fn output(cmd: &mut Command, tool: &str) -> Result<Output> {
    output_with_input(cmd, tool, None)
}

/// As [`output`], writing `input` to the tool's stdin (a credential helper reads the server
/// name there); `None` gives it no stdin.
pub fn output_with_input(cmd: &mut Command, tool: &str, input: Option<&[u8]>) -> Result<Output> {
    require(tool)?;
    let shown = shown(cmd, tool);
    let Some(input) = input else {
        return cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| anyhow::anyhow!("running {shown}: {e}"));
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running {shown}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A tool that exits without reading its input is judged by its exit status, not by this.
        let _ = std::io::Write::write_all(&mut stdin, input);
    }
    child
        .wait_with_output()
        .map_err(|e| anyhow::anyhow!("running {shown}: {e}"))
}

/// Starts a prepared command and hands back the child, for tools that run alongside kiln (QEMU,
/// fastboot streaming its progress); its stdio is whatever the caller set.
pub fn spawn(cmd: &mut Command, tool: &str) -> Result<Child> {
    require(tool)?;
    cmd.spawn()
        .map_err(|e| anyhow::anyhow!("running {}: {e}", shown(cmd, tool)))
}

/// The command line as the user would type it, for errors.
fn shown(cmd: &Command, tool: &str) -> String {
    format!(
        "{} {}",
        tool,
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The last lines of a tool's stderr: where tools say what went wrong.
pub fn stderr_tail(stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}
