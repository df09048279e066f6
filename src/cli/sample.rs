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
