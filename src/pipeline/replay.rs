//! The replay window: an upstream call belongs to the gateway, not to the caller's socket, and an identical
//! request that retries it attaches to that call (or its result) instead of paying for a second generation.
//!
//! [`ReplayWindow::run`] runs a call so that a caller that hangs up (or whose request the gateway times out)
//! does not cancel it: it runs to its end, and whatever the call settles (images stored, usage booked) happens
//! regardless. While its caller waits, the call is polled in the caller's own task (no hand-over to another
//! task and back per request); if the caller goes away first, the call moves to a task of its own
//! ([`Driver`]). Its result stays in the window for `window` after the call ends. A later request with the
//! same key (same tenant, same API key, same request) attaches to it when:
//! - it says it is a retry (`x-stainless-retry-count` > 0, or an `Idempotency-Key`, which is part of the key), or
//! - no caller received the result yet: every caller went away, or got an answer without its images (a gateway
//!   timeout, an ambiguous upstream failure).
//!
//! A deliberate repeat after a caller received a successful answer is a new call, as at OpenAI; so is a repeat
//! while the first caller still waits, unless it says it is a retry. Results not worth replaying (nothing was
//! generated, so a new call costs nothing twice) leave the window when the call ends. Generic over the result,
//! so the pipeline decides what a call is and what counts as delivered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::time::Instant;
use tracing::Instrument;

/// Identifies "the same request": a hash of the tenant, the API key, the endpoint, the body as sent and any
/// `Idempotency-Key`.
pub type ReplayKey = [u8; 32];

/// The body as it identifies a request: JSON as sent; a multipart form by its parts (an SDK's retry encodes
/// the same form with a new boundary).
pub fn fingerprint(request: &crate::images::request::ImageRequest) -> std::borrow::Cow<'_, [u8]> {
    use sha2::{Digest, Sha256};
    let Some(form) = request.form() else {
        return match &request.body {
            // The caller's bytes while nothing changed them, without a copy; else the body as written.
            crate::images::request::RequestBody::Json { raw: Some(raw), .. } => std::borrow::Cow::Borrowed(&raw[..]),
            _ => std::borrow::Cow::Owned(request.outgoing(None).to_bytes().to_vec()),
        };
    };
    let mut hasher = Sha256::new();
    for part in &form.parts {
        for field in [
            part.name.as_bytes(),
            part.file_name.as_deref().unwrap_or("").as_bytes(),
            part.content_type.as_deref().unwrap_or("").as_bytes(),
        ] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        // The data as the fields above (length, then bytes), read in the chunks it is held in.
        hasher.update((part.data.len() as u64).to_be_bytes());
        for chunk in part.data.chunks() {
            hasher.update(chunk);
        }
    }
    std::borrow::Cow::Owned(hasher.finalize().to_vec())
}

/// The [`ReplayKey`] of a request: each part length-prefixed, so no two different requests hash alike by
/// shifting bytes from one part to the next.
pub fn key(tenant_id: &str, key_id: &str, endpoint: &str, body: &[u8], idempotency_key: Option<&str>) -> ReplayKey {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in
        [tenant_id.as_bytes(), key_id.as_bytes(), endpoint.as_bytes(), body, idempotency_key.unwrap_or("").as_bytes()]
    {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.update([u8::from(idempotency_key.is_some())]);
    hasher.finalize().into()
}

/// What a finished call's result is, for the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Images the caller is to get: replayed to retries, and to anyone until a caller receives it.
    Images,
    /// No images, but the upstream may have generated and billed them (a timeout after the request went out):
    /// replayed to every identical request in the window, since a new call could pay twice.
    PossiblyBilled,
    /// Nothing generated (refused, invalid, unreachable): not kept; a repeat is a new call.
    Nothing,
}

/// How a caller was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its own call ran.
    Ran,
    /// It attached to an earlier identical request's call or result.
    Attached,
}

struct Entry<T> {
    result: Shared<BoxFuture<'static, Option<T>>>,
    /// Callers awaiting the result now.
    waiting: AtomicUsize,
    /// A caller received the images.
    delivered: AtomicBool,
    /// When the call ended (`None` while it runs).
    ended: Mutex<Option<Instant>>,
}

