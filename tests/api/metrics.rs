//! `/metrics` after known traffic: exact counts by route, tenant, model and status; histograms that counted
//! each request once; images, tokens and USD matching the usage ledger; refusals and cache outcomes as the
//! limits and the cache counted them; a token when configured; a listener of its own when configured; and
//! output that parses as the Prometheus text format and carries no key or prompt.

use imagegate::metrics::names;
use prometheus_parse::{Scrape, Value as Prom};
use serde_json::json;

use crate::support::app::TestApp;
use crate::support::fake_openai::FakeOpenAi;

const GENERATIONS: &str = "/v1/images/generations";

async fn scrape_at(app: &TestApp, root: &str, token: Option<&str>) -> (u16, String) {
    let mut req = app.client.get(format!("{root}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

pub(crate) async fn scrape(app: &TestApp) -> (String, Scrape) {
    let (status, text) = scrape_at(app, &app.root, None).await;
    assert_eq!(status, 200, "{text}");
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    (text, parsed)
}

/// The value of the one sample of `name` with these labels (counters, gauges, `_count`/`_sum` lines).
pub(crate) fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .filter_map(|x| match x.value {
            Prom::Counter(v) | Prom::Gauge(v) | Prom::Untyped(v) => Some(v),
            _ => None,
        })
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} matches {} samples", found.len());
    found.first().copied()
}

/// The sum of every sample of `name` with these labels.
fn total(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .filter_map(|x| match x.value {
            Prom::Counter(v) | Prom::Gauge(v) | Prom::Untyped(v) => Some(v),
            _ => None,
        })
        .sum()
}

fn count_of(histogram: &str) -> String {
    format!("{histogram}_count")
}

#[tokio::test]
async fn requests_are_counted_by_route_tenant_model_and_status_class_and_timed_once_each() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    for prompt in ["a", "b"] {
        let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": prompt})).await;
        assert_eq!(res.status(), 200);
    }
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "x", "n": 0})).await;
    assert_eq!(res.status(), 400);
    let res = app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "c"})).await;
    assert_eq!(res.status(), 200);
    let res = app.client.post(format!("{}{GENERATIONS}", app.root)).json(&json!({"prompt": "x"})).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(fake.call_count(), 3);

    let (_, s) = scrape(&app).await;
    let requests = |status, tenant, model| {
        value(
            &s,
            names::HTTP_REQUESTS,
            &[("route", GENERATIONS), ("method", "POST"), ("status", status), ("tenant", tenant), ("model", model)],
        )
    };
    assert_eq!(requests("2xx", "team-a", "gpt-image-1"), Some(2.0));
    assert_eq!(requests("4xx", "team-a", "gpt-image-1"), Some(1.0));
    assert_eq!(requests("2xx", "team-a", "dall-e-3"), Some(1.0));
    assert_eq!(requests("4xx", "", ""), Some(1.0), "an unauthenticated request has no tenant or model");
    assert_eq!(total(&s, names::HTTP_REQUESTS, &[("route", GENERATIONS)]), 5.0);

    let duration = count_of(names::HTTP_REQUEST_DURATION);
    let timed = |model, status| value(&s, &duration, &[("route", GENERATIONS), ("model", model), ("status", status)]);
    assert_eq!(timed("gpt-image-1", "2xx"), Some(2.0));
    assert_eq!(timed("dall-e-3", "2xx"), Some(1.0));
    let upstream = count_of(names::UPSTREAM_REQUEST_DURATION);
    let called = value(&s, &upstream, &[("upstream", "default"), ("endpoint", "generations"), ("outcome", "2xx")]);
    assert_eq!(called, Some(3.0), "one upstream call per request that reached it");
    assert_eq!(value(&s, names::HTTP_REQUESTS_IN_FLIGHT, &[]), Some(1.0), "the scrape itself");

    // Images, tokens and cost agree with the usage ledger.
    let rows = app.usage_rows(4).await;
    let ledger_usd: f64 = rows.iter().filter_map(|r| r["cost_usd"].as_f64()).sum();
    let metric_usd = total(&s, names::COST_USD, &[("tenant", "team-a")]);
    assert!(ledger_usd > 0.0 && (metric_usd - ledger_usd).abs() < 1e-9, "metrics {metric_usd} vs ledger {ledger_usd}");
    let images = |model| value(&s, names::IMAGES, &[("tenant", "team-a"), ("model", model), ("source", "upstream")]);
    assert_eq!(images("gpt-image-1"), Some(2.0));
    assert_eq!(images("dall-e-3"), Some(1.0));
    let ledger_output: f64 = rows.iter().filter_map(|r| r["output_tokens"].as_f64()).sum();
    let tokens = value(&s, names::TOKENS, &[("tenant", "team-a"), ("model", "gpt-image-1"), ("direction", "output")]);
    assert_eq!(tokens, Some(ledger_output));

    // Rows written show up once the writer has counted them (just after they are visible in the database).
    let mut s = scrape(&app).await.1;
    for _ in 0..100 {
        if value(&s, names::LEDGER_ROWS, &[("outcome", "written")]) == Some(4.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        s = scrape(&app).await.1;
    }
    assert_eq!(value(&s, names::LEDGER_ROWS, &[("outcome", "written")]), Some(4.0));
    assert_eq!(value(&s, names::LEDGER_ROWS, &[("outcome", "dropped")]), Some(0.0));
    assert_eq!(value(&s, names::LEDGER_QUEUE_DEPTH, &[]), Some(0.0));
    assert!(value(&s, &count_of(names::LEDGER_BATCH_DURATION), &[]).unwrap() >= 1.0);
}

