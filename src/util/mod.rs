//! Small helpers shared by every stage and layer: the content-addressed cache, running external
//! tools, files and inputs, and the user behind sudo.

pub mod cache;
pub mod cmd;
pub mod diskfull;
pub mod epoch;
pub mod fsutil;
pub mod input;
pub mod sudo;
