//! The replica stack (`scripts/stack.sh up`): two replicas behind nginx sharing PostgreSQL, Redis and S3,
//! driven through the load balancer. Limits are shared, a link one replica stored is served by the other,
//! and each replica's `/metrics` shows the traffic it took.
//!
//! Runs only when `IMAGEGATE_STACK_ENV` names the `stack.env` that `scripts/stack.sh up` wrote (`.ci/run`
//! does); otherwise each test says so and passes. Each test makes a tenant of its own, and they take turns
//! ([`TURN`]): nginx's round robin is shared, so two tests in lockstep could each see one replica only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests fail by panicking")]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

/// A cheap request whose answer needs no download: the mock's DALL·E links point at the load balancer, and
/// re-hosting one would send a request of its own through nginx's round robin.
fn small(prompt: &str) -> Value {
    json!({"model": "dall-e-2", "prompt": prompt, "size": "256x256", "response_format": "b64_json"})
}

/// One test at a time drives the stack.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What `stack.env` says.
struct Stack {
    lb: String,
    replicas: Vec<String>,
    metrics: Vec<String>,
    admin_token: String,
    metrics_token: String,
    client: reqwest::Client,
}

fn stack() -> Option<Stack> {
    let Ok(path) = std::env::var("IMAGEGATE_STACK_ENV") else {
        eprintln!("IMAGEGATE_STACK_ENV is unset: no replica stack to test (scripts/stack.sh up starts one)");
        return None;
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let list = |k: &str| vars[k].split(',').map(str::to_owned).collect::<Vec<_>>();
    Some(Stack {
        lb: vars["IMAGEGATE_STACK_URL"].to_owned(),
        replicas: list("IMAGEGATE_STACK_REPLICAS"),
        metrics: list("IMAGEGATE_STACK_METRICS"),
        admin_token: vars["IMAGEGATE_STACK_ADMIN_TOKEN"].to_owned(),
        metrics_token: vars["IMAGEGATE_STACK_METRICS_TOKEN"].to_owned(),
        client: reqwest::Client::new(),
    })
}

impl Stack {
    /// A tenant of this test's own with `limits`, created through the load balancer; its key.
    async fn tenant(&self, prefix: &str, limits: Value) -> (String, String) {
        let name = format!("{prefix}-{}", hex::encode(rand::random::<[u8; 4]>()));
        let admin =
            |path: String| self.client.post(format!("{}/admin/v1{path}", self.lb)).bearer_auth(&self.admin_token);
        let res = admin("/tenants".into()).json(&json!({"name": name, "limits": limits})).send().await.unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
        let res = admin(format!("/tenants/{name}/keys")).json(&json!({})).send().await.unwrap();
        assert_eq!(res.status(), 201);
        let key = res.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_owned();
        (name, key)
    }

    /// POST a generation through the load balancer: (status, the replica that answered, body).
    async fn generate(&self, key: &str, body: Value) -> (u16, String, Value) {
        let res = self
            .client
            .post(format!("{}/v1/images/generations", self.lb))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let replica = res.headers()["x-imagegate-replica"].to_str().unwrap().to_owned();
        (res.status().as_u16(), replica, res.json().await.unwrap_or_default())
    }

    /// `imagegate_http_requests_total` of `tenant`, summed over labels, on each replica's metrics listener.
    async fn requests_of(&self, tenant: &str) -> Vec<f64> {
        let mut out = Vec::new();
        for root in &self.metrics {
            let res = self.client.get(format!("{root}/metrics")).bearer_auth(&self.metrics_token).send().await.unwrap();
            assert_eq!(res.status(), 200);
            let text = res.text().await.unwrap();
            let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
            let sum = scrape
                .samples
                .iter()
                .filter(|s| {
                    s.metric == imagegate::metrics::names::HTTP_REQUESTS && s.labels.get("tenant") == Some(tenant)
                })
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => 0.0,
                })
                .sum();
            out.push(sum);
        }
        out
    }
}

#[tokio::test]
async fn a_tenants_limit_holds_across_both_replicas_behind_the_load_balancer() {
    let Some(stack) = stack() else { return };
    let _turn = TURN.lock().await;
    let (_, key) = stack.tenant("shared-limit", json!({"requests_per_minute": 4})).await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut served_by = BTreeSet::new();
    for i in 0..8 {
        let (status, replica, _) = stack.generate(&key, small(&format!("p{i}"))).await;
        *by_status.entry(status).or_default() += 1;
        if status == 200 {
            served_by.insert(replica);
        }
    }
    assert_eq!(by_status, BTreeMap::from([(200, 4), (429, 4)]), "4 a minute in total, not 4 per replica");
    assert_eq!(served_by.len(), 2, "both replicas served: {served_by:?}");
}

#[tokio::test]
async fn a_link_re_hosted_by_one_replica_is_served_by_the_other() {
    let Some(stack) = stack() else { return };
    let _turn = TURN.lock().await;
    let (_, key) = stack.tenant("shared-links", json!({})).await;
    let body = json!({"model": "gpt-image-1", "prompt": "a lighthouse", "size": "1024x1024", "response_format": "url"});
    let (status, replica, answer) = stack.generate(&key, body).await;
    assert_eq!(status, 200, "{answer}");
    let link = url::Url::parse(answer["data"][0]["url"].as_str().unwrap()).unwrap();
    assert!(link.as_str().starts_with(&stack.lb), "links point at the load balancer: {link}");
    let path_and_query = format!("{}?{}", link.path(), link.query().unwrap());
    let other = stack.replicas.iter().find(|r| !r.ends_with(&replica)).expect("another replica");
    let res = stack.client.get(format!("{other}{path_and_query}")).send().await.unwrap();
    assert_eq!(res.status(), 200, "replica {other} serves what {replica} stored");
    assert_eq!(res.headers()["content-type"], "image/png");
    let bytes = res.bytes().await.unwrap();
    let image = image::load_from_memory(&bytes).unwrap();
    assert_eq!((image.width(), image.height()), (1024, 1024));
}

#[tokio::test]
async fn each_replicas_metrics_show_the_requests_it_took_and_together_all_of_them() {
    let Some(stack) = stack() else { return };
    let _turn = TURN.lock().await;
    let (tenant, key) = stack.tenant("metrics", json!({})).await;
    let mut per_replica: BTreeMap<String, f64> = BTreeMap::new();
    for i in 0..6 {
        let (status, replica, _) = stack.generate(&key, small(&format!("m{i}"))).await;
        assert_eq!(status, 200);
        *per_replica.entry(replica).or_default() += 1.0;
    }
    let counted = stack.requests_of(&tenant).await;
    assert_eq!(counted.iter().sum::<f64>(), 6.0, "{counted:?}");
    assert!(counted.iter().all(|c| *c > 0.0), "both replicas took some: {counted:?}");
    let mut expected: Vec<f64> = per_replica.values().copied().collect();
    let mut got = counted.clone();
    expected.sort_by(f64::total_cmp);
    got.sort_by(f64::total_cmp);
    assert_eq!(got, expected, "each replica counts what nginx sent it");
    // /metrics is not served through the load balancer's API listeners, and needs its token.
    let res = stack.client.get(format!("{}/metrics", stack.metrics[0])).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = stack.client.get(format!("{}/metrics", stack.lb)).send().await.unwrap();
    assert_eq!(res.status(), 404);
}
