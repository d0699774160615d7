//! The usage writer's own connection to a SQLite file: a thread of its own that writes each batch in one
//! transaction, binding the values straight from the records into statements it keeps prepared (the pool's
//! statement sizes: up to 50 rows each).
//!
//! Through the pool, a batch went to sqlx's worker thread one statement at a time, and each value was first
//! copied into an owned argument list (that thread needs `'static` values), then converted from sqlx's `Any`
//! values to SQLite's. Here a batch moves to the thread behind an `Arc` and comes back whole with its outcome:
//! one hand-over each way. A cache hit's CPU fell by about a sixth on a 2-vCPU VM (docs/performance.md,
//! decision 0018). PostgreSQL, and SQLite in memory, are still written through the pool.
//!
//! The rest of the pool's SQLite set-up holds for this connection too (WAL, `synchronous = NORMAL`, foreign
//! keys), and it waits up to 5 s for another writer's lock as the pool's connections do (`busy_timeout`), but
//! in steps of [`BUSY_POLL`] that the shutdown deadline can cut short ([`busy`]).

use std::cell::{Cell, OnceCell};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::record::UsageRecord;
use super::rollup;
use crate::db::Backend;

/// How long a batch waits for another connection's write lock before it fails (transiently), as the pool's
/// `busy_timeout`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a batch waiting for the lock looks again, and whether the shutdown deadline has passed.
const BUSY_POLL: Duration = Duration::from_millis(10);

/// One batch for the thread, and where its outcome goes.
struct Job {
    rows: Arc<Vec<UsageRecord>>,
    done: oneshot::Sender<rusqlite::Result<()>>,
}

/// The sending side of the writer thread. Dropped (or [`SqliteLedger::close`]d), the thread finishes the
/// batch in hand and closes its connection.
pub struct SqliteLedger {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    /// Set when the shutdown deadline has passed: the batch in hand stops waiting for a lock and is rolled
    /// back unless it has committed, and later ones fail at once.
    give_up: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Why a batch was not written.
#[derive(Debug)]
pub enum Failure {
    /// SQLite's answer; the rows are the caller's again.
    Sqlite(rusqlite::Error),
    /// The shutdown deadline passed first.
    Deadline,
    /// The thread is gone (it panicked); nothing more can be written through it.
    Gone,
}

impl SqliteLedger {
    /// Start the thread for the database in `file`. The connection is opened by the first batch (and again by
    /// the next one if opening failed), so a file that cannot be opened yet fails batches as the pool would:
    /// transiently, kept and retried.
    pub fn start(file: PathBuf) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let give_up = Arc::new(AtomicBool::new(false));
        let flag = give_up.clone();
        let thread = std::thread::Builder::new().name("ledger-sqlite".to_owned()).spawn(move || {
            GIVE_UP.with(|cell| cell.set(flag)).ok();
            let mut conn: Option<Connection> = None;
            for job in queue {
                let outcome = match &mut conn {
                    Some(conn) => write(conn, &job.rows),
                    None => open(&file).and_then(|mut opened| {
                        let outcome = write(&mut opened, &job.rows);
                        conn = Some(opened);
                        outcome
                    }),
                };
                // The rows go back to the writer with the outcome: it must hold the only reference by then.
                drop(job.rows);
                let _ = job.done.send(outcome);
            }
        })?;
        Ok(Self { jobs: Some(jobs), give_up, thread: Some(thread) })
    }

    /// Write `rows` in one transaction, with their per-day totals. With a `deadline`, a write still running
    /// then is given up (rolled back) and reported as [`Failure::Deadline`], unless it committed meanwhile.
    pub async fn insert(&self, rows: Arc<Vec<UsageRecord>>, deadline: Option<Instant>) -> Result<(), Failure> {
        let (done, outcome) = oneshot::channel();
        let sent = self.jobs.as_ref().is_some_and(|jobs| jobs.send(Job { rows, done }).is_ok());
        if !sent {
            return Err(Failure::Gone);
        }
        let outcome = match deadline {
            None => outcome.await,
            Some(at) => {
                tokio::pin!(outcome);
                tokio::select! {
                    done = &mut outcome => done,
                    () = tokio::time::sleep_until(at) => {
                        // The thread answers within a poll of the lock, or as soon as the statement in hand is
                        // done; what it says is the truth: committed, or not written.
                        self.give_up.store(true, Ordering::Relaxed);
                        return match outcome.await {
                            Ok(Ok(())) => Ok(()),
                            _ => Err(Failure::Deadline),
                        };
                    }
                }
            }
        };
        match outcome {
            Ok(result) => result.map_err(Failure::Sqlite),
            Err(_) => Err(Failure::Gone),
        }
    }

