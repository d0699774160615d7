//! The usage ledger: one row per request, written off the request path. Requests hand their record to a
//! bounded queue and never wait for the database; a background task writes batches in one transaction and,
//! on shutdown, drains the queue before the process exits, so no row is lost to a SIGTERM.
//!
//! What the writer does when the database says no:
//!
//! - a **transient** failure (a locked SQLite file, a Postgres restart, a pool timeout) keeps the batch and
//!   retries it with exponential backoff. Meanwhile new rows wait in the queue, so memory stays bounded by
//!   `usage.queue_capacity`; rows that find the queue full are counted and logged as dropped;
//! - a failure **caused by the rows** (a value the database refuses, a duplicate id) splits the batch and
//!   writes its rows one by one, so one bad row never takes other tenants' rows down; a row the database
//!   still refuses is logged with its request id and counted as rejected;
//! - at shutdown the writer keeps retrying for at most `usage.shutdown_flush_timeout`; what is still
//!   unwritten then is counted and logged as dropped.
//!
//! Stored text is cleaned first ([`sanitize`]): control characters (NUL, which PostgreSQL text refuses,
//! among them) are removed and lengths capped, since rows keep the caller's model, size and quality as sent.
//!
//! `report` reads the ledger back as summaries (admin API, CLI); `rollup` keeps per-day totals beside the rows
//! (written with each batch) for the console; `browse` reads rows and totals for the console.

pub mod browse;
pub mod record;
pub mod report;
pub mod rollup;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::record::UsageRecord;
use crate::config::UsageSettings;
use crate::db::{Backend, Db};
use crate::metrics::facts;
use crate::metrics::{Metrics, UsageSample};

/// The longest model name stored (longer ones are cut).
pub const MAX_MODEL_CHARS: usize = 128;
/// The longest `size`, `quality`, request id or key id stored.
pub const MAX_SHORT_CHARS: usize = 128;
/// The longest prompt stored for tenants that opted into prompt logging.
pub const MAX_PROMPT_CHARS: usize = 32_000;

/// The first wait after a transient failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What this process has queued for the ledger and not written yet, per tenant: the spend a budget seeded
/// from the ledger would miss (the Redis limits add it when they seed a counter, docs/rate-limits.md).
#[derive(Debug, Default)]
pub struct Unwritten {
    by_tenant: std::sync::Mutex<std::collections::HashMap<String, Pending>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    rows: u64,
    images: u64,
    usd: f64,
}

impl Unwritten {
    /// Images and USD of `tenant_id`'s rows queued or being written now, counted as
    /// [`report::spent_since`] counts them.
    pub fn spent(&self, tenant_id: &str) -> (u64, f64) {
        self.by_tenant.lock().ok().and_then(|m| m.get(tenant_id).map(|p| (p.images, p.usd))).unwrap_or((0, 0.0))
    }

    fn add(&self, r: &UsageRecord) {
        let (images, usd) = spend_of(r);
        if let Ok(mut m) = self.by_tenant.lock() {
            let p = m.entry(r.tenant_id.clone()).or_default();
            p.rows += 1;
            p.images += images;
            p.usd += usd;
        }
    }

    fn remove(&self, tenant_id: &str, images: u64, usd: f64) {
        if let Ok(mut m) = self.by_tenant.lock()
            && let Some(p) = m.get_mut(tenant_id)
        {
            p.rows = p.rows.saturating_sub(1);
            p.images = p.images.saturating_sub(images);
            p.usd = (p.usd - usd).max(0.0);
            // The last row gone: drop the entry (no float residue, no growth with tenants).
            if p.rows == 0 {
                m.remove(tenant_id);
            }
        }
    }
}

/// What a row spends from the budgets: `report::spent_since`'s arithmetic for one row.
fn spend_of(r: &UsageRecord) -> (u64, f64) {
    let images = if r.cache_hit { 0 } else { u64::from(r.images_returned.unwrap_or(0)) };
    (images, r.cost_usd)
}

