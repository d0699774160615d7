//! The admin API, on SQLite and on PostgreSQL: only the admin token opens it; tenants and keys managed through
//! it take effect on this replica at the next request (issue → 200, revoke → 401, suspend → 403, model not
//! allowed → 403 without an upstream call, expiry → 401); usage reads back per tenant and model as JSON and
//! CSV; every error has OpenAI's shape.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::app::{ADMIN_TOKEN, TestApp, TestDb, error_of};
use crate::support::fake_openai::{FakeOpenAi, FakeOptions};

/// A request to `/admin/v1{path}` carrying the admin token.
fn admin(app: &TestApp, method: Method, path: &str) -> reqwest::RequestBuilder {
    app.client.request(method, format!("{}/admin/v1{path}", app.root)).bearer_auth(ADMIN_TOKEN)
}

/// The JSON body of a response that must have `status`.
async fn json_of(res: reqwest::Response, status: u16) -> Value {
    let actual = res.status().as_u16();
    let text = res.text().await.unwrap();
    assert_eq!(actual, status, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

async fn create_tenant(app: &TestApp, spec: Value) -> Value {
    json_of(admin(app, Method::POST, "/tenants").json(&spec).send().await.unwrap(), 201).await
}

/// Issue a key for `tenant`; returns the whole created-key object (`key` + listing fields).
async fn issue_key(app: &TestApp, tenant: &str, spec: Value) -> Value {
    json_of(admin(app, Method::POST, &format!("/tenants/{tenant}/keys")).json(&spec).send().await.unwrap(), 201).await
}

async fn generate(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.client.post(format!("{}/images/generations", app.base_url)).bearer_auth(key).json(&body).send().await.unwrap()
}

async fn generate_status(app: &TestApp, key: &str, body: Value) -> u16 {
    let res = generate(app, key, body).await;
    let status = res.status().as_u16();
    let _ = res.bytes().await;
    status
}

// ------------------------------------------------------------------------------------------- the admin token

async fn only_the_admin_token_opens_the_admin_api(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;
    let url = format!("{}/admin/v1/tenants", app.root);

    let wrong = format!("Bearer {ADMIN_TOKEN}x");
    let tenant_key = format!("Bearer {}", app.key);
    for auth in [None, Some("Basic YWRtaW46YWRtaW4="), Some(wrong.as_str()), Some(tenant_key.as_str())] {
        let mut req = app.client.get(&url);
        if let Some(value) = auth {
            req = req.header("authorization", value);
        }
        let (status, error) = error_of(req.send().await.unwrap()).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(error["code"], "invalid_api_key", "{auth:?}");
    }
    let created = app.client.post(&url).bearer_auth(&app.key).json(&json!({"name": "sneaky"})).send().await.unwrap();
    assert_eq!(error_of(created).await.0, 401, "a tenant key cannot create tenants");

    let body = json_of(admin(&app, Method::GET, "/tenants").send().await.unwrap(), 200).await;
    assert_eq!(body["object"], "list");
    // …and the admin token is not a tenant key.
    let (status, _) = error_of(generate(&app, ADMIN_TOKEN, json!({"prompt": "x"})).await).await;
    assert_eq!(status, 401);
    assert_eq!(fake.call_count(), 0);

    let (status, error) = error_of(admin(&app, Method::GET, "/nothing-here").send().await.unwrap()).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("unknown_url")));
    let (status, _) = error_of(admin(&app, Method::PUT, "/tenants").send().await.unwrap()).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn only_the_admin_token_opens_the_admin_api_on_sqlite() {
    only_the_admin_token_opens_the_admin_api(TestDb::Sqlite).await;
}

#[tokio::test]
async fn only_the_admin_token_opens_the_admin_api_on_postgres() {
    only_the_admin_token_opens_the_admin_api(TestDb::Postgres).await;
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.admin.token = None).await;
    let (status, error) = error_of(admin(&app, Method::GET, "/tenants").send().await.unwrap()).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("unknown_url")));
}

