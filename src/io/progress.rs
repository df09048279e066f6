//! Progress reporting, the one place that decides how it is shown: a bar on a terminal, a plain
//! line every few seconds otherwise (so logs in CI stay readable), one JSON object per line with
//! `--progress json`, or nothing. Stages report through this; they never print bars themselves.
//!
//! Two shapes share the drawing: `Progress` is one labelled task (a download, a decompression);
//! `Events` carries a flash's events — each target's stages, notes, fastboot's own lines and each
//! target's result — which `--progress json` prints as they are.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// `bar` drawn with `template`, in kiln's bar characters.
fn styled(bar: ProgressBar, template: &str) -> ProgressBar {
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    bar: Option<ProgressBar>,
    last_line: Instant,
    started: Instant,
}

impl Progress {
    pub fn new(label: &str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            let style = if total.is_some() {
                "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{msg:>12} {spinner} {bytes} {bytes_per_sec}"
            };
            let b = styled(b, style);
            b.set_message(label.to_string());
            b
        });
        Progress {
            label: label.to_string(),
            total,
            done: 0,
            bar,
            last_line: Instant::now(),
            started: Instant::now(),
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.last_line.elapsed() > Duration::from_secs(5) {
            self.last_line = Instant::now();
            match self.total {
                Some(t) if t > 0 => eprintln!(
                    "{}: {} of {} MiB ({}%)",
                    self.label,
                    self.done >> 20,
                    t >> 20,
                    self.done * 100 / t
                ),
                _ => eprintln!("{}: {} MiB", self.label, self.done >> 20),
            }
        }
    }

    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 1.0 {
            eprintln!("{}: {} MiB in {secs:.1} s", self.label, self.done >> 20);
        }
    }
}

/// A reader that reports bytes read to a `Progress`.
pub struct ProgressReader<'a, R> {
    pub inner: R,
    pub progress: &'a mut Progress,
}

impl<R: std::io::Read> std::io::Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prepare,
    Decode,
    Write,
    Verify,
    Done,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Decode => "decode",
            Stage::Write => "write",
            Stage::Verify => "verify",
            Stage::Done => "done",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal, plain lines otherwise.
    Auto,
    /// One JSON object per line on stdout.
    Json,
    None,
}

pub struct Events {
    mode: ProgressMode,
    tty: bool,
    multi: MultiProgress,
    bars: Mutex<HashMap<(String, &'static str), ProgressBar>>,
    last: Mutex<HashMap<(String, &'static str), Instant>>,
    total: Option<u64>,
    /// The bar over fastboot's steps for the phone being flashed.
    phone_bar: Mutex<Option<ProgressBar>>,
}

impl Events {
    pub fn new(mode: ProgressMode, total: Option<u64>) -> Events {
        Events {
            mode,
            tty: std::io::stderr().is_terminal(),
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
            last: Mutex::new(HashMap::new()),
            total,
            phone_bar: Mutex::new(None),
        }
    }

    pub fn emit(&self, stage: Stage, target: &Path, bytes: u64, total: Option<u64>) {
        let total = total.or(self.total);
        let key = (target.display().to_string(), stage.name());
        match self.mode {
            ProgressMode::None => {}
            ProgressMode::Json => {
                // Rate-limit the chatty stages; always report stage boundaries.
                if matches!(stage, Stage::Write | Stage::Verify | Stage::Decode)
                    && !self.due(&key, 200)
                {
                    return;
                }
                let line = serde_json::json!({
                    "event": "progress",
                    "stage": stage.name(),
                    "target": key.0,
                    "bytes": bytes,
                    "total": total,
                });
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            ProgressMode::Auto if self.tty => {
                if matches!(stage, Stage::Prepare | Stage::Decode) {
                    return;
                }
                let mut bars = self.bars.lock().expect("bars lock");
                let bar = bars.entry(key.clone()).or_insert_with(|| {
                    let b = styled(
                        self.multi.add(ProgressBar::new(total.unwrap_or(0))),
                        "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    );
                    b.set_message(format!("{} {}", stage.name(), key.0));
                    b
                });
                bar.set_position(bytes);
                if stage == Stage::Done {
                    for ((t, _), b) in bars.iter() {
                        if *t == key.0 {
                            b.finish();
                        }
                    }
                }
            }
            ProgressMode::Auto => {
                if matches!(stage, Stage::Done | Stage::Prepare) || self.due(&key, 5000) {
                    eprintln!("{} {}: {} MiB", stage.name(), key.0, bytes >> 20);
                }
            }
        }
    }

    pub fn note(&self, target: &Path, text: &str) {
        if self.mode == ProgressMode::Json {
            println!(
                "{}",
                serde_json::json!({"event": "note", "target": target.display().to_string(), "text": text})
            );
        } else if self.mode == ProgressMode::Auto {
            eprintln!("{}: {text}", target.display());
        }
    }

    /// One target's result, as a JSON line (human output has the summary table instead):
    /// bytes written and whether they were read back, or the error.
    pub fn result(&self, target: &Path, result: std::result::Result<(u64, bool), &str>) {
        if self.mode != ProgressMode::Json {
            return;
        }
        let target = target.display().to_string();
        let line = match result {
            Ok((written, verified)) => {
                serde_json::json!({"event": "result", "target": target, "ok": true, "written": written, "verified": verified})
            }
            Err(e) => {
                serde_json::json!({"event": "result", "target": target, "ok": false, "error": e})
            }
        };
        println!("{line}");
    }

    /// A phone is about to be flashed: on a terminal, a bar over fastboot's own steps.
    pub fn fastboot_begin(&self, serial: &str) {
        if self.mode != ProgressMode::Auto || !self.tty {
            return;
        }
        let b = styled(ProgressBar::new(1), "{prefix} [{bar:30}] {pos}/{len} {msg}");
        b.set_prefix(serial.to_string());
        *self.phone_bar.lock().expect("phone bar lock") = Some(b);
    }

    /// One line of fastboot's output: "Sending sparse 'userdata' 2/5 (…)", "Writing …".
    pub fn fastboot_line(&self, serial: &str, line: &str) {
        if line.is_empty() {
            return;
        }
        let bar = self.phone_bar.lock().expect("phone bar lock");
        if self.mode == ProgressMode::Json {
            println!(
                "{}",
                serde_json::json!({"event": "fastboot", "target": serial, "line": line})
            );
        } else if let Some(b) = bar.as_ref() {
            if let Some((i, n)) = sparse_step(line) {
                b.set_length(n);
                b.set_position(i - 1);
            }
            if line.starts_with("Writing") && line.contains("OKAY") {
                b.inc(1);
            }
            b.set_message(line.split("  ").next().unwrap_or(line).to_string());
        } else if self.mode != ProgressMode::None {
            eprintln!("  {serial}: {line}");
        }
    }

    /// The phone is flashed: its bar goes away.
    pub fn fastboot_end(&self) {
        if let Some(b) = self.phone_bar.lock().expect("phone bar lock").take() {
            b.finish_and_clear();
        }
    }

    fn due(&self, key: &(String, &'static str), ms: u64) -> bool {
        let mut last = self.last.lock().expect("last lock");
        let now = Instant::now();
        match last.get(key) {
            Some(t) if now.duration_since(*t) < Duration::from_millis(ms) => false,
            _ => {
                last.insert(key.clone(), now);
                true
            }
        }
    }
}

/// `i/n` from fastboot's "Sending sparse 'userdata' 2/5 (1024 KB)".
fn sparse_step(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("Sending sparse ")?;
    let frac = rest.split_whitespace().nth(1)?;
    let (i, n) = frac.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}
