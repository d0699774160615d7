//! Pools of deployments: one name for several upstreams (Azure deployments, OpenAI projects, compatible
//! servers) used as one, with per-deployment capacity and health, and failover that never pays twice.
//!
//! A [`Deployment`] is one configured upstream plus what a pool needs to know about it: the models it serves
//! (and the name it serves each as), its weight and priority tier, its own quota (requests and images per
//! minute, calls in flight), and its state (resting after a 429 until, unhealthy until, failures in a row).
//! A [`Pool`] is an ordered list of deployments; it is itself an [`Upstream`], so the pipeline does not know
//! whether one deployment or ten stand behind a tenant.
//!
//! Choosing: among the deployments that serve the model, have capacity now and are healthy (or may be probed),
//! the lowest priority tier wins, and within it smooth weighted round-robin (docs/decisions/0012).
//!
//! Moving on: a request goes to the next deployment only when the one it tried provably generated nothing:
//! the connect failed (refused, timed out, TLS), the answer was 429 or a 5xx, or a stream's first event was an
//! error. Once the body went out and no answer came (deadline, connection broken), the request ends there:
//! the images may have been generated and billed ([`UpstreamError::possibly_billed`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http::{HeaderValue, StatusCode};
use serde::Serialize;
use tokio::time::Instant;

use super::{Attribution, Reading, ReplyBody, Upstream, UpstreamError, UpstreamReply};
use crate::config::UpstreamSettings;
use crate::images::request::ImageRequest;
use crate::wire::headers;

/// The window of the per-minute quotas.
const MINUTE: Duration = Duration::from_secs(60);
/// How much of a stream is read, at most, to find its first event.
const PEEK_LIMIT: usize = 64 * 1024;
/// `retry-after` when a deployment is full only because of its concurrency (a slot frees when a call ends).
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// One upstream as a member of pools: what it serves, how much, and how it is doing. Shared by every pool
/// that lists it.
pub struct Deployment {
    name: String,
    upstream: Arc<dyn Upstream>,
    /// Model asked for → name served as; empty = every model under its own name.
    models: BTreeMap<String, String>,
    weight: u32,
    priority: u32,
    requests_per_minute: Option<u32>,
    images_per_minute: Option<u32>,
    max_concurrent: Option<u32>,
    rest_after_429: Duration,
    unhealthy_for: Duration,
    failures_to_trip: u32,
    state: Mutex<State>,
}

/// A deployment's moving parts.
#[derive(Default)]
struct State {
    in_flight: u32,
    /// Calls started in the last minute: when, and how many images each asked for.
    recent: VecDeque<(Instant, u32)>,
    /// After a 429: not chosen before this.
    resting_until: Option<Instant>,
    /// Circuit open (after `failures_to_trip` failures in a row): not chosen before this; after it, one call
    /// at a time probes.
    unhealthy_until: Option<Instant>,
    failures: u32,
    /// A half-open probe is in flight.
    probing: bool,
}

impl State {
    fn forget_old(&mut self, now: Instant) {
        while self.recent.front().is_some_and(|(at, _)| now.duration_since(*at) >= MINUTE) {
            self.recent.pop_front();
        }
    }

    fn images_in_window(&self) -> u64 {
        self.recent.iter().map(|(_, n)| u64::from(*n)).sum()
    }
}

/// A deployment's state as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentStatus {
    pub name: String,
    /// `healthy`, `resting` (after a 429), `unhealthy` (circuit open) or `probing` (half-open).
    pub state: &'static str,
    /// Milliseconds until a resting deployment is tried again.
    pub resting_for_ms: Option<u64>,
    /// Milliseconds until an unhealthy deployment is probed.
    pub unhealthy_for_ms: Option<u64>,
    pub in_flight: u32,
    pub weight: u32,
    pub priority: u32,
    /// Requests it may still start this minute (`None` = no limit).
    pub requests_left: Option<u64>,
    /// Images it may still be asked for this minute (`None` = no limit).
    pub images_left: Option<u64>,
    /// Further calls it may start now (`None` = no limit).
    pub concurrent_left: Option<u64>,
    /// Models it serves, with the name it serves each as (empty = every model, as asked).
    pub models: BTreeMap<String, String>,
}