// ------------------------------------------------------------------------------------------------- tenants

async fn tenants_are_created_listed_and_updated(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;

    let spec = json!({
        "name": "acme",
        "organization": "org-acme",
        "allowed_models": ["gpt-image-1"],
        "limits": {"requests_per_minute": 60},
        "metadata": {"cost_center": "42"},
    });
    let acme = create_tenant(&app, spec.clone()).await;
    assert_eq!(acme["name"], "acme");
    assert_eq!(acme["status"], "active");
    assert_eq!(acme["source"], "api");
    assert_eq!(acme["organization"], "org-acme");
    assert_eq!(acme["project"], Value::Null);
    assert_eq!(acme["allowed_models"], json!(["gpt-image-1"]));
    assert_eq!(acme["limits"]["requests_per_minute"], 60);
    assert_eq!(acme["limits"]["usd_per_month"], Value::Null);
    assert_eq!(acme["metadata"]["cost_center"], "42");
    assert_eq!(acme["log_prompts"], false);

    // Duplicates, bad names, bad JSON and unknown fields: OpenAI-shaped 409/400s naming the problem.
    let (status, error) = error_of(admin(&app, Method::POST, "/tenants").json(&spec).send().await.unwrap()).await;
    assert_eq!((status, error["type"].as_str()), (409, Some("invalid_request_error")));
    assert!(error["message"].as_str().unwrap().contains("acme"), "{error}");
    let bad_name = admin(&app, Method::POST, "/tenants").json(&json!({"name": "no spaces!"})).send().await.unwrap();
    let (status, error) = error_of(bad_name).await;
    assert_eq!(status, 400);
    assert!(error["message"].as_str().unwrap().contains("invalid tenant name"), "{error}");
    for (body, param) in [
        (r#"{"name": "x", "colour": "red"}"#, Some("colour")),
        (r#"{"organization": "o"}"#, Some("name")),
        (r#"{"name": "x", "limits": {"rpm": 1}}"#, Some("rpm")),
        (r#"{"name": "#, None),
    ] {
        let res = admin(&app, Method::POST, "/tenants")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, error) = error_of(res).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}: {error}");
        assert!(error["message"].as_str().unwrap().starts_with("Invalid JSON body"), "{error}");
    }

    let list = json_of(admin(&app, Method::GET, "/tenants").send().await.unwrap(), 200).await;
    assert_eq!(list["object"], "list");
    let names: Vec<&str> = list["data"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme", "team-a", "team-b"], "config tenants are listed too");
    let shown = json_of(admin(&app, Method::GET, "/tenants/acme").send().await.unwrap(), 200).await;
    assert_eq!(shown, acme);

    // PATCH: absent fields stay, null clears, limits are replaced as a whole.
    let patch = json!({"limits": {"images_per_day": 1000}, "allowed_models": null, "project": "proj_acme"});
    let patched = json_of(admin(&app, Method::PATCH, "/tenants/acme").json(&patch).send().await.unwrap(), 200).await;
    assert_eq!(patched["limits"]["images_per_day"], 1000);
    assert_eq!(patched["limits"]["requests_per_minute"], Value::Null);
    assert_eq!(patched["allowed_models"], Value::Null);
    assert_eq!(patched["organization"], "org-acme");
    assert_eq!(patched["project"], "proj_acme");
    assert!(patched["updated_at"].as_i64() >= acme["updated_at"].as_i64());
    let patched = json_of(
        admin(&app, Method::PATCH, "/tenants/acme").json(&json!({"organization": null})).send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(patched["organization"], Value::Null);
    let shown = json_of(admin(&app, Method::GET, "/tenants/acme").send().await.unwrap(), 200).await;
    assert_eq!(shown, patched, "the change is stored");
    let res = admin(&app, Method::PATCH, "/tenants/acme").json(&json!({"status": "paused"})).send().await.unwrap();
    assert_eq!(error_of(res).await.0, 400);

    // Unknown tenants and keys: 404 in OpenAI's shape.
    for (method, path) in [
        (Method::GET, "/tenants/nobody"),
        (Method::PATCH, "/tenants/nobody"),
        (Method::POST, "/tenants/nobody/suspend"),
        (Method::POST, "/tenants/nobody/resume"),
        (Method::GET, "/tenants/nobody/keys"),
        (Method::POST, "/tenants/nobody/keys"),
        (Method::DELETE, "/keys/zzzzzzzz"),
    ] {
        let res = admin(&app, method.clone(), path).json(&json!({})).send().await.unwrap();
        let (status, error) = error_of(res).await;
        assert_eq!((status, error["type"].as_str()), (404, Some("invalid_request_error")), "{method} {path}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("nobody") || message.contains("zzzzzzzz"), "{message}");
    }
}

#[tokio::test]
async fn tenants_are_created_listed_and_updated_on_sqlite() {
    tenants_are_created_listed_and_updated(TestDb::Sqlite).await;
}

#[tokio::test]
async fn tenants_are_created_listed_and_updated_on_postgres() {
    tenants_are_created_listed_and_updated(TestDb::Postgres).await;
}

// ---------------------------------------------------------------------------------------------------- keys

async fn keys_and_tenant_changes_apply_at_the_next_request(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;
    create_tenant(&app, json!({"name": "keyed", "organization": "org-keyed"})).await;

    // Issue: the secret is shown once, never listed.
    let created = issue_key(&app, "keyed", json!({"name": "ci"})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("ig_{id}_")), "{created}");
    assert_eq!((created["tenant"].as_str(), created["name"].as_str()), (Some("keyed"), Some("ci")));
    assert_eq!((created["expires_at"].clone(), created["revoked_at"].clone()), (Value::Null, Value::Null));
    let listed = admin(&app, Method::GET, "/tenants/keyed/keys").send().await.unwrap().text().await.unwrap();
    assert!(!listed.contains(&key[12..]), "a listing must not contain the secret: {listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["data"][0]["id"].as_str(), Some(id.as_str()));
    assert!(listed["data"][0].get("key").is_none());

    // Use it: the request reaches the upstream with the tenant's attribution.
    assert_eq!(generate_status(&app, &key, json!({"prompt": "first"})).await, 200);
    assert_eq!(fake.call_count(), 1);
    assert_eq!(fake.last_call().unwrap().header("openai-organization"), Some("org-keyed"));

    // Suspend → 403 at once; resume → 200 with the same key.
    let suspended = json_of(admin(&app, Method::POST, "/tenants/keyed/suspend").send().await.unwrap(), 200).await;
    assert_eq!(suspended["status"], "suspended");
    let (status, error) = error_of(generate(&app, &key, json!({"prompt": "suspended"})).await).await;
    assert_eq!((status, error["type"].as_str()), (403, Some("permission_error")));
    let resumed = json_of(admin(&app, Method::POST, "/tenants/keyed/resume").send().await.unwrap(), 200).await;
    assert_eq!(resumed["status"], "active");
    assert_eq!(generate_status(&app, &key, json!({"prompt": "resumed"})).await, 200);
    assert_eq!(fake.call_count(), 2);

    // Restrict the models → a gpt-image-1 request is refused with 403 and never reaches the upstream.
    let patch = json!({"allowed_models": ["dall-e-3"]});
    json_of(admin(&app, Method::PATCH, "/tenants/keyed").json(&patch).send().await.unwrap(), 200).await;
    let res = generate(&app, &key, json!({"model": "gpt-image-1", "prompt": "not allowed"})).await;
    let (status, error) = error_of(res).await;
    assert_eq!((status, error["type"].as_str()), (403, Some("permission_error")), "{error}");
    assert_eq!(fake.call_count(), 2, "a refused model must not reach the upstream");
    assert_eq!(generate_status(&app, &key, json!({"model": "dall-e-3", "prompt": "allowed"})).await, 200);
    assert_eq!(fake.call_count(), 3);

    // Revoke → the very next request is a 401 on this replica (no waiting for the key cache).
    let revoked = json_of(admin(&app, Method::DELETE, &format!("/keys/{id}")).send().await.unwrap(), 200).await;
    let revoked_at = revoked["revoked_at"].as_i64().expect("revoked_at is set");
    assert_eq!(revoked["tenant"], "keyed");
    let (status, error) = error_of(generate(&app, &key, json!({"model": "dall-e-3", "prompt": "x"})).await).await;
    assert_eq!((status, error["code"].as_str()), (401, Some("invalid_api_key")));
    let again = json_of(admin(&app, Method::DELETE, &format!("/keys/{id}")).send().await.unwrap(), 200).await;
    assert_eq!(again["revoked_at"].as_i64(), Some(revoked_at), "revoking twice keeps the first time");
    let listed = json_of(admin(&app, Method::GET, "/tenants/keyed/keys").send().await.unwrap(), 200).await;
    assert_eq!(listed["data"][0]["revoked_at"].as_i64(), Some(revoked_at));
    let whole_key = admin(&app, Method::DELETE, &format!("/keys/{key}")).send().await.unwrap();
    let (status, error) = error_of(whole_key).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("id")));
    assert_eq!(fake.call_count(), 3);

    // Expiry: a key with expires_in 1s works, then stops working.
    let before = imagegate::time::now_ms();
    let short = issue_key(&app, "keyed", json!({"expires_in": "1s"})).await;
    let expires_at = short["expires_at"].as_i64().unwrap();
    assert!((before + 1000..=imagegate::time::now_ms() + 1000).contains(&expires_at), "{short}");
    let short_key = short["key"].as_str().unwrap();
    assert_eq!(generate_status(&app, short_key, json!({"model": "dall-e-3", "prompt": "in time"})).await, 200);
    let wait = u64::try_from(expires_at - imagegate::time::now_ms()).unwrap_or(0) + 100;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (status, _) = error_of(generate(&app, short_key, json!({"model": "dall-e-3", "prompt": "late"})).await).await;
    assert_eq!(status, 401, "an expired key is refused");

    // Expiry spelt wrong → 400 naming the field.
    for (spec, param) in [
        (json!({"expires_in": "1d", "expires_at": "2099-01-01"}), "expires_in"),
        (json!({"expires_in": "soon"}), "expires_in"),
        (json!({"expires_at": "2001-01-01"}), "expires_at"),
        (json!({"expires_at": "next tuesday"}), "expires_at"),
        (json!({"label": "x"}), "label"),
    ] {
        let res = admin(&app, Method::POST, "/tenants/keyed/keys").json(&spec).send().await.unwrap();
        let (status, error) = error_of(res).await;
        assert_eq!((status, error["param"].as_str()), (400, Some(param)), "{spec}: {error}");
    }
    let dated = issue_key(&app, "keyed", json!({"expires_at": "2099-01-01T00:00:00Z"})).await;
    assert_eq!(dated["expires_at"].as_i64(), Some(4_070_908_800_000));
    let keys = json_of(admin(&app, Method::GET, "/tenants/keyed/keys").send().await.unwrap(), 200).await;
    assert_eq!(keys["data"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn keys_and_tenant_changes_apply_at_the_next_request_on_sqlite() {
    keys_and_tenant_changes_apply_at_the_next_request(TestDb::Sqlite).await;
}

#[tokio::test]
async fn keys_and_tenant_changes_apply_at_the_next_request_on_postgres() {
    keys_and_tenant_changes_apply_at_the_next_request(TestDb::Postgres).await;
}

// --------------------------------------------------------------------------------------------------- usage

/// The usage rows of `tenant` once they account for `requests` requests (the ledger writes asynchronously).
async fn usage_when(app: &TestApp, tenant: &str, requests: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let res = admin(app, Method::GET, &format!("/usage?tenant={tenant}")).send().await.unwrap();
        let body = json_of(res, 200).await;
        let seen: i64 = body["data"].as_array().unwrap().iter().map(|r| r["requests"].as_i64().unwrap()).sum();
        if seen >= requests || Instant::now() > deadline {
            assert_eq!(seen, requests, "{body:#}");
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn usage_reads_back_per_tenant_and_model(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;
    create_tenant(&app, json!({"name": "metered"})).await;
    let key = issue_key(&app, "metered", json!({})).await["key"].as_str().unwrap().to_owned();

    // Another tenant's traffic (sent first, so it is flushed by the time the tenant's is) stays out of a
    // per-tenant report.
    assert_eq!(generate_status(&app, &app.key, json!({"prompt": "team-a"})).await, 200);
    let dalle = json!({"model": "dall-e-3", "prompt": "d", "size": "1024x1024", "quality": "standard"});
    for (body, status) in [
        (json!({"model": "gpt-image-1", "prompt": "a", "n": 2}), 200),
        (json!({"model": "gpt-image-1", "prompt": "b"}), 200),
        (dalle, 200),
        (json!({"model": "dall-e-3", "prompt": "refused", "n": 3}), 400),
    ] {
        assert_eq!(generate_status(&app, &key, body.clone()).await, status, "{body}");
    }

    let report = usage_when(&app, "metered", 4).await;
    assert_eq!(report["object"], "list");
    let (from, to) = (report["from"].as_i64().unwrap(), report["to"].as_i64().unwrap());
    assert!(from < to && to <= imagegate::time::now_ms(), "{report}");
    assert_eq!(from % 86_400_000, 0, "the default range starts at midnight UTC");
    let rows = report["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report:#}");
    let gpt = rows.iter().find(|r| r["model"] == "gpt-image-1").unwrap();
    assert_eq!(gpt["tenant"], "metered");
    assert_eq!((gpt["requests"].as_i64(), gpt["succeeded"].as_i64()), (Some(2), Some(2)));
    assert_eq!((gpt["images_requested"].as_i64(), gpt["images_returned"].as_i64()), (Some(3), Some(3)));
    assert!(gpt["input_tokens"].as_i64().unwrap() > 0 && gpt["output_tokens"].as_i64().unwrap() > 0, "{gpt}");
    assert!(gpt["cost_usd"].as_f64().unwrap() > 0.0);
    let dalle = rows.iter().find(|r| r["model"] == "dall-e-3").unwrap();
    assert_eq!((dalle["requests"].as_i64(), dalle["succeeded"].as_i64()), (Some(2), Some(1)));
    assert_eq!(dalle["images_returned"].as_i64(), Some(1));
    assert!((dalle["cost_usd"].as_f64().unwrap() - 0.04).abs() < 1e-9, "the refused request costs nothing: {dalle}");

    // Every tenant, and an explicit range with nothing in it.
    let all = json_of(admin(&app, Method::GET, "/usage?from=0").send().await.unwrap(), 200).await;
    let tenants: Vec<&str> = all["data"].as_array().unwrap().iter().map(|r| r["tenant"].as_str().unwrap()).collect();
    assert!(tenants.contains(&"metered") && tenants.contains(&"team-a"), "{all}");
    let empty = admin(&app, Method::GET, "/usage?from=2000-01-01&to=2000-02-01T00:00:00Z").send().await.unwrap();
    let empty = json_of(empty, 200).await;
    assert_eq!((empty["from"].as_i64(), empty["to"].as_i64()), (Some(946_684_800_000), Some(949_363_200_000)));
    assert_eq!(empty["data"], json!([]));

    // CSV for spreadsheets.
    let res = admin(&app, Method::GET, "/usage?tenant=metered&format=csv").send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(res.headers()["content-disposition"], "attachment; filename=\"imagegate-usage.csv\"");
    let csv = res.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("tenant,model,requests,succeeded,images_requested,images_returned"), "{csv}");
    assert!(lines[1].starts_with("metered,dall-e-3,2,1,"), "{csv}");
    assert!(lines[2].starts_with("metered,gpt-image-1,2,2,3,3,"), "{csv}");

    // Bad parameters → 400 naming them; an unknown tenant → 404.
    for (query, param) in [
        ("from=yesterday", "from"),
        ("to=later", "to"),
        ("format=xml", "format"),
        ("from=2030-01-01&to=2029-01-01", "from"),
        ("model=x", "model"),
    ] {
        let (status, error) =
            error_of(admin(&app, Method::GET, &format!("/usage?{query}")).send().await.unwrap()).await;
        assert_eq!((status, error["param"].as_str()), (400, Some(param)), "{query}: {error}");
    }
    let (status, _) = error_of(admin(&app, Method::GET, "/usage?tenant=nobody").send().await.unwrap()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn usage_reads_back_per_tenant_and_model_on_sqlite() {
    usage_reads_back_per_tenant_and_model(TestDb::Sqlite).await;
}

#[tokio::test]
async fn usage_reads_back_per_tenant_and_model_on_postgres() {
    usage_reads_back_per_tenant_and_model(TestDb::Postgres).await;
}

// ------------------------------------------------------------------------------------- concurrent changes

async fn concurrent_updates_keep_every_change(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;
    create_tenant(&app, json!({"name": "busy"})).await;
    let patch = |body: Value| admin(&app, Method::PATCH, "/tenants/busy").json(&body).send();

    for round in 0..20 {
        let (org, project) = (format!("org-{round}"), format!("proj-{round}"));
        let (a, b) = tokio::join!(patch(json!({"organization": org})), patch(json!({"project": project})));
        assert_eq!((a.unwrap().status().as_u16(), b.unwrap().status().as_u16()), (200, 200));
        let shown = json_of(admin(&app, Method::GET, "/tenants/busy").send().await.unwrap(), 200).await;
        assert_eq!(
            (shown["organization"].as_str(), shown["project"].as_str()),
            (Some(org.as_str()), Some(project.as_str())),
            "round {round}: one update undid the other"
        );
    }
    for round in 0..20 {
        json_of(admin(&app, Method::POST, "/tenants/busy/resume").send().await.unwrap(), 200).await;
        let suspend = admin(&app, Method::POST, "/tenants/busy/suspend").send();
        let (a, b) = tokio::join!(suspend, patch(json!({"metadata": {"round": round}})));
        assert_eq!((a.unwrap().status().as_u16(), b.unwrap().status().as_u16()), (200, 200));
        let shown = json_of(admin(&app, Method::GET, "/tenants/busy").send().await.unwrap(), 200).await;
        assert_eq!(shown["status"], "suspended", "round {round}: a metadata change undid the suspension");
        assert_eq!(shown["metadata"]["round"], round);
    }
}

#[tokio::test]
async fn concurrent_updates_keep_every_change_on_sqlite() {
    concurrent_updates_keep_every_change(TestDb::Sqlite).await;
}

#[tokio::test]
async fn concurrent_updates_keep_every_change_on_postgres() {
    concurrent_updates_keep_every_change(TestDb::Postgres).await;
}

// ---------------------------------------------------------------------------------------- tenant policy

#[tokio::test]
async fn bad_tenant_settings_are_refused_with_the_field_named() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    for (extra, param) in [
        (json!({"limits": {"usd_per_month": -1}}), "limits.usd_per_month"),
        (json!({"limits": {"usd_per_day": -0.01}}), "limits.usd_per_day"),
        (json!({"limits": {"requests_per_minute": 0}}), "limits.requests_per_minute"),
        (json!({"limits": {"concurrent_requests": 0}}), "limits.concurrent_requests"),
        (json!({"limits": {"requests_per_minute": 10, "requests_burst": 11}}), "limits.requests_burst"),
        (json!({"limits": {"images_per_minute": 4, "images_burst": 5}}), "limits.images_burst"),
        (json!({"image_policy": {"retention": "0s"}}), "image_policy.retention"),
        (json!({"cache_policy": {"ttl": "0s"}}), "cache_policy.ttl"),
        (json!({"metadata": ["not", "an", "object"]}), "metadata"),
        (json!({"metadata": "text"}), "metadata"),
        (json!({"metadata": null}), "metadata"),
        (json!({"organization": ""}), "organization"),
        (json!({"project": "   "}), "project"),
        (json!({"organization": "org\r\nX-Injected: 1"}), "organization"),
        (json!({"allowed_models": ["gpt-image-1", ""]}), "allowed_models[1]"),
        (json!({"upstream": "nowhere"}), "upstream"),
    ] {
        let mut spec = json!({"name": "checked"});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, error) = error_of(admin(&app, Method::POST, "/tenants").json(&spec).send().await.unwrap()).await;
        assert_eq!((status, error["param"].as_str()), (400, Some(param)), "{spec}: {error}");
        assert!(error["message"].as_str().unwrap().contains(param), "{error}");
        // The same value in a PATCH of an existing tenant.
        let res = admin(&app, Method::PATCH, "/tenants/team-a").json(&extra).send().await.unwrap();
        let (status, error) = error_of(res).await;
        assert_eq!((status, error["param"].as_str()), (400, Some(param)), "PATCH {extra}: {error}");
    }
    let (status, _) = error_of(admin(&app, Method::GET, "/tenants/checked").send().await.unwrap()).await;
    assert_eq!(status, 404, "nothing refused was created");
    let team_a = json_of(admin(&app, Method::GET, "/tenants/team-a").send().await.unwrap(), 200).await;
    assert_eq!((team_a["organization"].as_str(), team_a["metadata"].clone()), (Some("org-team-a"), json!({})));
    assert_eq!(team_a["limits"]["requests_per_minute"], Value::Null, "nothing refused was stored");

    // What is allowed: budgets of zero, a burst equal to its rate, `{}` to empty the metadata.
    let ok = json!({"limits": {"usd_per_day": 0, "requests_per_minute": 5, "requests_burst": 5}, "metadata": {}});
    json_of(admin(&app, Method::PATCH, "/tenants/team-a").json(&ok).send().await.unwrap(), 200).await;
}

// ------------------------------------------------------------------------------------------- upstreams

#[tokio::test]
async fn each_tenant_reaches_the_upstream_it_names_with_that_upstreams_key() {
    let first = FakeOpenAi::start().await;
    let second_key = "sk-second-upstream";
    let second =
        FakeOpenAi::start_with(FakeOptions { expected_key: Some(second_key.into()), ..FakeOptions::default() }).await;
    let app = TestApp::spawn_with(&first.url, |s| {
        let named = imagegate::config::UpstreamSettings {
            base_url: url::Url::parse(&second.url).unwrap(),
            api_key: Some(imagegate::config::Secret::new(second_key)),
            organization: Some("org-second".into()),
            ..imagegate::config::UpstreamSettings::default()
        };
        s.upstreams.insert("second".into(), named);
        s.tenants[1].upstream = Some("second".into());
    })
    .await;
    let dalle = json!({"model": "dall-e-2", "prompt": "routed", "size": "256x256"});

    // team-a names none: [upstream]. team-b (from the config file) names "second".
    assert_eq!(generate_status(&app, &app.key, dalle.clone()).await, 200);
    assert_eq!((first.call_count(), second.call_count()), (1, 0));
    assert_eq!(first.last_call().unwrap().header("authorization"), Some("Bearer sk-upstream-test"));
    assert_eq!(generate_status(&app, &app.other_key, dalle.clone()).await, 200);
    assert_eq!((first.call_count(), second.call_count()), (1, 1));
    let call = second.last_call().unwrap();
    assert_eq!(call.header("authorization"), Some(format!("Bearer {second_key}").as_str()));
    assert_eq!(call.header("openai-organization"), Some("org-second"), "the named upstream's own default");
    assert_eq!(second.file_fetch_count(), 1, "the image was re-hosted from the second upstream's host");

    // Through the admin API: create on "second", move back to [upstream] with null.
    let created = create_tenant(&app, json!({"name": "routed", "upstream": "second"})).await;
    assert_eq!(created["upstream"], "second");
    let key = issue_key(&app, "routed", json!({})).await["key"].as_str().unwrap().to_owned();
    assert_eq!(generate_status(&app, &key, dalle.clone()).await, 200);
    assert_eq!((first.call_count(), second.call_count()), (1, 2));
    let moved = admin(&app, Method::PATCH, "/tenants/routed").json(&json!({"upstream": null})).send().await.unwrap();
    assert_eq!(json_of(moved, 200).await["upstream"], Value::Null);
    assert_eq!(generate_status(&app, &key, dalle).await, 200);
    assert_eq!((first.call_count(), second.call_count()), (2, 2));

    // Unknown names: 400 naming `upstream`, nothing changed.
    let res = admin(&app, Method::PATCH, "/tenants/routed").json(&json!({"upstream": "third"})).send().await.unwrap();
    let (status, error) = error_of(res).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("upstream")));
    assert!(error["message"].as_str().unwrap().contains("'third'"), "{error}");
}

#[tokio::test]
async fn a_tenant_on_a_named_mock_upstream_gets_its_images_rehosted() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        let offline = imagegate::config::UpstreamSettings {
            kind: imagegate::config::UpstreamKind::Mock,
            ..imagegate::config::UpstreamSettings::default()
        };
        s.upstreams.insert("offline".into(), offline);
        s.tenants[1].upstream = Some("offline".into());
    })
    .await;
    // The mock answers DALL·E with links to the gateway's own /_mock/files, which re-hosting downloads.
    let dalle = json!({"model": "dall-e-2", "prompt": "offline", "size": "256x256"});
    assert_eq!(generate_status(&app, &app.other_key, dalle).await, 200);
    assert_eq!(fake.call_count(), 0, "the mock answered, not [upstream]");
}

// ------------------------------------------------------------------------------------ usage parameters

#[tokio::test]
async fn usage_bounds_take_any_rfc3339_offset_and_name_the_bad_one() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    // 10:00+02:00 is 08:00Z; an unencoded `+` arrives as a space and means the same.
    for query in ["from=2026-12-01T10:00:00%2B02:00", "from=2026-12-01T10:00:00+02:00"] {
        let res = admin(&app, Method::GET, &format!("/usage?{query}&to=2026-12-02")).send().await.unwrap();
        let body = json_of(res, 200).await;
        assert_eq!(body["from"].as_i64(), Some(1_796_112_000_000), "{query}");
    }
    let res = admin(&app, Method::GET, "/usage?from=2026-11-30T20:00:00-05:00&to=2026-12-02").send().await.unwrap();
    assert_eq!(json_of(res, 200).await["from"].as_i64(), Some(1_796_086_800_000));

    for (query, param) in [("to=-5", "to"), ("to=2001-01-01", "to"), ("from=-5", "from")] {
        let (status, error) =
            error_of(admin(&app, Method::GET, &format!("/usage?{query}")).send().await.unwrap()).await;
        assert_eq!((status, error["param"].as_str()), (400, Some(param)), "{query}: {error}");
    }
    let key =
        admin(&app, Method::POST, "/tenants/team-a/keys").json(&json!({"expires_at": "2099-01-01T02:00:00+02:00"}));
    assert_eq!(json_of(key.send().await.unwrap(), 201).await["expires_at"].as_i64(), Some(4_070_908_800_000));
}

#[tokio::test]
async fn csv_cells_that_look_like_formulas_stay_text() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let model = "=HYPERLINK(\"http://attacker.example/\",\"click\")";
    let _ = generate_status(&app, &app.key, json!({"model": model, "prompt": "x"})).await;
    usage_when(&app, "team-a", 1).await;

    let csv = admin(&app, Method::GET, "/usage?format=csv").send().await.unwrap().text().await.unwrap();
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let models: Vec<String> = reader.records().map(|r| r.unwrap()[1].to_owned()).collect();
    assert_eq!(models, [format!("'{model}")], "{csv}");
}
