//! Progress reporting, the one place that decides how it is shown: a bar on a terminal, a plain
//! line every few seconds otherwise (so logs in CI stay readable), one JSON object per line with
//! `--progress json`, or nothing. Stages report through this; they never print bars themselves.
//!
//! Everything reports as events of a stage on a target: a flash's targets (prepare, decode,
//! write, verify, done, notes, fastboot's own lines and each result) and the tasks before it
//! (a base's download and decompression, through `Progress`). One `Events` draws them all, so
//! `kiln flash --node … --progress json` streams the download as it streams the write.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
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

/// How long tasks outside a flash (downloads, decompression) report: set once by a verb's
/// `--progress` (`kiln flash` has it), bars or lines when no verb sets it.
static MODE: OnceLock<ProgressMode> = OnceLock::new();

/// Sets the progress mode of the whole run, from the verb's `--progress`.
pub fn set_mode(mode: ProgressMode) {
    let _ = MODE.set(mode);
}

/// One labelled task (a download, a decompression) reporting through the same events as a
/// flash: a bar on a terminal, lines in a log, JSON with `--progress json`.
pub struct Progress {
    events: Events,
    stage: Stage,
    target: PathBuf,
    done: u64,
    started: Instant,
}

impl Progress {
    /// A task of `stage` on `target` (a file name), `total` bytes when known.
    pub fn new(stage: Stage, target: &str, total: Option<u64>) -> Progress {
        let mode = MODE.get().copied().unwrap_or(ProgressMode::Auto);
        let p = Progress {
            events: Events::new(mode, total),
            stage,
            target: PathBuf::from(target),
            done: 0,
            started: Instant::now(),
        };
        p.events.report(stage, &p.target, 0, None, true);
        p
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        self.events.emit(self.stage, &self.target, self.done, None);
    }

    /// The task is over: its last count is always reported, and a human reader gets its time.
    pub fn finish(self) {
        self.events
            .report(self.stage, &self.target, self.done, None, true);
        let secs = self.started.elapsed().as_secs_f64();
        if self.events.mode == ProgressMode::Auto && secs > 1.0 {
            self.events.finish_bars();
            eprintln!(
                "{} {}: {} MiB in {secs:.1} s",
                self.stage.name(),
                self.target.display(),
                self.done >> 20
            );
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
    /// A base image coming over HTTP.
    Download,
    /// A compressed base image being unpacked into the cache.
    Decompress,
}

impl Stage {
    /// Stages that report on every buffer; JSON and log lines are rate-limited for them.
    fn is_chatty(self) -> bool {
        matches!(
            self,
            Stage::Write | Stage::Verify | Stage::Decode | Stage::Download | Stage::Decompress
        )
    }

    fn name(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Decode => "decode",
            Stage::Write => "write",
            Stage::Verify => "verify",
            Stage::Done => "done",
            Stage::Download => "download",
            Stage::Decompress => "decompress",
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
        self.report(stage, target, bytes, total, false)
    }

    /// `emit`, where `last` reports even a chatty stage now (its first or final count).
    fn report(&self, stage: Stage, target: &Path, bytes: u64, total: Option<u64>, last: bool) {
        let total = total.or(self.total);
        let key = (target.display().to_string(), stage.name());
        match self.mode {
            ProgressMode::None => {}
            ProgressMode::Json => {
                // Rate-limit the chatty stages; always report stage boundaries.
                if stage.is_chatty() && !last && !self.due(&key, 200) {
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
                    // A download without a Content-Length has no end to draw: a spinner.
                    let b = match total {
                        Some(t) => styled(
                            self.multi.add(ProgressBar::new(t)),
                            "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        ),
                        None => styled(
                            self.multi.add(ProgressBar::new_spinner()),
                            "{msg:>24} {spinner} {bytes} {bytes_per_sec}",
                        ),
                    };
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
                    // A task's first report is its start, not news for a log.
                    if last && bytes == 0 {
                        return;
                    }
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

    /// Completes every bar drawn so far (a task's bar stays, full, above what follows).
    fn finish_bars(&self) {
        for b in self.bars.lock().expect("bars lock").values() {
            b.finish();
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
