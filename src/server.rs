//! HTTP plumbing: the global layer stack (`layers`), the tenant authentication layer of the image routes
//! (`auth`) and shutdown signals (`shutdown`).

pub mod auth;
pub mod layers;
pub mod shutdown;
