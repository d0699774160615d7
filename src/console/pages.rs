//! The console's HTML: one layout and one function per page, from plain data (no I/O here). `maud` escapes
//! every value, tenant names and prompts included.

use http::StatusCode;
use maud::{DOCTYPE, Markup, html};

use super::chart;
use crate::domain::{Limits, Tenant, TenantStatus};
use crate::ledger::browse::{LedgerRow, StatusFilter};
use crate::tenants::repo::KeyInfo;

/// What the layout needs to know about the page and who is looking.
#[derive(Debug, Clone)]
pub struct Frame<'a> {
    pub base: &'a str,
    pub title: &'a str,
    /// `admin` or the tenant's name.
    pub who: String,
    pub admin: bool,
    pub csrf: &'a str,
    /// Which nav entry is current.
    pub current: &'a str,
}

fn head(base: &str, title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · imagegate" }
            link rel="stylesheet" href=(format!("{base}/assets/console.css"));
            script src=(format!("{base}/assets/console.js")) defer {}
        }
    }
}

/// The page around `body`: navigation, who is signed in, sign-out.
pub fn layout(frame: &Frame<'_>, body: Markup) -> Markup {
    let base = frame.base;
    let mut nav = vec![("overview", "Overview")];
    if frame.admin {
        nav.push(("tenants", "Tenants"));
    }
    nav.extend([("usage", "Usage"), ("gallery", "Gallery")]);
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(base, frame.title))
            body {
                header.top {
                    a.brand href=(format!("{base}/overview")) { "imagegate" }
                    nav {
                        @for (path, label) in &nav {
                            a href=(format!("{base}/{path}")) aria-current=[(frame.current == *path).then_some("page")] { (label) }
                        }
                    }
                    form.signout method="post" action=(format!("{base}/sign-out")) {
                        input type="hidden" name="csrf" value=(frame.csrf);
                        span.who { "Signed in as " strong #who { (frame.who) } }
                        button type="submit" { "Sign out" }
                    }
                }
                main { h1 { (frame.title) } (body) }
            }
        }
    }
}

/// The sign-in page; `message` explains a refused attempt.
pub fn sign_in(base: &str, csrf: &str, message: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(base, "Sign in"))
            body.signin {
                main {
                    h1 { "imagegate console" }
                    @if let Some(m) = message { p.error role="alert" { (m) } }
                    form method="post" action=(format!("{base}/sign-in")) {
                        input type="hidden" name="csrf" value=(csrf);
                        label for="token" { "Admin token, or one of your team's keys (ig_…)" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        button type="submit" { "Sign in" }
                    }
                    p.hint { "The platform team signs in with the admin token and sees every tenant; a team signs in with one of its keys and sees only its own usage and images." }
                }
            }
        }
    }
}

/// A page for a refused or failed request.
pub fn error_page(status: StatusCode, message: &str, param: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { (status.as_u16()) " · imagegate" } }
            body {
                main {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
                    p.error role="alert" { (message) }
                    @if let Some(p) = param { p { "Field: " code { (p) } } }
                    p { a href="javascript:history.back()" { "Back" } }
                }
            }
        }
    }
}

/// A message banner (a refused form) above a page.
pub fn banner(error: Option<&(String, Option<String>)>) -> Markup {
    html! {
        @if let Some((message, param)) = error {
            p.error role="alert" {
                (message)
                @if let Some(p) = param { " (field: " code { (p) } ")" }
            }
        }
    }
}

/// The overview's numbers.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    pub days: i64,
    pub tenant_filter: Option<String>,
    /// Tenant names a platform viewer may pick from.
    pub tenant_names: Vec<String>,
    pub labels: Vec<String>,
    pub images: Vec<(String, Vec<f64>)>,
    pub requests: Vec<(String, Vec<f64>)>,
    pub usd: Vec<(String, Vec<f64>)>,
    /// (model, requests, images, usd), most images first.
    pub top_models: Vec<(String, i64, i64, f64)>,
    pub total_requests: i64,
    pub total_images: i64,
    pub total_usd: f64,
    pub refused: i64,
    pub errors: i64,
    pub cache_hits: i64,
    /// Each tenant with a budget, and its bars.
    pub budgets: Vec<(String, Vec<BudgetUse>)>,
}

/// One budget bar: (label, used, limit, in USD).
pub type BudgetUse = (String, f64, f64, bool);

fn ratio(part: i64, whole: i64) -> String {
    if whole == 0 { "–".to_owned() } else { format!("{:.1} %", part as f64 * 100.0 / whole as f64) }
}

