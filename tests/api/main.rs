//! The black-box integration suite: the real gateway on port 0 in front of a fake OpenAI that counts and
//! records every call. One binary, one module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "integration tests fail by panicking")]

#[path = "../support/mod.rs"]
mod support;

mod access_log;
mod admin;
mod attribution;
mod auth;
mod cache;
mod connections;
mod console;
mod edits;
mod errors;
mod generations;
mod hostile_bodies;
mod ledger;
mod metrics;
mod models;
mod pools;
mod process;
mod rate_limits;
mod rate_limits_redis;
mod redis_backend;
mod rehost;
mod sdk;
mod streaming;
mod upstream_answers;
mod validation;
