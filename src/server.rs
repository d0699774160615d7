//! HTTP plumbing: connections (`conn`: accept loop, caps and timeouts), the global layer stack (`layers`), the
//! access log and request metrics (`access`), the tenant authentication layer of the image routes (`auth`) and
//! shutdown signals (`shutdown`).

pub mod access;
pub mod auth;
pub mod conn;
pub mod layers;
pub mod shutdown;
