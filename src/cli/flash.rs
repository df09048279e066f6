//! `kiln flash`: its flags are the library's `deliver::flash::Request` (defined there, once); the
//! library does the rest.

use anyhow::Result;

use kiln::deliver::flash::{self, Request};

pub type Args = Request;

pub fn run(a: Args) -> Result<()> {
    flash::run(&a)
}
