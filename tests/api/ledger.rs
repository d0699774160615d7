//! The usage ledger and the tenant database: rows match what the upstream produced, on SQLite and on
//! PostgreSQL; refusals cost nothing; nothing survives in the database that could authenticate (config,
//! admin-API and CLI keys alike); restarts keep everything; SIGTERM under load loses no row; a row the
//! database refuses, or a database that is locked for a while, loses no other row.

use std::time::Duration;

use imagegate::config::{DatabaseSettings, Secret, UsageSettings};
use imagegate::db::Db;
use imagegate::ledger::record::UsageRecord;
use imagegate::ledger::{Ledger, LedgerStats};
use serde_json::json;

use crate::support::app::{ADMIN_TOKEN, FAKE_IMAGE_HOSTS, GatewayProcess, PostgresDb, TestApp, TestDb, UPSTREAM_KEY};
use crate::support::fake_openai::FakeOpenAi;

async fn rows_match_the_upstream(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;

    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "p", "n": 2})).await;
    let gpt_request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: serde_json::Value = res.json().await.unwrap();
    let res = app
        .post_json(
            "/images/generations",
            &json!({"model": "dall-e-3", "prompt": "p", "quality": "hd", "size": "1792x1024"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "p", "n": 3})).await.status(),
        400
    );
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "p #status=500"})).await.status(), 500);
    let stream = app
        .post_json(
            "/images/generations",
            &json!({"model": "gpt-image-1", "prompt": "s", "stream": true, "partial_images": 1}),
        )
        .await;
    let _ = stream.bytes().await.unwrap();

    let rows = app.usage_rows(5).await;
    assert_eq!(rows.len(), 5, "{rows:#?}");
    let gpt = rows.iter().find(|r| r["request_id"] == gpt_request_id.as_str()).unwrap();
    assert_eq!(gpt["tenant"], "team-a");
    assert_eq!((gpt["images_requested"].as_i64(), gpt["images_returned"].as_i64()), (Some(2), Some(2)));
    assert_eq!(gpt["input_tokens"].as_u64(), body["usage"]["input_tokens"].as_u64());
    assert_eq!(gpt["output_tokens"].as_u64(), body["usage"]["output_tokens"].as_u64());
    assert!(gpt["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(gpt["status"], 200);
    assert!(gpt["upstream_request_id"].as_str().unwrap().starts_with("req_"));
    assert!(gpt["prompt"].is_null(), "prompts are not stored without the tenant's opt-in");

    let dalle = rows.iter().find(|r| r["model"] == "dall-e-3" && r["status"] == 200).unwrap();
    assert!((dalle["cost_usd"].as_f64().unwrap() - 0.12).abs() < 1e-9, "dall-e-3 hd 1792x1024 is $0.12: {dalle}");
    let refused = rows.iter().find(|r| r["status"] == 400).unwrap();
    assert_eq!(refused["cost_usd"].as_f64(), Some(0.0));
    let failed = rows.iter().find(|r| r["status"] == 500).unwrap();
    assert_eq!(failed["cost_usd"].as_f64(), Some(0.0));
    let streamed = rows.iter().find(|r| r["stream"] == 1).unwrap();
    assert!(
        streamed["upstream_request_id"].as_str().is_some_and(|id| id.starts_with("req_")),
        "a stream records the upstream's request id too: {streamed}"
    );
    assert_eq!(streamed["images_returned"].as_i64(), Some(1));
    assert!(streamed["output_tokens"].as_i64().unwrap() > 0);
    assert!(streamed["cost_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn usage_rows_match_what_the_upstream_produced_on_sqlite() {
    rows_match_the_upstream(TestDb::Sqlite).await;
}

#[tokio::test]
async fn usage_rows_match_what_the_upstream_produced_on_postgres() {
    rows_match_the_upstream(TestDb::Postgres).await;
}

#[tokio::test]
async fn prompts_are_stored_only_for_tenants_that_opt_in() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].log_prompts = true).await;

    app.post_json("/images/generations", &json!({"prompt": "a logged prompt"})).await;
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&json!({"prompt": "a private prompt"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let rows = app.usage_rows(2).await;
    let prompts: Vec<(&str, Option<&str>)> =
        rows.iter().map(|r| (r["tenant"].as_str().unwrap(), r["prompt"].as_str())).collect();
    assert!(prompts.contains(&("team-a", Some("a logged prompt"))), "{prompts:?}");
    assert!(prompts.contains(&("team-b", None)), "{prompts:?}");
}

// ------------------------------------------------------------------------------------------ no key secrets

/// Issue a key for a new tenant `name` through the admin API; returns the key.
async fn admin_issued_key(app: &TestApp, name: &str) -> String {
    let res = app
        .client
        .post(format!("{}/admin/v1/tenants", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let res = app
        .client
        .post(format!("{}/admin/v1/tenants/{name}/keys", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = res.json().await.unwrap();
    body["key"].as_str().unwrap().to_owned()
}

/// Issue a key for `tenant` with the compiled CLI (`imagegate keys create`) on the gateway's database.
fn cli_issued_key(app: &TestApp, tenant: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n[storage]\ndata_dir = {:?}\n",
            app.database_url,
            app.data_dir.path().to_string_lossy()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["keys", "create", "--tenant", tenant, "--config"])
        .arg(&config)
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout.split_whitespace().find(|w| w.starts_with("ig_")).unwrap_or_else(|| panic!("no key in {stdout}")).to_owned()
}

/// Config keys, an admin-API key and a CLI key, each used once; returns every key.
async fn keys_of_every_origin(app: &TestApp) -> Vec<String> {
    let admin_key = admin_issued_key(app, "scanned").await;
    let cli_key = cli_issued_key(app, "scanned");
    let keys = vec![app.key.clone(), app.other_key.clone(), admin_key, cli_key];
    for key in &keys {
        let res = app
            .client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(key)
            .json(&json!({"prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    app.usage_rows(keys.len()).await;
    keys
}

fn assert_no_secret_in(bytes: &[u8], keys: &[String], what: &str) {
    for key in keys {
        let secret = &key.as_bytes()[12..];
        assert!(!bytes.windows(secret.len()).any(|w| w == secret), "a key secret is stored in {what}");
    }
}

#[tokio::test]
async fn the_database_file_never_contains_a_key_secret() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(TestDb::Sqlite, &fake.url, |_| {}).await;
    let keys = keys_of_every_origin(&app).await;

    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(app.data_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("imagegate.db") {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(bytes.len() > 4096, "the database file was not found");
    let id = &keys[2].as_bytes()[3..11];
    assert!(bytes.windows(id.len()).any(|w| w == id), "the scan does not see the keys' ids: wrong file?");
    assert_no_secret_in(&bytes, &keys, "the SQLite files");
}

#[tokio::test]
async fn no_postgres_table_contains_a_key_secret() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(TestDb::Postgres, &fake.url, |_| {}).await;
    let keys = keys_of_every_origin(&app).await;

    // Every row of every table, as PostgreSQL prints it.
    let pool = app.pool().await;
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT CAST(table_name AS TEXT) FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let names: Vec<&str> = tables.iter().map(|(t,)| t.as_str()).collect();
    for table in ["tenants", "api_keys", "usage_events", "_sqlx_migrations"] {
        assert!(names.contains(&table), "{table} missing from {names:?}");
    }
    let mut dump = Vec::new();
    for table in &names {
        let rows: Vec<(String,)> =
            sqlx::query_as(&format!("SELECT CAST(t AS TEXT) FROM \"{table}\" t")).fetch_all(&pool).await.unwrap();
        for (row,) in rows {
            dump.extend_from_slice(row.as_bytes());
            dump.push(b'\n');
        }
    }
    pool.close().await;
    let id = &keys[3].as_bytes()[3..11];
    assert!(dump.windows(id.len()).any(|w| w == id), "the scan does not see the CLI key's id");
    assert_no_secret_in(&dump, &keys, "a PostgreSQL table");
}

// ------------------------------------------------------------------------------------- restarts and SIGTERM

async fn a_restart_keeps_tenants_keys_and_usage(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;
    let admin = |app: &TestApp, method: reqwest::Method, path: &str| {
        app.client.request(method, format!("{}/admin/v1{path}", app.root)).bearer_auth(ADMIN_TOKEN)
    };
    let spec = json!({"name": "kept", "organization": "org-kept", "limits": {"requests_per_minute": 100},
                      "metadata": {"owner": "ops"}});
    let res = admin(&app, reqwest::Method::POST, "/tenants").json(&spec).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let created: serde_json::Value = res.json().await.unwrap();
    let res =
        admin(&app, reqwest::Method::POST, "/tenants/kept/keys").json(&json!({"name": "ci"})).send().await.unwrap();
    let issued: serde_json::Value = res.json().await.unwrap();
    let api_key = issued["key"].as_str().unwrap().to_owned();
    let post = |app: &TestApp, key: &str, prompt: &str| {
        app.client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(key)
            .json(&json!({"prompt": prompt}))
            .send()
    };
    assert_eq!(post(&app, &app.key, "before").await.unwrap().status(), 200);
    assert_eq!(post(&app, &api_key, "before").await.unwrap().status(), 200);
    app.usage_rows(2).await;

    let app = app.restart().await;

    let shown: serde_json::Value =
        admin(&app, reqwest::Method::GET, "/tenants/kept").send().await.unwrap().json().await.unwrap();
    assert_eq!(shown, created, "the API tenant is kept as it was");
    let keys: serde_json::Value =
        admin(&app, reqwest::Method::GET, "/tenants/kept/keys").send().await.unwrap().json().await.unwrap();
    assert_eq!(keys["data"][0]["id"], issued["id"]);
    assert_eq!(post(&app, &api_key, "after").await.unwrap().status(), 200, "the API key works after the restart");
    assert_eq!(post(&app, &app.key, "after").await.unwrap().status(), 200);
    let rows = app.usage_rows(4).await;
    assert_eq!(rows.len(), 4, "usage from before the restart is kept: {rows:#?}");
    assert_eq!(rows.iter().filter(|r| r["tenant"] == "kept").count(), 2);
    assert_eq!(fake.last_call().unwrap().header("openai-organization"), Some("org-team-a"));
}

#[tokio::test]
async fn a_restart_keeps_tenants_keys_and_usage_on_sqlite() {
    a_restart_keeps_tenants_keys_and_usage(TestDb::Sqlite).await;
}

#[tokio::test]
async fn a_restart_keeps_tenants_keys_and_usage_on_postgres() {
    a_restart_keeps_tenants_keys_and_usage(TestDb::Postgres).await;
}

async fn sigterm_under_load_loses_no_usage_row(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let postgres = match db {
        TestDb::Postgres => Some(PostgresDb::create().await),
        TestDb::Sqlite => None,
    };
    let database_url = postgres
        .as_ref()
        .map_or_else(|| format!("sqlite://{}", dir.path().join("imagegate.db").display()), |pg| pg.url.clone());
    let database = postgres.as_ref().map_or_else(String::new, |pg| format!("[database]\nurl = \"{}\"\n", pg.url));
    let key = imagegate::domain::keys::generate();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"20s\"\n[storage]\ndata_dir = \"{}\"\n{database}\
         [upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"\n[usage]\nflush_interval = \"5s\"\n{FAKE_IMAGE_HOSTS}\
         [[tenants]]\nname = \"load\"\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        dir.path().display(),
        fake.url,
        key.id,
        key.sha256
    );
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, config).unwrap();
    let mut gw = GatewayProcess::start(&["serve", "--config", path.to_str().unwrap()], dir.path());

    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (client, url, key) = (client.clone(), format!("{}/v1/images/generations", gw.root), key.key.clone());
        tasks.push(tokio::spawn(async move {
            let prompt = format!("load {i} #sleep={}", 200 + (i % 5) * 150);
            client.post(url).bearer_auth(key).json(&json!({"prompt": prompt})).send().await.map(|r| r.status())
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    gw.terminate();
    let mut answered = 0;
    for t in tasks {
        if let Ok(Ok(_status)) = t.await {
            answered += 1;
        }
    }
    assert!(gw.wait(Duration::from_secs(30)).success(), "{}", gw.printed());
    assert!(answered > 0, "no request was in flight when SIGTERM arrived");

    // The flush interval (5 s) is longer than the drain: only the shutdown flush can have written the rows.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&database_url).await.unwrap();
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM usage_events").fetch_one(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(rows, answered, "every answered request has its usage row");
}

#[tokio::test]
async fn sigterm_under_load_loses_no_usage_row_on_sqlite() {
    sigterm_under_load_loses_no_usage_row(TestDb::Sqlite).await;
}

#[tokio::test]
async fn sigterm_under_load_loses_no_usage_row_on_postgres() {
    sigterm_under_load_loses_no_usage_row(TestDb::Postgres).await;
}

// ---------------------------------------------------------------------- the writer when the database says no

async fn a_nul_byte_in_a_request_field_loses_no_row(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    // One flush a second: the poisoned row and the others share a batch.
    let app = TestApp::spawn_on(db, &fake.url, |s| s.usage.flush_interval = Duration::from_secs(1)).await;
    let bad = json!({"model": "gpt-image-1\u{0}", "prompt": "p", "size": "1024x1024\u{0}", "quality": "hi\u{0}gh"});
    let res = app.post_json("/images/generations", &bad).await;
    let bad_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let _ = res.bytes().await;
    for i in 0..3 {
        let res = app
            .client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(&app.other_key)
            .json(&json!({"model": "gpt-image-1", "prompt": format!("billed {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }

    let rows = app.usage_rows(4).await;
    assert_eq!(rows.len(), 4, "no row is lost with the poisoned one: {rows:#?}");
    let billed: Vec<_> = rows.iter().filter(|r| r["tenant"] == "team-b").collect();
    assert_eq!(billed.len(), 3);
    assert!(billed.iter().all(|r| r["status"] == 200 && r["cost_usd"].as_f64().unwrap() > 0.0), "{billed:#?}");
    let poisoned = rows.iter().find(|r| r["request_id"] == bad_id.as_str()).unwrap();
    assert_eq!(poisoned["model"], "gpt-image-1", "control characters are stripped: {poisoned}");
    for field in ["size", "quality"] {
        assert!(!poisoned[field].as_str().unwrap_or_default().contains('\u{0}'), "{poisoned}");
    }
}

#[tokio::test]
async fn a_nul_byte_in_a_request_field_loses_no_row_on_sqlite() {
    a_nul_byte_in_a_request_field_loses_no_row(TestDb::Sqlite).await;
}

#[tokio::test]
async fn a_nul_byte_in_a_request_field_loses_no_row_on_postgres() {
    a_nul_byte_in_a_request_field_loses_no_row(TestDb::Postgres).await;
}

/// A record as the pipeline would queue it.
pub(crate) fn record(request_id: &str) -> UsageRecord {
    UsageRecord {
        request_id: request_id.to_owned(),
        created_at: imagegate::time::now_ms(),
        tenant_id: "tenant-1".into(),
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
        output_tokens: Some(100),
        cost_usd: 0.04,
        status: 200,
        latency_ms: 5,
        stream: false,
        cache_hit: false,
        upstream_request_id: None,
        prompt: None,
        refused_by: None,
        deployment: None,
        possibly_billed: false,
    }
}

/// A database for a writer under test: (Db, URL, the guard of a PostgreSQL database, the data directory).
async fn writer_db(db: TestDb) -> (Db, String, Option<std::sync::Arc<PostgresDb>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let postgres = match db {
        TestDb::Postgres => Some(PostgresDb::create().await),
        TestDb::Sqlite => None,
    };
    let url = postgres
        .as_ref()
        .map_or_else(|| format!("sqlite://{}", dir.path().join("imagegate.db").display()), |pg| pg.url.clone());
    let settings =
        DatabaseSettings { url: postgres.as_ref().map(|pg| Secret::new(pg.url.clone())), ..Default::default() };
    let handle = Db::connect(&settings, dir.path()).await.unwrap();
    (handle, url, postgres, dir)
}

async fn stored_request_ids(db: &Db) -> Vec<String> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT request_id FROM usage_events ORDER BY request_id").fetch_all(db.pool()).await.unwrap();
    rows.into_iter().map(|(id,)| id).collect()
}

async fn stats_when(ledger: &Ledger, done: impl Fn(&LedgerStats) -> bool, limit: Duration) -> LedgerStats {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let stats = ledger.stats();
        if done(&stats) || std::time::Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_row_the_database_refuses_does_not_take_its_batch_down(db: TestDb) {
    let (handle, _url, _pg, _dir) = writer_db(db).await;
    let settings = UsageSettings { flush_interval: Duration::from_millis(300), ..UsageSettings::default() };
    let (ledger, writer) = Ledger::start(handle.clone(), &settings);
    ledger.record(record("req_taken"));
    stats_when(&ledger, |s| s.written == 1, Duration::from_secs(5)).await;

    // One batch: two good rows around one whose id is already stored, which no cleaning can make acceptable.
    for id in ["req_before", "req_taken", "req_after"] {
        ledger.record(record(id));
    }
    let stats = stats_when(&ledger, |s| s.written + s.rejected >= 4, Duration::from_secs(10)).await;
    assert_eq!(stats, LedgerStats { written: 3, rejected: 1, dropped: 0 });
    assert_eq!(stored_request_ids(&handle).await, ["req_after", "req_before", "req_taken"]);
    writer.close().await;
    handle.close().await;
}

#[tokio::test]
async fn a_row_the_database_refuses_does_not_take_its_batch_down_on_sqlite() {
    a_row_the_database_refuses_does_not_take_its_batch_down(TestDb::Sqlite).await;
}

#[tokio::test]
async fn a_row_the_database_refuses_does_not_take_its_batch_down_on_postgres() {
    a_row_the_database_refuses_does_not_take_its_batch_down(TestDb::Postgres).await;
}

/// Hold SQLite's write lock from another connection, as a long migration, a backup or a stuck admin would.
async fn lock_sqlite(url: &str) -> sqlx::AnyConnection {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    conn.execute("BEGIN EXCLUSIVE").await.unwrap();
    conn
}

#[tokio::test]
async fn rows_are_kept_and_retried_while_the_database_is_locked() {
    use sqlx::Executor;
    let (handle, url, _pg, _dir) = writer_db(TestDb::Sqlite).await;
    let settings = UsageSettings { flush_interval: Duration::from_millis(50), ..UsageSettings::default() };
    let (ledger, writer) = Ledger::start(handle.clone(), &settings);
    let mut lock = lock_sqlite(&url).await;
    for i in 0..3 {
        ledger.record(record(&format!("req_locked_{i}")));
    }
    // Longer than two busy timeouts (5 s each) plus the single 200 ms retry the writer used to allow.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(ledger.stats().written, 0, "the lock held");
    lock.execute("COMMIT").await.unwrap();

    let stats = stats_when(&ledger, |s| s.written == 3, Duration::from_secs(20)).await;
    assert_eq!(stats, LedgerStats { written: 3, rejected: 0, dropped: 0 });
    assert_eq!(stored_request_ids(&handle).await.len(), 3);
    writer.close().await;
    handle.close().await;
}

#[tokio::test]
async fn the_shutdown_flush_gives_up_after_its_timeout_and_counts_the_loss() {
    use sqlx::Executor;
    let (handle, url, _pg, _dir) = writer_db(TestDb::Sqlite).await;
    let settings = UsageSettings {
        flush_interval: Duration::from_secs(60),
        shutdown_flush_timeout: Duration::from_secs(1),
        ..UsageSettings::default()
    };
    let (ledger, writer) = Ledger::start(handle.clone(), &settings);
    let mut lock = lock_sqlite(&url).await;
    for i in 0..5 {
        ledger.record(record(&format!("req_late_{i}")));
    }
    let started = std::time::Instant::now();
    writer.close().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "the shutdown flush took {took:?}");
    assert_eq!(ledger.stats(), LedgerStats { written: 0, rejected: 0, dropped: 5 });
    lock.execute("ROLLBACK").await.unwrap();
    handle.close().await;
}

/// request_id, model, latency_ms, quality, output_tokens.
type StoredRow = (String, String, i64, Option<String>, Option<i64>);

/// More rows than one INSERT statement carries (50), in one batch: every row is stored whole, each value in
/// its own column, whether it is text, a number or NULL.
async fn a_batch_of_several_statements_stores_every_value_in_its_column(db: TestDb) {
    let (handle, _url, _pg, _dir) = writer_db(db).await;
    let settings = UsageSettings { flush_interval: Duration::from_millis(300), ..UsageSettings::default() };
    let (ledger, writer) = Ledger::start(handle.clone(), &settings);
    let rows = 123_u64;
    for i in 0..rows {
        let mut r = record(&format!("req_{i:03}"));
        r.model = format!("model-{i}");
        r.latency_ms = i;
        r.quality = (i % 2 == 0).then(|| format!("q{i}"));
        r.output_tokens = (i % 3 != 0).then_some(i * 10);
        ledger.record(r);
    }
    let stats = stats_when(&ledger, |s| s.written >= rows, Duration::from_secs(10)).await;
    assert_eq!(stats, LedgerStats { written: rows, rejected: 0, dropped: 0 });
    let stored: Vec<StoredRow> = sqlx::query_as(
        "SELECT request_id, model, latency_ms, quality, output_tokens FROM usage_events ORDER BY request_id",
    )
    .fetch_all(handle.pool())
    .await
    .unwrap();
    assert_eq!(stored.len(), 123);
    for (i, (id, model, latency, quality, tokens)) in stored.into_iter().enumerate() {
        let n = i as i64;
        assert_eq!(id, format!("req_{i:03}"));
        assert_eq!(model, format!("model-{i}"), "{id}");
        assert_eq!(latency, n, "{id}");
        assert_eq!(quality, (i % 2 == 0).then(|| format!("q{i}")), "{id}");
        assert_eq!(tokens, (i % 3 != 0).then_some(n * 10), "{id}");
    }
    writer.close().await;
    handle.close().await;
}

#[tokio::test]
async fn a_batch_of_several_statements_stores_every_value_in_its_column_on_sqlite() {
    a_batch_of_several_statements_stores_every_value_in_its_column(TestDb::Sqlite).await;
}

#[tokio::test]
async fn a_batch_of_several_statements_stores_every_value_in_its_column_on_postgres() {
    a_batch_of_several_statements_stores_every_value_in_its_column(TestDb::Postgres).await;
}