impl<T> Entry<T> {
    fn ended(&self) -> Option<Instant> {
        *self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Calls in flight and results kept, by [`ReplayKey`]. Cheap to clone.
pub struct ReplayWindow<T> {
    table: Arc<Mutex<Table<T>>>,
    window: Duration,
}

struct Table<T> {
    entries: HashMap<ReplayKey, Arc<Entry<T>>>,
    /// When results older than the window were last dropped (at most once a second, not on every request).
    pruned: Instant,
}

impl<T> Clone for ReplayWindow<T> {
    fn clone(&self) -> Self {
        Self { table: self.table.clone(), window: self.window }
    }
}

/// The call of the caller that started it, polled in that caller's task while it waits. Dropped unfinished
/// (the caller hung up, or its request timed out), it is spawned as a task of its own and runs to its end:
/// the call's future is boxed, so it moves to the task as it stands, mid-way.
struct Driver(Option<BoxFuture<'static, ()>>);

impl Future for Driver {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Some(call) = self.0.as_mut() else { return std::task::Poll::Ready(()) };
        std::task::ready!(call.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let Some(call) = self.0.take() else { return };
        // Unwinding: the call may be what panicked, and a panicked future cannot be resumed. Its waiters then
        // get no result, as when a call's task panicked.
        if std::thread::panicking() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(call)),
            Err(_) => tracing::error!("a call was left unfinished: its caller went away outside the runtime"),
        }
    }
}

/// A caller waiting on an entry; when it goes away without the result, the entry counts one waiter fewer.
struct Waiting<T>(Arc<Entry<T>>);

impl<T> Drop for Waiting<T> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<T: Clone + Send + Sync + 'static> ReplayWindow<T> {
    /// Results are kept for `window` after their call ends.
    pub fn new(window: Duration) -> Self {
        Self { table: Arc::new(Mutex::new(Table { entries: HashMap::new(), pruned: Instant::now() })), window }
    }