/// Why a deployment cannot take a request now, and when it may.
enum Unready {
    /// Does not serve the model.
    Never,
    /// Back (or has capacity) after this long.
    For(Duration),
}

impl Deployment {
    /// A deployment of `upstream` with the pool settings of its table.
    pub fn new(name: &str, settings: &UpstreamSettings, upstream: Arc<dyn Upstream>) -> Self {
        Self {
            name: name.to_owned(),
            upstream,
            models: settings.models.clone(),
            weight: settings.weight.max(1),
            priority: settings.priority,
            requests_per_minute: settings.requests_per_minute,
            images_per_minute: settings.images_per_minute,
            max_concurrent: settings.max_concurrent,
            rest_after_429: settings.rest_after_429,
            unhealthy_for: settings.unhealthy_for,
            failures_to_trip: settings.failures_to_trip.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// Its name (the `[upstreams.<name>]` table, or `upstream`), as `x-imagegate-deployment` says it.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name this deployment serves `model` as, or `None` when it does not serve it.
    fn served_name<'a>(&'a self, model: &'a str) -> Option<&'a str> {
        if self.models.is_empty() {
            return Some(model);
        }
        self.models.get(model).map(String::as_str)
    }

    /// Whether it can take a request for `n` images now. `health` false ignores rests and the breaker (a
    /// pool of one has nowhere else to go, so it passes the upstream's own answers on instead).
    fn readiness(&self, state: &mut State, model: &str, n: u32, now: Instant, health: bool) -> Result<(), Unready> {
        if self.served_name(model).is_none() {
            return Err(Unready::Never);
        }
        let mut wait = Duration::ZERO;
        if health {
            if let Some(until) = state.resting_until.filter(|u| *u > now) {
                wait = wait.max(until - now);
            }
            match state.unhealthy_until {
                Some(until) if until > now => wait = wait.max(until - now),
                // Half-open: one probe at a time.
                Some(_) if state.probing => wait = wait.max(self.unhealthy_for.min(CONCURRENCY_RETRY)),
                _ => {}
            }
        }
        state.forget_old(now);
        let oldest_expires =
            |state: &State| state.recent.front().map_or(Duration::ZERO, |(at, _)| MINUTE - (now - *at));
        if let Some(rpm) = self.requests_per_minute
            && state.recent.len() >= rpm as usize
        {
            wait = wait.max(oldest_expires(state));
        }
        if let Some(ipm) = self.images_per_minute {
            if u64::from(n) > u64::from(ipm) {
                // Never fits here; another deployment may take it.
                return Err(Unready::Never);
            }
            if state.images_in_window() + u64::from(n) > u64::from(ipm) {
                // The soonest an old enough call leaves the window and makes room.
                let mut freed = state.images_in_window() + u64::from(n) - u64::from(ipm);
                let mut until = Duration::ZERO;
                for (at, images) in &state.recent {
                    until = MINUTE - (now - *at);
                    freed = freed.saturating_sub(u64::from(*images));
                    if freed == 0 {
                        break;
                    }
                }
                wait = wait.max(until);
            }
        }
        if let Some(max) = self.max_concurrent
            && state.in_flight >= max
        {
            wait = wait.max(CONCURRENCY_RETRY);
        }
        if wait.is_zero() { Ok(()) } else { Err(Unready::For(wait)) }
    }

    /// Take a slot: counted against the minute's quotas and in flight until the guard drops.
    fn take(self: &Arc<Self>, state: &mut State, n: u32, now: Instant) -> Slot {
        state.recent.push_back((now, n));
        state.in_flight += 1;
        let probe = state.unhealthy_until.is_some_and(|u| u <= now);
        if probe {
            state.probing = true;
        }
        Slot { deployment: self.clone(), probe }
    }

    /// It answered: the breaker closes.
    fn succeeded(&self) {
        let mut state = self.lock();
        state.failures = 0;
        state.unhealthy_until = None;
    }

    /// A connect failure or a 5xx before any image: after `failures_to_trip` in a row (or a failed probe),
    /// out for `unhealthy_for`.
    fn failed(&self) {
        let mut state = self.lock();
        state.failures = state.failures.saturating_add(1);
        if state.failures >= self.failures_to_trip || state.unhealthy_until.is_some() {
            state.unhealthy_until = Some(Instant::now() + self.unhealthy_for);
            tracing::warn!(deployment = %self.name, failures = state.failures, "deployment marked unhealthy");
        }
    }

    /// A 429: rest for `retry_after` (or the configured back-off).
    fn rest(&self, retry_after: Option<Duration>) {
        let rest = retry_after.unwrap_or(self.rest_after_429);
        let mut state = self.lock();
        let until = Instant::now() + rest;
        state.resting_until = Some(state.resting_until.map_or(until, |u| u.max(until)));
        tracing::info!(deployment = %self.name, rest_ms = rest.as_millis() as u64, "deployment resting after a 429");
    }

    /// Its state now, for the admin API.
    pub fn status(&self) -> DeploymentStatus {
        let now = Instant::now();
        let mut state = self.lock();
        state.forget_old(now);
        let resting = state.resting_until.filter(|u| *u > now).map(|u| (u - now).as_millis() as u64);
        let unhealthy = state.unhealthy_until.filter(|u| *u > now).map(|u| (u - now).as_millis() as u64);
        let label = if unhealthy.is_some() {
            "unhealthy"
        } else if state.unhealthy_until.is_some() {
            "probing"
        } else if resting.is_some() {
            "resting"
        } else {
            "healthy"
        };
        let in_window = state.recent.len() as u64;
        DeploymentStatus {
            name: self.name.clone(),
            state: label,
            resting_for_ms: resting,
            unhealthy_for_ms: unhealthy,
            in_flight: state.in_flight,
            weight: self.weight,
            priority: self.priority,
            requests_left: self.requests_per_minute.map(|r| u64::from(r).saturating_sub(in_window)),
            images_left: self.images_per_minute.map(|i| u64::from(i).saturating_sub(state.images_in_window())),
            concurrent_left: self.max_concurrent.map(|m| u64::from(m.saturating_sub(state.in_flight))),
            models: self.models.clone(),
        }
    }
}

/// A call in flight at a deployment; dropping it frees the concurrency slot (and a probe's turn).
struct Slot {
    deployment: Arc<Deployment>,
    probe: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.deployment.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if self.probe {
            state.probing = false;
        }
    }
}

/// Deployments used as one.
pub struct Pool {
    name: String,
    deployments: Vec<Arc<Deployment>>,
    /// Smooth weighted round-robin: each deployment's current weight.
    current: Mutex<Vec<i64>>,
}

/// What a pick found.
enum Pick {
    Go(usize, Slot),
    /// Nothing can take it now: whether any deployment (tried or not) serves the model, and the soonest an
    /// untried one may.
    None {
        served: bool,
        soonest: Option<Duration>,
    },
}

/// What one attempt came to.
enum Attempt {
    /// An answer to hand on.
    Done(UpstreamReply),
    /// Provably nothing generated: try the next deployment. The answer, if there was one, is kept in case
    /// no other deployment does better.
    MoveOn(Option<UpstreamReply>, Option<UpstreamError>),
}

impl Pool {
    /// A pool of `deployments`, in order.
    pub fn new(name: &str, deployments: Vec<Arc<Deployment>>) -> Self {
        let current = Mutex::new(vec![0; deployments.len()]);
        Self { name: name.to_owned(), deployments, current }
    }

