//! `kiln completions` and `kiln manpage`, generated from the clap definitions.

use anyhow::Result;
use clap::CommandFactory;

use super::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
    Ok(())
}

pub fn manpage() -> Result<()> {
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}
