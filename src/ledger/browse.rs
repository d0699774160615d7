//! Reading the ledger for the web console: per-day totals by tenant and model over a range (the overview,
//! from the `usage_daily` rollup, so a year of rows stays fast), single rows filtered and paged (the usage
//! table), and the rows behind given request ids (the gallery). Portable SQL like the rest.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::Row as _;

use crate::db::Db;

pub use super::rollup::DAY_MS;

/// Totals of one tenant with one model in one slot of a range (a day, a week).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotTotals {
    /// Which slot, counted from the range's first day.
    pub slot: i64,
    pub tenant_id: String,
    pub model: String,
    pub requests: i64,
    /// Images handed to callers (cached answers included).
    pub images: i64,
    pub cost_usd: f64,
    pub cache_hits: i64,
    /// Requests refused by a limit: imagegate's own (`refused_by = 'gateway'`) or the upstream's 429.
    pub refused: i64,
    /// Requests that failed upstream or in the gateway (5xx not counted as a refusal).
    pub errors: i64,
}

/// Totals by slot of `slot_days` days (a day, a week), tenant and model over the `days` UTC days starting at
/// midnight `first_day_ms`, optionally for one tenant (by id), read from the per-day rollup
/// (`ledger::rollup`): at most days × tenants × models rows are read, however many ledger rows the range holds.
pub async fn slot_totals(
    db: &Db,
    first_day_ms: i64,
    days: i64,
    slot_days: i64,
    tenant_id: Option<&str>,
) -> Result<Vec<SlotTotals>, sqlx::Error> {
    let rows = super::rollup::slot_totals(db, first_day_ms, days, slot_days, tenant_id).await?;
    Ok(rows
        .into_iter()
        .map(|(slot, tenant_id, model, t)| SlotTotals {
            slot,
            tenant_id,
            model,
            requests: t.requests,
            images: t.images,
            cost_usd: t.cost_usd,
            cache_hits: t.cache_hits,
            refused: t.refused,
            errors: t.errors,
        })
        .collect())
}

/// Which rows the usage table shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowFilter {
    pub from_ms: i64,
    pub to_ms: i64,
    pub tenant_id: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub status: StatusFilter,
}

/// The status column filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatusFilter {
    #[default]
    Any,
    /// 2xx.
    Succeeded,
    /// Refused by a limit (imagegate's or the upstream's).
    Refused,
    /// Any other 4xx or 5xx.
    Failed,
    /// Exactly this HTTP status.
    Code(i64),
}

impl StatusFilter {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "" | "any" => Some(Self::Any),
            "ok" => Some(Self::Succeeded),
            "refused" => Some(Self::Refused),
            "failed" => Some(Self::Failed),
            code => code.parse().ok().filter(|c| (100..600).contains(c)).map(Self::Code),
        }
    }

    pub fn as_param(self) -> String {
        match self {
            Self::Any => String::new(),
            Self::Succeeded => "ok".into(),
            Self::Refused => "refused".into(),
            Self::Failed => "failed".into(),
            Self::Code(c) => c.to_string(),
        }
    }
}

/// One ledger row as the usage table shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerRow {
    pub time: String,
    pub tenant: String,
    pub key_id: String,
    pub endpoint: String,
    pub model: String,
    pub images: i64,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub status: i64,
    pub refused_by: Option<String>,
    pub cache_hit: bool,
    pub latency_ms: i64,
    pub cost_usd: f64,
    pub request_id: String,
}

/// Up to `limit` rows matching `filter`, newest first, after skipping `offset`.
pub async fn rows(db: &Db, filter: &RowFilter, limit: i64, offset: i64) -> Result<Vec<LedgerRow>, sqlx::Error> {
    let mut sql = String::from(
        "SELECT u.request_id, u.created_at, t.name AS tenant, u.key_id, u.endpoint, u.model, \
         COALESCE(u.images_returned, 0) AS images, u.size, u.quality, u.status, u.refused_by, u.cache_hit, \
         u.latency_ms, u.cost_usd FROM usage_events u JOIN tenants t ON t.id = u.tenant_id \
         WHERE u.created_at >= $1 AND u.created_at < $2",
    );
    let mut texts = Vec::new();
    for (column, value) in
        [("u.tenant_id", &filter.tenant_id), ("u.key_id", &filter.key_id), ("u.model", &filter.model)]
    {
        if let Some(v) = value {
            texts.push(v.clone());
            sql.push_str(&format!(" AND {column} = ${}", texts.len() + 2));
        }
    }
    match filter.status {
        StatusFilter::Any => {}
        StatusFilter::Succeeded => sql.push_str(" AND u.status >= 200 AND u.status < 300"),
        StatusFilter::Refused => sql.push_str(" AND u.refused_by IS NOT NULL"),
        StatusFilter::Failed => sql.push_str(" AND u.status >= 400 AND u.refused_by IS NULL"),
        StatusFilter::Code(code) => sql.push_str(&format!(" AND u.status = {code}")),
    }
    let n = texts.len() + 2;
    sql.push_str(&format!(" ORDER BY u.created_at DESC, u.request_id DESC LIMIT ${} OFFSET ${}", n + 1, n + 2));
    let mut query = sqlx::query(&sql).bind(filter.from_ms).bind(filter.to_ms);
    for t in texts {
        query = query.bind(t);
    }
    let rows = query.bind(limit).bind(offset).fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(LedgerRow {
                time: rfc3339(r.try_get("created_at")?),
                tenant: r.try_get("tenant")?,
                key_id: r.try_get("key_id")?,
                endpoint: r.try_get("endpoint")?,
                model: r.try_get("model")?,
                images: r.try_get("images")?,
                size: r.try_get("size")?,
                quality: r.try_get("quality")?,
                status: r.try_get("status")?,
                refused_by: r.try_get("refused_by")?,
                cache_hit: r.try_get::<i64, _>("cache_hit")? != 0,
                latency_ms: r.try_get("latency_ms")?,
                cost_usd: r.try_get("cost_usd")?,
                request_id: r.try_get("request_id")?,
            })
        })
        .collect()
}

