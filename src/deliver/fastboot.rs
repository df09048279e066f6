//! Flashing phones over fastboot, by driving the `fastboot` tool (USB and TCP transports, sparse
//! splitting to the device's `max-download-size` — all as Android's own client does them).
//!
//! Everything that can refuse is asked first — the phone is there, it is the profile's product,
//! its partition holds the image — so a wrong phone is never written to. Every call has a time
//! limit: `fastboot` waits forever for a USB serial that is not connected.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One phone in fastboot mode, by serial (`tcp:host:port` for network fastboot).
pub struct Phone {
    pub serial: String,
    tool: PathBuf,
}

fn tool() -> Result<PathBuf> {
    crate::util::cmd::require("fastboot")?;
    crate::util::cmd::which("fastboot").context("fastboot vanished from PATH")
}

/// Runs `fastboot` with a deadline; returns (success, stdout + stderr).
fn run(tool: &Path, args: &[&str], limit: Duration) -> Result<(bool, String)> {
    let mut child = crate::util::cmd::spawn(
        Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "fastboot",
    )?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            return Ok((status.success(), text));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "fastboot {} did not finish within {} s",
                args.join(" "),
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serials of the phones `fastboot devices` lists (USB; network phones are not listed).
pub fn devices() -> Result<Vec<String>> {
    let (_, out) = run(&tool()?, &["devices"], Duration::from_secs(10))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let serial = it.next()?;
            (it.next() == Some("fastboot")).then(|| serial.to_string())
        })
        .collect())
}

/// The phone to flash: the pinned serial, or the one phone in fastboot mode.
pub fn find(pinned: Option<&str>) -> Result<Phone> {
    let tool = tool()?;
    if let Some(s) = pinned {
        let network = s.starts_with("tcp:") || s.starts_with("udp:");
        if let Some(addr) = s.strip_prefix("tcp:") {
            // fastboot waits for ever on a refused TCP address; find out first.
            let addr = if addr.contains(':') {
                addr.to_string()
            } else {
                format!("{addr}:5554")
            };
            let reachable = std::net::ToSocketAddrs::to_socket_addrs(&addr)
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| {
                    std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)).map(drop)
                });
            match reachable {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    bail!("no phone answers at {s}: {e}; nothing was written")
                }
                None => bail!("{s}: cannot resolve {addr}; nothing was written"),
            }
        }
        if !network && !devices()?.iter().any(|d| d == s) {
            bail!(
                "no phone {s} in fastboot mode (connect it over USB and hold Volume Down while it powers on); nothing was written"
            );
        }
        return Ok(Phone {
            serial: s.to_string(),
            tool,
        });
    }
    let found = devices()?;
    match found.as_slice() {
        [one] => Ok(Phone {
            serial: one.clone(),
            tool,
        }),
        [] => bail!(
            "no phone in fastboot mode (connect it over USB and hold Volume Down while it powers on); nothing was written"
        ),
        many => bail!(
            "{} phones in fastboot mode ({}); name one, or pin its serial in the cluster file",
            many.len(),
            many.join(", ")
        ),
    }
}

impl Phone {
    /// `fastboot getvar VAR`; `None` when the phone does not know it.
    pub fn getvar(&self, var: &str) -> Result<Option<String>> {
        let (ok, out) = run(
            &self.tool,
            &["-s", &self.serial, "getvar", var],
            Duration::from_secs(20),
        )
        .with_context(|| format!("asking the phone at {}; nothing was written", self.serial))?;
        if !ok {
            if out.contains("Failed to connect") || out.contains("no devices") {
                bail!(
                    "no phone answers at {}: {}; nothing was written",
                    self.serial,
                    out.trim()
                );
            }
            return Ok(None);
        }
        let prefix = format!("{var}:");
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().to_string()))
    }

    fn number(&self, var: &str) -> Result<Option<u64>> {
        match self.getvar(var)? {
            None => Ok(None),
            Some(v) => {
                let n = match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => v.parse(),
                };
                Ok(Some(n.with_context(|| {
                    format!("the phone's {var} is {v:?}, not a number")
                })?))
            }
        }
    }

    /// Checks the phone before anything is written: its product and the partition's size.
    pub fn check(&self, product: Option<&str>, partition: &str, image_size: u64) -> Result<()> {
        let found = self.getvar("product")?;
        if let Some(want) = product {
            match found.as_deref() {
                Some(p) if p == want => {}
                Some(p) => bail!(
                    "the phone at {} is a {p:?}, but the image is for {want:?}; nothing was written",
                    self.serial
                ),
                None => bail!(
                    "the phone at {} does not report its product; nothing was written",
                    self.serial
                ),
            }
        }
        match self.number(&format!("partition-size:{partition}"))? {
            Some(size) if size >= image_size => Ok(()),
            Some(size) => bail!(
                "partition {partition} on {} holds {size} bytes but the image has {image_size}; nothing was written",
                self.serial
            ),
            None => bail!(
                "the phone at {} has no partition {partition}; nothing was written",
                self.serial
            ),
        }
    }

    /// `fastboot flash PARTITION FILE…` (sparse pieces in order), reporting each step.
    pub fn flash(&self, partition: &str, files: &[PathBuf], report: &dyn Fn(&str)) -> Result<()> {
        for f in files {
            let mut child = crate::util::cmd::spawn(
                Command::new(&self.tool)
                    .args(["-s", &self.serial, "flash", partition])
                    .arg(f)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
                "fastboot",
            )?;
            let mut log = String::new();
            // fastboot ends its progress lines with "OKAY [ 0.1s]" or a FAILED line.
            for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
                let line = line?;
                report(line.trim());
                log.push_str(&line);
                log.push('\n');
            }
            let status = child.wait()?;
            if !status.success() {
                bail!(
                    "fastboot flash {partition} {} failed on {}:\n{}",
                    f.display(),
                    self.serial,
                    log.trim()
                );
            }
        }
        Ok(())
    }

    pub fn reboot(&self) -> Result<()> {
        let (ok, out) = run(
            &self.tool,
            &["-s", &self.serial, "reboot"],
            Duration::from_secs(30),
        )?;
        if !ok {
            bail!("fastboot reboot failed: {}", out.trim());
        }
        Ok(())
    }
}

/// The size of the raw image an Android sparse file expands to, if `path` is one.
pub fn sparse_expanded_size(path: &Path) -> Result<Option<u64>> {
    crate::artifact::android_sparse::expanded_size(path)
}
