//! The black-box integration suite: the real gateway on port 0 in front of a fake OpenAI that counts and
//! records every call. One binary, one module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "integration tests fail by panicking")]

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod auth;
mod cache;
mod edits;
mod errors;
mod generations;
mod ledger;
mod models;
mod pools;
mod process;
mod rate_limits;
mod rate_limits_redis;
mod redis_backend;
mod rehost;
mod sdk;
mod streaming;
mod validation;
