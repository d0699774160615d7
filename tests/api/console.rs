//! The web console over plain HTTP (no browser), on SQLite and on PostgreSQL: what its cookies carry and how
//! they are flagged, forged and expired sessions, CSRF tokens on every form, sign-in back-off, sessions that
//! end with their key or tenant, a team seeing only its own tenant, the admin API's validation messages, and
//! turning the console off or moving it.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;

use crate::support::app::{ADMIN_TOKEN, TestApp, TestDb};
use crate::support::fake_openai::FakeOpenAi;

/// A client that follows no redirects, so each answer of the console is seen as sent.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The `Set-Cookie` header for cookie `name`.
fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

/// The value of the hidden `csrf` input of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_owned()
}

/// A browser-like visitor: the cookies the console set, sent back.
struct Visitor {
    http: reqwest::Client,
    base: String,
    cookies: Vec<String>,
}

impl Visitor {
    fn new(app: &TestApp) -> Self {
        Self { http: client(), base: format!("{}/console", app.root), cookies: Vec::new() }
    }

    fn keep(&mut self, res: &reqwest::Response) {
        for value in res.headers().get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()) {
            let pair = cookie_pair(value);
            let name = pair.split('=').next().unwrap().to_owned();
            self.cookies.retain(|c| !c.starts_with(&format!("{name}=")));
            if !pair.ends_with('=') {
                self.cookies.push(pair);
            }
        }
    }

    async fn get(&mut self, path: &str) -> reqwest::Response {
        let res =
            self.http.get(format!("{}{path}", self.base)).header(COOKIE, self.cookies.join("; ")).send().await.unwrap();
        self.keep(&res);
        res
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let res = self
            .http
            .request(Method::POST, format!("{}{path}", self.base))
            .header(COOKIE, self.cookies.join("; "))
            .form(form)
            .send()
            .await
            .unwrap();
        self.keep(&res);
        res
    }

    /// Sign in with `token`; returns the answer to the form.
    async fn sign_in(&mut self, token: &str) -> reqwest::Response {
        let page = self.get("/sign-in").await.text().await.unwrap();
        let csrf = csrf_of(&page);
        self.post("/sign-in", &[("csrf", &csrf), ("token", token)]).await
    }

    /// The CSRF token of the signed-in session (read from a page's forms).
    async fn csrf(&mut self) -> String {
        let res = self.get("/overview").await;
        assert_eq!(res.status(), 200);
        csrf_of(&res.text().await.unwrap())
    }
}

fn location(res: &reqwest::Response) -> String {
    res.headers().get(LOCATION).map(|l| l.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn the_session_cookie_is_http_only_strict_scoped_and_holds_no_secret() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut v = Visitor::new(&app);
    assert!(location(&v.get("/overview").await).ends_with("/console/sign-in"), "signed out: to the sign-in page");
    let res = v.sign_in(ADMIN_TOKEN).await;
    assert_eq!(res.status(), 303);
    assert!(location(&res).ends_with("/console/overview"));
    let cookie = set_cookie(&res, "imagegate_console").expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "served over plain HTTP: {cookie}");
    assert!(!cookie.contains(ADMIN_TOKEN) && !cookie.contains(&app.key), "{cookie}");
    let page = v.get("/overview").await;
    assert_eq!(page.status(), 200);
    for header in ["content-security-policy", "x-frame-options"] {
        assert!(page.headers().contains_key(header), "{header}");
    }
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(page.text().await.unwrap().contains("platform team"));

    let https =
        TestApp::spawn_with(&fake.url, |s| s.server.public_url = Some("https://images.example.com".parse().unwrap()))
            .await;
    let cookie = set_cookie(&Visitor::new(&https).sign_in(ADMIN_TOKEN).await, "imagegate_console").unwrap();
    assert!(cookie.contains("Secure"), "behind HTTPS: {cookie}");
}

