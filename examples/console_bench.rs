//! How fast the console's pages render over a year of usage: `scripts/bench-console.sh [--rows N] [--db
//! sqlite|postgres|both] [--runs R]`.
//!
//! For each database it upgrades a deployment the way production does: the schema as it was before the
//! per-day rollup (migrations up to 0009), the real gateway started in-process on it, 20 tenants created
//! through the admin API (a third with budgets), N generated ledger rows spread over the last 365 days (5
//! models, refusals, errors and cache hits mixed in), then the remaining migrations run (0010 fills the
//! `usage_daily` rollup from those rows, timed). It then signs in to the console as the platform team over
//! HTTP and times whole page answers: the overview over 30 and 365 days, for the whole deployment and for one
//! tenant, the usage table's first page and one filtered by tenant and model. It prints a Markdown report on
//! stdout (progress on stderr), with the load average before and after, since the machine may be shared.
//! PostgreSQL runs in a fresh database on `IMAGEGATE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`), dropped afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout, reason = "a benchmark")]

use std::time::{Duration, Instant};

use imagegate::config::{Secret, Settings, UpstreamKind};
use imagegate::startup::Application;
use serde_json::json;
use sqlx::Executor as _;

const ADMIN: &str = "bench-admin-token-0123456789abcdef";
const DAY_MS: i64 = 86_400_000;
/// The migration that adds the per-day rollup (`usage_daily`) and backfills it.
const ROLLUP_MIGRATION: i64 = 10;

struct Args {
    rows: usize,
    dbs: Vec<&'static str>,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args { rows: 1_000_000, dbs: vec!["sqlite", "postgres"], runs: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--rows" => a.rows = value.parse().expect("--rows N"),
            "--runs" => a.runs = value.parse().expect("--runs N"),
            "--db" => {
                a.dbs = match value.as_str() {
                    "sqlite" => vec!["sqlite"],
                    "postgres" => vec!["postgres"],
                    "both" => vec!["sqlite", "postgres"],
                    other => panic!("--db {other}: use sqlite, postgres or both"),
                }
            }
            other => panic!("unknown flag {other}: use --rows, --db, --runs"),
        }
    }
    a
}

/// The 1-minute load average (Linux), or "?".
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

#[tokio::main]
async fn main() {
    let args = args();
    sqlx::any::install_default_drivers();
    println!("# Console benchmark: {} ledger rows over 365 days, 20 tenants\n", args.rows);
    println!(
        "Whole HTTP answers of the console (render included), signed in as the platform team; median and worst of {} runs after one warm-up.\n",
        args.runs
    );
    println!("| database | page | median | worst |");
    println!("| --- | --- | --- | --- |");
    for db in &args.dbs {
        run(db, &args).await;
    }
}

