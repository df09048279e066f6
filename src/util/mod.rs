//! Small helpers shared by every stage.

pub mod cache;
pub mod cmd;
pub mod diskfull;
pub mod fsutil;
pub mod input;
