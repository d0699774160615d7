//! Tenant authentication: every failure is a 401 in OpenAI's shape and never reaches the upstream; tenants and
//! keys declared in the configuration file are applied at startup as the file says (removed keys revoked,
//! removed tenants suspended, API tenants never taken over, replicas starting together agreeing).

use imagegate::config::{KeySettings, TenantSettings};
use imagegate::domain::keys;
use imagegate::tenants::repo::TenantRepo;
use imagegate::tenants::sync;
use serde_json::json;

use crate::support::app::{ADMIN_TOKEN, TestApp, TestDb, error_of};
use crate::support::fake_openai::FakeOpenAi;

async fn post_with(app: &TestApp, auth: Option<&str>) -> reqwest::Response {
    let mut req = app.client.post(format!("{}/images/generations", app.base_url)).json(&json!({"prompt": "x"}));
    if let Some(value) = auth {
        req = req.header("authorization", value);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys_get_401_and_no_upstream_call() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let forged = format!("{}{}", &app.key[..12], "Z".repeat(32));

    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz".to_owned()),
        Some("Bearer sk-a-real-openai-key".to_owned()),
        Some("Bearer ig_zzzzzzzz_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned()),
        Some(format!("Bearer {forged}")),
    ] {
        let res = post_with(&app, auth.as_deref()).await;
        assert!(res.headers().contains_key("x-request-id"));
        let (status, error) = error_of(res).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["code"], "invalid_api_key");
    }
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn a_valid_key_for_either_tenant_is_accepted() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    assert_eq!(post_with(&app, Some(&format!("Bearer {}", app.key))).await.status(), 200);
    assert_eq!(post_with(&app, Some(&format!("Bearer {}", app.other_key))).await.status(), 200);
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn health_probes_need_no_key() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.client.get(format!("{}/healthz", app.root)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.get(format!("{}/readyz", app.root)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ready");
}

// ------------------------------------------------------------------------------- tenants from the config file

/// A `[[tenants]]` key entry for a fresh key; returns the entry and the key.
fn config_key(expires_at: Option<&str>) -> (KeySettings, String) {
    let k = keys::generate();
    (KeySettings { id: k.id, sha256: k.sha256, expires_at: expires_at.map(str::to_owned) }, k.key)
}

async fn status_of(app: &TestApp, key: &str) -> u16 {
    post_with(app, Some(&format!("Bearer {key}"))).await.status().as_u16()
}

async fn admin_get(app: &TestApp, path: &str) -> serde_json::Value {
    let res = app.client.get(format!("{}/admin/v1{path}", app.root)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test]
async fn keys_and_tenants_removed_from_the_config_file_stop_working_at_the_next_start() {
    let fake = FakeOpenAi::start().await;
    let (extra, extra_key) = config_key(None);
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].keys.push(extra.clone())).await;
    assert_eq!(status_of(&app, &app.key).await, 200);
    assert_eq!(status_of(&app, &extra_key).await, 200);
    // team-b also has a key issued through the admin API, which the file knows nothing about.
    let res = app
        .client
        .post(format!("{}/admin/v1/tenants/team-b/keys", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let api_key = res.json::<serde_json::Value>().await.unwrap()["key"].as_str().unwrap().to_owned();
    assert_eq!(status_of(&app, &api_key).await, 200);

    // The next start: team-a lists only its first key; team-b is gone from the file.
    let mut settings = app.settings.clone();
    settings.tenants[0].keys.truncate(1);
    settings.tenants.truncate(1);
    let app = app.restart_with(settings.clone()).await;

    assert_eq!(status_of(&app, &app.key).await, 200, "a key still listed works");
    assert_eq!(status_of(&app, &extra_key).await, 401, "a key removed from the file is revoked");
    assert_eq!(status_of(&app, &app.other_key).await, 401, "a removed tenant's config keys are revoked");
    assert_eq!(status_of(&app, &api_key).await, 403, "a removed tenant is suspended, API keys and all");
    let team_b = admin_get(&app, "/tenants/team-b").await;
    assert_eq!(team_b["status"], "suspended");
    let listed = admin_get(&app, "/tenants/team-a/keys").await;
    let revoked: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| !k["revoked_at"].is_null())
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(revoked, [extra.id.as_str()]);

    // Listing the key again does not undo the revocation; declaring team-b again does not resume it.
    let mut again = settings;
    again.tenants[0].keys.push(extra);
    let app = app.restart_with(again).await;
    assert_eq!(status_of(&app, &extra_key).await, 401, "revocation is final");
    assert_eq!(fake.call_count(), 4, "refused requests never reach the upstream");
}

#[tokio::test]
async fn config_tenants_declare_status_metadata_upstream_and_key_expiry() {
    let fake = FakeOpenAi::start().await;
    let (expired, expired_key) = config_key(Some("2001-01-01T00:00:00+02:00"));
    let (dated, dated_key) = config_key(Some("2099-01-01T02:00:00+02:00"));
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.tenants[0].keys.extend([expired.clone(), dated.clone()]);
        s.tenants[0].metadata = Some(json!({"owner": "design", "budget_code": 7}));
        s.tenants[1].status = Some(imagegate::domain::TenantStatus::Suspended);
    })
    .await;

    assert_eq!(status_of(&app, &expired_key).await, 401, "a key past its expires_at is refused");
    assert_eq!(status_of(&app, &dated_key).await, 200);
    let listed = admin_get(&app, "/tenants/team-a/keys").await;
    let expiry = listed["data"].as_array().unwrap().iter().find(|k| k["id"] == dated.id.as_str()).unwrap();
    assert_eq!(expiry["expires_at"].as_i64(), Some(4_070_908_800_000));
    assert_eq!(admin_get(&app, "/tenants/team-a").await["metadata"], json!({"owner": "design", "budget_code": 7}));
    assert_eq!(status_of(&app, &app.other_key).await, 403, "declared suspended");
    assert_eq!(admin_get(&app, "/tenants/team-b").await["status"], "suspended");

    // Metadata changed through the API survives a restart when the file sets none; the file's status wins.
    let mut settings = app.settings.clone();
    settings.tenants[0].metadata = None;
    let res = app
        .client
        .patch(format!("{}/admin/v1/tenants/team-a", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"metadata": {"owner": "ops"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    settings.tenants[1].status = Some(imagegate::domain::TenantStatus::Active);
    let app = app.restart_with(settings).await;
    assert_eq!(admin_get(&app, "/tenants/team-a").await["metadata"], json!({"owner": "ops"}));
    assert_eq!(status_of(&app, &app.other_key).await, 200, "status = \"active\" in the file resumes it");
}

#[tokio::test]
async fn a_config_tenant_never_takes_over_a_tenant_created_through_the_api() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let res = app
        .client
        .post(format!("{}/admin/v1/tenants", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "owned-by-api", "organization": "org-api"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let mut settings = app.settings.clone();
    let (key_a, key_b) = (app.key.clone(), app.other_key.clone());
    let (data_dir, database_url, postgres) = (app.data_dir.clone(), app.database_url.clone(), app.postgres.clone());
    app.shutdown().await;

    let (key, _) = config_key(None);
    settings.tenants.push(TenantSettings {
        name: "owned-by-api".into(),
        organization: Some("org-file".into()),
        keys: vec![key],
        ..TenantSettings::default()
    });
    let error = match imagegate::startup::Application::build(settings.clone()).await {
        Ok(_) => panic!("the startup must refuse to take over an API tenant"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("owned-by-api") && error.contains("created through the admin API"),
        "the message says what is wrong: {error}"
    );

    // Nothing was taken over: the tenant keeps its organization and has no key from the file.
    settings.tenants.pop();
    let app = TestApp::start(settings, key_a, key_b, data_dir, database_url).await;
    assert_eq!(admin_get(&app, "/tenants/owned-by-api").await["organization"], "org-api");
    assert_eq!(admin_get(&app, "/tenants/owned-by-api/keys").await["data"], json!([]));
    drop(app);
    drop(postgres);
}

async fn replicas_starting_together_apply_the_same_new_tenants(db: TestDb) {
    let prepared = TestApp::prepare(db, "http://127.0.0.1:9/v1").await;
    let database = imagegate::config::DatabaseSettings {
        url: Some(imagegate::config::Secret::new(prepared.database_url.clone())),
        ..Default::default()
    };
    let dir = prepared.data_dir.path();
    let (one, two) = (
        imagegate::db::Db::connect(&database, dir).await.unwrap(),
        imagegate::db::Db::connect(&database, dir).await.unwrap(),
    );
    let (repo_one, repo_two) = (TenantRepo::new(one.clone()), TenantRepo::new(two.clone()));
    for round in 0..10 {
        let tenants: Vec<TenantSettings> = (0..3)
            .map(|i| TenantSettings {
                name: format!("race-team-{round}-{i}"),
                keys: vec![config_key(None).0, config_key(None).0],
                ..TenantSettings::default()
            })
            .collect();
        let (a, b) = tokio::join!(sync::apply(&repo_one, &tenants), sync::apply(&repo_two, &tenants));
        assert!(a.is_ok() && b.is_ok(), "round {round}: {a:?} / {b:?}");
        for t in &tenants {
            let keys = repo_one.list_keys(&t.name).await.unwrap();
            assert_eq!(keys.len(), 2, "round {round}: {keys:?}");
            assert!(keys.iter().all(|k| k.revoked_at.is_none()));
        }
    }
    one.close().await;
    two.close().await;
    drop(prepared);
}

#[tokio::test]
async fn replicas_starting_together_apply_the_same_new_tenants_on_sqlite() {
    replicas_starting_together_apply_the_same_new_tenants(TestDb::Sqlite).await;
}

#[tokio::test]
async fn replicas_starting_together_apply_the_same_new_tenants_on_postgres() {
    replicas_starting_together_apply_the_same_new_tenants(TestDb::Postgres).await;
}

// ------------------------------------------------------------------------------------ floods of made-up keys

async fn key_lookups(app: &TestApp, result: &str) -> f64 {
    let (_, scrape) = crate::metrics::scrape(app).await;
    crate::metrics::value(&scrape, "imagegate_key_lookups_total", &[("result", result)]).unwrap_or(0.0)
}

/// A made-up key in imagegate's format (a well-formed id that no key has).
fn made_up_key() -> String {
    keys::generate().key
}

/// A flood of made-up key ids (each new, so no cache can answer it) takes at most `auth.max_key_lookups`
/// database connections: while the keys table is locked and the flood's lookups hang, the rest of the pool
/// still serves real callers (here the admin API, which needs the database), and a cached key keeps working.
/// Before the bound, the flood held every pooled connection and even the cached key's request failed (checked
/// by lifting the bound). Each made-up id costs one lookup, repeated and concurrent ones none more.
#[tokio::test]
async fn a_flood_of_made_up_keys_leaves_the_database_to_real_callers() {
    const FLOOD: usize = 40;
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(TestDb::Postgres, &fake.url, |s| {
        s.database.max_connections = 6;
        s.auth.max_key_lookups = 2;
        s.auth.key_cache_ttl = std::time::Duration::from_secs(300);
    })
    .await;
    assert_eq!(status_of(&app, &app.key).await, 200, "the real key is cached from now on");

    // Hold the keys table so every key lookup hangs until the lock is released.
    let pool = app.pool().await;
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE").execute(&mut *locker).await.unwrap();

    let flood: Vec<String> = (0..FLOOD).map(|_| made_up_key()).collect();
    let tasks: Vec<_> = flood
        .iter()
        .map(|key| {
            let (client, url, key) = (app.client.clone(), format!("{}/images/generations", app.base_url), key.clone());
            tokio::spawn(async move {
                client.post(url).bearer_auth(key).json(&json!({"prompt": "x"})).send().await.unwrap().status()
            })
        })
        .collect();
    // Every flood request is in flight (the scrape itself is one more).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, scrape) = crate::metrics::scrape(&app).await;
        let in_flight = crate::metrics::value(&scrape, "imagegate_http_requests_in_flight", &[]).unwrap_or(0.0);
        if in_flight > FLOOD as f64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the flood never arrived ({in_flight} in flight)");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Real callers during the flood: a cached key, and the admin API reading the database.
    assert_eq!(status_of(&app, &app.key).await, 200, "a cached key never waits for the flood");
    let res = app.client.get(format!("{}/admin/v1/tenants", app.root)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200, "the flood left database connections to everyone else");

    locker.rollback().await.unwrap();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 401);
    }
    assert_eq!(key_lookups(&app, "unknown").await, FLOOD as f64, "one lookup per made-up id");

    // The same ids again, and one new id sent 20 times at once: one more lookup in all.
    let again = flood.iter().cloned().chain(std::iter::repeat_n(made_up_key(), 20));
    let statuses = futures::future::join_all(again.map(|key| {
        let app = &app;
        async move { status_of(app, &key).await }
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(key_lookups(&app, "unknown").await, FLOOD as f64 + 1.0, "ids just found unknown are remembered");
    assert_eq!(fake.call_count(), 2, "only the real key's requests reached the upstream");
}

/// An id found unknown is not remembered past a key created on this replica: a key that the CLI (or another
/// replica) inserted after its id was looked up works as soon as a key is created here, and one created here
/// works at once.
#[tokio::test]
async fn a_key_created_after_its_id_was_found_unknown_works() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.auth.key_cache_ttl = std::time::Duration::from_secs(300)).await;
    let (entry, key) = config_key(None);
    assert_eq!(status_of(&app, &key).await, 401, "not created yet");

    // Inserted behind this replica's back, as `imagegate keys new` would.
    let database = imagegate::config::DatabaseSettings {
        url: Some(imagegate::config::Secret::new(app.database_url.clone())),
        ..Default::default()
    };
    let db = imagegate::db::Db::connect(&database, app.data_dir.path()).await.unwrap();
    let repo = TenantRepo::new(db.clone());
    let tenant = repo.get_tenant("team-a").await.unwrap();
    repo.ensure_config_key(&tenant, &entry.id, &entry.sha256, None).await.unwrap();
    db.close().await;

    // A key created on this replica drops every id it remembered as unknown.
    let res = app
        .client
        .post(format!("{}/admin/v1/tenants/team-a/keys", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let issued = res.json::<serde_json::Value>().await.unwrap()["key"].as_str().unwrap().to_owned();
    assert_eq!(status_of(&app, &issued).await, 200);
    assert_eq!(status_of(&app, &key).await, 200, "no stale negative entry");
}
