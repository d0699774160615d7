//! Limits shared by several replicas through Redis: two gateway processes on one Redis (127.0.0.1:6379) and
//! one PostgreSQL database, hit concurrently; the tenant gets exactly its allowance in total, not twice it.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::app::{FAKE_IMAGE_HOSTS, GatewayProcess, UPSTREAM_KEY, fresh_postgres};
use crate::support::fake_openai::FakeOpenAi;

#[tokio::test]
async fn two_replicas_sharing_redis_grant_the_allowance_once_in_total() {
    let fake = FakeOpenAi::start().await;
    let database_url = fresh_postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let key = imagegate::tenants::keys::generate();
    let prefix = format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>()));
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n[database]\nurl = \"{database_url}\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"\n\
         [limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nredis_prefix = \"{prefix}\"\n\
         on_backend_error = \"closed\"\n{FAKE_IMAGE_HOSTS}\
         [[tenants]]\nname = \"shared\"\nlimits = {{ requests_per_minute = 20 }}\n\
         keys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        dir.path().display(),
        fake.url,
        key.id,
        key.sha256
    );
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    // One after the other: the second finds the migrations and the configured tenant already in place.
    let first = GatewayProcess::start(&["serve", "--config", path], dir.path());
    let second = GatewayProcess::start(&["serve", "--config", path], dir.path());

    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let root = if i % 2 == 0 { &first.root } else { &second.root };
        let request = client
            .post(format!("{root}/v1/images/generations"))
            .bearer_auth(&key.key)
            .json(&json!({"prompt": format!("shared {i}")}));
        tasks.push(tokio::spawn(async move {
            let res = request.send().await.unwrap();
            let retry_after = res.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let limit = res.headers().get("x-ratelimit-limit-requests").map(|v| v.to_str().unwrap().to_owned());
            (res.status().as_u16(), retry_after, limit)
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    // One request earns back every 3 s: the burst must be decided before the first refill.
    assert!(started.elapsed() < Duration::from_secs(3), "too slow to be exact: {:?}", started.elapsed());

    let ok = answers.iter().filter(|(status, ..)| *status == 200).count();
    let limited: Vec<_> = answers.iter().filter(|(status, ..)| *status == 429).collect();
    assert_eq!(ok, 20, "{answers:?}\n{}\n{}", first.printed(), second.printed());
    assert_eq!(limited.len(), 40, "{answers:?}");
    for (_, retry_after, limit) in &limited {
        let secs: u64 = retry_after.as_deref().expect("429 without retry-after").parse().unwrap();
        assert!((1..=3).contains(&secs), "retry-after {secs}");
        assert_eq!(limit.as_deref(), Some("20"));
    }
    assert_eq!(fake.call_count(), 20, "refused requests never reached the upstream");
}
