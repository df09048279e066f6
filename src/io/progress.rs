//! Progress reporting: a bar on a terminal, a plain line every few seconds otherwise, so logs in
//! CI stay readable. Stages report through this; they never print bars themselves.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

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
            b.set_style(
                ProgressStyle::with_template(style)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
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