    /// Let the thread finish and close its connection (checkpointing the WAL), then return.
    pub async fn close(mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the usage writer's SQLite thread stopped abnormally");
            }
        }
    }
}

impl Failure {
    /// Whether the database was unavailable (worth retrying the same rows) rather than the rows refused.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => super::sqlite_code_is_transient(e.extended_code),
            Self::Sqlite(_) => false,
            Self::Deadline | Self::Gone => true,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(e) => write!(f, "{e}"),
            Self::Deadline => f.write_str("the shutdown deadline passed"),
            Self::Gone => f.write_str("the usage writer's SQLite thread is gone"),
        }
    }
}

thread_local! {
    /// The writer thread's [`SqliteLedger::give_up`].
    static GIVE_UP: OnceCell<Arc<AtomicBool>> = const { OnceCell::new() };
    /// When the current wait for another connection's lock began.
    static WAITING_SINCE: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
}

fn given_up() -> bool {
    GIVE_UP.with(|flag| flag.get().is_some_and(|flag| flag.load(Ordering::Relaxed)))
}

/// SQLite's busy handler for the writer's connection: `busy_timeout`'s wait, cut short once the shutdown deadline
/// has passed. `attempt` counts the calls of one wait, from 0. True: try the lock again.
fn busy(attempt: i32) -> bool {
    let now = std::time::Instant::now();
    let since = match WAITING_SINCE.get() {
        Some(since) if attempt > 0 => since,
        _ => {
            WAITING_SINCE.set(Some(now));
            now
        }
    };
    if given_up() || now.duration_since(since) >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(BUSY_POLL);
    true
}

/// The connection, set up as the pool's (`db::Db::connect`).
fn open(file: &std::path::Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(file, flags)?;
    conn.busy_handler(Some(busy))?;
    // The seven statement sizes of the INSERT and of the per-day upsert.
    conn.set_prepared_statement_cache_capacity(32);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// One batch and its per-day totals, in one transaction: all of it or none. Many rows per statement, in the
/// pool's statement sizes (`statement_rows`): each statement is stepped once for up to 50 rows, and the few
/// texts stay prepared.
fn write(conn: &mut Connection, rows: &[UsageRecord]) -> rusqlite::Result<()> {
    static UPSERTS: OnceLock<Vec<String>> = OnceLock::new();
    let upserts = UPSERTS
        .get_or_init(|| (0..=super::ROWS_PER_STATEMENT).map(|n| rollup::upsert_sql(Backend::Sqlite, n)).collect());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut rest = rows;
    for count in super::statement_rows(rows.len()) {
        let (chunk, tail) = rest.split_at(count);
        rest = tail;
        let mut insert = tx.prepare_cached(super::insert_sql(Backend::Sqlite, count))?;
        for (at, r) in chunk.iter().enumerate() {
            bind_row(&mut insert, at * super::COLUMNS, r)?;
        }
        insert.raw_execute()?;
    }
    let totals: Vec<_> = rollup::totals(rows).into_iter().collect();
    let mut rest = totals.as_slice();
    for count in super::statement_rows(totals.len()) {
        let (chunk, tail) = rest.split_at(count);
        rest = tail;
        let mut upsert = tx.prepare_cached(upserts.get(count).map_or("", String::as_str))?;
        for (at, ((day, tenant_id, model), t)) in chunk.iter().enumerate() {
            let values: [&dyn rusqlite::ToSql; 10] = [
                day,
                tenant_id,
                model,
                &t.requests,
                &t.images,
                &t.images_billed,
                &t.cost_usd,
                &t.cache_hits,
                &t.refused,
                &t.errors,
            ];
            for (column, value) in values.into_iter().enumerate() {
                upsert.raw_bind_parameter(at * values.len() + column + 1, value)?;
            }
        }
        upsert.raw_execute()?;
    }
    if given_up() {
        // Dropped, the transaction rolls back: nothing of the batch is written after the deadline.
        return Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT), None));
    }
    tx.commit()
}

