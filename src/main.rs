//! The `kiln` binary: parse the command line and dispatch to one handler per verb.

mod cli;

use clap::Parser;

/// The exit status of a Unix tool killed by SIGPIPE (128 + 13), what a shell sees from
/// `cat big | head -1`.
const BROKEN_PIPE_STATUS: i32 = 141;

fn main() {
    end_quietly_on_a_closed_stdout();
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

/// `kiln check | head -1` closes kiln's stdout early. Rust ignores SIGPIPE (so a closed socket or
/// a child's closed stdin is an error kiln can report, not a silent death), which makes `print!`
/// panic on EPIPE instead; a reader that stopped reading is not kiln's failure, so kiln ends the
/// way Unix tools do there: quietly, with SIGPIPE's status.
fn end_quietly_on_a_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        default(info)
    }));
}