/// The usage table's rows as CSV with a header line; text cells a spreadsheet would run as a formula are
/// prefixed with `'` (as in `report::to_csv`).
pub fn rows_to_csv(rows: &[LedgerRow]) -> anyhow::Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "time",
        "tenant",
        "key_id",
        "endpoint",
        "model",
        "images",
        "size",
        "quality",
        "status",
        "refused_by",
        "cache_hit",
        "latency_ms",
        "cost_usd",
        "request_id",
    ])?;
    for r in rows {
        writer.write_record([
            r.time.clone(),
            inert(&r.tenant),
            inert(&r.key_id),
            inert(&r.endpoint),
            inert(&r.model),
            r.images.to_string(),
            inert(r.size.as_deref().unwrap_or_default()),
            inert(r.quality.as_deref().unwrap_or_default()),
            r.status.to_string(),
            r.refused_by.clone().unwrap_or_default(),
            r.cache_hit.to_string(),
            r.latency_ms.to_string(),
            format!("{:.6}", r.cost_usd),
            inert(&r.request_id),
        ])?;
    }
    Ok(String::from_utf8(writer.into_inner()?)?)
}

fn inert(cell: &str) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{cell}") } else { cell.to_owned() }
}

/// What the gallery shows about the request that produced an image.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFacts {
    pub cost_usd: f64,
    pub images: i64,
    pub size: Option<String>,
    /// Only stored for tenants that opted into prompt logging.
    pub prompt: Option<String>,
}

/// The ledger rows of `request_ids`, by request id (ids without a row are absent).
pub async fn requests(db: &Db, request_ids: &[String]) -> Result<HashMap<String, RequestFacts>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in request_ids.chunks(100) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT request_id, cost_usd, COALESCE(images_returned, 0) AS images, size, prompt FROM usage_events \
             WHERE request_id IN ({})",
            marks.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.clone());
        }
        for r in query.fetch_all(db.pool()).await? {
            let facts = RequestFacts {
                cost_usd: r.try_get("cost_usd")?,
                images: r.try_get("images")?,
                size: r.try_get("size")?,
                prompt: r.try_get("prompt")?,
            };
            out.insert(r.try_get("request_id")?, facts);
        }
    }
    Ok(out)
}

/// Unix milliseconds as an RFC 3339 UTC time to the second.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_filters_round_trip_through_their_query_spelling() {
        for f in [StatusFilter::Any, StatusFilter::Succeeded, StatusFilter::Refused, StatusFilter::Failed] {
            assert_eq!(StatusFilter::parse(&f.as_param()), Some(f));
        }
        assert_eq!(StatusFilter::parse("429"), Some(StatusFilter::Code(429)));
        assert_eq!(StatusFilter::parse("42"), None);
        assert_eq!(StatusFilter::parse("1; DROP TABLE"), None);
    }

    #[test]
    fn csv_cells_never_become_formulas() {
        let row = LedgerRow {
            time: rfc3339(0),
            tenant: "=cmd".into(),
            key_id: "abcd1234".into(),
            endpoint: "generations".into(),
            model: "+x".into(),
            images: 1,
            size: Some("1024x1024".into()),
            quality: None,
            status: 200,
            refused_by: None,
            cache_hit: false,
            latency_ms: 5,
            cost_usd: 0.04,
            request_id: "req".into(),
        };
        let csv = rows_to_csv(&[row]).unwrap();
        assert!(csv.starts_with("time,tenant,key_id"));
        assert!(
            csv.contains("1970-01-01T00:00:00Z,'=cmd,abcd1234,generations,'+x,1,1024x1024,,200,,false,5,0.040000,req"),
            "{csv}"
        );
    }
}
