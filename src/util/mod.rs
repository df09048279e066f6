//! Small helpers shared by every stage.

pub mod cmd;
pub mod fsutil;