/// The sending side, shared by every request.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::Sender<UsageRecord>,
    counters: Arc<Counters>,
    /// Rows queued and not written yet.
    unwritten: Arc<Unwritten>,
    /// Images, tokens and cost by tenant and model, batch latency and database errors, when observed.
    metrics: Option<Arc<Metrics>>,
}

/// What the writer has done so far, for tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerStats {
    /// Rows stored.
    pub written: u64,
    /// Rows the database refused on their own (logged with their request id).
    pub rejected: u64,
    /// Rows lost because the queue was full or the shutdown deadline passed.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    /// Rows dropped because the queue was full, not yet reported in the log.
    unreported_full: AtomicU64,
}

/// The writer task; `close` flushes and waits.
pub struct LedgerWriter {
    handle: JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Ledger {
    /// Start the writer on `db`.
    pub fn start(db: Db, settings: &UsageSettings) -> (Self, LedgerWriter) {
        Self::start_observed(db, settings, None)
    }

    /// Start the writer on `db`, counting every record's images, tokens and cost, and every batch, in `metrics`.
    pub fn start_observed(db: Db, settings: &UsageSettings, metrics: Option<Arc<Metrics>>) -> (Self, LedgerWriter) {
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let counters = Arc::new(Counters::default());
        let unwritten = Arc::new(Unwritten::default());
        let writer = Writer {
            unwritten: unwritten.clone(),
            db,
            batch_size: settings.batch_size,
            interval: settings.flush_interval,
            shutdown_timeout: settings.shutdown_flush_timeout,
            counters: counters.clone(),
            metrics: metrics.clone(),
        };
        let handle = tokio::spawn(writer.run(rx, stopped));
        (Self { tx, counters, unwritten, metrics }, LedgerWriter { handle, stop })
    }

    /// Queue a record; never blocks. A full queue drops the record; the writer reports how many were dropped
    /// (one log line per batch, not one per row, so an overload does not also flood the log).
    #[tracing::instrument(name = "ledger", level = "debug", skip_all)]
    pub fn record(&self, mut record: UsageRecord) {
        sanitize(&mut record);
        record.emit();
        self.observe(&record);
        // Counted before it is queued: the writer may write (and uncount) it at once.
        self.unwritten.add(&record);
        if let Err(e) = self.tx.try_send(record) {
            let r = e.into_inner();
            let (images, usd) = spend_of(&r);
            self.unwritten.remove(&r.tenant_id, images, usd);
            self.counters.unreported_full.fetch_add(1, Ordering::Relaxed);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The record's images, tokens and cost in the metrics, and its facts on the request's access-log line.
    fn observe(&self, r: &UsageRecord) {
        let images = r.images_returned.unwrap_or(0);
        if let Some(m) = &self.metrics {
            m.usage(UsageSample {
                tenant: &r.tenant,
                model: &r.model,
                images,
                cached: r.cache_hit,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cost_usd: r.cost_usd,
            });
        }
        facts::note(|f| {
            f.model = Some(r.model.clone());
            f.images = r.images_returned;
            f.cost_usd = Some(r.cost_usd);
            f.stream = r.stream;
        });
    }

    /// The spend of rows queued and not written yet.
    pub fn unwritten(&self) -> Arc<Unwritten> {
        self.unwritten.clone()
    }

    /// Rows waiting in the queue now, and how many it holds at most.
    pub fn queue(&self) -> (u64, u64) {
        let max = self.tx.max_capacity();
        let waiting = max.saturating_sub(self.tx.capacity());
        (waiting as u64, max as u64)
    }

    /// Counters since the start.
    pub fn stats(&self) -> LedgerStats {
        LedgerStats {
            written: self.counters.written.load(Ordering::Relaxed),
            rejected: self.counters.rejected.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }
}

impl LedgerWriter {
    /// Write every row queued so far (retrying for at most `usage.shutdown_flush_timeout`), then stop. Call
    /// once the server has stopped serving.
    pub async fn close(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "usage writer stopped abnormally");
        }
    }
}

/// Remove control characters and cap the length of every stored text field, so no value the caller chose can
/// make the database refuse the row (PostgreSQL text refuses NUL) or bloat it. Prompts keep line breaks and
/// tabs.
pub fn sanitize(record: &mut UsageRecord) {
    for (field, max) in [
        (&mut record.model, MAX_MODEL_CHARS),
        (&mut record.request_id, MAX_SHORT_CHARS),
        (&mut record.key_id, MAX_SHORT_CHARS),
        (&mut record.tenant_id, MAX_SHORT_CHARS),
    ] {
        clean(field, max, false);
    }
    if let Some(requested) = &mut record.requested_model {
        clean(requested, MAX_MODEL_CHARS, false);
    }
    for field in [&mut record.size, &mut record.quality, &mut record.upstream_request_id].into_iter().flatten() {
        clean(field, MAX_SHORT_CHARS, false);
    }
    if let Some(prompt) = record.prompt.as_mut() {
        clean(prompt, MAX_PROMPT_CHARS, true);
    }
}

fn clean(text: &mut String, max_chars: usize, keep_breaks: bool) {
    let unwanted = |c: char| c.is_control() && !(keep_breaks && matches!(c, '\n' | '\t'));
    // The common case, short printable ASCII, by bytes (no char decoding): every row passes here several times.
    let printable = |b: u8| (0x20..0x7f).contains(&b) || (keep_breaks && matches!(b, b'\n' | b'\t'));
    if text.len() <= max_chars && text.bytes().all(printable) {
        return;
    }
    // Byte length first: it bounds the characters, and is free.
    let short = text.len() <= max_chars || text.chars().nth(max_chars).is_none();
    if short && !text.chars().any(unwanted) {
        return;
    }
    *text = text.chars().filter(|c| !unwanted(*c)).take(max_chars).collect();
}

/// What the writer task works with.
struct Writer {
    db: Db,
    unwritten: Arc<Unwritten>,
    batch_size: usize,
    interval: Duration,
    shutdown_timeout: Duration,
    counters: Arc<Counters>,
    metrics: Option<Arc<Metrics>>,
}

/// Why a write did not complete.
#[derive(Debug)]
enum WriteError {
    /// The database could not be used just now; the rows are kept for a retry.
    Transient(String),
    /// The shutdown deadline passed; the rows are kept (and then dropped by the caller).
    Deadline,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transient(e) => f.write_str(e),
            Self::Deadline => f.write_str("the shutdown deadline passed"),
        }
    }
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<UsageRecord>, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut backoff: Option<Duration> = None;
        let mut stopping = false;
        while !stopping {
            if batch.is_empty() {
                let first = tokio::select! {
                    next = rx.recv() => next,
                    _ = &mut stop => None,
                };
                let Some(first) = first else { break };
                batch.push(first);
                stopping = self.fill(&mut rx, &mut batch, &mut stop).await;
                if stopping {
                    break;
                }
            } else {
                // Retrying: top the kept rows up with what queued meanwhile, without waiting.
                top_up(&mut rx, &mut batch, self.batch_size);
            }
            match self.write(&mut batch, None).await {
                Ok(()) => backoff = None,
                Err(e) => {
                    let wait = backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                    backoff = Some(wait);
                    tracing::warn!(
                        error = %e,
                        rows = batch.len(),
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "usage write failed; the rows are kept and retried"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = &mut stop => stopping = true,
                    }
                }
            }
        }
        self.drain(rx, batch).await;
    }

    /// Collect rows until the batch is full or `flush_interval` has passed since the first. Returns true when
    /// the stop signal came meanwhile (the batch is then written by the shutdown drain).
    async fn fill(
        &self,
        rx: &mut mpsc::Receiver<UsageRecord>,
        batch: &mut Vec<UsageRecord>,
        stop: &mut tokio::sync::oneshot::Receiver<()>,
    ) -> bool {
        let deadline = tokio::time::sleep(self.interval);
        tokio::pin!(deadline);
        while batch.len() < self.batch_size {
            let room = self.batch_size - batch.len();
            tokio::select! {
                // Every row queued by the time the writer runs, not one per wake-up: under load, rows arrive
                // faster than the writer task is scheduled.
                taken = rx.recv_many(batch, room) => if taken == 0 { break },
                () = &mut deadline => break,
                _ = &mut *stop => return true,
            }
        }
        false
    }

    /// Shutting down: write whatever is queued now, retrying transient failures until the deadline.
    async fn drain(&self, mut rx: mpsc::Receiver<UsageRecord>, mut batch: Vec<UsageRecord>) {
        let deadline = Instant::now() + self.shutdown_timeout;
        let mut backoff = FIRST_BACKOFF;
        loop {
            top_up(&mut rx, &mut batch, self.batch_size);
            if batch.is_empty() {
                break;
            }
            match self.write(&mut batch, Some(deadline)).await {
                Ok(()) => {}
                Err(WriteError::Deadline) => break,
                Err(e) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    tracing::warn!(error = %e, rows = batch.len(), "usage write failed during shutdown, retrying");
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let mut lost = batch.len();
        let first_lost = batch.first().map(|r| r.request_id.clone());
        while rx.try_recv().is_ok() {
            lost += 1;
        }
        self.report_full_queue();
        if lost > 0 {
            self.counters.dropped.fetch_add(lost as u64, Ordering::Relaxed);
            tracing::error!(
                rows = lost,
                first_request_id = first_lost.as_deref(),
                timeout_secs = self.shutdown_timeout.as_secs_f64(),
                "usage rows could not be written before usage.shutdown_flush_timeout and are lost"
            );
        } else {
            tracing::debug!("usage writer drained");
        }
    }

    fn report_full_queue(&self) {
        let dropped = self.counters.unreported_full.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::error!(
                rows = dropped,
                "usage queue full: rows were dropped (raise usage.queue_capacity, or the database cannot keep up)"
            );
        }
    }

    /// [`Writer::write_batch`], timed and its database failures counted in the metrics.
    async fn write(&self, batch: &mut Vec<UsageRecord>, deadline: Option<Instant>) -> Result<(), WriteError> {
        self.report_full_queue();
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let spends: Vec<(String, u64, f64)> =
            batch.iter().map(|r| (r.tenant_id.clone(), spend_of(r).0, spend_of(r).1)).collect();
        let result = self.write_batch(batch, deadline).await;
        // The rows kept for a retry are always the batch's tail: the ones before it were written or refused.
        let done = spends.len().saturating_sub(batch.len());
        for (tenant_id, images, usd) in &spends[..done] {
            self.unwritten.remove(tenant_id, *images, *usd);
        }
        if let Some(m) = &self.metrics {
            m.ledger_batch(started.elapsed());
            if matches!(result, Err(WriteError::Transient(_))) {
                m.ledger_database_error();
            }
        }
        result
    }

    /// Write `batch`. On success it is empty afterwards; on a transient failure (or the deadline) it holds the
    /// rows still to be written. Rows the database refuses on their own are logged, counted and removed.
    async fn write_batch(&self, batch: &mut Vec<UsageRecord>, deadline: Option<Instant>) -> Result<(), WriteError> {
        match insert_until(&self.db, batch, deadline).await {
            Ok(()) => {
                self.counters.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
                return Ok(());
            }
            Err(Attempt::Deadline) => return Err(WriteError::Deadline),
            Err(Attempt::Failed(e)) if is_transient(&e, self.db.backend()) => {
                return Err(WriteError::Transient(e.to_string()));
            }
            Err(Attempt::Failed(e)) if batch.len() > 1 => {
                tracing::warn!(error = %e, rows = batch.len(), "the database refused a usage batch; writing its rows one by one");
            }
            Err(Attempt::Failed(e)) => {
                self.reject(&batch[0], &e);
                batch.clear();
                return Ok(());
            }
        }
        // One by one: a row that still fails on its own is rejected; a transient failure keeps this row and
        // every later one for the retry.
        let rows = std::mem::take(batch);
        let mut rows = rows.into_iter();
        while let Some(row) = rows.next() {
            match insert_until(&self.db, std::slice::from_ref(&row), deadline).await {
                Ok(()) => {
                    self.counters.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(Attempt::Failed(e)) if !is_transient(&e, self.db.backend()) => self.reject(&row, &e),
                Err(failure) => {
                    batch.push(row);
                    batch.extend(rows);
                    return Err(match failure {
                        Attempt::Deadline => WriteError::Deadline,
                        Attempt::Failed(e) => WriteError::Transient(e.to_string()),
                    });
                }
            }
        }
        Ok(())
    }

    fn reject(&self, row: &UsageRecord, e: &sqlx::Error) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            request_id = %row.request_id,
            tenant = %row.tenant,
            error = %e,
            "the database refused this usage row; it is not stored"
        );
    }
}

