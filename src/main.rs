//! The `kiln` binary: parse the command line and dispatch to one handler per verb.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        // Other verbs than build: where the cache stands, but no promise about their temporaries.
        let cache = kiln::base::cache::Cache::location().unwrap_or_default();
        if let Some(h) = kiln::util::diskfull::hint(&e, &[("cache", &cache)], false) {
            eprintln!("hint: {h}");
        }
        std::process::exit(1);
    }
}
