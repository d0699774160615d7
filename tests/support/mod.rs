//! Shared helpers for the integration tests. Each test binary uses only part of them, hence `dead_code` is allowed;
//! clippy's `allow-*-in-tests` settings cover only `#[test]` functions, not helpers, hence the panic-lint allowances.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod app;
pub mod fake_openai;
pub mod redis_proxy;