#[tokio::test]
async fn forged_altered_and_expired_sessions_are_sent_to_sign_in() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.console.session_ttl = Duration::from_secs(1)).await;
    let mut v = Visitor::new(&app);
    assert_eq!(v.sign_in(ADMIN_TOKEN).await.status(), 303);
    assert_eq!(v.get("/overview").await.status(), 200);
    let real = v.cookies.iter().find(|c| c.starts_with("imagegate_console=")).unwrap().clone();
    let (id, sig) = real.trim_start_matches("imagegate_console=").rsplit_once('.').unwrap();
    let swapped = if id.starts_with('A') { "B" } else { "A" };
    let flipped = format!("{swapped}{}", &id[1..]);
    for forged in [
        format!("imagegate_console={flipped}.{sig}"),
        format!("imagegate_console={id}.AAAA{}", &sig[4..]),
        "imagegate_console=admin".to_owned(),
        format!("imagegate_console={}", URL_SAFE_RANDOM),
    ] {
        let res = client().get(format!("{}/console/overview", app.root)).header(COOKIE, &forged).send().await.unwrap();
        assert_eq!(res.status(), 303, "{forged}");
        assert!(location(&res).ends_with("/console/sign-in"));
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = v.get("/overview").await;
    assert_eq!(res.status(), 303, "the session expired");
    assert!(location(&res).ends_with("/console/sign-in"));
}

const URL_SAFE_RANDOM: &str = "dGhpcyBpcyBub3QgYSBzZXNzaW9u.c2lnbmF0dXJl";

#[tokio::test]
async fn every_form_without_the_sessions_csrf_token_is_refused_and_changes_nothing() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut v = Visitor::new(&app);

    // The sign-in form itself: without its token cookie and field, no session.
    let res =
        client().post(format!("{}/console/sign-in", app.root)).form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
    assert_eq!(res.status(), 403);
    assert!(set_cookie(&res, "imagegate_console").is_none());

    assert_eq!(v.sign_in(ADMIN_TOKEN).await.status(), 303);
    let csrf = v.csrf().await;
    for token in [None, Some("wrong"), Some(&csrf[1..])] {
        let mut form = vec![("name", "sneaky"), ("log_prompts", "true")];
        if let Some(t) = token {
            form.push(("csrf", t));
        }
        assert_eq!(v.post("/tenants", &form).await.status(), 403, "{token:?}");
        assert_eq!(v.post("/tenants/team-a/suspend", &form).await.status(), 403);
        assert_eq!(v.post("/sign-out", &form).await.status(), 403);
    }
    let tenants: serde_json::Value = app
        .client
        .get(format!("{}/admin/v1/tenants", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = tenants["data"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["team-a", "team-b"], "nothing was created");
    assert!(tenants["data"].as_array().unwrap().iter().all(|t| t["status"] == "active"), "nothing was suspended");

    // With the token, the same forms work; sign-out ends the session.
    assert_eq!(v.post("/tenants", &[("csrf", &csrf), ("name", "made-here")]).await.status(), 303);
    assert_eq!(v.post("/sign-out", &[("csrf", &csrf)]).await.status(), 303);
    assert_eq!(v.get("/overview").await.status(), 303);
}

#[tokio::test]
async fn repeated_failed_sign_ins_back_off_even_for_the_right_token() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.console.max_failed_sign_ins = 3).await;
    let mut v = Visitor::new(&app);
    assert_eq!(v.sign_in("not-the-token").await.status(), 401);
    assert_eq!(v.sign_in("ig_abcdefgh_0123456789abcdef0123456789abcdef").await.status(), 401);
    let third = v.sign_in("still-wrong").await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let res = v.sign_in(ADMIN_TOKEN).await;
    assert_eq!(res.status(), 429, "locked out: not even the right token is tried");
    assert!(set_cookie(&res, "imagegate_console").is_none());
}