#[tokio::test]
async fn refusals_cache_outcomes_and_upstream_failures_appear_as_the_gateway_counted_them() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.tenants[1].limits = serde_json::from_value(json!({"requests_per_minute": 1})).unwrap();
    })
    .await;
    let same = json!({"model": "gpt-image-1", "prompt": "the same"});
    assert_eq!(app.post_json("/images/generations", &same).await.status(), 200);
    let hit = app.post_json("/images/generations", &same).await;
    assert_eq!(hit.headers()["x-imagegate-cache"], "hit");
    let rate_limited = json!({"model": "gpt-image-1", "prompt": "x #status=429"});
    assert_eq!(app.post_json("/images/generations", &rate_limited).await.status(), 429);
    assert_eq!(app.post_json("/images/generations", &rate_limited).await.status(), 429);
    // team-b: one request a minute.
    let post_b = || {
        app.client
            .post(format!("{}{GENERATIONS}", app.root))
            .bearer_auth(&app.other_key)
            .json(&json!({"model": "dall-e-2", "prompt": "b"}))
            .send()
    };
    assert_eq!(post_b().await.unwrap().status(), 200);
    assert_eq!(post_b().await.unwrap().status(), 429);
    assert_eq!(fake.call_count(), 4, "the hit and the refusal never reached the upstream");

    let (_, s) = scrape(&app).await;
    assert_eq!(value(&s, names::CACHE_REQUESTS, &[("outcome", "hit")]), Some(1.0));
    assert_eq!(value(&s, names::CACHE_REQUESTS, &[("outcome", "miss")]), Some(4.0));
    assert_eq!(value(&s, names::CACHE_STORES, &[]), Some(2.0));
    let cached = value(&s, names::IMAGES, &[("tenant", "team-a"), ("model", "gpt-image-1"), ("source", "cache")]);
    assert_eq!(cached, Some(1.0));
    assert_eq!(value(&s, names::LIMIT_REFUSALS, &[("reason", "requests_per_minute")]), Some(1.0));
    assert_eq!(value(&s, names::LIMIT_REFUSALS, &[("reason", "images_per_minute")]), Some(0.0));
    assert_eq!(value(&s, names::UPSTREAM_ERRORS, &[("upstream", "default"), ("kind", "rate_limited")]), Some(2.0));
    assert_eq!(value(&s, names::UPSTREAM_ERRORS, &[("kind", "server_error")]), None);
    let requests = |status, tenant| total(&s, names::HTTP_REQUESTS, &[("status", status), ("tenant", tenant)]);
    assert_eq!(requests("4xx", "team-a"), 2.0, "the upstream's 429s");
    assert_eq!(requests("4xx", "team-b"), 1.0, "the tenant's limit");
}