    /// Its name (`upstream` for `[upstream]`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kind of upstream behind its first deployment (`openai` or `mock`), for logs.
    pub fn kind(&self) -> &'static str {
        self.deployments.first().map_or("none", |d| d.upstream.name())
    }

    /// Every deployment's state, in pool order.
    pub fn status(&self) -> Vec<DeploymentStatus> {
        self.deployments.iter().map(|d| d.status()).collect()
    }

    /// A pool of one has nowhere else to go: it neither rests nor breaks, and hands the upstream's own 429s
    /// and 5xx answers on as they are (as a single upstream always did).
    fn watches_health(&self) -> bool {
        self.deployments.len() > 1
    }

    /// Choose among the untried deployments that can take the request now: the lowest priority tier, then
    /// smooth weighted round-robin within it.
    fn pick(&self, model: &str, n: u32, tried: &[bool]) -> Pick {
        let now = Instant::now();
        let health = self.watches_health();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let mut states: Vec<Option<MutexGuard<'_, State>>> = Vec::with_capacity(self.deployments.len());
        let (mut served, mut soonest, mut tier) = (false, None::<Duration>, None::<u32>);
        let mut ready = vec![false; self.deployments.len()];
        for (i, d) in self.deployments.iter().enumerate() {
            let mut state = d.lock();
            let readiness = d.readiness(&mut state, model, n, now, health);
            if d.served_name(model).is_some() {
                served = true;
            }
            if !tried[i] {
                match readiness {
                    Ok(()) => {
                        ready[i] = true;
                        tier = Some(tier.map_or(d.priority, |t| t.min(d.priority)));
                    }
                    Err(Unready::For(wait)) => soonest = Some(soonest.map_or(wait, |s| s.min(wait))),
                    Err(Unready::Never) => {}
                }
            }
            states.push(Some(state));
        }
        let Some(tier) = tier else { return Pick::None { served, soonest } };
        let in_tier: Vec<usize> =
            (0..self.deployments.len()).filter(|&i| ready[i] && self.deployments[i].priority == tier).collect();
        let total: i64 = in_tier.iter().map(|&i| i64::from(self.deployments[i].weight)).sum();
        let mut best = in_tier[0];
        for &i in &in_tier {
            current[i] += i64::from(self.deployments[i].weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        let Some(state) = states[best].as_mut() else { return Pick::None { served, soonest } };
        let slot = self.deployments[best].take(state, n, now);
        Pick::Go(best, slot)
    }

    /// Send `request` to the pool: to one deployment, or on to the next while the one tried provably
    /// generated nothing.
    async fn send_pooled(
        &self,
        request: &ImageRequest,
        attribution: &Attribution,
        reading: Reading,
    ) -> Result<UpstreamReply, UpstreamError> {
        let model = request.model();
        let n = request.n();
        let mut tried = vec![false; self.deployments.len()];
        let mut kept: Option<UpstreamReply> = None;
        let mut last_error: Option<UpstreamError> = None;
        let mut rested = false;
        loop {
            let (i, slot) = match self.pick(&model, n, &tried) {
                Pick::Go(i, slot) => (i, slot),
                Pick::None { served: false, .. } => return Err(UpstreamError::ModelNotServed { model }),
                Pick::None { soonest, .. } => {
                    return self.give_up(kept, last_error, rested, soonest);
                }
            };
            tried[i] = true;
            let deployment = self.deployments[i].clone();
            let outcome = self.attempt(&deployment, request, attribution, reading.clone(), slot).await;
            match outcome {
                Ok(Attempt::Done(mut reply)) => {
                    mark(&mut reply, deployment.name());
                    return Ok(reply);
                }
                Ok(Attempt::MoveOn(reply, error)) => {
                    if let Some(mut reply) = reply {
                        rested |= reply.status == StatusCode::TOO_MANY_REQUESTS;
                        mark(&mut reply, deployment.name());
                        kept = Some(reply);
                    }
                    if let Some(error) = error {
                        last_error = Some(error);
                    }
                    tracing::warn!(pool = %self.name, deployment = %deployment.name(), "moving the request on");
                }
                Err(e) => return Err(e.at(deployment.name())),
            }
        }
    }

    /// Nothing more to try. A pool of one hands on its upstream's answer; a pool of several answers 429 when a
    /// deployment is only resting or full (with the soonest `retry-after`), else the last answer or failure.
    fn give_up(
        &self,
        kept: Option<UpstreamReply>,
        last_error: Option<UpstreamError>,
        rested: bool,
        soonest: Option<Duration>,
    ) -> Result<UpstreamReply, UpstreamError> {
        let busy = |wait: Option<Duration>| {
            let ms = wait.unwrap_or(CONCURRENCY_RETRY).as_millis().max(1);
            UpstreamError::Busy { retry_after_ms: u64::try_from(ms).unwrap_or(u64::MAX) }
        };
        if !self.watches_health() {
            return match (kept, last_error) {
                (Some(reply), _) => Ok(reply),
                (None, Some(error)) => Err(error),
                (None, None) => Err(busy(soonest)),
            };
        }
        if rested || soonest.is_some() {
            let rest = self
                .deployments
                .iter()
                .filter_map(|d| d.lock().resting_until.map(|u| u.saturating_duration_since(Instant::now())))
                .filter(|d| !d.is_zero())
                .min();
            let wait = match (soonest, rest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            return Err(busy(wait));
        }
        match (kept, last_error) {
            (Some(reply), _) => Ok(reply),
            (None, Some(error)) => Err(error),
            (None, None) => Err(busy(soonest)),
        }
    }

    /// One call at one deployment, with its model renamed, judged: hand on, or move on.
    async fn attempt(
        &self,
        deployment: &Arc<Deployment>,
        request: &ImageRequest,
        attribution: &Attribution,
        reading: Reading,
        slot: Slot,
    ) -> Result<Attempt, UpstreamError> {
        // Only a deployment that lists its models renames them; the body is otherwise forwarded as sent (a
        // missing `model` stays missing).
        let model = request.model();
        let served = deployment.served_name(&model).unwrap_or(&model);
        let renamed;
        let request = if deployment.models.is_empty() || request.field_str("model").as_deref() == Some(served) {
            request
        } else {
            renamed = request.clone().with_field("model", Some(served));
            &renamed
        };
        let reply = match deployment.upstream.send(request, attribution, reading).await {
            Ok(reply) => reply,
            Err(e @ UpstreamError::Unavailable(_)) => {
                deployment.failed();
                tracing::warn!(deployment = %deployment.name(), error = %e, "deployment unreachable");
                return Ok(Attempt::MoveOn(None, Some(e)));
            }
            Err(e) => {
                deployment.failed();
                return Err(e);
            }
        };
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            deployment.rest(retry_after(&reply.headers));
            return Ok(Attempt::MoveOn(Some(reply), None));
        }
        if reply.status.is_server_error() {
            deployment.failed();
            return Ok(Attempt::MoveOn(Some(reply), None));
        }
        match reply.body {
            ReplyBody::Stream(stream) if reply.status.is_success() => {
                let (first, rest) = first_event(stream).await;
                let body = if is_upstream_error_event(&first) {
                    deployment.failed();
                    tracing::warn!(deployment = %deployment.name(), "stream began with an error event");
                    let first = first.freeze();
                    let body = ReplyBody::Stream(futures::stream::once(async move { first }).boxed());
                    return Ok(Attempt::MoveOn(Some(UpstreamReply { body, ..reply }), None));
                } else {
                    deployment.succeeded();
                    let head = futures::stream::once(async move { first.freeze() });
                    // The slot is held until the stream ends.
                    let held = rest.map(move |chunk| {
                        hold(&slot);
                        chunk
                    });
                    ReplyBody::Stream(head.chain(held).filter(|c| futures::future::ready(!c.is_empty())).boxed())
                };
                Ok(Attempt::Done(UpstreamReply { body, ..reply }))
            }
            body => {
                deployment.succeeded();
                Ok(Attempt::Done(UpstreamReply { body, ..reply }))
            }
        }
    }
}

impl Upstream for Pool {
    fn send<'a>(
        &'a self,
        request: &'a ImageRequest,
        attribution: &'a Attribution,
        reading: Reading,
    ) -> BoxFuture<'a, Result<UpstreamReply, UpstreamError>> {
        Box::pin(self.send_pooled(request, attribution, reading))
    }

