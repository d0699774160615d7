//! HTTP plumbing: connections (`conn`: accept loop, caps and timeouts), the global layer stack (`layers`) and
//! shutdown signals (`shutdown`).

pub mod conn;
pub mod layers;
pub mod shutdown;