#[tokio::test]
async fn a_revoked_key_or_a_suspended_tenant_ends_its_console_sessions() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let admin = |method: Method, path: &str| {
        app.client.request(method, format!("{}/admin/v1{path}", app.root)).bearer_auth(ADMIN_TOKEN)
    };
    let key: serde_json::Value =
        admin(Method::POST, "/tenants/team-b/keys").json(&json!({})).send().await.unwrap().json().await.unwrap();
    let (secret, id) = (key["key"].as_str().unwrap(), key["id"].as_str().unwrap());

    let mut by_key = Visitor::new(&app);
    assert_eq!(by_key.sign_in(secret).await.status(), 303);
    assert_eq!(by_key.get("/overview").await.status(), 200);
    let mut by_other_key = Visitor::new(&app);
    assert_eq!(by_other_key.sign_in(&app.other_key).await.status(), 303);

    assert_eq!(admin(Method::DELETE, &format!("/keys/{id}")).send().await.unwrap().status(), 200);
    assert_eq!(by_key.get("/overview").await.status(), 303, "revoked: signed out");
    assert_eq!(by_key.sign_in(secret).await.status(), 401, "and cannot sign in again");
    assert_eq!(by_other_key.get("/overview").await.status(), 200, "the tenant's other key still works");

    assert_eq!(admin(Method::POST, "/tenants/team-b/suspend").send().await.unwrap().status(), 200);
    assert_eq!(by_other_key.get("/overview").await.status(), 303, "suspended: signed out");
    let refused = by_other_key.sign_in(&app.other_key).await;
    assert_eq!(refused.status(), 401);
    assert!(refused.text().await.unwrap().contains("suspended"));
}

