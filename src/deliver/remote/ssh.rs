//! The system `ssh` and `scp`, run through kiln's one command runner with the user's options.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::util::cmd;

pub struct Ssh {
    pub target: String,
    /// `-o Key=Value` options for both ssh and scp.
    pub options: Vec<String>,
}

impl Ssh {
    pub fn new(target: &str, options: &[String]) -> Result<Ssh> {
        if target.is_empty() || target.starts_with('-') || target.contains(char::is_whitespace) {
            bail!("{target:?} is not an ssh destination (user@host)");
        }
        for o in options {
            if !o.contains('=') {
                bail!("--ssh-option {o:?} is not KEY=VALUE");
            }
        }
        Ok(Ssh {
            target: target.to_string(),
            options: options.to_vec(),
        })
    }

    fn opts(&self, c: &mut Command) {
        // BatchMode: never hang on a password prompt; kiln is not interactive over ssh.
        c.args(["-o", "BatchMode=yes"]);
        for o in &self.options {
            c.arg("-o").arg(o);
        }
    }

    /// `ssh <target> -- sh -c '<script>'`.
    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("ssh");
        self.opts(&mut c);
        c.arg(&self.target)
            .arg("--")
            .arg("sh")
            .arg("-c")
            .arg(super::shell_join(&[script.to_string()]));
        c
    }

    /// Runs `script` with `sh` on the target; returns its stdout.
    pub fn run(&self, script: &str) -> Result<String> {
        let out = cmd::run_with(&mut self.command(script), "ssh")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `script`, returning (exit status, stdout) without failing on a non-zero exit.
    pub fn status(&self, script: &str) -> Result<(i32, String)> {
        let out = cmd::output(&mut self.command(script), "ssh")?;
        if out.status.code() == Some(255) {
            bail!(
                "ssh to {} failed: {}",
                self.target,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Copies local files into `dir` on the target.
    pub fn copy(&self, files: &[PathBuf], dir: &str) -> Result<()> {
        let mut c = Command::new("scp");
        c.arg("-q");
        self.opts(&mut c);
        c.args(files).arg(format!("{}:{dir}/", self.target));
        cmd::run_with(&mut c, "scp")?;
        Ok(())
    }
}
