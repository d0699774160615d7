//! The response cache's byte bound against the process's real memory (RSS from `/proc/self/status`), with
//! entries shaped like real ones: a re-hosted DALL·E answer of about 1.1 KB and the four headers an answer
//! keeps. Each measurement runs in a fresh child process (this test binary run again with
//! `IMAGEGATE_CACHE_MEMORY` set), so memory an earlier phase freed cannot hide growth:
//!
//! - `calibrate`: 20,000 entries in an unbounded cache; the RSS growth per entry must stay between
//!   [`MIN_RATIO`] and [`MAX_RATIO`] of `Answer::weight` (this is how `cache::ENTRY_OVERHEAD` was measured:
//!   0.96 to 1.04 over several runs on glibc; the constants before it counted 0.82 of the real memory);
//! - `bound`: 16 MiB bound, 64,000 distinct entries (about nine times the bound); RSS growth must stay
//!   within [`FACTOR`] of the bound plus [`SLACK`] (measured: 1.02 to 1.12, the rest being the allocator's
//!   reuse of evicted entries' memory).
//!
//! Run with `--nocapture` to see the figures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests fail by panicking")]
#![allow(clippy::print_stdout, reason = "the child reports its measurement on stdout")]

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use imagegate::cache::{Answer, Directive, Fetched, Lookup, ResponseCache};
use imagegate::config::CacheSettings;
use sha2::{Digest as _, Sha256};

const PHASE: &str = "IMAGEGATE_CACHE_MEMORY";
/// An entry's real memory over its weight: undercounting more than this breaks the bound…
const MAX_RATIO: f64 = 1.10;
/// …and overcounting more than this wastes the memory given to the cache.
const MIN_RATIO: f64 = 0.85;
/// Real memory may exceed the configured bound by at most this factor (plus [`SLACK`]).
const FACTOR: f64 = 1.20;
/// Allowance for the allocator's and the runtime's own bookkeeping, independent of the bound.
const SLACK: u64 = 1 << 20;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A re-hosted DALL·E 3 answer as the cache holds it: one imagegate link and a revised prompt, ~1.1 KB.
fn answer(i: u64) -> Answer {
    let id = hex::encode(&Sha256::digest(i.to_be_bytes())[..16]);
    let signature = hex::encode(&Sha256::digest(id.as_bytes())[..22]);
    let prompt = format!("A detailed, vivid rendering of: request {i} ").repeat(18);
    let body = serde_json::json!({
        "created": 1_760_000_000u64 + i,
        "data": [{
            "url": format!("https://images.example.com/v1/images/files/{id}.png?expires=1762592000&signature={signature}"),
            "revised_prompt": prompt,
        }],
    });
    let headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("openai-version".to_owned(), "2020-10-01".to_owned()),
        ("openai-processing-ms".to_owned(), format!("{}", 5000 + i % 4000)),
        ("x-upstream-request-id".to_owned(), format!("req_{id}")),
    ];
    let body = serde_json::to_vec(&body).unwrap();
    // As `Answer::from_reply` makes it: a copy of exactly the body's size.
    Answer { status: 200, headers, body: Bytes::copy_from_slice(&body), images: Some(1) }
}

fn lookup(i: u64) -> Lookup {
    Lookup {
        key: Sha256::digest(format!("key {i}")).into(),
        ttl: Duration::from_secs(3600),
        link_margin: Duration::ZERO,
        directive: Directive::Normal,
    }
}

async fn fill(cache: &ResponseCache, entries: u64) {
    for i in 0..entries {
        let answer = answer(i);
        let (served, _) = cache
            .get_or_fetch(&lookup(i), async move { Ok(Fetched { answer, store_for: Ok(Duration::from_secs(3600)) }) })
            .await;
        assert!(served.is_ok());
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn settings(max_bytes: u64) -> CacheSettings {
    CacheSettings {
        enabled: true,
        max_bytes: bytesize::ByteSize(max_bytes),
        max_entry_bytes: bytesize::ByteSize(1 << 20),
        ..CacheSettings::default()
    }
}

/// Child: bytes of real memory per entry, and the weight the bound counts for it.
fn calibrate() {
    const ENTRIES: u64 = 20_000;
    runtime().block_on(async {
        let cache = ResponseCache::new(&settings(1 << 40), None);
        let before = rss();
        fill(&cache, ENTRIES).await;
        let stats = cache.stats().await;
        let grown = rss().saturating_sub(before);
        assert_eq!(stats.entries, ENTRIES);
        let sample = answer(ENTRIES / 2);
        let payload = sample.body.len() + sample.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        println!(
            "MEASURED real_per_entry={} weight_per_entry={} payload_per_entry={}",
            grown / ENTRIES,
            stats.bytes / ENTRIES,
            payload
        );
    });
}

/// Child: real memory grown while filling a 16 MiB cache with four times that, and its final weight.
fn bound() {
    const MAX: u64 = 16 << 20;
    runtime().block_on(async {
        let cache = ResponseCache::new(&settings(MAX), None);
        let before = rss();
        fill(&cache, 64_000).await;
        let stats = cache.stats().await;
        assert!(stats.bytes <= MAX && stats.evictions > 0, "{stats:?}");
        println!(
            "MEASURED grown={} max_bytes={MAX} bytes={} entries={}",
            rss().saturating_sub(before),
            stats.bytes,
            stats.entries
        );
    });
}

/// Run this binary again with `phase` and return the numbers it measured.
fn measure(phase: &str) -> std::collections::HashMap<String, u64> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "the_byte_bound_holds_in_real_memory", "--nocapture", "--test-threads=1"])
        .env(PHASE, phase)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{phase}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find_map(|l| l.split_once("MEASURED ")).map(|(_, m)| m.to_owned()).unwrap();
    println!("{phase}: {line}");
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

#[test]
fn the_byte_bound_holds_in_real_memory() {
    match std::env::var(PHASE).as_deref() {
        Ok("calibrate") => return calibrate(),
        Ok("bound") => return bound(),
        _ => {}
    }
    let calibrated = measure("calibrate");
    let (real, weight) = (calibrated["real_per_entry"] as f64, calibrated["weight_per_entry"] as f64);
    println!("real memory per entry / weight = {:.2}", real / weight);
    let bounded = measure("bound");
    let (grown, max) = (bounded["grown"], bounded["max_bytes"]);
    println!("real memory grown / max_bytes = {:.2}", grown as f64 / max as f64);
    let ratio = real / weight;
    assert!((MIN_RATIO..=MAX_RATIO).contains(&ratio), "an entry takes {real} bytes but weighs {weight}");
    assert!(
        grown as f64 <= max as f64 * FACTOR + SLACK as f64,
        "filling a {max}-byte cache grew the process by {grown} bytes"
    );
}
