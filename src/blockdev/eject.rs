//! Ejecting a card after a successful write and after its descriptors are closed, so the reader
//! drops it and the user may pull it (what Raspberry Pi Imager and Etcher do). On macOS the
//! wait, unmount and `diskutil eject` are `volumes::eject_after_close`.

#[cfg(not(target_os = "macos"))]
use std::path::Path;
#[cfg(not(target_os = "macos"))]
use std::process::Command;

#[cfg(not(target_os = "macos"))]
use crate::util::cmd;

use super::BlockDevice;

/// Whether a written disk should be ejected: media a user pulls out (USB readers and sticks, SD
/// slots) — never loop devices or fixed disks, which have nothing to eject.
pub fn wanted(dev: &BlockDevice, no_eject: bool) -> bool {
    !no_eject
        && !matches!(dev.bus.as_str(), "loop" | "disk-image")
        && (dev.removable || dev.bus == "usb" || dev.bus == "sd/mmc")
}

/// Ejects a written disk once the writer has closed every descriptor of it (macOS re-mounts a
/// card on close, so ejecting while it is open only races that). Returns what to tell the user.
pub fn eject_closed(dev: &BlockDevice) -> String {
    #[cfg(target_os = "macos")]
    return super::volumes::eject_after_close(&super::diskutil::Diskutil, &dev.path);
    #[cfg(not(target_os = "macos"))]
    eject(Path::new(&dev.path))
}

/// Ejects `dev` with util-linux's `eject` (SCSI START STOP UNIT for USB readers; an SD slot on
/// the mmc bus has no eject and is only synced, which the write already did).
#[cfg(not(target_os = "macos"))]
fn eject(dev: &Path) -> String {
    match cmd::output(Command::new("eject").arg(dev), "eject") {
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
