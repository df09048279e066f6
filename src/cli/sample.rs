//! `kiln sample`: write the built-in sample base image for a profile.

use std::path::Path;

use anyhow::Result;

pub fn run(profile: &str, output: &Path) -> Result<()> {
    let (p, _) = kiln::plan::profile::load(
        profile,
        &kiln::plan::resolve::search_dirs(Path::new("."), "images"),
    )?;
    kiln::base::sample::make(&p, output)?;
    println!(
        "{}: sample base with the {} layout",
        output.display(),
        p.name
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image profile.
    #[arg(long, default_value = "hypriot-rpi")]
    pub profile: String,
    /// Where to write the image.
    pub output: std::path::PathBuf,
}