/// Move queued rows into `batch` without waiting, up to `max`.
fn top_up(rx: &mut mpsc::Receiver<UsageRecord>, batch: &mut Vec<UsageRecord>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

/// Whether a failure is the database being unavailable (worth retrying the same rows) rather than the rows
/// themselves being refused.
fn is_transient(e: &sqlx::Error, backend: Backend) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| transient_code(&code, backend)),
        _ => false,
    }
}

/// SQLite reports numeric extended result codes, PostgreSQL five-character SQLSTATEs.
fn transient_code(code: &str, backend: Backend) -> bool {
    match backend {
        // BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL (the primary code is the low byte)
        Backend::Sqlite => {
            code.parse::<i32>().is_ok_and(|extended| matches!(extended & 0xff, 5 | 6 | 10 | 13 | 14 | 15))
        }
        // connection exception, transaction rollback (serialization, deadlock), insufficient resources, operator
        // intervention (shutdown, cancel), system error
        Backend::Postgres => ["08", "40", "53", "57", "58"].iter().any(|class| code.starts_with(class)),
    }
}

enum Attempt {
    Failed(sqlx::Error),
    Deadline,
}

async fn insert_until(db: &Db, rows: &[UsageRecord], deadline: Option<Instant>) -> Result<(), Attempt> {
    match deadline {
        None => insert(db, rows).await.map_err(Attempt::Failed),
        Some(at) => match tokio::time::timeout_at(at, insert(db, rows)).await {
            Ok(result) => result.map_err(Attempt::Failed),
            Err(_) => Err(Attempt::Deadline),
        },
    }
}

