//! `imagegate pools`: each pool deployment's state in a running gateway (healthy, resting or unhealthy and for
//! how long, calls in flight, capacity left this minute), read from its admin API (`GET /admin/v1/pools`):
//! the state lives in the gateway's memory, not in the database.

use anyhow::{Context, bail};
use url::Url;

use super::table;

/// `GET <gateway>/admin/v1/pools` with the admin token, as a table (or the API's JSON with `json`).
pub async fn status(gateway: &Url, token: &str, json: bool) -> anyhow::Result<String> {
    let mut url = gateway.clone();
    let base = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{base}{}/pools", crate::admin::PREFIX));
    let response = reqwest::Client::new()
        .get(url.clone())
        .bearer_auth(token)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway's admin API at {url}"))?;
    if !response.status().is_success() {
        bail!("the admin API at {url} answered {}", response.status());
    }
    let bytes = response.bytes().await.context("reading the admin API's answer")?;
    let body: serde_json::Value = serde_json::from_slice(&bytes).context("the admin API's answer is not JSON")?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&body)?));
    }
    Ok(format!("{}\n", render(&body)))
}

/// One row per deployment of every pool.
pub fn render(body: &serde_json::Value) -> String {
    let mut out = table::new(&[
        "POOL",
        "DEPLOYMENT",
        "STATE",
        "BACK IN",
        "IN FLIGHT",
        "REQUESTS LEFT",
        "IMAGES LEFT",
        "CALLS LEFT",
        "WEIGHT",
        "PRIORITY",
    ]);
    let empty = Vec::new();
    for pool in body["pools"].as_array().unwrap_or(&empty) {
        for d in pool["deployments"].as_array().unwrap_or(&empty) {
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::Null => table::NONE.to_owned(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let back_in = d["resting_for_ms"]
                .as_u64()
                .or_else(|| d["unhealthy_for_ms"].as_u64())
                .map_or(table::NONE.to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
            out.add_row(vec![
                text(&pool["name"]),
                text(&d["name"]),
                text(&d["state"]),
                back_in,
                text(&d["in_flight"]),
                text(&d["requests_left"]),
                text(&d["images_left"]),
                text(&d["concurrent_left"]),
                text(&d["weight"]),
                text(&d["priority"]),
            ]);
        }
    }
    out.to_string()
}

/// The gateway to ask: `--url`, else `server.public_url`, else the listen address (a wildcard address read as
/// loopback).
pub fn gateway_url(explicit: Option<Url>, settings: &crate::config::Settings) -> anyhow::Result<Url> {
    if let Some(url) = explicit.or_else(|| settings.server.public_url.clone()) {
        return Ok(url);
    }
    let mut listen = settings.server.listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(Url::parse(&format!("http://{listen}"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_deployment_with_absent_limits_as_a_dash() {
        let body = serde_json::json!({"pools": [{"name": "default", "deployments": [
            {"name": "east", "state": "resting", "resting_for_ms": 800, "unhealthy_for_ms": null, "in_flight": 0,
             "weight": 3, "priority": 0, "requests_left": null, "images_left": 2, "concurrent_left": null},
            {"name": "west", "state": "healthy", "resting_for_ms": null, "unhealthy_for_ms": null, "in_flight": 1,
             "weight": 1, "priority": 0, "requests_left": 19, "images_left": null, "concurrent_left": null}]}]});
        let text = render(&body);
        let east = text.lines().find(|l| l.contains("east")).unwrap();
        assert!(east.contains("resting") && east.contains("0.8s") && east.contains(" 2 "), "{text}");
        let west = text.lines().find(|l| l.contains("west")).unwrap();
        assert!(west.contains("healthy") && west.contains(" 19 ") && west.contains(" - "), "{text}");
    }
}
