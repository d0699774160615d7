//! The generic cell rate algorithm over several buckets at once, as pure functions of "now": a request is
//! checked against every bucket and reserved in all of them or in none. `limits::local` runs it under a
//! mutex per tenant; `limits/reserve.lua` is the same arithmetic inside Redis, on Redis' clock.
//!
//! A bucket of `limit` per `period` refills one unit every `period / limit` and holds at most `burst` units
//! (by default `limit`: a quiet tenant may spend its whole minute at once). Its state is one number, the
//! theoretical arrival time (TAT); a demand of `n` units fits when `TAT + n·T − burst·T ≤ now`. Giving `k`
//! units back moves the TAT back by `k·T`, never below now (a bucket cannot hold more than its burst).
//!
//! Times are integer milliseconds on a clock that never goes back (the local backend's monotonic clock,
//! Redis' `TIME`), so the arithmetic here and in the Lua scripts is identical to the millisecond.

/// One bucket's configuration, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Units per period.
    pub limit: u64,
    pub period_ms: u64,
    /// Units that may be spent at once; at least 1.
    pub burst: u64,
}

impl Bucket {
    /// `limit` per minute with a burst of `burst` (default: `limit`).
    pub fn per_minute(limit: u32, burst: Option<u32>) -> Self {
        Self { limit: u64::from(limit), period_ms: 60_000, burst: u64::from(burst.unwrap_or(limit)).max(1) }
    }

    /// Milliseconds to earn one unit.
    pub fn interval(&self) -> u64 {
        (self.period_ms / self.limit.max(1)).max(1)
    }
}

/// What a bucket says about a demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The bucket's new TAT if the demand is granted.
    pub new_tat: u64,
    /// Units left after the demand (or now, if refused).
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
    /// `None` when the demand fits; otherwise how long until it would (`u64::MAX`: never, demand > burst).
    pub retry_after_ms: Option<u64>,
}

/// Check `n` units against a bucket whose TAT is `tat` (0 for a fresh bucket).
pub fn check(bucket: Bucket, tat: u64, now: u64, n: u64) -> Verdict {
    let t = bucket.interval();
    let tat = tat.max(now);
    let capacity = bucket.burst.saturating_mul(t);
    let new_tat = tat.saturating_add(n.saturating_mul(t));
    let allow_at = new_tat.saturating_sub(capacity);
    if n > bucket.burst {
        return Verdict {
            new_tat: tat,
            remaining: left(tat, now, capacity, t),
            reset_ms: tat - now,
            retry_after_ms: Some(u64::MAX),
        };
    }
    if allow_at <= now {
        Verdict { new_tat, remaining: left(new_tat, now, capacity, t), reset_ms: new_tat - now, retry_after_ms: None }
    } else {
        Verdict {
            new_tat: tat,
            remaining: left(tat, now, capacity, t),
            reset_ms: tat - now,
            retry_after_ms: Some(allow_at - now),
        }
    }
}

/// The TAT after giving `cells` units back to a bucket whose TAT is `tat`: earlier by their emission
/// interval, never earlier than `now`.
pub fn give_back(bucket: Bucket, tat: u64, now: u64, cells: u64) -> u64 {
    tat.saturating_sub(cells.saturating_mul(bucket.interval())).max(now)
}

/// Units that could be spent now at a given TAT.
fn left(tat: u64, now: u64, capacity: u64, t: u64) -> u64 {
    now.saturating_add(capacity).saturating_sub(tat) / t
}

/// Check several buckets; the demand is granted only if every bucket grants it. Returns each verdict (with
/// `new_tat` to store only when all were granted).
pub fn check_all(buckets: &[(Bucket, u64, u64)], now: u64) -> (bool, Vec<Verdict>) {
    let verdicts: Vec<Verdict> = buckets.iter().map(|(b, tat, n)| check(*b, *tat, now, *n)).collect();
    let granted = verdicts.iter().all(|v| v.retry_after_ms.is_none());
    if granted {
        (true, verdicts)
    } else {
        // Refused: report every bucket as it stands, unchanged.
        let unchanged = buckets
            .iter()
            .zip(&verdicts)
            .map(|((b, tat, _), v)| if v.retry_after_ms.is_none() { check(*b, *tat, now, 0) } else { *v })
            .map(|v| Verdict { retry_after_ms: v.retry_after_ms, ..v })
            .collect();
        (false, unchanged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_bucket_allows_exactly_its_burst_then_one_per_interval() {
        let b = Bucket::per_minute(60, None);
        let mut tat = 0;
        let now = 1_000_000;
        for i in 0..60 {
            let v = check(b, tat, now, 1);
            assert_eq!(v.retry_after_ms, None, "request {i}");
            assert_eq!(v.remaining, 59 - i);
            tat = v.new_tat;
        }
        let refused = check(b, tat, now, 1);
        assert_eq!(refused.retry_after_ms, Some(1000));
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_ms, 60_000);
        assert_eq!(check(b, tat, now + 999, 1).retry_after_ms, Some(1));
        let later = check(b, tat, now + 1000, 1);
        assert_eq!(later.retry_after_ms, None);
        assert_eq!(check(b, later.new_tat, now + 1000, 1).retry_after_ms, Some(1000));
    }

    #[test]
    fn weighted_demands_spend_n_units() {
        let b = Bucket::per_minute(10, None);
        let v = check(b, 0, 0, 4);
        assert_eq!((v.retry_after_ms, v.remaining), (None, 6));
        let v = check(b, v.new_tat, 0, 4);
        assert_eq!((v.retry_after_ms, v.remaining), (None, 2));
        let refused = check(b, v.new_tat, 0, 4);
        assert_eq!(refused.retry_after_ms, Some(12_000), "two more units take 2 × 6 s");
        assert_eq!(check(b, v.new_tat, 0, 11).retry_after_ms, Some(u64::MAX), "more than the burst never fits");
    }

    #[test]
    fn giving_back_moves_the_tat_back_but_never_below_now() {
        let b = Bucket::per_minute(10, None); // one unit every 6 s
        let now = 1_000_000;
        let v = check(b, 0, now, 4);
        assert_eq!(v.remaining, 6);
        let tat = give_back(b, v.new_tat, now, 3);
        assert_eq!(tat, now + 6_000, "three of the four units came back");
        assert_eq!(check(b, tat, now, 0).remaining, 9);
        assert_eq!(give_back(b, tat, now, 5), now, "a bucket never holds more than its burst");
        assert_eq!(check(b, give_back(b, tat, now, 5), now, 0).remaining, 10);
        // Later, the refilled part cannot be given back twice.
        assert_eq!(give_back(b, v.new_tat, now + 20_000, 4), now + 20_000);
    }

    #[test]
    fn a_refusal_in_one_bucket_spends_nothing_in_the_others() {
        let requests = Bucket::per_minute(100, None);
        let images = Bucket::per_minute(4, None);
        let (ok, v) = check_all(&[(requests, 0, 1), (images, 0, 4)], 0);
        assert!(ok);
        let (req_tat, img_tat) = (v[0].new_tat, v[1].new_tat);
        let (ok, v) = check_all(&[(requests, req_tat, 1), (images, img_tat, 1)], 0);
        assert!(!ok);
        assert_eq!(v[0].new_tat, req_tat, "the request bucket is untouched");
        assert_eq!(v[0].remaining, 99);
        assert!(v[1].retry_after_ms.is_some());
    }
}