/// Parameters per row of the INSERT.
const COLUMNS: usize = 23;

/// Rows per INSERT statement, on both databases: 1,000 parameters, one round trip on PostgreSQL, one
/// statement step on SQLite.
const ROWS_PER_STATEMENT: usize = 50;

const INSERT_HEAD: &str = "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
     images_requested, images_returned, size, quality, input_tokens, output_tokens, cost_usd, status, latency_ms, \
     stream, cache_hit, upstream_request_id, prompt, refused_by, requested_model, deployment, \
     possibly_billed) VALUES ";

/// The INSERT of `rows` rows, built once per backend and row count and kept: sqlx caches the prepared
/// statement by its text, so a full batch reuses the same prepared statement every time.
///
/// SQLite gets anonymous `?` placeholders. sqlx asks SQLite for each parameter's name as it binds, and SQLite
/// finds a name by walking the statement's list of named parameters, so `$n` placeholders made binding cost
/// grow with the square of the parameters per statement (a tenth of the gateway's CPU at 50 rows, measured
/// with `perf`; docs/performance.md). Anonymous placeholders have no names to walk. PostgreSQL needs `$n`.
fn insert_sql(backend: Backend, rows: usize) -> &'static str {
    use std::sync::OnceLock;
    static SQLITE: OnceLock<Vec<String>> = OnceLock::new();
    static POSTGRES: OnceLock<Vec<String>> = OnceLock::new();
    let cell = match backend {
        Backend::Sqlite => &SQLITE,
        Backend::Postgres => &POSTGRES,
    };
    let all = cell.get_or_init(|| (0..=ROWS_PER_STATEMENT).map(|n| build_insert_sql(backend, n)).collect());
    all.get(rows).map_or(INSERT_HEAD, String::as_str)
}

