//! The usage ledger: one row per request, written off the request path. Requests hand their record to a
//! bounded queue and never wait for the database; a background task writes batches in one transaction and,
//! on shutdown, drains the queue before the process exits, so no row is lost to a SIGTERM.
//!
//! `report` reads the ledger back as summaries (admin API, CLI).

pub mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::UsageSettings;
use crate::db::Db;
use crate::images::usage::UsageRecord;

/// The sending side, shared by every request.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::Sender<UsageRecord>,
    /// Rows dropped because the queue was full, not yet reported in the log.
    dropped: Arc<AtomicU64>,
}

/// The writer task; `close` flushes and waits.
pub struct LedgerWriter {
    handle: JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Ledger {
    /// Start the writer on `db`.
    pub fn start(db: Db, settings: &UsageSettings) -> (Self, LedgerWriter) {
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let loop_state = Writer { db, batch_size: settings.batch_size, dropped: dropped.clone() };
        let handle = tokio::spawn(write_loop(loop_state, rx, stopped, settings.flush_interval));
        (Self { tx, dropped }, LedgerWriter { handle, stop })
    }

    /// Queue a record; never blocks. A full queue drops the record; the writer reports how many were dropped
    /// (one log line per batch, not one per row, so an overload does not also flood the log).
    pub fn record(&self, record: UsageRecord) {
        record.emit();
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl LedgerWriter {
    /// Write every row queued so far, then stop. Call once the server has stopped serving.
    pub async fn close(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "usage writer stopped abnormally");
        }
    }
}

/// What the writer task works with.
struct Writer {
    db: Db,
    batch_size: usize,
    dropped: Arc<AtomicU64>,
}

async fn write_loop(
    writer: Writer,
    mut rx: mpsc::Receiver<UsageRecord>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    interval: Duration,
) {
    let batch_size = writer.batch_size;
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        let first = tokio::select! {
            next = rx.recv() => next,
            _ = &mut stop => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        let deadline = tokio::time::sleep(interval);
        tokio::pin!(deadline);
        while batch.len() < batch_size {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(r) => batch.push(r),
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        writer.write_batch(&mut batch).await;
    }
    // Shutting down: whatever is queued now is written before the process exits.
    while let Ok(r) = rx.try_recv() {
        batch.push(r);
        if batch.len() >= batch_size {
            writer.write_batch(&mut batch).await;
        }
    }
    writer.write_batch(&mut batch).await;
    tracing::debug!("usage writer drained");
}

/// Rows per INSERT statement: 20 parameters each, well under SQLite's and PostgreSQL's parameter limits.
const ROWS_PER_STATEMENT: usize = 50;
const COLUMNS: usize = 20;

impl Writer {
    async fn write_batch(&self, batch: &mut Vec<UsageRecord>) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::error!(
                rows = dropped,
                "usage queue full: rows were dropped (raise usage.queue_capacity, or the database cannot keep up)"
            );
        }
        if batch.is_empty() {
            return;
        }
        let count = batch.len();
        // One retry covers a transient failure (a busy SQLite file, a Postgres failover).
        for attempt in 0..2 {
            match insert(&self.db, batch).await {
                Ok(()) => {
                    batch.clear();
                    return;
                }
                Err(e) if attempt == 0 => {
                    tracing::warn!(error = %e, rows = count, "usage write failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => tracing::error!(error = %e, rows = count, "usage rows could not be written and were dropped"),
            }
        }
        batch.clear();
    }
}

/// Write `batch` in one transaction, many rows per statement.
async fn insert(db: &Db, batch: &[UsageRecord]) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await?;
    for rows in batch.chunks(ROWS_PER_STATEMENT) {
        let values: Vec<String> = (0..rows.len())
            .map(|row| {
                let params: Vec<String> = (1..=COLUMNS).map(|c| format!("${}", row * COLUMNS + c)).collect();
                format!("({})", params.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
             images_requested, images_returned, size, quality, input_tokens, output_tokens, cost_usd, status, \
             latency_ms, stream, cache_hit, upstream_request_id, prompt, refused_by) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for r in rows {
            query = query
                .bind(r.request_id.clone())
                .bind(r.created_at)
                .bind(r.tenant_id.clone())
                .bind(r.key_id.clone())
                .bind(r.endpoint)
                .bind(r.model.clone())
                .bind(i64::from(r.images_requested))
                .bind(r.images_returned.map(i64::from))
                .bind(r.size.clone())
                .bind(r.quality.clone())
                .bind(r.input_tokens.and_then(|t| i64::try_from(t).ok()))
                .bind(r.output_tokens.and_then(|t| i64::try_from(t).ok()))
                .bind(r.cost_usd)
                .bind(i64::from(r.status))
                .bind(i64::try_from(r.latency_ms).unwrap_or(i64::MAX))
                .bind(i64::from(r.stream))
                .bind(i64::from(r.cache_hit))
                .bind(r.upstream_request_id.clone())
                .bind(r.prompt.clone())
                .bind(r.refused_by);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await
}
