//! `kiln devices`: the disks kiln could write to, with what would stop it.

use anyhow::Result;

use kiln::blockdev;

pub fn run(all: bool, json: bool) -> Result<()> {
    let devices: Vec<_> = blockdev::list()?
        .into_iter()
        .filter(|d| all || d.removable)
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    if devices.is_empty() {
        println!(
            "no removable disks found{}",
            if all { "" } else { " (--all lists every disk)" }
        );
        return Ok(());
    }
    println!(
        "{:<14} {:>10}  {:<8} {:<24} {:<16} mounted",
        "path", "size", "bus", "model", "serial"
    );
    for d in devices {
        let mounts: Vec<String> = d
            .all_mountpoints()
            .into_iter()
            .map(|(p, m)| format!("{p} on {m}"))
            .collect();
        println!(
            "{:<14} {:>10}  {:<8} {:<24} {:<16} {}",
            d.path,
            blockdev::human_size(d.size),
            d.bus,
            if d.model.is_empty() { "-" } else { &d.model },
            d.serial.as_deref().unwrap_or("-"),
            if mounts.is_empty() {
                "-".to_string()
            } else {
                mounts.join(", ")
            }
        );
        let problems = blockdev::refusals(&d, None, false, None);
        for p in problems {
            println!("{:<14} kiln will not write it: {p}", "");
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}