#[tokio::test]
async fn a_team_sees_only_its_own_tenant() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    for key in [&app.key, &app.other_key] {
        let res = app
            .client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(key)
            .json(&json!({"model": "dall-e-2", "prompt": "a harbour"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    app.usage_rows(2).await;
    let mut team = Visitor::new(&app);
    assert_eq!(team.sign_in(&app.key).await.status(), 303);
    let csrf = team.csrf().await;
    assert_eq!(team.get("/tenants").await.status(), 403);
    assert_eq!(team.post("/tenants", &[("csrf", &csrf), ("name", "mine")]).await.status(), 403);
    assert_eq!(team.post("/tenants/team-b/suspend", &[("csrf", &csrf)]).await.status(), 403);

    // Asking for the other tenant still shows only its own rows.
    let csv = team.get("/usage.csv?tenant=team-b").await.text().await.unwrap();
    let tenants: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap()).collect();
    assert_eq!(tenants, ["team-a"], "{csv}");
    let overview = team.get("/overview?tenant=team-b").await.text().await.unwrap();
    assert!(overview.contains("team-a") && !overview.contains("team-b"));

    // The other tenant's image: not in the gallery, its thumbnail and delete are not found.
    let mut admin = Visitor::new(&app);
    assert_eq!(admin.sign_in(ADMIN_TOKEN).await.status(), 303);
    let gallery = admin.get("/gallery?tenant=team-b").await.text().await.unwrap();
    let at = gallery.find("data-image=\"").unwrap() + "data-image=\"".len();
    let other_image = gallery[at..].split('"').next().unwrap().to_owned();
    assert!(!team.get("/gallery").await.text().await.unwrap().contains(&other_image));
    assert_eq!(team.get(&format!("/gallery/{other_image}/thumb")).await.status(), 404);
    assert_eq!(team.post(&format!("/gallery/{other_image}/delete"), &[("csrf", &csrf)]).await.status(), 404);
    assert_eq!(admin.get(&format!("/gallery/{other_image}/thumb")).await.status(), 200, "still there");
}

#[tokio::test]
async fn tenant_forms_refuse_what_the_admin_api_refuses_with_its_message() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut v = Visitor::new(&app);
    assert_eq!(v.sign_in(ADMIN_TOKEN).await.status(), 303);
    let csrf = v.csrf().await;
    for (form, api_body) in [
        (vec![("name", "bad name!")], json!({"name": "bad name!"})),
        (
            vec![("name", "ok"), ("limits.images_per_day", "lots")],
            json!({"name": "ok", "limits": {"images_per_day": "lots"}}),
        ),
        (vec![("name", "team-a")], json!({"name": "team-a"})),
    ] {
        let api = app
            .client
            .post(format!("{}/admin/v1/tenants", app.root))
            .bearer_auth(ADMIN_TOKEN)
            .json(&api_body)
            .send()
            .await
            .unwrap();
        let api_status = api.status().as_u16();
        let api_error: serde_json::Value = api.json().await.unwrap();
        let message = api_error["error"]["message"].as_str().unwrap();
        // Positions in the JSON body mean nothing on a form; the rest of the message is the same.
        let message = match message.find(" at line ") {
            Some(at) => &message[..at],
            None => message,
        };
        let mut fields = vec![("csrf", csrf.as_str())];
        fields.extend(form.iter().copied());
        let res = v.post("/tenants", &fields).await;
        assert_eq!(res.status().as_u16(), api_status, "{message}");
        let page = res.text().await.unwrap().replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&");
        assert!(page.contains(message), "the admin API's message '{message}' on the page");
    }
}

#[tokio::test]
async fn the_console_can_be_moved_or_turned_off() {
    let fake = FakeOpenAi::start().await;
    let off = TestApp::spawn_with(&fake.url, |s| s.console.enabled = false).await;
    assert_eq!(client().get(format!("{}/console/sign-in", off.root)).send().await.unwrap().status(), 404);
    let moved = TestApp::spawn_with(&fake.url, |s| s.console.path = "/ops/console".into()).await;
    assert_eq!(client().get(format!("{}/console/sign-in", moved.root)).send().await.unwrap().status(), 404);
    let res = client().get(format!("{}/ops/console/sign-in", moved.root)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(set_cookie(&res, "imagegate_console_signin").unwrap().contains("Path=/ops/console"));
}

/// What the ledger's raw rows add up to in the overview's range, computed here with SQL over `usage_events`
/// (not through the rollup the console reads).
#[derive(Debug, Default)]
struct RawTotals {
    requests: i64,
    images: i64,
    usd: f64,
    refused: i64,
    errors: i64,
    cache_hits: i64,
    /// (model, requests, images, usd)
    models: Vec<(String, i64, i64, f64)>,
    /// The charts' bar segments: "{day} · {tenant}: {value}" for images, requests and USD.
    segments: [Vec<String>; 3],
}

async fn raw_totals(pool: &sqlx::AnyPool, from_ms: i64, tenant: Option<&str>) -> RawTotals {
    use sqlx::Row as _;
    let day = "(u.created_at / 86400000) * 86400000";
    let filter = tenant.map_or_else(String::new, |t| format!(" AND t.name = '{t}'"));
    let rows = sqlx::query(&format!(
        "SELECT {day} AS day, t.name AS tenant, u.model AS model, COUNT(*) AS requests, \
         CAST(SUM(COALESCE(u.images_returned, 0)) AS BIGINT) AS images, CAST(SUM(u.cost_usd) AS DOUBLE PRECISION) AS usd, \
         CAST(SUM(CASE WHEN u.refused_by IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT) AS refused, \
         CAST(SUM(CASE WHEN u.status >= 500 AND u.refused_by IS NULL THEN 1 ELSE 0 END) AS BIGINT) AS errors, \
         CAST(SUM(u.cache_hit) AS BIGINT) AS hits \
         FROM usage_events u JOIN tenants t ON t.id = u.tenant_id WHERE u.created_at >= $1{filter} \
         GROUP BY {day}, t.name, u.model"
    ))
    .bind(from_ms)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut raw = RawTotals::default();
    let mut models: std::collections::BTreeMap<String, (i64, i64, f64)> = Default::default();
    let mut bars: std::collections::BTreeMap<(i64, String), (i64, i64, f64)> = Default::default();
    for r in &rows {
        let (requests, images, usd): (i64, i64, f64) = (r.get("requests"), r.get("images"), r.get("usd"));
        raw.requests += requests;
        raw.images += images;
        raw.usd += usd;
        raw.refused += r.get::<i64, _>("refused");
        raw.errors += r.get::<i64, _>("errors");
        raw.cache_hits += r.get::<i64, _>("hits");
        let m = models.entry(r.get("model")).or_default();
        *m = (m.0 + requests, m.1 + images, m.2 + usd);
        let b = bars.entry((r.get("day"), r.get("tenant"))).or_default();
        *b = (b.0 + images, b.1 + requests, b.2 + usd);
    }
    raw.models = models.into_iter().map(|(m, (r, i, u))| (m, r, i, u)).collect();
    raw.models.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)).then(a.0.cmp(&b.0)));
    for ((day, tenant), (images, requests, usd)) in bars {
        let label = chrono::DateTime::from_timestamp_millis(day).unwrap().format("%Y-%m-%d").to_string();
        let segments = [
            (images as f64, format!("{images}")),
            (requests as f64, format!("{requests}")),
            (usd, format!("${usd:.2}")),
        ];
        for (i, (value, text)) in segments.into_iter().enumerate() {
            if value > 0.0 {
                raw.segments[i].push(format!("{label} · {tenant}: {text}"));
            }
        }
    }
    raw
}