pub fn overview(frame: &Frame<'_>, o: &Overview) -> Markup {
    let base = frame.base;
    layout(
        frame,
        html! {
            form.filters method="get" action=(format!("{base}/overview")) {
                label { "Range " select name="days" {
                    @for d in [1, 7, 30, 90, 365] {
                        option value=(d) selected[o.days == d] { "last " (d) (if d == 1 { " day" } else { " days" }) }
                    }
                } }
                @if frame.admin {
                    label { "Tenant " select name="tenant" {
                        option value="" { "all" }
                        @for t in &o.tenant_names { option value=(t) selected[o.tenant_filter.as_deref() == Some(t.as_str())] { (t) } }
                    } }
                }
                button type="submit" { "Show" }
            }
            section.cards {
                div.card { span.n #total-images { (o.total_images) } span { "images" } }
                div.card { span.n #total-requests { (o.total_requests) } span { "requests" } }
                div.card { span.n #total-usd { (format!("${:.2}", o.total_usd)) } span { "estimated USD" } }
                div.card { span.n #refusal-ratio { (ratio(o.refused, o.total_requests)) } span { "refused by limits" } }
                div.card { span.n #error-ratio { (ratio(o.errors, o.total_requests)) } span { "upstream / gateway errors" } }
                div.card { span.n #cache-ratio { (ratio(o.cache_hits, o.total_requests)) } span { "cache hits" } }
            }
            section.charts {
                (chart::stacked_bars(if o.days > 90 { "Images per week" } else { "Images per day" }, &o.labels, &o.images, false))
                (chart::stacked_bars(if o.days > 90 { "Requests per week" } else { "Requests per day" }, &o.labels, &o.requests, false))
                (chart::stacked_bars(if o.days > 90 { "Estimated USD per week" } else { "Estimated USD per day" }, &o.labels, &o.usd, true))
            }
            section {
                h2 { "Top models" }
                table #top-models {
                    thead { tr { th { "Model" } th.num { "Requests" } th.num { "Images" } th.num { "USD" } } }
                    tbody {
                        @for (model, requests, images, usd) in &o.top_models {
                            tr { td { (model) } td.num { (requests) } td.num { (images) } td.num { (format!("{usd:.4}")) } }
                        }
                    }
                }
            }
            section #budgets {
                h2 { "Budgets" }
                @if o.budgets.is_empty() { p.hint { "No tenant in view has a daily or monthly budget." } }
                @for (tenant, bars) in &o.budgets {
                    div.tenant-budgets {
                        h3 { (tenant) }
                        @for (label, used, limit, money) in bars { (chart::budget_bar(label, *used, *limit, *money)) }
                    }
                }
            }
            // SLOT(pools): deployment state. Upstream pools are being built separately (see docs/console.md);
            // when they land, render each deployment's health, in-flight calls and recent errors here.
            section #deployments {
                h2 { "Deployments" }
                p.hint { "Upstream pools are not part of this version: every tenant uses its configured upstream." }
            }
        },
    )
}

fn limit_cell(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| v.to_string())
}

/// The limits of a tenant in one line.
fn limits_summary(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(v) = l.requests_per_minute {
        parts.push(format!("{v} req/min"));
    }
    if let Some(v) = l.images_per_minute {
        parts.push(format!("{v} img/min"));
    }
    if let Some(v) = l.images_per_day {
        parts.push(format!("{v} img/day"));
    }
    if let Some(v) = l.images_per_month {
        parts.push(format!("{v} img/month"));
    }
    if let Some(v) = l.usd_per_day {
        parts.push(format!("${v}/day"));
    }
    if let Some(v) = l.usd_per_month {
        parts.push(format!("${v}/month"));
    }
    if let Some(v) = l.concurrent_requests {
        parts.push(format!("{v} at once"));
    }
    if parts.is_empty() { "unlimited".to_owned() } else { parts.join(", ") }
}

/// The fields of the limits form, in order: (field, label).
pub const LIMIT_FIELDS: [(&str, &str); 9] = [
    ("requests_per_minute", "Requests per minute"),
    ("images_per_minute", "Images per minute"),
    ("requests_burst", "Request burst"),
    ("images_burst", "Image burst"),
    ("concurrent_requests", "Concurrent requests"),
    ("images_per_day", "Images per day"),
    ("images_per_month", "Images per month"),
    ("usd_per_day", "USD per day"),
    ("usd_per_month", "USD per month"),
];

fn limit_value(l: &Limits, field: &str) -> String {
    match field {
        "requests_per_minute" => limit_cell(l.requests_per_minute),
        "images_per_minute" => limit_cell(l.images_per_minute),
        "requests_burst" => limit_cell(l.requests_burst),
        "images_burst" => limit_cell(l.images_burst),
        "concurrent_requests" => limit_cell(l.concurrent_requests),
        "images_per_day" => limit_cell(l.images_per_day),
        "images_per_month" => limit_cell(l.images_per_month),
        "usd_per_day" => limit_cell(l.usd_per_day),
        "usd_per_month" => limit_cell(l.usd_per_month),
        _ => String::new(),
    }
    .replace('–', "")
}

fn limit_inputs(l: &Limits) -> Markup {
    html! {
        fieldset.limits {
            legend { "Limits (empty = unlimited)" }
            @for (field, label) in LIMIT_FIELDS {
                label { (label) input type="text" inputmode="decimal" name=(format!("limits.{field}")) value=(limit_value(l, field)); }
            }
        }
    }
}

pub fn tenants(frame: &Frame<'_>, list: &[Tenant], error: Option<&(String, Option<String>)>) -> Markup {
    let base = frame.base;
    layout(
        frame,
        html! {
            (banner(error))
            table #tenants {
                thead { tr { th { "Name" } th { "Status" } th { "Limits" } th { "Models" } th { "Prompts" } th { "Source" } th { "" } } }
                tbody {
                    @for t in list {
                        tr data-tenant=(t.name) {
                            td { a href=(format!("{base}/tenants/{}", urlencode(&t.name))) { (t.name) } }
                            td { span class=(format!("status {}", t.status.as_str())) { (t.status.as_str()) } }
                            td { (limits_summary(&t.limits)) }
                            td { (t.allowed_models.as_ref().map_or_else(|| "all".to_owned(), |m| m.join(", "))) }
                            td { (if t.log_prompts { "stored" } else { "not stored" }) }
                            td { (t.source) }
                            td { (status_button(base, frame.csrf, t)) }
                        }
                    }
                }
            }
            h2 { "New tenant" }
            form.stack #create-tenant method="post" action=(format!("{base}/tenants")) {
                input type="hidden" name="csrf" value=(frame.csrf);
                label { "Name" input type="text" name="name" required; }
                label { "Allowed models (comma-separated; empty = all)" input type="text" name="allowed_models"; }
                label.check { input type="checkbox" name="log_prompts" value="true"; " Store prompts (shown in the gallery)" }
                (limit_inputs(&Limits::default()))
                button type="submit" { "Create tenant" }
            }
        },
    )
}

