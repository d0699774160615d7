//! Per-day totals of the ledger (`usage_daily`, migration 0010): by UTC day, tenant and model, the sums the
//! console's overview and budget bars show, so a year of usage is read as days × tenants × models rows
//! instead of every ledger row. Exact: the usage writer calls [`add`] with each batch inside the transaction
//! that inserts the batch's rows, so the totals commit (or roll back) with the rows they count. Ledger rows
//! are never updated or deleted, so nothing else has to keep the two in step; the migration backfilled the
//! rows written before it.

use std::collections::BTreeMap;

use sqlx::{AnyConnection, Row as _};

use super::record::UsageRecord;
use crate::db::{Backend, Db};

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// The UTC midnight starting the day `ms` falls in, as the migration's backfill computes it (integer
/// division: timestamps are never negative).
pub fn day_of(ms: i64) -> i64 {
    (ms / DAY_MS) * DAY_MS
}

/// The totals of one day, tenant and model, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DayTotals {
    pub requests: i64,
    /// Images handed to callers (cached answers included).
    pub images: i64,
    /// Images not served from the cache: what image budgets count.
    pub images_billed: i64,
    pub cost_usd: f64,
    pub cache_hits: i64,
    /// Rows with `refused_by` set.
    pub refused: i64,
    /// Rows with a 5xx status that were not refusals.
    pub errors: i64,
}

impl DayTotals {
    fn count(&mut self, r: &UsageRecord) {
        let images = i64::from(r.images_returned.unwrap_or(0));
        self.requests += 1;
        self.images += images;
        if !r.cache_hit {
            self.images_billed += images;
        }
        self.cost_usd += r.cost_usd;
        self.cache_hits += i64::from(r.cache_hit);
        self.refused += i64::from(r.refused_by.is_some());
        self.errors += i64::from(r.status >= 500 && r.refused_by.is_none());
    }
}

/// The batch's totals by (day, tenant id, model), in key order: every writer (several replicas on one
/// PostgreSQL) then locks the rows it upserts in the same order, so concurrent batches cannot deadlock.
pub fn totals(rows: &[UsageRecord]) -> BTreeMap<(i64, &str, &str), DayTotals> {
    let mut out: BTreeMap<(i64, &str, &str), DayTotals> = BTreeMap::new();
    for r in rows {
        out.entry((day_of(r.created_at), r.tenant_id.as_str(), r.model.as_str())).or_default().count(r);
    }
    out
}

/// Columns of one upserted row.
const COLUMNS: usize = 10;

fn upsert_sql(backend: Backend, rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO usage_daily (day, tenant_id, model, requests, images, images_billed, cost_usd, cache_hits, \
         refused, errors) VALUES ",
    );
    super::push_values(&mut sql, backend, rows, COLUMNS);
    sql.push_str(
        " ON CONFLICT (day, tenant_id, model) DO UPDATE SET requests = usage_daily.requests + excluded.requests, \
         images = usage_daily.images + excluded.images, \
         images_billed = usage_daily.images_billed + excluded.images_billed, \
         cost_usd = usage_daily.cost_usd + excluded.cost_usd, \
         cache_hits = usage_daily.cache_hits + excluded.cache_hits, \
         refused = usage_daily.refused + excluded.refused, errors = usage_daily.errors + excluded.errors",
    );
    sql
}

