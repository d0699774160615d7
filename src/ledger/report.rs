//! Reading the ledger back: usage per tenant and model over a time range, as rows for JSON, CSV or a table.

use serde::Serialize;
use sqlx::Row;

use crate::db::Db;

/// Which rows to summarise: `[from_ms, to_ms)`, optionally one tenant.
#[derive(Debug, Clone)]
pub struct SummaryQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub tenant: Option<String>,
}

/// Usage of one tenant with one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SummaryRow {
    pub tenant: String,
    pub model: String,
    /// Every request that reached the pipeline, including refused and failed ones.
    pub requests: i64,
    /// Requests answered with a 2xx.
    pub succeeded: i64,
    pub images_requested: i64,
    pub images_returned: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    pub cache_hits: i64,
    /// Requests imagegate's own limits refused (429, or 503 when fail-closed).
    pub refused: i64,
    /// Requests the upstream refused with 429 (its quota, not the tenant's limits).
    pub upstream_rate_limited: i64,
}

/// Summaries grouped by tenant and model, ordered by tenant then model.
pub async fn summary(db: &Db, q: &SummaryQuery) -> Result<Vec<SummaryRow>, sqlx::Error> {
    // CASTs: PostgreSQL sums BIGINT into NUMERIC, which the portable driver cannot decode.
    let mut sql = String::from(
        "SELECT t.name AS tenant, u.model AS model, COUNT(*) AS requests, \
         CAST(SUM(CASE WHEN u.status >= 200 AND u.status < 300 THEN 1 ELSE 0 END) AS BIGINT) AS succeeded, \
         CAST(SUM(u.images_requested) AS BIGINT) AS images_requested, \
         CAST(SUM(COALESCE(u.images_returned, 0)) AS BIGINT) AS images_returned, \
         CAST(SUM(COALESCE(u.input_tokens, 0)) AS BIGINT) AS input_tokens, \
         CAST(SUM(COALESCE(u.output_tokens, 0)) AS BIGINT) AS output_tokens, \
         CAST(SUM(u.cost_usd) AS DOUBLE PRECISION) AS cost_usd, \
         CAST(SUM(u.cache_hit) AS BIGINT) AS cache_hits, \
         CAST(SUM(CASE WHEN u.refused_by = 'gateway' THEN 1 ELSE 0 END) AS BIGINT) AS refused, \
         CAST(SUM(CASE WHEN u.refused_by = 'upstream' THEN 1 ELSE 0 END) AS BIGINT) AS upstream_rate_limited \
         FROM usage_events u JOIN tenants t ON t.id = u.tenant_id \
         WHERE u.created_at >= $1 AND u.created_at < $2",
    );
    if q.tenant.is_some() {
        sql.push_str(" AND t.name = $3");
    }
    sql.push_str(" GROUP BY t.name, u.model ORDER BY t.name, u.model");
    let mut query = sqlx::query(&sql).bind(q.from_ms).bind(q.to_ms);
    if let Some(t) = &q.tenant {
        query = query.bind(t.clone());
    }
    let rows = query.fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(SummaryRow {
                tenant: r.try_get("tenant")?,
                model: r.try_get("model")?,
                requests: r.try_get("requests")?,
                succeeded: r.try_get("succeeded")?,
                images_requested: r.try_get("images_requested")?,
                images_returned: r.try_get("images_returned")?,
                input_tokens: r.try_get("input_tokens")?,
                output_tokens: r.try_get("output_tokens")?,
                cost_usd: r.try_get("cost_usd")?,
                cache_hits: r.try_get("cache_hits")?,
                refused: r.try_get("refused")?,
                upstream_rate_limited: r.try_get("upstream_rate_limited")?,
            })
        })
        .collect()
}

/// A usage report as the admin API and `imagegate usage --format json` both print it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// Always `list`.
    pub object: &'static str,
    /// The range used, Unix milliseconds: `[from, to)`.
    pub from: i64,
    pub to: i64,
    pub data: Vec<SummaryRow>,
}

