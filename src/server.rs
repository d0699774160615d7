//! HTTP plumbing: the global layer stack (`layers`) and shutdown signals (`shutdown`).

pub mod layers;
pub mod shutdown;
