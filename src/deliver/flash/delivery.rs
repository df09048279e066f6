//! The seam every `kiln flash` goes through, whatever receives the bytes: a `Delivery` is one
//! image on its way to its destinations — disks and files through the commit-last write loop
//! (`jobs.rs`), a phone through fastboot (`phones.rs`) — and `carry_out` is the order they all
//! keep: every refusal of every delivery first, one question, every destination opened, then the
//! writes (each delivery in its own thread; one failing does not stop the others), one result per
//! destination and the summary.
//!
//! Two levels, on purpose: `target::FlashTarget` is positioned writes, a flush and positioned
//! reads, which commit-last and the read-back need, and a block device, a file and the in-memory
//! test target have them. fastboot has none of them (the bootloader places and commits the bytes,
//! and nothing can be read back), so a phone is a `Delivery` of its own instead of a
//! `FlashTarget` whose methods would be pretence. Tests drive `carry_out` with in-memory
//! deliveries.

use anyhow::{Result, bail};

use super::confirm::confirm;
use super::{Outcome, summary};
use crate::io::progress::{Events, ProgressMode};

/// One image going to its destinations.
pub trait Delivery: Send {
    /// Everything that forbids this delivery, found without writing anything (empty: go ahead).
    /// Takes `&mut self` so that what was found (the phone, say) is kept for the write.
    fn refusals(&mut self) -> Vec<String>;
    /// The question's lines: what goes where.
    fn describe(&self) -> Vec<String>;
    /// Partitions the question must say will be unmounted first, as (partition, mount point).
    fn mounted(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// After the yes: opens the destinations, checking they are still the ones confirmed. An
    /// error here stops the whole run before any byte is written anywhere.
    fn open(&mut self) -> Result<()> {
        Ok(())
    }
    /// Writes (and reads back where the destination allows): one outcome per destination.
    fn deliver(self: Box<Self>, progress: ProgressMode) -> Vec<Outcome>;
}

/// What loses its contents, for the question: "disks", "partitions".
pub fn carry_out(
    mut deliveries: Vec<Box<dyn Delivery>>,
    yes: bool,
    noun: &str,
    progress: ProgressMode,
) -> Result<()> {
    let problems: Vec<String> = deliveries.iter_mut().flat_map(|d| d.refusals()).collect();
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    let lines: Vec<String> = deliveries.iter().flat_map(|d| d.describe()).collect();
    let mounted: Vec<(String, String)> = deliveries.iter().flat_map(|d| d.mounted()).collect();
    confirm(yes, &lines, &mounted, noun)?;
    for d in &mut deliveries {
        d.open()?;
    }
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = deliveries
            .into_iter()
            .map(|d| scope.spawn(move || d.deliver(progress)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("delivery thread panicked"))
            .collect()
    });
    let events = Events::new(progress, None);
    for o in &outcomes {
        let result = match &o.result {
            Ok(d) => Ok((d.written, d.verified)),
            Err(e) => Err(e.as_str()),
        };
        events.result(&o.path, result);
    }
    summary(&outcomes)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::deliver::flash::Done;

    /// A delivery that records what `carry_out` asked of it, and fails where told to.
    struct Fake {
        name: &'static str,
        refuse: Option<&'static str>,
        fail_open: bool,
        fail_write: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Fake {
        fn new(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> Fake {
            Fake {
                name,
                refuse: None,
                fail_open: false,
                fail_write: false,
                log: log.clone(),
            }
        }
        fn note(&self, what: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{what} {}", self.name));
        }
    }

    impl Delivery for Fake {
        fn refusals(&mut self) -> Vec<String> {
            self.note("check");
            self.refuse.map(String::from).into_iter().collect()
        }
        fn describe(&self) -> Vec<String> {
            vec![format!("  image → {}", self.name)]
        }
        fn open(&mut self) -> Result<()> {
            self.note("open");
            if self.fail_open {
                bail!("{} changed since it was confirmed", self.name);
            }
            Ok(())
        }
        fn deliver(self: Box<Self>, _: ProgressMode) -> Vec<Outcome> {
            self.note("write");
            let result = if self.fail_write {
                Err("EIO".to_string())
            } else {
                Ok(Done {
                    written: 1,
                    verified: true,
                    seconds: 0.0,
                    detail: None,
                })
            };
            vec![Outcome {
                path: PathBuf::from(self.name),
                result,
            }]
        }
    }

    fn writes(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        let mut w: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("write"))
            .cloned()
            .collect();
        w.sort();
        w
    }

    #[test]
    fn one_refusal_stops_every_delivery_before_any_write() {
        let log = Arc::default();
        let mut b = Fake::new("b", &log);
        b.refuse = Some("refusing b: it holds /");
        let all: Vec<Box<dyn Delivery>> = vec![Box::new(Fake::new("a", &log)), Box::new(b)];
        let e = carry_out(all, true, "disks", ProgressMode::None).unwrap_err();
        assert!(e.to_string().contains("holds /"), "{e}");
        let log = log.lock().unwrap();
        assert_eq!(
            *log,
            ["check a", "check b"],
            "every delivery checked, none opened"
        );
    }

    #[test]
    fn a_destination_that_changed_after_the_question_stops_all_before_writing() {
        let log = Arc::default();
        let mut b = Fake::new("b", &log);
        b.fail_open = true;
        let all: Vec<Box<dyn Delivery>> = vec![Box::new(Fake::new("a", &log)), Box::new(b)];
        let e = carry_out(all, true, "disks", ProgressMode::None).unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
        assert!(writes(&log).is_empty());
    }

    #[test]
    fn one_failing_delivery_does_not_stop_the_others_and_fails_the_run() {
        let log = Arc::default();
        let mut b = Fake::new("b", &log);
        b.fail_write = true;
        let all: Vec<Box<dyn Delivery>> = vec![
            Box::new(Fake::new("a", &log)),
            Box::new(b),
            Box::new(Fake::new("c", &log)),
        ];
        let e = carry_out(all, true, "disks", ProgressMode::None).unwrap_err();
        assert!(e.to_string().contains("1 of 3"), "{e}");
        assert_eq!(writes(&log), ["write a", "write b", "write c"]);
    }
}
