//! Coalescing: one upstream call in flight per key, awaited by its caller and every identical request that
//! joins it, and removed from the map however its task ends.

use super::*;

/// What the cache stage decided for one request.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub key: Key,
    /// The tenant's TTL; an entry's own TTL may be shorter (see [`storable_for`]).
    pub ttl: Duration,
    /// The least life a hit's links must have left: half the image retention.
    pub link_margin: Duration,
    pub directive: Directive,
}

/// A finished upstream call with a 2xx answer, and whether (and for how long) it may be stored.
#[derive(Debug)]
pub struct Fetched {
    pub answer: Answer,
    pub store_for: Result<Duration, NotStored>,
}

/// A miss that did not produce a stored answer, shared with every coalesced waiter.
#[derive(Debug)]
pub enum Uncached {
    /// An answer that is not stored (an error status from the upstream, too large, foreign links, …).
    Answer(Answer),
    /// No answer: the gateway's own error (upstream unreachable, re-hosting failed, …).
    Error(ApiError),
    /// The leading caller's own limits refused the call before anything was sent. That answer is the
    /// leader's alone (it names the leader's tenant and limits): waiters try again, one of them leading.
    Refused(ApiError),
}

impl Uncached {
    /// One caller's own copy: the value itself when nobody else holds it (an internal error keeps its cause),
    /// else an equal one.
    pub fn take(shared: Arc<Self>) -> Self {
        Arc::try_unwrap(shared).unwrap_or_else(|shared| match shared.as_ref() {
            Self::Answer(answer) => Self::Answer(answer.clone()),
            Self::Error(e) => Self::Error(e.duplicate()),
            Self::Refused(e) => Self::Refused(e.duplicate()),
        })
    }
}

/// What an upstream call through the cache gave: the stored answer, or what was not stored.
pub type Served = Result<Answer, Arc<Uncached>>;

/// How a request that went through [`ResponseCache::get_or_fetch`] was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its own upstream call ran: the miss that fills the entry (or a `no-cache` refresh).
    Fetched,
    /// Another identical request's upstream call, already in flight, answered it.
    Joined,
    /// An entry stored while it waited for the limits answered it.
    Found,
}

impl Role {
    /// The `x-imagegate-cache` of a request so answered: a hit only when the answer came from a stored entry.
    pub fn outcome(self, served: &Served) -> Outcome {
        match self {
            Self::Fetched => Outcome::Miss,
            Self::Found => Outcome::Hit,
            Self::Joined if served.is_ok() => Outcome::Hit,
            Self::Joined => Outcome::Miss,
        }
    }

    /// True when another request's upstream call (or entry) answered this one: it costs nothing.
    pub fn served_by_another(self) -> bool {
        self != Self::Fetched
    }
}

/// An upstream call in flight, awaited by its caller and by every identical request that joins it.
pub(super) type Flight = Shared<BoxFuture<'static, Served>>;

/// A call about to be launched: what its callers await, and where its task sends the answer. A task that ends
/// without answering (a panic, the runtime shutting down) answers an internal error.
pub(super) fn flight() -> (Flight, oneshot::Sender<Served>) {
    let (answer, answered) = oneshot::channel();
    let flight = async move {
        answered.await.unwrap_or_else(|_| {
            Err(Arc::new(Uncached::Error(ApiError::Internal(anyhow::anyhow!(
                "the upstream call's task ended without an answer"
            )))))
        })
    }
    .boxed()
    .shared();
    (flight, answer)
}

/// Calls in flight by key, with an id so that a finished call removes only itself.
pub(super) type Flights = Arc<Mutex<HashMap<Key, (u64, Flight)>>>;

pub(super) fn lock(flights: &Flights) -> MutexGuard<'_, HashMap<Key, (u64, Flight)>> {
    flights.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a call from the in-flight map when its task ends, however it ends (it is dropped on a panic or
/// when the runtime shuts down), so a key never stays stuck on a call that will not answer.
pub(super) struct Landing {
    pub(super) flights: Flights,
    pub(super) key: Key,
    pub(super) id: u64,
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut flights = lock(&self.flights);
        if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.key);
        }
    }
}