fn build_insert_sql(backend: Backend, rows: usize) -> String {
    let mut sql = String::with_capacity(INSERT_HEAD.len() + rows * COLUMNS * 6);
    sql.push_str(INSERT_HEAD);
    push_values(&mut sql, backend, rows, COLUMNS);
    sql
}

/// Appends the placeholders of a multi-row `VALUES` list, `rows` tuples of `columns` each: `(?, ?), (?, ?)` on
/// SQLite, `($1, $2), ($3, $4)` on PostgreSQL.
fn push_values(sql: &mut String, backend: Backend, rows: usize, columns: usize) {
    use std::fmt::Write as _;
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${}", row * columns + c + 1);
                }
            }
        }
        sql.push(')');
    }
}

/// The rows of each INSERT that writes `rows` rows: full statements of [`ROWS_PER_STATEMENT`], then the rest in
/// falling powers of two (37 = 32 + 4 + 1). Only seven statement texts are ever used, so each connection's
/// statement cache keeps all of them prepared from batch to batch. With one statement for the rest, a batch the
/// timer flushed part full (any rate below `batch_size` rows per `flush_interval`) had a row count of its own
/// and SQLite parsed a new INSERT of up to 1,127 parameters for it: 8 % of the gateway's instructions per
/// request under callgrind (docs/performance.md).
fn statement_rows(mut rows: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let take = match rows {
            0 => return None,
            n if n >= ROWS_PER_STATEMENT => ROWS_PER_STATEMENT,
            n => 1 << n.ilog2(),
        };
        rows -= take;
        Some(take)
    })
}

