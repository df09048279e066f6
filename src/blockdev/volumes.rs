//! Getting a disk's volumes out of the way on macOS, where they do not stay away: Spotlight or
//! Finder can hold a volume through one `diskutil unmountDisk`, and macOS mounts a card's volumes
//! again as soon as the writer closes it (Raspberry Pi Imager waits 1 s after closing, etcher
//! 2 s, before they unmount and eject). So: unmount with `force` and retries until nothing of the
//! disk is mounted, right before opening it; and after the write, with every descriptor closed,
//! wait, unmount again and only then eject.
//!
//! The steps run against the small `Volumes` trait: `diskutil` on a Mac (`diskutil.rs`), a
//! simulated Mac in the tests.

use std::time::Duration;

use anyhow::{Result, bail};

/// What kiln needs of the system's volume handling.
pub trait Volumes {
    /// Mount points of every volume of `disk` (`/dev/disk4`) now.
    fn mounted(&self, disk: &str) -> Result<Vec<String>>;
    /// Unmounts every volume of `disk`, even ones in use (`diskutil unmountDisk force`).
    fn unmount_disk(&self, disk: &str) -> Result<()>;
    /// Ejects the medium (`diskutil eject`).
    fn eject(&self, disk: &str) -> Result<()>;
    /// Waits; the simulated Mac only counts.
    fn pause(&self, how_long: Duration);
}

/// Forced unmounts tried before giving up.
pub const ATTEMPTS: u32 = 5;
/// How long macOS gets to re-mount a card after its writer closed it.
pub const SETTLE: Duration = Duration::from_millis(1500);

/// Unmounts `disk` until nothing of it is mounted; fails naming what stays mounted.
pub fn unmount_until_clear(v: &impl Volumes, disk: &str) -> Result<()> {
    let mut last_error = None;
    for attempt in 1..=ATTEMPTS {
        if v.mounted(disk)?.is_empty() {
            return Ok(());
        }
        if let Err(e) = v.unmount_disk(disk) {
            last_error = Some(format!("{e:#}"));
        }
        v.pause(Duration::from_millis(250 * u64::from(attempt)));
    }
    let still = v.mounted(disk)?;
    if still.is_empty() {
        return Ok(());
    }
    bail!(
        "{disk} is still mounted ({}) after {ATTEMPTS} forced unmounts{}; quit what uses it and run again",
        still.join(", "),
        last_error
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    )
}

/// Ejects `disk` after a write whose descriptors are all closed: waits for the re-mount macOS
/// does on close, unmounts again, ejects. Returns what to tell the user.
pub fn eject_after_close(v: &impl Volumes, disk: &str) -> String {
    v.pause(SETTLE);
    if let Err(e) = unmount_until_clear(v, disk) {
        return format!("written and flushed, but not ejected: {e:#}");
    }
    match v.eject(disk) {
        Ok(()) => format!("ejected {disk}: safe to remove"),
        Err(e) => format!(
            "written and flushed; {disk} could not be ejected ({e:#}), remove it when its light is off"
        ),
    }
}

#[cfg(test)]
pub(crate) mod simulated {
    //! A Mac's volume handling in memory: a volume that comes back when the writer closes the
    //! disk, and unmounts that fail while a program holds the volume.

    use std::cell::{Cell, RefCell};

    use super::*;

    #[derive(Default)]
    pub struct SimulatedMac {
        /// The card's volume is mounted.
        pub mounted: Cell<bool>,
        /// This many `unmountDisk force` calls fail first (Spotlight indexing the volume).
        pub busy_unmounts: Cell<u32>,
        /// The volume never lets go (a shell sitting in it that even force cannot move).
        pub stuck: bool,
        /// The volume comes back at the next pause (macOS re-mounting after the writer closed).
        pub remount_on_pause: Cell<bool>,
        pub log: RefCell<Vec<String>>,
    }

    impl Volumes for SimulatedMac {
        fn mounted(&self, _disk: &str) -> Result<Vec<String>> {
            Ok(if self.mounted.get() {
                vec!["/Volumes/NO NAME".into()]
            } else {
                vec![]
            })
        }
        fn unmount_disk(&self, disk: &str) -> Result<()> {
            self.log
                .borrow_mut()
                .push(format!("unmountDisk force {disk}"));
            if self.stuck || self.busy_unmounts.get() > 0 {
                self.busy_unmounts
                    .set(self.busy_unmounts.get().saturating_sub(1));
                bail!("Unmount of {disk} failed: at least one volume could not be unmounted");
            }
            self.mounted.set(false);
            Ok(())
        }
        fn eject(&self, disk: &str) -> Result<()> {
            if self.mounted.get() {
                bail!("{disk} has a mounted volume");
            }
            self.log.borrow_mut().push(format!("eject {disk}"));
            Ok(())
        }
        fn pause(&self, how_long: Duration) {
            self.log
                .borrow_mut()
                .push(format!("pause {}ms", how_long.as_millis()));
            if self.remount_on_pause.replace(false) {
                self.mounted.set(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::simulated::SimulatedMac;
    use super::*;

    #[test]
    fn the_remount_after_close_is_waited_for_unmounted_and_then_ejected() {
        let mac = SimulatedMac {
            remount_on_pause: true.into(),
            ..Default::default()
        };
        let said = eject_after_close(&mac, "/dev/disk4");
        assert_eq!(said, "ejected /dev/disk4: safe to remove");
        assert_eq!(
            *mac.log.borrow(),
            [
                "pause 1500ms",
                "unmountDisk force /dev/disk4",
                "pause 250ms",
                "eject /dev/disk4"
            ]
        );
        assert!(!mac.mounted.get());
    }

    #[test]
    fn a_busy_volume_is_retried_and_a_stuck_one_named() {
        let mac = SimulatedMac {
            mounted: true.into(),
            busy_unmounts: 2.into(),
            ..Default::default()
        };
        unmount_until_clear(&mac, "/dev/disk4").unwrap();
        assert_eq!(
            mac.log
                .borrow()
                .iter()
                .filter(|l| l.starts_with("unmountDisk"))
                .count(),
            3
        );
        let stuck = SimulatedMac {
            mounted: true.into(),
            stuck: true,
            ..Default::default()
        };
        let e = unmount_until_clear(&stuck, "/dev/disk4")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("still mounted (/Volumes/NO NAME) after 5 forced unmounts"),
            "{e}"
        );
        let said = eject_after_close(&stuck, "/dev/disk4");
        assert!(
            said.starts_with("written and flushed, but not ejected"),
            "{said}"
        );
    }

    #[test]
    fn nothing_mounted_means_nothing_to_do() {
        let mac = SimulatedMac::default();
        unmount_until_clear(&mac, "/dev/disk4").unwrap();
        assert!(mac.log.borrow().is_empty());
    }
}