impl UsageReport {
    pub fn new(from: i64, to: i64, data: Vec<SummaryRow>) -> Self {
        Self { object: "list", from, to, data }
    }
}

/// The rows as CSV with a header line, for spreadsheets. Text cells that a spreadsheet would run as a
/// formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) are prefixed with `'`.
pub fn to_csv(rows: &[SummaryRow]) -> anyhow::Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        let safe = SummaryRow { tenant: inert(&row.tenant), model: inert(&row.model), ..row.clone() };
        writer.serialize(safe)?;
    }
    if rows.is_empty() {
        writer.write_record([
            "tenant",
            "model",
            "requests",
            "succeeded",
            "images_requested",
            "images_returned",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "cache_hits",
            "refused",
            "upstream_rate_limited",
        ])?;
    }
    Ok(String::from_utf8(writer.into_inner()?)?)
}

/// A text cell that spreadsheets show as text (OWASP's advice against CSV injection).
fn inert(cell: &str) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{cell}") } else { cell.to_owned() }
}

/// What a tenant spent from its budgets in `[from_ms, until_ms)` (`until_ms` `None`: up to now), as the limits
/// count it: images the upstream returned on rows not served from the cache (a 2xx whose re-hosting failed
/// keeps its images: the upstream billed them), and the rows' `cost_usd`. Budgets start from this after a
/// restart, and Redis reseeds a lost counter from it.
pub async fn spent_since(
    db: &Db,
    tenant_id: &str,
    from_ms: i64,
    until_ms: Option<i64>,
) -> Result<(u64, f64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(CASE WHEN cache_hit = 0 THEN COALESCE(images_returned, 0) ELSE 0 END), 0) \
         AS BIGINT) AS images, CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) AS usd \
         FROM usage_events WHERE tenant_id = $1 AND created_at >= $2 AND created_at < $3",
    )
    .bind(tenant_id.to_owned())
    .bind(from_ms)
    .bind(until_ms.unwrap_or(i64::MAX))
    .fetch_one(db.pool())
    .await?;
    let images: i64 = row.try_get("images")?;
    Ok((u64::try_from(images).unwrap_or(0), row.try_get("usd")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_never_become_formulas() {
        let row = |model: &str| SummaryRow {
            tenant: "-team".into(),
            model: model.into(),
            requests: 1,
            succeeded: 1,
            images_requested: 1,
            images_returned: 1,
            ..SummaryRow::default()
        };
        let rows: Vec<SummaryRow> =
            ["=HYPERLINK(\"http://x\",\"y\")", "+1", "@SUM(A1)", "\tx", "\rx", "gpt-image-1"].map(row).into();
        let csv = to_csv(&rows).unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let cells: Vec<(String, String)> =
            reader.records().map(|r| r.unwrap()).map(|r| (r[0].to_owned(), r[1].to_owned())).collect();
        assert!(cells.iter().all(|(tenant, _)| tenant == "'-team"), "{cells:?}");
        let models: Vec<&str> = cells.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(models, ["'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'@SUM(A1)", "'\tx", "'\rx", "gpt-image-1"]);
    }

    #[test]
    fn csv_has_a_header_even_when_empty() {
        let csv = to_csv(&[]).unwrap();
        assert!(csv.starts_with("tenant,model,requests"));
        let row = SummaryRow {
            tenant: "a,b".into(),
            model: "gpt-image-1".into(),
            requests: 2,
            succeeded: 1,
            images_requested: 3,
            images_returned: 2,
            input_tokens: 10,
            output_tokens: 20,
            cost_usd: 0.5,
            cache_hits: 0,
            refused: 1,
            upstream_rate_limited: 0,
        };
        let csv = to_csv(&[row]).unwrap();
        assert!(csv.contains("\"a,b\",gpt-image-1,2,1,3,2,10,20,0.5,0,1,0"), "{csv}");
    }
}