/// The text of the element with `id` on a page.
fn text_of(html: &str, id: &str) -> String {
    let at = html.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("#{id} on the page"));
    let start = at + html[at..].find('>').unwrap() + 1;
    html[start..start + html[start..].find('<').unwrap()].to_owned()
}

fn ratio(part: i64, whole: i64) -> String {
    if whole == 0 { "–".to_owned() } else { format!("{:.1} %", part as f64 * 100.0 / whole as f64) }
}

/// The overview page shows exactly `raw`: totals, ratios, top models and every bar segment of the charts.
fn assert_overview_shows(html: &str, raw: &RawTotals, what: &str) {
    assert_eq!(text_of(html, "total-images"), raw.images.to_string(), "{what}: images");
    assert_eq!(text_of(html, "total-requests"), raw.requests.to_string(), "{what}: requests");
    assert_eq!(text_of(html, "total-usd"), format!("${:.2}", raw.usd), "{what}: USD");
    assert_eq!(text_of(html, "refusal-ratio"), ratio(raw.refused, raw.requests), "{what}: refusals");
    assert_eq!(text_of(html, "error-ratio"), ratio(raw.errors, raw.requests), "{what}: errors");
    assert_eq!(text_of(html, "cache-ratio"), ratio(raw.cache_hits, raw.requests), "{what}: cache hits");
    let table = &html[html.find("id=\"top-models\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    let shown: Vec<String> = table
        .split("<tr>")
        .skip(2)
        .map(|row| {
            row.split("</td>")
                .map(|c| c.rsplit('>').next().unwrap())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let expected: Vec<String> = raw.models.iter().take(8).map(|(m, r, i, u)| format!("{m} {r} {i} {u:.4}")).collect();
    assert_eq!(shown, expected, "{what}: top models");
    let charts: Vec<&str> = html.split("<figure class=\"chart\">").skip(1).collect();
    assert_eq!(charts.len(), 3, "{what}: three charts");
    for (chart, expected) in charts.iter().zip(&raw.segments) {
        let mut titles: Vec<String> =
            chart.split("<title>").skip(1).map(|t| t.split("</title>").next().unwrap().to_owned()).collect();
        titles.sort();
        let mut expected = expected.clone();
        expected.sort();
        assert_eq!(titles, expected, "{what}: bar segments");
    }
}

/// An upgraded deployment: rows written before migration 0010 (yesterday, today, and ten days ago, outside a
/// week's range) are counted by its backfill, then calls through the real API of two tenants and several
/// models (successes, a cache hit, a refusal by the tenant's limit and by the upstream, upstream errors) by
/// the usage writer; the overview over a week, whole and for one tenant, and the budget bars show exactly
/// what the raw ledger rows add up to.
async fn the_overview_adds_up_to_the_ledger_rows(db: TestDb) {
    use imagegate::domain::Limits;
    use sqlx::Executor as _;
    const DAY: i64 = 86_400_000;
    let fake = FakeOpenAi::start().await;
    let mut p = TestApp::prepare(db, &fake.url).await;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&p.database_url).await.unwrap();
    let mut before_rollup = sqlx::migrate!("./migrations");
    before_rollup.migrations =
        before_rollup.migrations.iter().filter(|m| m.version < 10).cloned().collect::<Vec<_>>().into();
    before_rollup.run(&pool).await.unwrap();
    p.settings.cache.enabled = true;
    p.settings.tenants[1].limits = Limits {
        requests_per_minute: Some(2),
        images_per_day: Some(40),
        usd_per_month: Some(10.0),
        ..Limits::default()
    };
    let upgraded = p.settings.clone();
    p.settings.database.migrate = false;
    let app = p.start().await;

    let now = imagegate::time::now_ms();
    let today = now - now % DAY;
    let ids: Vec<(String, String)> =
        sqlx::query_as("SELECT name, id FROM tenants ORDER BY name").fetch_all(&pool).await.unwrap();
    let id = |name: &str| ids.iter().find(|(n, _)| n == name).unwrap().1.clone();
    // (when, tenant, model, images, usd, status, cache_hit, refused_by)
    let old = [
        (today - 10 * DAY, "team-a", "dall-e-3", Some(1), 0.04, 200, 0, None),
        (today - DAY + 1, "team-a", "dall-e-3", Some(2), 0.08, 200, 0, None),
        (today - 1, "team-a", "gpt-image-1", Some(1), 0.042, 200, 0, None),
        (today - DAY / 2, "team-b", "dall-e-2", Some(3), 0.06, 200, 0, None),
        (today - DAY / 2, "team-b", "dall-e-2", Some(3), 0.0, 200, 1, None),
        (today - DAY / 3, "team-b", "dall-e-2", None, 0.0, 429, 0, Some("gateway")),
        (today - DAY / 4, "team-a", "dall-e-3", None, 0.0, 502, 0, None),
        (today, "team-b", "dall-e-2", Some(1), 0.02, 200, 0, None),
        (now - 5, "team-a", "dall-e-2", Some(2), 0.04, 200, 0, None),
    ];
    for (i, (at, tenant, model, images, usd, status, hit, refused_by)) in old.into_iter().enumerate() {
        pool.execute(
            sqlx::query(
                "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
                 images_requested, images_returned, cost_usd, status, latency_ms, stream, cache_hit, refused_by) \
                 VALUES ($1, $2, $3, 'oldkey00', 'generations', $4, 1, $5, $6, $7, 5, 0, $8, $9)",
            )
            .bind(format!("old_{i}"))
            .bind(at)
            .bind(id(tenant))
            .bind(model)
            .bind(images.map(i64::from))
            .bind(usd)
            .bind(i64::from(status))
            .bind(i64::from(hit))
            .bind(refused_by),
        )
        .await
        .unwrap();
    }
    // The upgrade: migration 0010 backfills the rollup from these rows.
    let app = app.restart_with(upgraded).await;

    let call = |key: String, body: serde_json::Value| {
        let (client, url) = (app.client.clone(), format!("{}/images/generations", app.base_url));
        async move { client.post(url).bearer_auth(key).json(&body).send().await.unwrap().status().as_u16() }
    };
    let a = app.key.clone();
    let b = app.other_key.clone();
    let mut statuses = Vec::new();
    for (key, body) in [
        (&a, json!({"model": "dall-e-2", "prompt": "a harbour", "n": 2})),
        (&a, json!({"model": "dall-e-2", "prompt": "a harbour", "n": 2})),
        (&a, json!({"model": "gpt-image-1", "prompt": "a lighthouse"})),
        (&a, json!({"model": "dall-e-3", "prompt": "fog #status=500"})),
        (&a, json!({"model": "dall-e-2", "prompt": "busy #status=429"})),
        (&b, json!({"model": "dall-e-2", "prompt": "a quay", "n": 3})),
        (&b, json!({"model": "gpt-image-1", "prompt": "a crane"})),
        (&b, json!({"model": "dall-e-2", "prompt": "one too many"})),
    ] {
        statuses.push(call(key.clone(), body).await);
    }
    assert_eq!(statuses[..3], [200, 200, 200], "{statuses:?}");
    assert!(statuses[3] >= 500 && statuses[4] == 429 && statuses[7] == 429, "{statuses:?}");
    let rows = app.usage_rows(old.len() + statuses.len()).await;
    assert_eq!(rows.len(), old.len() + statuses.len());
    let new_rows = &rows.iter().filter(|r| !r["request_id"].as_str().unwrap().starts_with("old_")).collect::<Vec<_>>();
    assert!(new_rows.iter().any(|r| r["cache_hit"] == 1), "a cache hit among the calls");
    assert!(
        new_rows.iter().any(|r| r["refused_by"] == "gateway") && new_rows.iter().any(|r| r["refused_by"] == "upstream")
    );

    let week = today - 6 * DAY;
    let mut admin = Visitor::new(&app);
    assert_eq!(admin.sign_in(ADMIN_TOKEN).await.status(), 303);
    let page = admin.get("/overview?days=7").await.text().await.unwrap();
    assert_overview_shows(&page, &raw_totals(&pool, week, None).await, "whole deployment, 7 days");
    let page = admin.get("/overview?days=7&tenant=team-b").await.text().await.unwrap();
    assert_overview_shows(&page, &raw_totals(&pool, week, Some("team-b")).await, "team-b, 7 days");
    let page = admin.get("/overview?days=30").await.text().await.unwrap();
    assert_overview_shows(&page, &raw_totals(&pool, today - 29 * DAY, None).await, "whole deployment, 30 days");

    // team-b's budget bars: what the limits count (images not from the cache, cost), today and this month.
    let month = imagegate::time::month_start(now).unwrap();
    let spent = |from: i64| {
        let pool = pool.clone();
        let tenant = id("team-b");
        async move {
            let row: (i64, f64) = sqlx::query_as(
                "SELECT CAST(COALESCE(SUM(CASE WHEN cache_hit = 0 THEN COALESCE(images_returned, 0) ELSE 0 END), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) FROM usage_events WHERE tenant_id = $1 AND created_at >= $2",
            )
            .bind(tenant)
            .bind(from)
            .fetch_one(&pool)
            .await
            .unwrap();
            row
        }
    };
    let (images_today, _) = spent(today).await;
    let (_, usd_month) = spent(month).await;
    let mut team = Visitor::new(&app);
    assert_eq!(team.sign_in(&app.other_key).await.status(), 303);
    let page = team.get("/overview?days=7").await.text().await.unwrap();
    assert!(page.contains(&format!("{images_today} of 40")), "images today: {images_today}");
    assert!(page.contains(&format!("${usd_month:.2} of $10.00")), "USD this month: {usd_month}");
    assert_overview_shows(&page, &raw_totals(&pool, week, Some("team-b")).await, "team-b signed in, 7 days");
}

#[tokio::test]
async fn the_overview_adds_up_to_the_ledger_rows_on_sqlite() {
    the_overview_adds_up_to_the_ledger_rows(TestDb::Sqlite).await;
}

#[tokio::test]
async fn the_overview_adds_up_to_the_ledger_rows_on_postgres() {
    the_overview_adds_up_to_the_ledger_rows(TestDb::Postgres).await;
}

/// Cache settings for a replica sharing the test Redis under `prefix`.
fn cached_on_redis(s: &mut imagegate::config::Settings, prefix: &str) {
    s.cache.enabled = true;
    s.cache.ttl = Duration::from_secs(60);
    s.cache.backend = imagegate::config::CacheBackend::Redis;
    s.cache.redis_url = Some(imagegate::config::Secret::new("redis://127.0.0.1:6379"));
    s.cache.redis_prefix = prefix.to_owned();
}

/// An image deleted from the console is not handed out again by the response cache, neither from the memory
/// of the replica that deleted it nor from another replica's memory or the Redis both share: the same request
/// gets a new image (one more upstream call) whose link works, and the deleted link answers 404.
#[tokio::test]
async fn a_deleted_image_is_never_handed_out_again_by_the_response_cache() {
    let fake = FakeOpenAi::start().await;
    let prefix = format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>()));
    // Replicas behind one balancer share their public URL, and so their links.
    let public = "http://images.example.test";
    let a = TestApp::spawn_with(&fake.url, |s| {
        cached_on_redis(s, &prefix);
        s.server.public_url = Some(public.parse().unwrap());
    })
    .await;
    let b = {
        let mut settings = a.settings.clone();
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        settings.storage.data_dir = dir.path().to_path_buf();
        a.replica(settings, dir).await
    };
    let body = json!({"model": "dall-e-2", "prompt": "a harbour at dawn"});
    let link_from = |app: &TestApp| {
        let (client, url, key, body) =
            (app.client.clone(), format!("{}/images/generations", app.base_url), app.key.clone(), body.clone());
        async move {
            let res = client.post(url).bearer_auth(key).json(&body).send().await.unwrap();
            assert_eq!(res.status(), 200);
            let cache = res.headers().get("x-imagegate-cache").map(|v| v.to_str().unwrap().to_owned());
            let answer: serde_json::Value = res.json().await.unwrap();
            (answer["data"][0]["url"].as_str().unwrap().to_owned(), cache)
        }
    };
    // A link fetched through one replica, as the balancer would send it.
    let get_via = |app: &TestApp, link: &str| {
        let url = link.replace(public, &app.root);
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    // Wait until both replicas reach Redis, so B's first request is answered from what A stored there.
    for app in [&a, &b] {
        for _ in 0..100 {
            let stats: serde_json::Value = app
                .client
                .get(format!("{}/admin/v1/cache", app.root))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if stats["shared_state"] == "up" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let (first, _) = link_from(&a).await;
    assert_eq!(get_via(&a, &first).await, 200);
    let mut from_b = None;
    for _ in 0..60 {
        // Redis is written in a task of its own: B finds the entry once it is there.
        let (link, cache) = link_from(&b).await;
        if cache.as_deref() == Some("hit") {
            from_b = Some(link);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(from_b.as_deref(), Some(first.as_str()), "B answered from the shared cache");
    let calls_before = fake.call_count();
    assert_eq!(link_from(&a).await.0, first, "a hit on A too");

    let id = first.rsplit('/').next().unwrap().split('.').next().unwrap().to_owned();
    let mut console = Visitor::new(&a);
    assert_eq!(console.sign_in(ADMIN_TOKEN).await.status(), 303);
    let csrf = console.csrf().await;
    assert_eq!(console.post(&format!("/gallery/{id}/delete"), &[("csrf", &csrf)]).await.status(), 303);
    assert_eq!(get_via(&a, &first).await, 404, "the deleted link is dead");

    for (name, app) in [("A", &a), ("B", &b)] {
        let (link, cache) = link_from(app).await;
        assert_ne!(link, first, "{name} handed out the deleted image's link again (x-imagegate-cache: {cache:?})");
        assert_eq!(get_via(app, &link).await, 200, "{name}'s new link works");
    }
    assert!(fake.call_count() > calls_before, "the deleted image was generated anew");
    assert_eq!(get_via(&a, &first).await, 404);
}

/// With the limits in Redis, replicas behind one balancer share the sign-in back-off: failures counted on
/// either replica add up, and once they earn a wait, the other replica refuses even the right token too.
#[tokio::test]
async fn replicas_sharing_the_limits_redis_share_the_sign_in_back_off() {
    let fake = FakeOpenAi::start().await;
    let prefix = format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>()));
    let a = TestApp::spawn_with(&fake.url, |s| {
        s.console.max_failed_sign_ins = 3;
        s.limits.backend = imagegate::config::LimitsBackend::Redis;
        s.limits.redis_url = Some(imagegate::config::Secret::new("redis://127.0.0.1:6379"));
        s.limits.redis_prefix = prefix.clone();
    })
    .await;
    let b = {
        let mut settings = a.settings.clone();
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        settings.storage.data_dir = dir.path().to_path_buf();
        a.replica(settings, dir).await
    };
    let (mut on_a, mut on_b) = (Visitor::new(&a), Visitor::new(&b));
    assert_eq!(on_a.sign_in("wrong-1").await.status(), 401);
    assert_eq!(on_b.sign_in("wrong-2").await.status(), 401);
    let third = on_a.sign_in("wrong-3").await;
    assert_eq!(third.status(), 429, "the third failure, counted across both replicas");
    let res = on_b.sign_in(ADMIN_TOKEN).await;
    assert_eq!(res.status(), 429, "the other replica enforces the same wait, even for the right token");
    assert!(res.headers().contains_key("retry-after"));
    assert!(set_cookie(&res, "imagegate_console").is_none());

    // A success forgets the failures everywhere.
    let mut conn =
        redis::Client::open("redis://127.0.0.1:6379").unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:console:signin:*")).query_async(&mut conn).await.unwrap();
    assert!(keys.iter().any(|k| k.ends_with(":locked")), "{keys:?}");
    let lock = keys.iter().find(|k| k.ends_with(":locked")).unwrap();
    redis::cmd("DEL").arg(lock).query_async::<()>(&mut conn).await.unwrap();
    assert_eq!(on_a.sign_in(ADMIN_TOKEN).await.status(), 303, "the wait is over");
    let left: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:console:signin:*")).query_async(&mut conn).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}