#[tokio::test]
async fn the_output_parses_line_for_line_uses_only_the_documented_names_and_holds_no_key_or_prompt() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.cache.enabled = true).await;
    let secret_prompt = "a very private prompt 7f3a";
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": secret_prompt})).await;
    assert_eq!(res.status(), 200);
    let res = app.post_json("/images/generations", &json!({"model": &app.key, "prompt": secret_prompt})).await;
    assert!(res.status().is_success() || res.status().is_client_error());

    let (text, s) = scrape(&app).await;
    assert!(!text.contains(secret_prompt) && !text.contains(&app.key), "{text}");
    assert!(!text.contains("req_"), "no request ids: {text}");
    assert!(text.contains("model=\"other\""), "a made-up model is `other`: {text}");

    // Every sample line was understood (prometheus-parse skips what it cannot read).
    let sample_lines = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
    let parsed: usize = s
        .samples
        .iter()
        .map(|x| match &x.value {
            Prom::Histogram(buckets) => buckets.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(parsed, sample_lines, "{text}");
    assert!(text.trim_end().ends_with("# EOF"));

    let documented = documented();
    for sample in &s.samples {
        let base = ["_count", "_sum", "_created", "_bucket"]
            .iter()
            .find_map(|suffix| sample.metric.strip_suffix(suffix))
            .unwrap_or(&sample.metric);
        assert!(
            documented.contains(&sample.metric.as_str()) || documented.contains(&base),
            "{} is not in imagegate::metrics::names",
            sample.metric
        );
    }
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/observability.md")).unwrap();
    for name in documented {
        assert!(docs.contains(&format!("`{name}`")), "docs/observability.md does not describe {name}");
    }
}

/// Every name in `imagegate::metrics::names`.
fn documented() -> Vec<&'static str> {
    vec![
        names::HTTP_REQUESTS,
        names::HTTP_REQUEST_DURATION,
        names::HTTP_REQUESTS_IN_FLIGHT,
        names::IMAGES,
        names::TOKENS,
        names::COST_USD,
        names::UPSTREAM_REQUEST_DURATION,
        names::UPSTREAM_ERRORS,
        names::REHOST_BYTES,
        names::REHOST_IMAGES,
        names::REHOST_DURATION,
        names::CACHE_REQUESTS,
        names::CACHE_STORES,
        names::CACHE_EVICTIONS,
        names::CACHE_ENTRIES,
        names::CACHE_BYTES,
        names::LIMIT_REFUSALS,
        names::LIMIT_FAIL_OPEN,
        names::LIMIT_IN_FLIGHT,
        names::REDIS_ERRORS,
        names::DATABASE_ERRORS,
        names::LEDGER_QUEUE_DEPTH,
        names::LEDGER_QUEUE_CAPACITY,
        names::LEDGER_ROWS,
        names::LEDGER_BATCH_DURATION,
        names::KEY_LOOKUPS,
        names::BUILD_INFO,
    ]
}

#[test]
fn the_dashboard_and_the_alert_rules_query_only_metrics_the_gateway_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/imagegate.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();
    let documented = documented();
    for (file, text) in [("imagegate.json", &dashboard), ("alerts.yml", &alerts)] {
        let mut used = 0;
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("imagegate_") {
                continue;
            }
            used += 1;
            let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
            assert!(documented.contains(&base), "{file} queries {word}, which the gateway does not export");
        }
        assert!(used > 5, "{file} queries imagegate's metrics");
    }
}

#[tokio::test]
async fn metrics_need_no_tenant_key_but_their_own_token_when_one_is_set() {
    let fake = FakeOpenAi::start().await;
    let open = TestApp::spawn(&fake.url).await;
    assert_eq!(scrape_at(&open, &open.root, None).await.0, 200);

    let token = "metrics-token-0123456789";
    let guarded =
        TestApp::spawn_with(&fake.url, |s| s.metrics.token = Some(imagegate::config::Secret::new(token))).await;
    assert_eq!(scrape_at(&guarded, &guarded.root, None).await.0, 401);
    assert_eq!(scrape_at(&guarded, &guarded.root, Some("metrics-token-wrong-456789")).await.0, 401);
    assert_eq!(scrape_at(&guarded, &guarded.root, Some(&guarded.key)).await.0, 401, "a tenant key is no token");
    let (status, text) = scrape_at(&guarded, &guarded.root, Some(token)).await;
    assert_eq!(status, 200);
    assert!(text.contains(names::HTTP_REQUESTS.trim_end_matches("_total")), "{text}");
}

#[tokio::test]
async fn a_metrics_listener_of_its_own_serves_them_there_and_not_beside_the_api() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.metrics.listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "x"})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(scrape_at(&app, &app.root, None).await.0, 404, "not on the API listener");
    let metrics_root = app.metrics_root.clone().unwrap();
    let (status, text) = scrape_at(&app, &metrics_root, None).await;
    assert_eq!(status, 200);
    let s = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let ok = value(&s, names::HTTP_REQUESTS, &[("route", GENERATIONS), ("status", "2xx"), ("tenant", "team-a")]);
    assert_eq!(ok, Some(1.0));
}