/// One row's values, in the INSERT's column order, from parameter `base + 1` on.
fn bind_row(statement: &mut rusqlite::CachedStatement<'_>, base: usize, r: &UsageRecord) -> rusqlite::Result<()> {
    let values: [&dyn rusqlite::ToSql; super::COLUMNS] = [
        &r.request_id,
        &r.created_at,
        &r.tenant_id,
        &r.key_id,
        &r.endpoint,
        &r.model,
        &i64::from(r.images_requested),
        &r.images_returned.map(i64::from),
        &r.size,
        &r.quality,
        &r.input_tokens.and_then(|t| i64::try_from(t).ok()),
        &r.output_tokens.and_then(|t| i64::try_from(t).ok()),
        &r.cost_usd,
        &i64::from(r.status),
        &i64::try_from(r.latency_ms).unwrap_or(i64::MAX),
        &i64::from(r.stream),
        &i64::from(r.cache_hit),
        &r.upstream_request_id,
        &r.prompt,
        &r.refused_by,
        &r.requested_model,
        &r.deployment,
        &i64::from(r.possibly_billed),
    ];
    for (column, value) in values.into_iter().enumerate() {
        statement.raw_bind_parameter(base + column + 1, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use crate::config::DatabaseSettings;
    use crate::db::Db;

    fn row(request_id: &str) -> UsageRecord {
        UsageRecord {
            request_id: request_id.to_owned(),
            created_at: 1_800_000_000_000,
            tenant_id: "t1".into(),
            tenant: "team".into(),
            key_id: "abcd1234".into(),
            endpoint: "generations",
            model: "gpt-image-1".into(),
            requested_model: None,
            images_requested: 1,
            images_returned: Some(1),
            size: Some("1024x1024".into()),
            quality: None,
            input_tokens: Some(10),
            output_tokens: None,
            cost_usd: 0.04,
            status: 200,
            latency_ms: 12,
            stream: false,
            cache_hit: false,
            upstream_request_id: None,
            prompt: None,
            refused_by: None,
            deployment: None,
            possibly_billed: false,
        }
    }

    fn count(file: &std::path::Path, sql: &str) -> i64 {
        Connection::open(file).unwrap().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// A batch still waiting for another connection's lock when the shutdown deadline passes stops waiting at
    /// once (not after the 5 s a lock is waited for), is reported as not written, and is not written later
    /// either, once the lock is free: the rows the writer counts as lost are the rows missing.
    #[tokio::test]
    async fn a_batch_given_up_at_the_deadline_is_not_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let file = db.sqlite_file().unwrap().to_owned();
        let writer = SqliteLedger::start(file.clone()).unwrap();
        writer.insert(Arc::new(vec![row("req_before")]), None).await.unwrap();

        let lock = Connection::open(&file).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let started = std::time::Instant::now();
        let deadline = Instant::now() + Duration::from_millis(300);
        let late = writer.insert(Arc::new(vec![row("req_late_1"), row("req_late_2")]), Some(deadline)).await;
        assert!(matches!(late, Err(Failure::Deadline)), "{late:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "gave up after {:?}", started.elapsed());

        lock.execute_batch("COMMIT").unwrap();
        drop(lock);
        writer.close().await;
        assert_eq!(count(&file, "SELECT COUNT(*) FROM usage_events"), 1);
        assert_eq!(count(&file, "SELECT SUM(requests) FROM usage_daily"), 1, "the totals count the written row only");
        db.close().await;
    }

    /// Rows with every kind of value (text, numbers, NULLs) across several statement sizes, read back through
    /// the pool: what the writer's own connection stores is what the pool sees.
    #[tokio::test]
    async fn a_batch_is_stored_whole_with_its_daily_totals() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let writer = SqliteLedger::start(db.sqlite_file().unwrap().to_owned()).unwrap();
        let rows: Vec<UsageRecord> = (0..53)
            .map(|i| {
                let mut r = row(&format!("req_{i:03}"));
                r.tenant_id = format!("t{}", i % 3);
                r.quality = (i % 2 == 0).then(|| "high".to_owned());
                r
            })
            .collect();
        writer.insert(Arc::new(rows), None).await.unwrap();
        writer.close().await;

        let stored: Vec<(String, String, Option<String>, f64)> =
            sqlx::query_as("SELECT request_id, tenant_id, quality, cost_usd FROM usage_events ORDER BY request_id")
                .fetch_all(db.pool())
                .await
                .unwrap();
        assert_eq!(stored.len(), 53);
        assert_eq!(stored[4], ("req_004".to_owned(), "t1".to_owned(), Some("high".to_owned()), 0.04));
        assert_eq!(stored[5].2, None);
        let daily: Vec<(String, i64)> =
            sqlx::query_as("SELECT tenant_id, requests FROM usage_daily ORDER BY tenant_id")
                .fetch_all(db.pool())
                .await
                .unwrap();
        assert_eq!(daily, [("t0".to_owned(), 18), ("t1".to_owned(), 18), ("t2".to_owned(), 17)]);
        db.close().await;
    }
}
