//! The usage ledger: one row per request, written off the request path. Requests hand their record to a
//! bounded queue and never wait for the database; a background task writes batches in one transaction and,
//! on shutdown, drains the queue before the process exits, so no row is lost to a SIGTERM.
//!
//! `report` reads the ledger back as summaries (admin API, CLI).

pub mod report;

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
        let handle = tokio::spawn(write_loop(db, rx, stopped, settings.batch_size, settings.flush_interval));
        (Self { tx }, LedgerWriter { handle, stop })
    }

    /// Queue a record; never blocks. A full queue drops the record and says so in the log.
    pub fn record(&self, record: UsageRecord) {
        record.emit();
        if let Err(e) = self.tx.try_send(record) {
            tracing::error!(error = %e, "usage queue full or closed: a usage row was dropped");
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

async fn write_loop(
    db: Db,
    mut rx: mpsc::Receiver<UsageRecord>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    batch_size: usize,
    interval: Duration,
) {
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
        write_batch(&db, &mut batch).await;
    }
    // Shutting down: whatever is queued now is written before the process exits.
    while let Ok(r) = rx.try_recv() {
        batch.push(r);
        if batch.len() >= batch_size {
            write_batch(&db, &mut batch).await;
        }
    }
    write_batch(&db, &mut batch).await;
    tracing::debug!("usage writer drained");
}

async fn write_batch(db: &Db, batch: &mut Vec<UsageRecord>) {
    if batch.is_empty() {
        return;
    }
    let count = batch.len();
    // One retry covers a transient failure (a busy SQLite file, a Postgres failover).
    for attempt in 0..2 {
        match insert(db, batch).await {
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

async fn insert(db: &Db, batch: &[UsageRecord]) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await?;
    for r in batch {
        sqlx::query(
            "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
             images_requested, images_returned, size, quality, input_tokens, output_tokens, cost_usd, status, \
             latency_ms, stream, cache_hit, upstream_request_id, prompt) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
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
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}
