//! Plain-ASCII tables for the command line (no colour, no box-drawing characters, no wrapping), so output
//! pastes cleanly into tickets and chat, and the time format they share (RFC 3339, UTC).

use std::time::{Duration, UNIX_EPOCH};

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};

use crate::domain::Tenant;
use crate::ledger::report::SummaryRow;
use crate::tenants::repo::KeyInfo;

/// What a table shows for an absent value.
pub const NONE: &str = "-";

/// An empty table with imagegate's style and these column headers.
pub fn new(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::ASCII_FULL_CONDENSED)
        .force_no_tty()
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    table
}

/// Right-align the given columns (numbers).
fn align_right(table: &mut Table, columns: &[usize]) {
    for &i in columns {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// Unix milliseconds as RFC 3339 UTC to the second, e.g. `2026-11-01T09:30:00Z`.
pub fn time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
        Err(_) => ms.to_string(),
    }
}

/// An optional time, `-` when absent.
pub fn opt_time(ms: Option<i64>) -> String {
    ms.map_or_else(|| NONE.to_owned(), time)
}

fn opt_text(text: Option<&str>) -> String {
    text.map_or_else(|| NONE.to_owned(), str::to_owned)
}

/// The model catalog: id, status, whether its dates act, dates, replacement, source, price, aliases.
pub fn models_catalog(list: &[crate::catalog::Listing]) -> String {
    let mut table = new(&[
        "model",
        "status",
        "enforced",
        "deprecated on",
        "shutdown on",
        "replacement",
        "source",
        "price",
        "aliases",
    ]);
    for m in list {
        let date = |d: Option<crate::catalog::Date>| d.map_or_else(|| NONE.to_owned(), |d| d.to_string());
        table.add_row(vec![
            m.id.clone(),
            m.status.name().to_owned(),
            if m.lifecycle_enforced { "yes" } else { "no" }.to_owned(),
            date(m.deprecated_on),
            date(m.shutdown_on),
            opt_text(m.replacement.as_deref()),
            match m.source {
                crate::catalog::Source::Builtin => "built-in",
                crate::catalog::Source::Config => "config",
            }
            .to_owned(),
            m.price.to_owned(),
            if m.aliases.is_empty() { NONE.to_owned() } else { m.aliases.join(",") },
        ]);
    }
    table.to_string()
}

/// A tenant's allowed models for people: `all`, or the list.
pub fn models(allowed: Option<&[String]>) -> String {
    match allowed {
        None => "all".to_owned(),
        Some([]) => "none".to_owned(),
        Some(list) => list.join(","),
    }
}

/// JSON without `null` members, compact: the limits that are set.
pub fn compact_json(value: &serde_json::Value) -> String {
    let pruned = match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect(),
        ),
        other => other.clone(),
    };
    pruned.to_string()
}

/// `imagegate tenants list`.
pub fn tenants(list: &[Tenant]) -> Table {
    let mut table = new(&["name", "status", "allowed models", "org", "project", "upstream", "source", "created"]);
    for t in list {
        table.add_row(vec![
            t.name.clone(),
            t.status.as_str().to_owned(),
            models(t.allowed_models.as_deref()),
            opt_text(t.organization.as_deref()),
            opt_text(t.project.as_deref()),
            t.upstream.clone().unwrap_or_else(|| "default".to_owned()),
            t.source.clone(),
            time(t.created_at),
        ]);
    }
    table
}