/// Add `rows` (a batch the caller is inserting into `usage_events` in the same transaction on `conn`) to the
/// per-day totals.
pub async fn add(conn: &mut AnyConnection, backend: Backend, rows: &[UsageRecord]) -> Result<(), sqlx::Error> {
    let totals: Vec<_> = totals(rows).into_iter().collect();
    // In the INSERT's statement sizes (full statements, then falling powers of two), so the few statement
    // texts stay prepared in each connection's cache from batch to batch.
    let mut rest = totals.as_slice();
    for count in super::statement_rows(totals.len()) {
        let (chunk, tail) = rest.split_at(count);
        rest = tail;
        let sql = upsert_sql(backend, chunk.len());
        let mut query = sqlx::query(&sql);
        for ((day, tenant_id, model), t) in chunk {
            query = query
                .bind(*day)
                .bind((*tenant_id).to_owned())
                .bind((*model).to_owned())
                .bind(t.requests)
                .bind(t.images)
                .bind(t.images_billed)
                .bind(t.cost_usd)
                .bind(t.cache_hits)
                .bind(t.refused)
                .bind(t.errors);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Totals by slot of `slot_days` days, tenant and model over the `days` days starting at UTC midnight
/// `first_day_ms`, optionally for one tenant (by id). `slot` in the answer counts slots from `first_day_ms`.
/// At most slots × tenants × models rows come back, however many ledger rows the range holds.
pub async fn slot_totals(
    db: &Db,
    first_day_ms: i64,
    days: i64,
    slot_days: i64,
    tenant_id: Option<&str>,
) -> Result<Vec<(i64, String, String, DayTotals)>, sqlx::Error> {
    let from = day_of(first_day_ms);
    let to = from + days.max(0) * DAY_MS;
    // CASTs: PostgreSQL sums BIGINT into NUMERIC, which the portable driver cannot decode.
    let mut sql = String::from(
        "SELECT CAST((day - $1) / $3 AS BIGINT) AS slot, tenant_id, model, CAST(SUM(requests) AS BIGINT) AS requests, \
         CAST(SUM(images) AS BIGINT) AS images, CAST(SUM(images_billed) AS BIGINT) AS images_billed, \
         CAST(SUM(cost_usd) AS DOUBLE PRECISION) AS cost_usd, CAST(SUM(cache_hits) AS BIGINT) AS cache_hits, \
         CAST(SUM(refused) AS BIGINT) AS refused, CAST(SUM(errors) AS BIGINT) AS errors \
         FROM usage_daily WHERE day >= $1 AND day < $2",
    );
    if tenant_id.is_some() {
        sql.push_str(" AND tenant_id = $4");
    }
    sql.push_str(" GROUP BY 1, 2, 3");
    let mut query = sqlx::query(&sql).bind(from).bind(to).bind(slot_days.max(1) * DAY_MS);
    if let Some(t) = tenant_id {
        query = query.bind(t.to_owned());
    }
    let rows = query.fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            let totals = DayTotals {
                requests: r.try_get("requests")?,
                images: r.try_get("images")?,
                images_billed: r.try_get("images_billed")?,
                cost_usd: r.try_get("cost_usd")?,
                cache_hits: r.try_get("cache_hits")?,
                refused: r.try_get("refused")?,
                errors: r.try_get("errors")?,
            };
            Ok((r.try_get("slot")?, r.try_get("tenant_id")?, r.try_get("model")?, totals))
        })
        .collect()
}

/// What each tenant spent from its budgets since UTC midnight `today_ms` and since `month_ms` (the first of
/// the month), as the limits count it (`ledger::report::spent_since`: images not served from the cache, and
/// `cost_usd`): tenant id → (images today, USD today, images this month, USD this month). Tenants without
/// usage are absent.
pub async fn spent_by_tenant(
    db: &Db,
    today_ms: i64,
    month_ms: i64,
) -> Result<BTreeMap<String, (i64, f64, i64, f64)>, sqlx::Error> {
    let (today, month) = (day_of(today_ms), day_of(month_ms));
    let rows = sqlx::query(
        "SELECT tenant_id, \
         CAST(SUM(CASE WHEN day >= $1 THEN images_billed ELSE 0 END) AS BIGINT) AS day_images, \
         CAST(SUM(CASE WHEN day >= $1 THEN cost_usd ELSE 0 END) AS DOUBLE PRECISION) AS day_usd, \
         CAST(SUM(CASE WHEN day >= $2 THEN images_billed ELSE 0 END) AS BIGINT) AS month_images, \
         CAST(SUM(CASE WHEN day >= $2 THEN cost_usd ELSE 0 END) AS DOUBLE PRECISION) AS month_usd \
         FROM usage_daily WHERE day >= $3 GROUP BY tenant_id",
    )
    .bind(today)
    .bind(month)
    .bind(today.min(month))
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let spent =
                (r.try_get("day_images")?, r.try_get("day_usd")?, r.try_get("month_images")?, r.try_get("month_usd")?);
            Ok((r.try_get("tenant_id")?, spent))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, created_at: i64, tenant: &str, model: &str) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            created_at,
            tenant_id: tenant.into(),
            tenant: tenant.into(),
            key_id: "abcd1234".into(),
            endpoint: "generations",
            model: model.into(),
            requested_model: None,
            images_requested: 2,
            images_returned: Some(2),
            size: None,
            quality: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: 0.08,
            status: 200,
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
    fn a_batch_is_summed_per_utc_day_tenant_and_model() {
        let day = 20_000 * DAY_MS;
        let mut hit = record("c", day + 5, "t1", "m");
        hit.cache_hit = true;
        hit.cost_usd = 0.0;
        let mut refused = record("d", day + DAY_MS - 1, "t1", "m");
        (refused.status, refused.refused_by, refused.images_returned, refused.cost_usd) =
            (429, Some(super::super::record::REFUSED_BY_GATEWAY), None, 0.0);
        let mut failed = record("e", day + 7, "t1", "m");
        (failed.status, failed.images_returned, failed.cost_usd) = (502, None, 0.0);
        let rows = [
            record("a", day, "t1", "m"),
            hit,
            refused,
            failed,
            record("b", day + DAY_MS, "t1", "m"),
            record("f", day, "t2", "m"),
            record("g", day, "t1", "other"),
        ];
        let totals = totals(&rows);
        let keys: Vec<_> = totals.keys().copied().collect();
        assert_eq!(keys, [(day, "t1", "m"), (day, "t1", "other"), (day, "t2", "m"), (day + DAY_MS, "t1", "m")]);
        let first = totals[&(day, "t1", "m")];
        assert_eq!(
            first,
            DayTotals {
                requests: 4,
                images: 4,
                images_billed: 2,
                cost_usd: 0.08,
                cache_hits: 1,
                refused: 1,
                errors: 1
            }
        );
        assert_eq!(totals[&(day + DAY_MS, "t1", "m")].requests, 1, "the next UTC day starts a new row");
    }

    /// Through the real writer on SQLite: rows of two days and tenants, written in batches that add to totals
    /// already stored, and a duplicate request id (the database refuses that row; its batch is then written
    /// row by row). The totals are exactly what the stored rows add up to.
    #[tokio::test]
    async fn the_writer_keeps_the_totals_with_the_rows_it_stores() {
        use crate::config::{DatabaseSettings, UsageSettings};
        use crate::ledger::Ledger;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let settings =
            UsageSettings { flush_interval: std::time::Duration::from_millis(5), ..UsageSettings::default() };
        let (ledger, writer) = Ledger::start(db.clone(), &settings);
        let day = crate::time::now_ms() / DAY_MS * DAY_MS;
        let mut n = 0;
        for round in 0..3 {
            for (at, tenant, model) in
                [(day - 1, "t1", "m"), (day, "t1", "m"), (day + 5, "t2", "m"), (day + 9, "t1", "other")]
            {
                n += 1;
                let mut r = record(&format!("r{n}"), at, tenant, model);
                (r.cache_hit, r.cost_usd) = (n % 3 == 0, 0.01 * f64::from(n));
                ledger.record(r);
            }
            if round == 1 {
                ledger.record(record("r1", day, "t1", "m"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        writer.close().await;
        assert_eq!(ledger.stats().rejected, 1, "the duplicate was refused");
        let raw: Vec<(i64, String, String, i64, i64, i64, f64)> = sqlx::query_as(
            "SELECT (created_at / 86400000) * 86400000, tenant_id, model, COUNT(*), \
             CAST(SUM(COALESCE(images_returned, 0)) AS BIGINT), \
             CAST(SUM(CASE WHEN cache_hit = 0 THEN COALESCE(images_returned, 0) ELSE 0 END) AS BIGINT), \
             SUM(cost_usd) FROM usage_events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        let rolled: Vec<(i64, String, String, i64, i64, i64, f64)> = sqlx::query_as(
            "SELECT day, tenant_id, model, requests, images, images_billed, cost_usd FROM usage_daily \
             ORDER BY 1, 2, 3",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(raw.len(), 4);
        assert_eq!(rolled.len(), raw.len());
        for (r, t) in raw.iter().zip(&rolled) {
            assert_eq!((&r.0, &r.1, &r.2, r.3, r.4, r.5), (&t.0, &t.1, &t.2, t.3, t.4, t.5));
            assert!((r.6 - t.6).abs() < 1e-9, "{r:?} {t:?}");
        }
        let spent = spent_by_tenant(&db, day, day - DAY_MS).await.unwrap();
        let (images_today, _, images_since_yesterday, _) = spent["t1"];
        assert_eq!(images_since_yesterday - images_today, raw[0].5, "yesterday's billed images");
    }

    #[test]
    fn upserts_have_one_placeholder_per_value() {
        for rows in [1, super::super::ROWS_PER_STATEMENT] {
            let sqlite = upsert_sql(Backend::Sqlite, rows);
            assert_eq!(sqlite.matches('?').count(), rows * COLUMNS);
            let postgres = upsert_sql(Backend::Postgres, rows);
            assert_eq!(postgres.matches('$').count(), rows * COLUMNS);
            assert!(postgres.contains(&format!("${})", rows * COLUMNS)));
        }
    }
}