/// Write `batch` in one transaction, many rows per statement, with its per-day totals (`rollup`).
async fn insert(db: &Db, batch: &[UsageRecord]) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await?;
    let mut rest = batch;
    for count in statement_rows(batch.len()) {
        let (rows, tail) = rest.split_at(count);
        rest = tail;
        let mut query = sqlx::query(insert_sql(db.backend(), rows.len()));
        for r in rows {
            query = query
                .bind(r.request_id.as_str())
                .bind(r.created_at)
                .bind(r.tenant_id.as_str())
                .bind(r.key_id.as_str())
                .bind(r.endpoint)
                .bind(r.model.as_str())
                .bind(i64::from(r.images_requested))
                .bind(r.images_returned.map(i64::from))
                .bind(r.size.as_deref())
                .bind(r.quality.as_deref())
                .bind(r.input_tokens.and_then(|t| i64::try_from(t).ok()))
                .bind(r.output_tokens.and_then(|t| i64::try_from(t).ok()))
                .bind(r.cost_usd)
                .bind(i64::from(r.status))
                .bind(i64::try_from(r.latency_ms).unwrap_or(i64::MAX))
                .bind(i64::from(r.stream))
                .bind(i64::from(r.cache_hit))
                .bind(r.upstream_request_id.as_deref())
                .bind(r.prompt.as_deref())
                .bind(r.refused_by)
                .bind(r.requested_model.as_deref())
                .bind(r.deployment.as_deref())
                .bind(i64::from(r.possibly_billed));
        }
        query.execute(&mut *tx).await?;
    }
    // The per-day totals the console reads commit or roll back with the rows they count.
    rollup::add(&mut tx, db.backend(), batch).await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UsageRecord {
        UsageRecord {
            request_id: "req_1".into(),
            created_at: 1,
            tenant_id: "t".into(),
            tenant: "team".into(),
            key_id: "abcd1234".into(),
            endpoint: "generations",
            model: "gpt-image-1".into(),
            requested_model: None,
            images_requested: 1,
            images_returned: None,
            size: None,
            quality: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: 0.0,
            status: 400,
            latency_ms: 1,
            stream: false,
            cache_hit: false,
            upstream_request_id: None,
            prompt: None,
            refused_by: None,
            deployment: None,
            possibly_billed: false,
        }
    }

    #[test]
    fn stored_text_loses_control_characters_and_is_capped() {
        let mut r = record();
        r.model = format!("gpt\u{0}-image\u{1b}[31m-{}", "x".repeat(500));
        r.size = Some("1024x1024\u{0}".into());
        r.upstream_request_id = Some("req-\u{85}é\u{7f}".into());
        r.quality = Some("hi\r\ngh".into());
        r.prompt = Some("line one\nline two\u{0}\ttabbed\r".into());
        sanitize(&mut r);
        assert!(r.model.starts_with("gpt-image[31m-xxx"), "{}", r.model);
        assert_eq!(r.model.chars().count(), MAX_MODEL_CHARS);
        assert_eq!(r.size.as_deref(), Some("1024x1024"));
        assert_eq!(r.upstream_request_id.as_deref(), Some("req-é"), "C1 controls and DEL go, letters stay");
        assert_eq!(r.quality.as_deref(), Some("high"));
        assert_eq!(r.prompt.as_deref(), Some("line one\nline two\ttabbed"));
        let mut plain = record();
        sanitize(&mut plain);
        assert_eq!(plain, record(), "clean values are kept as they are");
    }

    #[test]
    fn insert_statements_have_one_placeholder_per_value() {
        for rows in [1, 7, ROWS_PER_STATEMENT] {
            let sqlite = insert_sql(Backend::Sqlite, rows);
            assert_eq!(sqlite.matches('?').count(), rows * COLUMNS, "{sqlite}");
            assert!(!sqlite.contains('$'), "{sqlite}");
            let postgres = insert_sql(Backend::Postgres, rows);
            assert_eq!(postgres.matches('$').count(), rows * COLUMNS);
            assert!(postgres.ends_with(&format!("${})", rows * COLUMNS)), "{postgres}");
            assert_eq!(postgres.matches(", (").count(), rows - 1);
        }
    }

    #[test]
    fn a_batch_of_any_size_is_written_with_the_same_few_statement_sizes() {
        let mut sizes = std::collections::BTreeSet::new();
        for rows in 0..=1_000 {
            let counts: Vec<usize> = statement_rows(rows).collect();
            assert_eq!(counts.iter().sum::<usize>(), rows, "{counts:?}");
            assert!(counts.len() <= rows / ROWS_PER_STATEMENT + 6, "{rows}: {counts:?}");
            sizes.extend(counts);
        }
        assert_eq!(sizes.into_iter().collect::<Vec<_>>(), [1, 2, 4, 8, 16, 32, ROWS_PER_STATEMENT]);
    }

    #[test]
    fn lock_and_connection_failures_are_transient_but_refused_values_are_not() {
        for code in ["5", "517", "6", "10", "13"] {
            assert!(transient_code(code, Backend::Sqlite), "{code}");
        }
        for code in ["19", "1555", "2067", "1"] {
            assert!(!transient_code(code, Backend::Sqlite), "{code}");
        }
        for code in ["08006", "57P01", "40001", "53100"] {
            assert!(transient_code(code, Backend::Postgres), "{code}");
        }
        for code in ["22021", "23505", "42P01", "22001"] {
            assert!(!transient_code(code, Backend::Postgres), "{code}");
        }
        assert!(is_transient(&sqlx::Error::PoolTimedOut, Backend::Postgres));
        assert!(!is_transient(&sqlx::Error::RowNotFound, Backend::Sqlite));
    }
}
