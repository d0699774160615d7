//! A granted reservation: the permit a request holds until it is finished with what it used, extended when a
//! cached request turns out to lead, refreshed while it runs, and finished with nothing if it is dropped.

use super::*;

/// A granted request: header material and what it holds, finished once ([`Permit::finish`]) or, if it never
/// is (the request was dropped: a timeout, a disconnected caller), with [`Usage::NOTHING`] when the last
/// clone goes. Clones share one reservation (a stream and its metering hold one each).
#[derive(Clone)]
pub struct Permit(pub(super) Arc<PermitInner>);

pub(super) struct PermitInner {
    pub(super) limiter: Limiter,
    pub(super) limits: Limits,
    pub(super) state: Mutex<PermitState>,
}

pub(super) struct PermitState {
    /// `None` once finished.
    pub(super) held: Option<Held>,
    pub(super) report: Report,
    pub(super) refresher: Option<tokio::task::AbortHandle>,
}

impl Permit {
    /// The buckets after this request's reservation, for its headers.
    pub fn report(&self) -> Report {
        self.0.state.lock().map(|s| s.report).unwrap_or_default()
    }

    /// Reserve `images` and `usd` more on this reservation (a cached request that turned out to lead the
    /// upstream call). A refusal (or fail-closed) finishes the permit with the request given back: a refused
    /// request spends nothing.
    pub async fn extend(&self, images: u32, usd: f64) -> Result<(), Denied> {
        let limiter = &self.0.limiter;
        let Some((tenant_id, id)) = self.with_held(|h| (h.tenant_id.clone(), h.id.clone())) else {
            return Ok(());
        };
        let demand = Demand::more(images, usd);
        let outcome = limiter.inner.backend.reserve(&tenant_id, &self.0.limits, demand, &id).await;
        let current = self.report();
        let denied = match outcome {
            Ok(Ok(grant)) => {
                self.with_held(|h| h.record(demand, false));
                if let Ok(mut outstanding) = limiter.inner.outstanding.lock()
                    && let Some(h) = outstanding.get_mut(&id)
                {
                    h.record(demand, false);
                }
                if let Ok(mut state) = self.0.state.lock() {
                    state.report.images = grant.report.images.or(state.report.images);
                }
                self.start_refresher();
                return Ok(());
            }
            Ok(Err(mut refusal)) => {
                limiter.count_refusal(refusal.reason);
                refusal.report.requests = current.requests;
                Denied::Refused(refusal)
            }
            Err(e) => match limiter.backend_failed(&e, &self.0.limits) {
                Ok(_) => return Ok(()),
                Err(_) => Denied::Unavailable(e, current),
            },
        };
        self.finish(Usage::REFUNDED);
        Err(denied)
    }

    /// Settle the reservation with what the request used. Only the first call counts.
    pub fn finish(&self, usage: Usage) {
        let taken = self.0.state.lock().ok().and_then(|mut s| {
            if let Some(r) = s.refresher.take() {
                r.abort();
            }
            s.held.take()
        });
        if let Some(held) = taken {
            self.0.limiter.settle(held, usage);
        }
    }

    pub(super) fn with_held<T>(&self, f: impl FnOnce(&mut Held) -> T) -> Option<T> {
        self.0.state.lock().ok().and_then(|mut s| s.held.as_mut().map(f))
    }

    /// Keep the reservation's lease alive while it lasts (backends whose holds expire).
    pub(super) fn start_refresher(&self) {
        let backend = self.0.limiter.inner.backend.clone();
        let Some(lease) = backend.lease() else { return };
        let Ok(mut state) = self.0.state.lock() else { return };
        let Some(held) = state.held.clone().filter(|h| h.slot || h.images > 0 || h.usd > 0.0) else { return };
        if let Some(old) = state.refresher.take() {
            old.abort();
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let counters = Arc::downgrade(&self.0.limiter.inner);
        let every = (lease / 3).max(Duration::from_millis(100));
        let task = handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = backend.refresh(&held).await {
                    if let Some(inner) = counters.upgrade() {
                        inner.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(kind = "limits.backend_unavailable", error = %e, "a reservation's lease was not refreshed");
                }
            }
        });
        state.refresher = Some(task.abort_handle());
    }
}

impl Drop for PermitInner {
    fn drop(&mut self) {
        let Ok(state) = self.state.get_mut() else { return };
        if let Some(r) = state.refresher.take() {
            r.abort();
        }
        if let Some(held) = state.held.take() {
            self.limiter.settle(held, Usage::NOTHING);
        }
    }
}

/// Holds a stream's reservation until the stream ends (the metered stream drops it last).
pub struct SlotGuard(pub Permit);
