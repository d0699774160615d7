//! HTTP plumbing: the global layer stack (`layers`), the access log and request metrics (`access`), and
//! shutdown signals (`shutdown`).

pub mod access;
pub mod layers;
pub mod shutdown;