    fn name(&self) -> &'static str {
        self.kind()
    }
}

/// Keeps a value alive inside a closure that does not otherwise use it.
fn hold<T>(_: &T) {}

/// Say which deployment answered.
fn mark(reply: &mut UpstreamReply, deployment: &str) {
    if let Ok(value) = HeaderValue::from_str(deployment) {
        reply.headers.insert(headers::X_IMAGEGATE_DEPLOYMENT, value);
    }
}

/// `retry-after-ms`, else `retry-after` in seconds (an HTTP date is not worth parsing here: the back-off
/// applies).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text(headers::RETRY_AFTER_MS).and_then(|v| v.parse::<f64>().ok()).filter(|v| *v >= 0.0) {
        return Some(Duration::from_millis(ms as u64));
    }
    text("retry-after").and_then(|v| v.parse::<f64>().ok()).filter(|v| *v >= 0.0).map(Duration::from_secs_f64)
}

/// Read a stream until its first whole event (or [`PEEK_LIMIT`] bytes): that much, and the rest.
async fn first_event(mut stream: BoxStream<'static, Bytes>) -> (BytesMut, BoxStream<'static, Bytes>) {
    let mut head = BytesMut::new();
    while head.len() < PEEK_LIMIT && !has_event_end(&head) {
        match stream.next().await {
            Some(chunk) => head.extend_from_slice(&chunk),
            None => break,
        }
    }
    (head, stream)
}