async fn run(db: &str, args: &Args) {
    let dir = tempfile::tempdir().unwrap();
    let (url, pg_name) = match db {
        "sqlite" => (format!("sqlite://{}?mode=rwc", dir.path().join("imagegate.db").display()), None),
        _ => {
            let admin = std::env::var("IMAGEGATE_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await.expect("PostgreSQL");
            let name = format!("ig_bench_{}", hex::encode(rand::random::<[u8; 4]>()));
            conn.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
            let base = admin.rsplit_once('/').unwrap().0.to_owned();
            (format!("{base}/{name}"), Some((admin, name)))
        }
    };
    // The schema before the rollup: the rows below are then counted by migration 0010's backfill, as an
    // upgraded deployment's are; new rows are counted by the usage writer (tested in tests/api/console.rs).
    let before_rollup = {
        let mut m = sqlx::migrate!("./migrations");
        m.migrations = m.migrations.iter().filter(|m| m.version < ROLLUP_MIGRATION).cloned().collect::<Vec<_>>().into();
        m
    };
    {
        let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
        before_rollup.run(&pool).await.expect("migrations before the rollup");
        pool.close().await;
    }
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.server.shutdown_grace = Duration::ZERO;
    s.upstream.kind = UpstreamKind::Mock;
    s.admin.token = Some(Secret::new(ADMIN));
    s.storage.data_dir = dir.path().to_path_buf();
    s.database.url = Some(Secret::new(url.clone()));
    s.database.migrate = false;
    let app = Application::build(s).await.expect("gateway");
    let root = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    for i in 0..20 {
        let limits = if i % 3 == 0 { json!({"images_per_day": 5000, "usd_per_month": 2000.0}) } else { json!({}) };
        let res = http
            .post(format!("{root}/admin/v1/tenants"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": format!("team-{i:02}"), "limits": limits}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
    let tenants: Vec<String> =
        sqlx::query_scalar("SELECT id FROM tenants ORDER BY name").fetch_all(&pool).await.unwrap();
    let started = Instant::now();
    generate(&pool, &tenants, args.rows).await;
    eprintln!("{db}: {} rows written in {:.1}s", args.rows, started.elapsed().as_secs_f64());
    let started = Instant::now();
    sqlx::migrate!("./migrations").run(&pool).await.expect("migration 0010");
    let backfill = started.elapsed().as_secs_f64();
    let (days, rows): (i64, i64) =
        sqlx::query_as("SELECT COUNT(DISTINCT day), COUNT(*) FROM usage_daily").fetch_one(&pool).await.unwrap();
    eprintln!("{db}: migration 0010 filled {rows} rollup rows ({days} days) in {backfill:.1}s");
    pool.execute("ANALYZE").await.unwrap();
    let load_before = load_average();

    let cookie = sign_in(&http, &root).await;
    let pages = [
        ("overview, 30 days", "/console/overview?days=30"),
        ("overview, 30 days, one tenant", "/console/overview?days=30&tenant=team-03"),
        ("overview, 365 days", "/console/overview?days=365"),
        ("overview, 365 days, one tenant", "/console/overview?days=365&tenant=team-03"),
        ("usage table, page 1", "/console/usage"),
        ("usage table, one tenant and model, page 20", "/console/usage?tenant=team-07&model=dall-e-3&page=20"),
    ];
    for (label, path) in pages {
        let (median, worst) = time(&http, &root, path, &cookie, args.runs).await;
        println!("| {db} | {label} | {median:.0} ms | {worst:.0} ms |");
    }
    println!(
        "| {db} | (migration 0010's backfill of {} rows into {rows} rollup rows) | {:.0} ms | |",
        args.rows,
        backfill * 1000.0
    );
    println!("| {db} | (load average before / after the timings) | {load_before} / {} | |", load_average());
    pool.close().await;
    let _ = stop.send(());
    let _ = server.await;
    if let Some((admin, name)) = pg_name {
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await.unwrap();
        let _ = conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
    }
}

/// Ledger rows spread evenly over the last 365 days, generated inside the database (one INSERT … SELECT over
/// a recursive counter per tenant), with models, refusals, errors and cache hits mixed in by arithmetic.
async fn generate(pool: &sqlx::AnyPool, tenants: &[String], rows: usize) {
    let now = now_ms();
    let start = now - 365 * DAY_MS;
    let per_tenant = (rows / tenants.len()) as i64;
    let total = per_tenant * tenants.len() as i64;
    for (k, tenant) in tenants.iter().enumerate() {
        let k = k as i64;
        // Row j of tenant k is row j * tenants + k of the whole range, in time order.
        let sql = format!(
            "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, images_requested, \
             images_returned, size, cost_usd, status, latency_ms, stream, cache_hit, refused_by) \
             WITH RECURSIVE n(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM n WHERE j < {last}) \
             SELECT 'req_' || CAST({k} AS TEXT) || '_' || CAST(j AS TEXT), \
               CAST({start} + ((j * {t} + {k}) * CAST({span} AS BIGINT)) / {total} AS BIGINT), $1, 'benchkey', 'generations', \
               CASE (j * 7 + {k}) % 5 WHEN 0 THEN 'gpt-image-1' WHEN 1 THEN 'gpt-image-1-mini' WHEN 2 THEN 'dall-e-3' \
                 WHEN 3 THEN 'dall-e-2' ELSE 'gpt-image-1.5' END, \
               1 + (j % 4), CASE WHEN (j * 13 + {k}) % 100 < 9 THEN NULL ELSE 1 + (j % 4) END, '1024x1024', \
               CASE WHEN (j * 13 + {k}) % 100 < 19 THEN 0.0 ELSE (1 + (j % 4)) * 0.04 END, \
               CASE WHEN (j * 13 + {k}) % 100 < 5 THEN 429 WHEN (j * 13 + {k}) % 100 < 7 THEN 400 \
                 WHEN (j * 13 + {k}) % 100 < 9 THEN 502 ELSE 200 END, \
               800 + (j * 37) % 19000, 0, CASE WHEN (j * 13 + {k}) % 100 BETWEEN 9 AND 18 THEN 1 ELSE 0 END, \
               CASE WHEN (j * 13 + {k}) % 100 < 4 THEN 'gateway' WHEN (j * 13 + {k}) % 100 < 5 THEN 'upstream' ELSE NULL END \
             FROM n",
            last = per_tenant - 1,
            t = tenants.len(),
            span = 365 * DAY_MS,
        );
        sqlx::query(&sql).bind(tenant.clone()).execute(pool).await.unwrap();
    }
    eprintln!("  {total} rows");
}

async fn sign_in(http: &reqwest::Client, root: &str) -> String {
    let form = http.get(format!("{root}/console/sign-in")).send().await.unwrap();
    let signin_cookie = form.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let html = form.text().await.unwrap();
    let at = html.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = html[at..].split('"').next().unwrap().to_owned();
    let res = http
        .post(format!("{root}/console/sign-in"))
        .header("cookie", signin_cookie)
        .form(&[("csrf", csrf.as_str()), ("token", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "signed in");
    res.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("imagegate_console="))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// Median and worst milliseconds of `runs` whole answers to `path`, after one warm-up.
async fn time(http: &reqwest::Client, root: &str, path: &str, cookie: &str, runs: usize) -> (f64, f64) {
    let get = || async {
        let started = Instant::now();
        let res = http.get(format!("{root}{path}")).header("cookie", cookie).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let body = res.text().await.unwrap();
        assert!(body.len() > 1000);
        started.elapsed().as_secs_f64() * 1000.0
    };
    get().await;
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        times.push(get().await);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[times.len() - 1])
}