    fn lock(&self) -> MutexGuard<'_, Table<T>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Forget `entry` if it is still the one kept under `key`.
    fn forget(&self, key: &ReplayKey, entry: &Arc<Entry<T>>) {
        let mut table = self.lock();
        if table.entries.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            table.entries.remove(key);
        }
    }

    /// Answer a request: attach to an identical earlier request's call or result when the rules above allow,
    /// else run `call` (in the caller's task while it waits, in a task of its own if the caller goes away).
    /// `kept` classifies a finished result. Images a caller received leave the window at once (so it holds only
    /// what nobody got), unless `keep_delivered` (the request has an `Idempotency-Key`, whose repeats get the
    /// same answer for the whole window). `None` only when the call ended without a result (a panic, the
    /// runtime shutting down).
    ///
    /// The decision is taken (and the call boxed) when `run` is called; the future returned drives the call (if
    /// it is this caller's) and waits for the result. An `async fn` would keep `call`, whole, in its own state
    /// beside the box for as long as its caller waits: kilobytes per held request (docs/performance.md).
    pub fn run<F>(
        &self,
        key: ReplayKey,
        says_retry: bool,
        keep_delivered: bool,
        call: F,
        kept: fn(&T) -> Kept,
    ) -> impl Future<Output = (Option<T>, Role)> + Send + '_
    where
        F: Future<Output = T> + Send + 'static,
    {
        let now = Instant::now();
        let (entry, role, driver) = {
            let mut table = self.lock();
            let window = self.window;
            if now.duration_since(table.pruned) >= Duration::from_secs(1) {
                table.entries.retain(|_, e| e.ended().is_none_or(|ended| now.duration_since(ended) < window));
                table.pruned = now;
            }
            let entries = &mut table.entries;
            let existing =
                entries.get(&key).filter(|e| e.ended().is_none_or(|ended| now.duration_since(ended) < window));
            match existing {
                Some(entry) if self.may_attach(entry, says_retry) => {
                    entry.waiting.fetch_add(1, Ordering::SeqCst);
                    (entry.clone(), Role::Attached, Driver(None))
                }
                existing => {
                    let (entry, driver) = self.launch(call, kept, key);
                    // A repeat while the first caller still waits runs on its own and is not kept (the first
                    // call stays the one retries find).
                    if existing.is_none() || existing.is_some_and(|e| e.ended().is_some()) {
                        entries.insert(key, entry.clone());
                    }
                    (entry, Role::Ran, driver)
                }
            }
        };
        let waiting = Waiting(entry);
        async move {
            driver.await;
            let result = waiting.0.result.clone().await;
            if let Some(result) = &result
                && kept(result) == Kept::Images
            {
                waiting.0.delivered.store(true, Ordering::SeqCst);
                if !keep_delivered {
                    self.forget(&key, &waiting.0);
                }
            }
            (result, role)
        }
    }

    fn may_attach(&self, entry: &Entry<T>, says_retry: bool) -> bool {
        if says_retry {
            return true;
        }
        match entry.ended() {
            // Running: only when its caller went away.
            None => entry.waiting.load(Ordering::SeqCst) == 0,
            // Ended: until a caller received its images.
            Some(_) => !entry.delivered.load(Ordering::SeqCst),
        }
    }

    /// The entry for `call` (with one waiter: the caller), which resolves to its result, and the call to drive.
    fn launch<F>(&self, call: F, kept: fn(&T) -> Kept, key: ReplayKey) -> (Arc<Entry<T>>, Driver)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<T>();
        let result: BoxFuture<'static, Option<T>> = Box::pin(async move { rx.await.ok() });
        let entry = Arc::new(Entry {
            result: result.shared(),
            waiting: AtomicUsize::new(1),
            delivered: AtomicBool::new(false),
            ended: Mutex::new(None),
        });
        let (this, ended) = (self.clone(), entry.clone());
        // `carry`: what the call learns (upstream, images) still reaches the request's access-log line.
        // `map`, not an `async` block awaiting `call`: the block would keep `call` twice in its state (the
        // captured future and the one being awaited), kilobytes per held request (docs/performance.md).
        let driver = Driver(Some(Box::pin(crate::metrics::facts::carry(
            call.map(move |result| {
                let keep = kept(&result);
                *ended.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                if keep == Kept::Nothing {
                    this.forget(&key, &ended);
                }
                // Nobody may be waiting any more: the call ran to its end all the same.
                let _ = tx.send(result);
            })
            .instrument(tracing::Span::current()),
        ))));
        (entry, driver)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    /// A call that counts its runs, takes `ms`, and answers `kept`.
    fn call(runs: &Arc<AtomicU32>, ms: u64, result: Kept) -> impl Future<Output = Kept> + Send + 'static {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            result
        }
    }

    fn same(k: &Kept) -> Kept {
        *k
    }

    const KEY: ReplayKey = [7; 32];

    #[test]
    fn keys_differ_by_tenant_key_endpoint_body_and_idempotency_key() {
        let base = key("t", "k", "generations", b"{}", None);
        assert_eq!(base, key("t", "k", "generations", b"{}", None));
        for other in [
            key("u", "k", "generations", b"{}", None),
            key("t", "j", "generations", b"{}", None),
            key("t", "k", "edits", b"{}", None),
            key("t", "k", "generations", b"{ }", None),
            key("t", "k", "generations", b"{}", Some("")),
            key("tk", "", "generations", b"{}", None),
        ] {
            assert_ne!(base, other);
        }
    }

    #[tokio::test]
    async fn a_call_whose_caller_hung_up_runs_to_its_end_and_the_next_identical_request_gets_its_result() {
        let window = ReplayWindow::new(Duration::from_secs(60));
        let runs = Arc::new(AtomicU32::new(0));
        let first = tokio::time::timeout(
            Duration::from_millis(20),
            window.run(KEY, false, false, call(&runs, 100, Kept::Images), same),
        )
        .await;
        assert!(first.is_err(), "the caller gave up");
        let (result, role) = window.run(KEY, false, false, call(&runs, 100, Kept::Images), same).await;
        assert_eq!((result, role), (Some(Kept::Images), Role::Attached));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Received now: a deliberate repeat is a new call.
        let (_, role) = window.run(KEY, false, false, call(&runs, 1, Kept::Images), same).await;
        assert_eq!((role, runs.load(Ordering::SeqCst)), (Role::Ran, 2));
    }

    #[tokio::test]
    async fn a_retry_attaches_to_a_running_call_whose_caller_still_waits_but_a_plain_repeat_does_not() {
        let window = ReplayWindow::new(Duration::from_secs(60));
        let runs = Arc::new(AtomicU32::new(0));
        let (a, b, c) = tokio::join!(
            window.run(KEY, false, false, call(&runs, 100, Kept::Images), same),
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                window.run(KEY, true, false, call(&runs, 100, Kept::Images), same).await
            },
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                window.run(KEY, false, false, call(&runs, 100, Kept::Images), same).await
            },
        );
        assert_eq!((a.1, b.1, c.1), (Role::Ran, Role::Attached, Role::Ran));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_possibly_billed_result_is_replayed_and_a_result_with_nothing_generated_is_not_kept() {
        let window = ReplayWindow::new(Duration::from_secs(60));
        let runs = Arc::new(AtomicU32::new(0));
        window.run(KEY, false, false, call(&runs, 1, Kept::PossiblyBilled), same).await;
        let (result, role) = window.run(KEY, false, false, call(&runs, 1, Kept::Images), same).await;
        assert_eq!((result, role), (Some(Kept::PossiblyBilled), Role::Attached));
        let other = [8; 32];
        window.run(other, false, false, call(&runs, 1, Kept::Nothing), same).await;
        let (_, role) = window.run(other, true, false, call(&runs, 1, Kept::Images), same).await;
        assert_eq!(role, Role::Ran, "nothing was generated: a retry runs anew");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn delivered_images_leave_the_window_at_once_unless_the_request_has_an_idempotency_key() {
        let window = ReplayWindow::new(Duration::from_secs(60));
        let runs = Arc::new(AtomicU32::new(0));
        window.run(KEY, false, false, call(&runs, 1, Kept::Images), same).await;
        assert_eq!(window.len(), 0, "nobody can need it again: the window holds only what nobody got");
        let keyed = [9; 32];
        window.run(keyed, true, true, call(&runs, 1, Kept::Images), same).await;
        let (_, role) = window.run(keyed, true, true, call(&runs, 1, Kept::Images), same).await;
        assert_eq!((role, runs.load(Ordering::SeqCst)), (Role::Attached, 2));
    }

    #[tokio::test]
    async fn results_leave_the_window_when_it_ends() {
        let window = ReplayWindow::new(Duration::from_millis(30));
        let runs = Arc::new(AtomicU32::new(0));
        let _ = tokio::time::timeout(
            Duration::from_millis(5),
            window.run(KEY, false, false, call(&runs, 10, Kept::Images), same),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        let (_, role) = window.run(KEY, true, false, call(&runs, 1, Kept::Images), same).await;
        assert_eq!((role, runs.load(Ordering::SeqCst)), (Role::Ran, 2));
    }
}
