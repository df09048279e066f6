//! Ejecting a card after a successful write, so the reader drops it and the user may pull it
//! (what `diskutil eject` does on macOS, and what Raspberry Pi Imager and Etcher do).

use std::path::Path;
use std::process::Command;

use crate::util::cmd;

use super::BlockDevice;

/// Whether a written disk should be ejected: media a user pulls out (USB readers and sticks, SD
/// slots) — never loop devices or fixed disks, which have nothing to eject.
pub fn wanted(dev: &BlockDevice, no_eject: bool) -> bool {
    !no_eject
        && !matches!(dev.bus.as_str(), "loop" | "disk-image")
        && (dev.removable || dev.bus == "usb" || dev.bus == "sd/mmc")
}

/// Ejects `dev` with util-linux's `eject` (SCSI START STOP UNIT for USB readers; an SD slot on
/// the mmc bus has no eject and is only synced, which the write already did), or on macOS with
/// `diskutil eject`. Returns what to
/// tell the user.
pub fn eject(dev: &Path) -> String {
    // macOS: `diskutil eject` unmounts what the OS mounted after the write and powers the slot.
    #[cfg(target_os = "macos")]
    let out = cmd::output(Command::new("diskutil").arg("eject").arg(dev), "diskutil");
    #[cfg(not(target_os = "macos"))]
    let out = cmd::output(Command::new("eject").arg(dev), "eject");
    match out {
        Ok(o) if o.status.success() => format!("ejected {}: safe to remove", dev.display()),
        Ok(o) => format!(
            "written and flushed; {} could not be ejected ({}), remove it when its light is off",
            dev.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(_) => format!(
            "written and flushed; `eject` (util-linux) is not installed, so {} stays attached",
            dev.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(bus: &str, removable: bool) -> BlockDevice {
        BlockDevice {
            bus: bus.into(),
            removable,
            ..crate::blockdev::card()
        }
    }

    #[test]
    fn cards_and_sticks_are_ejected_loops_and_fixed_disks_are_not() {
        assert!(wanted(&disk("usb", true), false));
        assert!(wanted(&disk("usb", false), false)); // USB SSDs report removable=0
        assert!(wanted(&disk("sd/mmc", false), false));
        assert!(!wanted(&disk("usb", true), true)); // --no-eject
        assert!(!wanted(&disk("loop", false), false));
        assert!(!wanted(&disk("sata", false), false));
        assert!(!wanted(&disk("nvme", false), false));
    }
}