fn status_button(base: &str, csrf: &str, t: &Tenant) -> Markup {
    let (action, label) = match t.status {
        TenantStatus::Active => ("suspend", "Suspend"),
        TenantStatus::Suspended => ("resume", "Resume"),
    };
    html! {
        form.inline method="post" action=(format!("{base}/tenants/{}/{action}", urlencode(&t.name))) {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" name="action" value=(action) { (label) }
        }
    }
}

fn pretty(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

pub fn tenant(frame: &Frame<'_>, t: &Tenant, keys: &[KeyInfo], error: Option<&(String, Option<String>)>) -> Markup {
    let base = frame.base;
    let at = format!("{base}/tenants/{}", urlencode(&t.name));
    layout(
        frame,
        html! {
            (banner(error))
            p { "Status: " span class=(format!("status {}", t.status.as_str())) { (t.status.as_str()) } " " (status_button(base, frame.csrf, t)) }
            h2 { "Keys" }
            table #keys {
                thead { tr { th { "Id" } th { "Name" } th { "Created" } th { "Expires" } th { "Last used" } th { "State" } th { "" } } }
                tbody {
                    @for k in keys {
                        tr data-key=(k.id) {
                            td { code { (k.id) } }
                            td { (k.name.clone().unwrap_or_default()) }
                            td { (time(Some(k.created_at))) }
                            td { (time(k.expires_at)) }
                            td { (time(k.last_used_at)) }
                            td { (if k.revoked_at.is_some() { "revoked" } else { "active" }) }
                            td {
                                @if k.revoked_at.is_none() {
                                    form.inline method="post" action=(format!("{base}/keys/{}/revoke", k.id)) {
                                        input type="hidden" name="csrf" value=(frame.csrf);
                                        button.danger type="submit" { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            form.inline #issue-key method="post" action=(format!("{at}/keys")) {
                input type="hidden" name="csrf" value=(frame.csrf);
                label { "Key name " input type="text" name="name" placeholder="ci"; }
                label { "Expires in " input type="text" name="expires_in" placeholder="90d (empty = never)"; }
                button type="submit" { "Issue key" }
            }
            h2 { "Settings" }
            form.stack #edit-tenant method="post" action=(at) {
                input type="hidden" name="csrf" value=(frame.csrf);
                label { "Allowed models (comma-separated; empty = all)" input type="text" name="allowed_models" value=(t.allowed_models.as_ref().map(|m| m.join(", ")).unwrap_or_default()); }
                label { "OpenAI organization" input type="text" name="organization" value=(t.organization.clone().unwrap_or_default()); }
                label { "OpenAI project" input type="text" name="project" value=(t.project.clone().unwrap_or_default()); }
                label { "Upstream (empty = [upstream])" input type="text" name="upstream" value=(t.upstream.clone().unwrap_or_default()); }
                input type="hidden" name="log_prompts" value="false";
                label.check { input type="checkbox" name="log_prompts" value="true" checked[t.log_prompts]; " Store prompts (shown in the gallery)" }
                (limit_inputs(&t.limits))
                label { "Cache policy (JSON; empty = the deployment default)" textarea name="cache_policy" rows="3" { (t.cache_policy.as_ref().map(pretty).unwrap_or_default()) } }
                label { "Image policy (JSON)" textarea name="image_policy" rows="3" { (pretty(&t.image_policy)) } }
                label { "Metadata (JSON object)" textarea name="metadata" rows="3" { (pretty(&t.metadata)) } }
                button type="submit" { "Save" }
            }
        },
    )
}

/// The page shown once after a key is issued.
pub fn key_issued(frame: &Frame<'_>, tenant: &str, key: &str, public_v1: &str) -> Markup {
    let python = format!(
        "from openai import OpenAI\n\nclient = OpenAI(base_url=\"{public_v1}\", api_key=\"{key}\")\nimage = client.images.generate(model=\"gpt-image-1\", prompt=\"a lighthouse at dawn\")"
    );
    let node = format!(
        "import OpenAI from \"openai\";\n\nconst client = new OpenAI({{ baseURL: \"{public_v1}\", apiKey: \"{key}\" }});\nconst image = await client.images.generate({{ model: \"gpt-image-1\", prompt: \"a lighthouse at dawn\" }});"
    );
    let shell = format!("export OPENAI_BASE_URL={public_v1}\nexport OPENAI_API_KEY={key}");
    layout(
        frame,
        html! {
            p.warning { "This is the only time the key is shown: copy it now. imagegate keeps only its hash." }
            div.secret {
                code #new-key { (key) }
                button type="button" data-copy="new-key" { "Copy" }
            }
            h2 { "Use it with the OpenAI SDKs" }
            p { "Only the base URL and the key change:" }
            h3 { "Environment" } pre { code { (shell) } }
            h3 { "Python" } pre { code { (python) } }
            h3 { "Node" } pre { code { (node) } }
            p { a href=(format!("{}/tenants/{}", frame.base, urlencode(tenant))) { "Back to " (tenant) } }
        },
    )
}

/// The usage table's filters, as the form shows them.
#[derive(Debug, Clone, Default)]
pub struct UsageFilters {
    pub tenant: String,
    pub key: String,
    pub model: String,
    pub status: StatusFilter,
    pub from: String,
    pub to: String,
    pub page: i64,
}

impl UsageFilters {
    /// The query string for these filters (and `page`).
    pub fn query(&self, page: i64) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("tenant", &self.tenant),
            ("key", &self.key),
            ("model", &self.model),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !v.is_empty() {
                q.append_pair(k, v);
            }
        }
        let status = self.status.as_param();
        if !status.is_empty() {
            q.append_pair("status", &status);
        }
        if page > 1 {
            q.append_pair("page", &page.to_string());
        }
        q.finish()
    }
}

pub fn usage(frame: &Frame<'_>, f: &UsageFilters, tenant_names: &[String], rows: &[LedgerRow], more: bool) -> Markup {
    let base = frame.base;
    let statuses = [("", "any"), ("ok", "succeeded"), ("refused", "refused by a limit"), ("failed", "failed")];
    let current_status = f.status.as_param();
    layout(
        frame,
        html! {
            form.filters #usage-filters method="get" action=(format!("{base}/usage")) {
                @if frame.admin {
                    label { "Tenant " select name="tenant" {
                        option value="" { "all" }
                        @for t in tenant_names { option value=(t) selected[f.tenant == *t] { (t) } }
                    } }
                }
                label { "Key id " input type="text" name="key" value=(f.key) size="9"; }
                label { "Model " input type="text" name="model" value=(f.model) size="14"; }
                label { "Status " select name="status" {
                    @for (v, l) in statuses { option value=(v) selected[current_status == v] { (l) } }
                    @if let StatusFilter::Code(c) = f.status { option value=(c) selected { (c) } }
                } }
                label { "From " input type="date" name="from" value=(f.from); }
                label { "To " input type="date" name="to" value=(f.to); }
                button type="submit" { "Filter" }
                a.button #export-csv href=(format!("{base}/usage.csv?{}", f.query(f.page))) { "Export CSV" }
            }
            table #usage-table {
                thead { tr {
                    th { "Time (UTC)" } th { "Tenant" } th { "Key" } th { "Endpoint" } th { "Model" } th.num { "Images" }
                    th { "Size" } th { "Status" } th { "Cache" } th.num { "ms" } th.num { "USD" }
                } }
                tbody {
                    @for r in rows {
                        tr {
                            td { (r.time) } td { (r.tenant) } td { code { (r.key_id) } } td { (r.endpoint) } td { (r.model) }
                            td.num { (r.images) } td { (r.size.clone().unwrap_or_default()) }
                            td { (r.status) @if let Some(by) = &r.refused_by { " (" (by) ")" } }
                            td { (if r.cache_hit { "hit" } else { "" }) } td.num { (r.latency_ms) } td.num { (format!("{:.4}", r.cost_usd)) }
                        }
                    }
                }
            }
            @if rows.is_empty() { p.hint { "No requests match." } }
            nav.pages {
                @if f.page > 1 { a rel="prev" href=(format!("{base}/usage?{}", f.query(f.page - 1))) { "← Newer" } }
                span { "Page " (f.page) }
                @if more { a rel="next" href=(format!("{base}/usage?{}", f.query(f.page + 1))) { "Older →" } }
            }
        },
    )
}

/// One image in the gallery.
#[derive(Debug, Clone)]
pub struct GalleryItem {
    pub id: String,
    pub tenant: String,
    pub link: String,
    pub model: String,
    pub size: String,
    pub time: String,
    pub cost_usd: Option<f64>,
    pub prompt: Option<String>,
}

pub fn gallery(
    frame: &Frame<'_>,
    tenant: &str,
    tenant_names: &[String],
    items: &[GalleryItem],
    page: i64,
    more: bool,
) -> Markup {
    let base = frame.base;
    let query = |page: i64| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if !tenant.is_empty() {
            q.append_pair("tenant", tenant);
        }
        if page > 1 {
            q.append_pair("page", &page.to_string());
        }
        q.finish()
    };
    layout(
        frame,
        html! {
            @if frame.admin {
                form.filters method="get" action=(format!("{base}/gallery")) {
                    label { "Tenant " select name="tenant" {
                        option value="" { "all" }
                        @for t in tenant_names { option value=(t) selected[tenant == t] { (t) } }
                    } }
                    button type="submit" { "Show" }
                }
            }
            @if items.is_empty() { p.hint { "No stored images yet. Images appear here when imagegate re-hosts them (response_format url)." } }
            ul.gallery #gallery {
                @for item in items {
                    li.tile data-image=(item.id) {
                        a href=(item.link) target="_blank" rel="noopener" {
                            img src=(format!("{base}/gallery/{}/thumb", item.id)) alt=(item.prompt.clone().unwrap_or_else(|| format!("{} image", item.model))) loading="lazy" width="256";
                        }
                        dl {
                            dt { "Model" } dd { (item.model) }
                            dt { "Size" } dd { (item.size) }
                            dt { "Time" } dd { (item.time) }
                            dt { "Cost" } dd { (item.cost_usd.map_or_else(|| "–".to_owned(), |c| format!("${c:.4}"))) }
                            @if frame.admin { dt { "Tenant" } dd { (item.tenant) } }
                        }
                        @if let Some(p) = &item.prompt { p.prompt { (p) } }
                        form.inline method="post" action=(format!("{base}/gallery/{}/delete", item.id)) data-confirm="Delete this image? Its link stops working." {
                            input type="hidden" name="csrf" value=(frame.csrf);
                            button.danger type="submit" { "Delete" }
                        }
                    }
                }
            }
            nav.pages {
                @if page > 1 { a rel="prev" href=(format!("{base}/gallery?{}", query(page - 1))) { "← Newer" } }
                span { "Page " (page) }
                @if more { a rel="next" href=(format!("{base}/gallery?{}", query(page + 1))) { "Older →" } }
            }
        },
    )
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM` UTC, or a dash.
pub fn time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "–".to_owned(), |t| t.format("%Y-%m-%d %H:%M").to_string())
}

/// A path segment, percent-encoded.
pub fn urlencode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect::<String>().replace('+', "%20")
}
