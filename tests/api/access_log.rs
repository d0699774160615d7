//! The access log of the real binary (`log.format = "json"`): one JSON line per request with who, what, how it
//! ended and why it was refused, the SDK that sent it; never a key or a prompt.

use std::time::Duration;

use imagegate::domain::keys;
use serde_json::{Value, json};

use crate::support::app::{FAKE_IMAGE_HOSTS, GatewayProcess, UPSTREAM_KEY};
use crate::support::fake_openai::FakeOpenAi;

/// The `imagegate::access` lines printed so far, parsed, once there are `n` of them.
async fn access_lines(gw: &GatewayProcess, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let lines: Vec<Value> = gw
            .printed()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "imagegate::access")
            .collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} access lines: {}", gw.printed());
}

#[tokio::test]
async fn each_request_leaves_one_json_access_line_saying_who_what_and_why_it_was_refused_without_key_or_prompt() {
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = keys::generate();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"0s\"\n[log]\nformat = \"json\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"\n{FAKE_IMAGE_HOSTS}\
         [[tenants]]\nname = \"ci\"\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        fake.url, key.id, key.sha256
    );
    std::fs::write(dir.path().join("imagegate.toml"), config).unwrap();
    let gw = GatewayProcess::start(&["serve", "--config", "imagegate.toml"], dir.path());
    let client = reqwest::Client::new();
    let url = format!("{}/v1/images/generations", gw.root);
    let prompt = "a confidential prompt 93c1";
    let send = |body: Value, auth: bool| {
        let mut req = client
            .post(&url)
            .header("x-stainless-lang", "python")
            .header("x-stainless-package-version", "1.99.9")
            .header("user-agent", "OpenAI/Python 1.99.9")
            .json(&body);
        if auth {
            req = req.bearer_auth(&key.key);
        }
        req.send()
    };
    let ok = send(json!({"model": "gpt-image-1", "prompt": prompt, "n": 2}), true).await.unwrap();
    assert_eq!(ok.status(), 200);
    let bad = send(json!({"model": "dall-e-3", "prompt": prompt, "size": "999x999"}), true).await.unwrap();
    assert_eq!(bad.status(), 400);
    let anonymous = send(json!({"prompt": prompt}), false).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let ids: Vec<String> =
        [&ok, &bad, &anonymous].iter().map(|r| r.headers()["x-request-id"].to_str().unwrap().to_owned()).collect();

    let lines = access_lines(&gw, 3).await;
    assert_eq!(lines.len(), 3, "one line per request: {lines:#?}");
    let line = |id: &str| lines.iter().find(|l| l["request_id"] == id).unwrap_or_else(|| panic!("{id}: {lines:#?}"));

    let served = line(&ids[0]);
    assert_eq!(served["status"], 200);
    assert_eq!(served["route"], "/v1/images/generations");
    assert_eq!(served["tenant"], "ci");
    assert_eq!(served["key_id"], key.id.as_str());
    assert_eq!(served["model"], "gpt-image-1");
    assert_eq!(served["images"], 2);
    assert!(served["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(served["upstream"], "default");
    assert!(served["upstream_latency_ms"].is_u64() && served["latency_ms"].is_u64(), "{served}");
    assert_eq!(served["client_lang"], "python");
    assert_eq!(served["client_version"], "1.99.9");
    assert_eq!(served["user_agent"], "OpenAI/Python 1.99.9");
    assert!(served.get("error_code").is_none(), "{served}");

    let refused = line(&ids[1]);
    assert_eq!(refused["status"], 400);
    assert_eq!(refused["tenant"], "ci");
    assert_eq!(refused["model"], "dall-e-3");
    assert_eq!(refused["error_type"], "invalid_request_error");
    assert_eq!(refused["error_param"], "size");
    assert!(refused.get("upstream").is_none(), "never sent upstream: {refused}");

    let unknown = line(&ids[2]);
    assert_eq!(unknown["status"], 401);
    assert_eq!(unknown["error_code"], "invalid_api_key");
    assert!(unknown.get("tenant").is_none(), "{unknown}");

    let printed = gw.printed();
    assert!(!printed.contains(&key.key) && !printed.contains(prompt), "no key or prompt in the log: {printed}");
    assert!(!printed.contains("finished processing request"), "one line per request, not two");
}
