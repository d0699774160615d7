//! The cache's counters and the snapshot `GET /admin/v1/cache` shows.

use super::*;

/// Counters, for `GET /admin/v1/cache`.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) bypasses: AtomicU64,
    pub(super) coalesced: AtomicU64,
    pub(super) stores: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) shared_hits: AtomicU64,
    pub(super) shared_errors: AtomicU64,
    pub(super) shared_skipped: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a Redis failure (`Unavailable`: not asked, the circuit is open).
    pub(super) fn shared_failed(&self, error: &SharedError, doing: &'static str) {
        if matches!(error, SharedError::Unavailable) {
            Self::add(&self.shared_skipped);
        } else {
            Self::add(&self.shared_errors);
            tracing::warn!(error = %error, doing, "shared cache failed; going on without it");
        }
    }
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub enabled_by_default: bool,
    pub backend: &'static str,
    /// Requests answered from a stored entry (counted once the limits let them through).
    pub hits: u64,
    /// Requests whose own upstream call ran through the cache (`no-cache` refreshes included).
    pub misses: u64,
    pub bypasses: u64,
    /// Requests served by another identical request's upstream call, already in flight. Those given a stored
    /// answer also count in `hits`; those given an answer that was not stored (an error) count only here.
    pub coalesced: u64,
    pub stores: u64,
    /// Entries dropped to stay within `max_bytes` (expiries are not counted).
    pub evictions: u64,
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Answers found in Redis (and copied into this replica's memory).
    pub shared_hits: u64,
    /// Redis calls that failed or timed out.
    pub shared_errors: u64,
    /// Redis calls not made because Redis was down (the circuit was open).
    pub shared_skipped: u64,
    /// `up`, `connecting` or `down`; `null` without Redis.
    pub shared_state: Option<&'static str>,
}