/// An SSE event ends with a blank line, in any of the three line-break spellings.
fn has_event_end(buf: &[u8]) -> bool {
    buf.windows(2).any(|w| w == b"\n\n" || w == b"\r\r") || buf.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Whether the stream's first event is an error the upstream sent (`event: error`, or `"type":"error"`), as
/// opposed to one imagegate added when the stream broke or stalled (`upstream_stream_interrupted`), which
/// follows a request the upstream may be generating.
fn is_upstream_error_event(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&head[..head.len().min(PEEK_LIMIT)]);
    let text = text.trim_start();
    let first = text.split("\n\n").next().unwrap_or_default();
    let mut event = None;
    let mut data = String::new();
    for line in first.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim());
        }
    }
    if data.contains("upstream_stream_interrupted") {
        return false;
    }
    let typed_error = serde_json::from_str::<serde_json::Value>(&data)
        .ok()
        .is_some_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("error"));
    event.as_deref() == Some("error") || typed_error
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamSettings;

    struct Never;
    impl Upstream for Never {
        fn send<'a>(
            &'a self,
            _: &'a ImageRequest,
            _: &'a Attribution,
            _: Reading,
        ) -> BoxFuture<'a, Result<UpstreamReply, UpstreamError>> {
            Box::pin(async { Err(UpstreamError::Unavailable("never".into())) })
        }
        fn name(&self) -> &'static str {
            "never"
        }
    }

    fn deployment(name: &str, tweak: impl FnOnce(&mut UpstreamSettings)) -> Arc<Deployment> {
        let mut s = UpstreamSettings::default();
        tweak(&mut s);
        Arc::new(Deployment::new(name, &s, Arc::new(Never)))
    }

    fn pick_name(pool: &Pool, model: &str, n: u32) -> Option<String> {
        match pool.pick(model, n, &vec![false; pool.deployments.len()]) {
            Pick::Go(i, _slot) => Some(pool.deployments[i].name().to_owned()),
            Pick::None { .. } => None,
        }
    }

    #[test]
    fn smooth_weighted_round_robin_splits_exactly_by_weight() {
        let pool = Pool::new("p", vec![deployment("a", |s| s.weight = 3), deployment("b", |s| s.weight = 1)]);
        let picks: Vec<String> = (0..8).filter_map(|_| pick_name(&pool, "dall-e-2", 1)).collect();
        assert_eq!(picks.iter().filter(|p| *p == "a").count(), 6);
        // Spread out, not bunched: b never twice in a row.
        assert!(!picks.windows(2).any(|w| w[0] == "b" && w[1] == "b"), "{picks:?}");
    }

    #[test]
    fn a_lower_priority_tier_is_used_only_when_the_first_cannot_take_the_request() {
        let pool = Pool::new(
            "p",
            vec![deployment("spare", |s| s.priority = 1), deployment("main", |s| s.images_per_minute = Some(2))],
        );
        assert_eq!(pick_name(&pool, "dall-e-2", 1).as_deref(), Some("main"));
        assert_eq!(pick_name(&pool, "dall-e-2", 1).as_deref(), Some("main"));
        assert_eq!(pick_name(&pool, "dall-e-2", 1).as_deref(), Some("spare"), "main's images per minute are spent");
    }

    #[test]
    fn only_deployments_serving_the_model_are_chosen() {
        let pool = Pool::new(
            "p",
            vec![
                deployment("a", |s| {
                    s.models.insert("gpt-image-1".into(), "img-east".into());
                }),
                deployment("b", |s| {
                    s.models.insert("dall-e-3".into(), "d3".into());
                }),
            ],
        );
        for _ in 0..3 {
            assert_eq!(pick_name(&pool, "gpt-image-1", 1).as_deref(), Some("a"));
        }
        assert!(matches!(pool.pick("dall-e-2", 1, &[false, false]), Pick::None { served: false, .. }));
    }

    #[test]
    fn a_full_pool_says_when_the_soonest_deployment_has_room() {
        let pool = Pool::new(
            "p",
            vec![deployment("a", |s| s.max_concurrent = Some(1)), deployment("b", |s| s.requests_per_minute = Some(1))],
        );
        let first = pool.pick("dall-e-2", 1, &[false, false]);
        let second = pool.pick("dall-e-2", 1, &[false, false]);
        assert!(matches!((&first, &second), (Pick::Go(..), Pick::Go(..))));
        match pool.pick("dall-e-2", 1, &[false, false]) {
            Pick::None { served: true, soonest: Some(wait) } => assert!(wait <= CONCURRENCY_RETRY, "{wait:?}"),
            _ => panic!("expected no room"),
        }
        drop(first);
        assert!(matches!(pool.pick("dall-e-2", 1, &[false, false]), Pick::Go(..)), "a's slot came back");
    }

    #[test]
    fn an_unhealthy_deployment_is_skipped_then_probed_by_one_call() {
        let pool = Pool::new(
            "p",
            vec![deployment("a", |s| s.unhealthy_for = Duration::from_millis(1)), deployment("b", |s| s.weight = 1)],
        );
        pool.deployments[0].failed();
        assert_eq!(pool.deployments[0].status().state, "unhealthy");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(pool.deployments[0].status().state, "probing");
        let probe = pool.pick("dall-e-2", 1, &[false, true]);
        assert!(matches!(probe, Pick::Go(0, _)));
        assert!(matches!(pool.pick("dall-e-2", 1, &[false, true]), Pick::None { .. }), "one probe at a time");
        drop(probe);
        pool.deployments[0].succeeded();
        assert_eq!(pool.deployments[0].status().state, "healthy");
    }

    #[test]
    fn error_events_are_told_from_interruptions() {
        assert!(is_upstream_error_event(b"event: error\ndata: {\"error\":{\"message\":\"x\"}}\n\n"));
        assert!(is_upstream_error_event(b"data: {\"type\":\"error\",\"error\":{}}\n\n"));
        assert!(!is_upstream_error_event(b"event: image_generation.partial_image\ndata: {}\n\n"));
        let ours = crate::upstream::sse_error_event("cut", "server_error", Some("upstream_stream_interrupted"));
        assert!(!is_upstream_error_event(&ours));
    }

    #[test]
    fn retry_after_reads_milliseconds_first() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
    }
}
