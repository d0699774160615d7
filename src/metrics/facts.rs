//! What one request turned out to be (tenant, model, images, cache outcome, upstream latency), gathered while
//! it runs, for its access-log line and its request metrics.
//!
//! A task-local slot set by the access layer around the rest of the stack: the authentication layer, the
//! usage ledger and the upstream wrapper note what they know with [`note`]; outside a request (tests, background
//! tasks) noting does nothing. A task spawned on a request's behalf (the response cache's upstream call) takes
//! the slot along with [`carry`].

use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::future::Either;

/// What is known about one request so far.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    /// The model as the caller named it (the ledger's cleaned copy).
    pub model: Option<String>,
    /// Images returned to the caller.
    pub images: Option<u32>,
    pub cost_usd: Option<f64>,
    /// The upstream (deployment) that answered: `default` or the name of `[upstreams.<name>]`.
    pub upstream: Option<String>,
    /// How long the upstream took to answer (headers), in milliseconds.
    pub upstream_ms: Option<u64>,
    pub stream: bool,
}

/// One request's slot.
pub type Slot = Arc<Mutex<Facts>>;

tokio::task_local! {
    static FACTS: Slot;
}

/// Run `future` with `slot` as the request's facts.
///
/// Here and in [`carry`], the scope is returned as it is rather than awaited in an `async` block: such a block
/// keeps its argument and the scope it was moved into side by side, twice the future's size for as long as it
/// runs (a held request's call is kilobytes, docs/performance.md).
pub fn scope<F: Future>(slot: Slot, future: F) -> impl Future<Output = F::Output> {
    FACTS.scope(slot, future)
}

/// Note something about the current request; does nothing outside one.
pub fn note(f: impl FnOnce(&mut Facts)) {
    let _ = FACTS.try_with(|slot| {
        if let Ok(mut facts) = slot.lock() {
            f(&mut facts);
        }
    });
}

/// `future`, noting into the current request's slot (if any) wherever it runs.
pub fn carry<F: Future>(future: F) -> impl Future<Output = F::Output> {
    match FACTS.try_with(Arc::clone) {
        Ok(slot) => Either::Left(FACTS.scope(slot, future)),
        Err(_) => Either::Right(future),
    }
}

/// A copy of the facts in `slot`.
pub fn read(slot: &Slot) -> Facts {
    slot.lock().map(|f| f.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notes_reach_the_slot_inside_a_request_and_a_task_carried_from_it_but_not_outside() {
        note(|f| f.tenant = Some("nobody".into()));
        let slot = Slot::default();
        scope(slot.clone(), async {
            note(|f| f.tenant = Some("team-a".into()));
            let carried = tokio::spawn(carry(async { note(|f| f.images = Some(2)) }));
            carried.await.unwrap();
        })
        .await;
        let facts = read(&slot);
        assert_eq!(facts.tenant.as_deref(), Some("team-a"));
        assert_eq!(facts.images, Some(2));
    }
}