/// `imagegate tenants show`: one field per line.
pub fn tenant(t: &Tenant) -> Table {
    let limits = serde_json::to_value(&t.limits).unwrap_or(serde_json::Value::Null);
    let mut table = new(&["field", "value"]);
    let images = serde_json::to_value(&t.image_policy).unwrap_or(serde_json::Value::Null);
    let rows: [(&str, String); 15] = [
        ("name", t.name.clone()),
        ("id", t.id.clone()),
        ("status", t.status.as_str().to_owned()),
        ("source", t.source.clone()),
        ("allowed models", models(t.allowed_models.as_deref())),
        ("organization", opt_text(t.organization.as_deref())),
        ("project", opt_text(t.project.as_deref())),
        ("upstream", t.upstream.clone().unwrap_or_else(|| "default".to_owned())),
        ("log prompts", if t.log_prompts { "yes" } else { "no" }.to_owned()),
        ("limits", compact_json(&limits)),
        (
            "image policy",
            if images.as_object().is_some_and(|o| o.is_empty()) { "default".to_owned() } else { compact_json(&images) },
        ),
        (
            "cache policy",
            t.cache_policy
                .as_ref()
                .map_or_else(|| "default".to_owned(), |p| compact_json(&serde_json::to_value(p).unwrap_or_default())),
        ),
        ("metadata", t.metadata.to_string()),
        ("created", time(t.created_at)),
        ("updated", time(t.updated_at)),
    ];
    for (field, value) in rows {
        table.add_row(vec![field.to_owned(), value]);
    }
    table
}

/// `imagegate keys list`.
pub fn keys(list: &[KeyInfo]) -> Table {
    let mut table = new(&["id", "name", "created", "expires", "revoked", "last used"]);
    for k in list {
        table.add_row(vec![
            k.id.clone(),
            opt_text(k.name.as_deref()),
            time(k.created_at),
            opt_time(k.expires_at),
            opt_time(k.revoked_at),
            opt_time(k.last_used_at),
        ]);
    }
    table
}

/// `imagegate usage --format table`, with a TOTAL row when there is more than one row.
pub fn usage(rows: &[SummaryRow]) -> Table {
    let mut table = new(&[
        "tenant",
        "model",
        "requests",
        "ok",
        "images (returned/requested)",
        "tokens in",
        "tokens out",
        "cost USD",
        "cache hits",
        "refused",
        "upstream 429",
    ]);
    for r in rows {
        table.add_row(usage_cells(&r.tenant, &r.model, r));
    }
    if rows.len() > 1 {
        let total = rows.iter().fold(SummaryRow::default(), |mut acc, r| {
            acc.requests += r.requests;
            acc.succeeded += r.succeeded;
            acc.images_requested += r.images_requested;
            acc.images_returned += r.images_returned;
            acc.input_tokens += r.input_tokens;
            acc.output_tokens += r.output_tokens;
            acc.cost_usd += r.cost_usd;
            acc.cache_hits += r.cache_hits;
            acc.refused += r.refused;
            acc.upstream_rate_limited += r.upstream_rate_limited;
            acc
        });
        table.add_row(usage_cells("TOTAL", "", &total));
    }
    align_right(&mut table, &[2, 3, 4, 5, 6, 7, 8, 9, 10]);
    table
}

fn usage_cells(tenant: &str, model: &str, r: &SummaryRow) -> Vec<String> {
    vec![
        tenant.to_owned(),
        model.to_owned(),
        r.requests.to_string(),
        r.succeeded.to_string(),
        format!("{}/{}", r.images_returned, r.images_requested),
        r.input_tokens.to_string(),
        r.output_tokens.to_string(),
        format!("{:.4}", r.cost_usd),
        r.cache_hits.to_string(),
        r.refused.to_string(),
        r.upstream_rate_limited.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time(1_793_491_200_000), "2026-11-01T00:00:00Z");
        assert_eq!(opt_time(None), "-");
    }

    #[test]
    fn tables_are_plain_ascii() {
        let row = SummaryRow {
            tenant: "a".into(),
            model: "gpt-image-1".into(),
            requests: 2,
            succeeded: 1,
            images_requested: 3,
            images_returned: 2,
            input_tokens: 10,
            output_tokens: 20,
            cost_usd: 0.5,
            cache_hits: 0,
            refused: 3,
            upstream_rate_limited: 1,
        };
        let text = usage(&[row.clone(), SummaryRow { tenant: "b".into(), ..row }]).to_string();
        assert!(text.is_ascii(), "{text}");
        assert!(text.contains("TOTAL") && text.contains("1.0000") && text.contains("4/6"), "{text}");
        let total = text.lines().find(|l| l.contains("TOTAL")).unwrap_or_default();
        let cells: Vec<&str> = total.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(cells[cells.len() - 2..], ["6", "2"], "refused and upstream 429s add up: {text}");
    }
}
