//! Re-hosting: upstream images are stored and answered with imagegate's own signed, durable links; the
//! guarded downloader refuses hostile image URLs; links serve with ETag, caching and Range; expired images are
//! swept; links survive restarts; S3-compatible storage lets replicas share images.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::support::app::{TestApp, TestDb, error_of};
use crate::support::fake_openai::{FakeOpenAi, FakeOptions, render_image};

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The same link on another origin (a restarted gateway listens on a new port; users keep a stable
/// `server.public_url`).
fn on_origin(link: &str, root: &str) -> String {
    let at = link.find("/images/files/").unwrap();
    format!("{root}{}", &link[at..])
}

async fn images_rows(app: &TestApp) -> i64 {
    use sqlx::Row as _;
    let row = sqlx::query("SELECT COUNT(*) AS n FROM images").fetch_one(&app.pool().await).await.unwrap();
    row.try_get::<i64, _>("n").unwrap()
}

/// A GPT image model asked for a link.
async fn gpt_as_link(app: &TestApp, prompt: &str) -> reqwest::Response {
    app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": prompt, "response_format": "url"}))
        .await
}

fn stored_files(app: &TestApp) -> usize {
    fn walk(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map_or(0, |entries| entries.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
    }
    walk(&app.data_dir.path().join("images"))
}

async fn links_of(res: reqwest::Response) -> Vec<String> {
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["data"].as_array().unwrap().iter().map(|d| d["url"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn dall_e_links_keep_serving_the_same_bytes_after_the_upstream_link_expired_and_a_restart() {
    let fake =
        FakeOpenAi::start_with(FakeOptions { url_ttl: Some(Duration::from_secs(1)), ..Default::default() }).await;
    let app = TestApp::spawn(&fake.url).await;

    let links =
        links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "a pier", "n": 2})).await)
            .await;

    assert_eq!(links.len(), 2);
    assert_eq!(fake.file_fetch_count(), 2, "each upstream image is downloaded once, before answering");
    let upstream: Vec<String> = (0..2u64).map(|i| sha256(&render_image("a pier", i * 4 + 3, false, "png"))).collect();
    for (link, expected) in links.iter().zip(&upstream) {
        assert!(link.starts_with(&format!("{}/images/files/", app.root)), "{link}");
        let res = app.client.get(link).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "image/png");
        assert_eq!(res.headers()["etag"].to_str().unwrap(), format!("\"{expected}\""));
        assert_eq!(sha256(&res.bytes().await.unwrap()), *expected);
    }

    tokio::time::sleep(Duration::from_millis(1500)).await; // the upstream's links are dead now
    let app = app.restart().await;
    for (link, expected) in links.iter().zip(&upstream) {
        let res = app.client.get(on_origin(link, &app.root)).send().await.unwrap();
        assert_eq!(res.status(), 200, "the link outlives the upstream's and a restart");
        assert_eq!(sha256(&res.bytes().await.unwrap()), *expected);
    }
    assert_eq!(fake.file_fetch_count(), 2, "served from imagegate's store, not fetched again");
}

#[tokio::test]
async fn gpt_models_answer_links_when_asked_and_the_upstream_never_sees_response_format() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let prompt = "a tall lighthouse #side=256";

    let as_b64 = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": prompt})).await;
    let as_b64: Value = as_b64.json().await.unwrap();
    let res = gpt_as_link(&app, prompt).await;

    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let as_url: Value = serde_json::from_str(&text).unwrap();
    assert!(fake.calls().iter().all(|c| c.field("response_format").is_none()), "stripped before forwarding");
    assert_eq!(as_url["usage"], as_b64["usage"], "everything else passes unchanged");
    assert_eq!(as_url["output_format"], "png");
    assert!(as_url["data"][0].get("b64_json").is_none());
    let bytes = app.client.get(as_url["data"][0]["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&bytes), sha256(&b64(as_b64["data"][0]["b64_json"].as_str().unwrap())));
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 256);
    let b64_len = serde_json::to_vec(&as_b64).unwrap().len();
    assert!(b64_len >= 30 * text.len(), "a link answer is small: {} vs {b64_len} bytes", text.len());
}

/// A GPT answer is read as it arrives when its images become links: its base64 decoded piece by piece, never
/// held whole. Trickled in small chunks without a length, with more images than asked for (a broken upstream),
/// the link still serves exactly the image the upstream made, and only the image asked for is stored and
/// charged.
#[tokio::test]
async fn gpt_base64_arriving_in_small_pieces_is_stored_exactly_and_held_to_n() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let prompt = "a harbour at dusk #side=300 #items=3 #trickle=1001";

    let res = gpt_as_link(&app, prompt).await;

    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{body}");
    assert!(data[0].get("b64_json").is_none(), "{body}");
    assert_eq!(body["output_format"], "png", "the rest of the answer passes unchanged: {body}");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0, "{body}");
    let bytes = app.client.get(data[0]["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    let made = crate::support::fake_openai::render_image_sized(prompt, 3, false, "png", 300);
    assert_eq!(sha256(&bytes), sha256(&made), "the stored image is the upstream's, byte for byte");
    assert_eq!(fake.calls().len(), 1);
    assert_eq!(images_rows(&app).await, 1, "the images beyond n are not stored");
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["images_returned"], 1, "{rows:?}");
}

/// The bytes in the gateway's staging files (images on their way to disk).
fn staged_bytes(app: &TestApp) -> u64 {
    let dir = app.data_dir.path().join("images").join(".staging");
    std::fs::read_dir(dir)
        .map_or(0, |entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

/// A GPT image asked as a link goes to disk as its answer arrives: half the answer in, the gateway has written
/// part of the image to a staging file, not held it all in memory until the end; the link then serves the
/// upstream's image exactly, and no staging file is left.
#[tokio::test]
async fn a_gpt_image_is_written_to_disk_while_its_answer_is_still_arriving() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let prompt = "a crowded market #side=1000 #stall";
    let made = crate::support::fake_openai::render_image_sized(prompt, 3, false, "png", 1000);
    assert!(made.len() > 1_000_000, "an image of {} bytes is too small to see it staged", made.len());

    // The fake holds the second half of its answer for two seconds: look at the disk meanwhile.
    let watch = async {
        let deadline = std::time::Instant::now() + crate::support::fake_openai::STALL;
        let mut staged = 0;
        while staged == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            staged = staged_bytes(&app);
        }
        staged
    };
    let (res, staged) = tokio::join!(gpt_as_link(&app, prompt), watch);
    assert!(staged > 0, "half the answer in, nothing of its image was on disk");
    assert!(staged < made.len() as u64, "{staged} bytes staged of {}", made.len());

    assert_eq!(res.status(), 200);
    let links = links_of(res).await;
    let bytes = app.client.get(&links[0]).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&bytes), sha256(&made), "the stored image is the upstream's, byte for byte");
    // Its content address is the SHA-256 of those bytes (the decoder's hash, handed to the store).
    use sqlx::Row as _;
    let blob = sqlx::query("SELECT sha256 FROM image_blobs").fetch_one(&app.pool().await).await.unwrap();
    assert_eq!(blob.try_get::<String, _>("sha256").unwrap(), sha256(&made));
    assert_eq!(staged_bytes(&app), 0, "the staging file was moved into place");
    assert_eq!((fake.calls().len(), images_rows(&app).await), (1, 1));
}

/// A GPT answer cut off in the middle of its image: the call failed upstream and is billed as such, nothing is
/// stored, and the half-written staging file is removed.
#[tokio::test]
async fn a_gpt_answer_cut_off_mid_image_stores_nothing_and_leaves_no_staging_file() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let prompt = "a crowded market #side=1000 #cut";

    let res = gpt_as_link(&app, prompt).await;

    let (status, _) = error_of(res).await;
    assert_eq!(status, 502);
    assert_eq!(fake.calls().len(), 1);
    assert_eq!(app.usage_rows(1).await.len(), 1, "the broken call is in the ledger");
    assert_eq!((images_rows(&app).await, stored_files(&app)), (0, 0), "nothing stored, no staging file left");
}

#[tokio::test]
async fn formats_follow_the_request_then_the_tenant_then_the_deployment_then_the_model() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.images.response_format = Some(imagegate::domain::ResponseFormat::B64Json);
        s.tenants[1].images.response_format = Some(imagegate::domain::ResponseFormat::Url);
    })
    .await;
    let post = |key: &str, body: Value| {
        app.client.post(format!("{}/images/generations", app.base_url)).bearer_auth(key).json(&body).send()
    };

    // Deployment default b64_json: DALL·E is asked for base64 and nothing is downloaded.
    let body: Value = post(&app.key, json!({"model": "dall-e-2", "prompt": "a"})).await.unwrap().json().await.unwrap();
    assert!(body["data"][0]["b64_json"].is_string());
    assert_eq!(fake.last_call().unwrap().field("response_format").as_deref(), Some("b64_json"));
    assert_eq!(fake.file_fetch_count(), 0);
    // The request wins over every default.
    let body: Value = post(&app.key, json!({"model": "dall-e-2", "prompt": "b", "response_format": "url"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(body["data"][0]["url"].as_str().unwrap().starts_with(&app.root));
    // Tenant default url: a GPT model without response_format answers a link.
    let body: Value =
        post(&app.other_key, json!({"model": "gpt-image-1", "prompt": "c"})).await.unwrap().json().await.unwrap();
    assert!(body["data"][0]["url"].as_str().unwrap().starts_with(&app.root));
    assert!(fake.last_call().unwrap().field("response_format").is_none());
}

#[tokio::test]
async fn links_serve_conditional_requests_ranges_and_long_lived_cache_headers() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let link = links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "r"})).await)
        .await
        .remove(0);
    let get = |headers: &[(&str, &str)]| {
        let mut req = app.client.get(&link);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };

    let full = get(&[]).await.unwrap();
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    let length: usize = full.headers()["content-length"].to_str().unwrap().parse().unwrap();
    let cache = full.headers()["cache-control"].to_str().unwrap().to_owned();
    let modified = full.headers()["last-modified"].to_str().unwrap().to_owned();
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    let bytes = full.bytes().await.unwrap();
    assert_eq!(bytes.len(), length);
    assert!(cache.starts_with("public, max-age=") && cache.ends_with("immutable"), "{cache}");
    let max_age: u64 = cache["public, max-age=".len()..].split(',').next().unwrap().parse().unwrap();
    assert!(max_age > 29 * 24 * 3600, "cached for the retention (30 days): {max_age}");

    let res = get(&[("if-none-match", &etag)]).await.unwrap();
    assert_eq!(res.status(), 304);
    assert!(res.bytes().await.unwrap().is_empty());
    assert_eq!(get(&[("if-none-match", "\"other\"")]).await.unwrap().status(), 200);
    assert_eq!(get(&[("if-modified-since", &modified)]).await.unwrap().status(), 304);

    let res = get(&[("range", "bytes=0-7")]).await.unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(res.headers()["content-range"].to_str().unwrap(), format!("bytes 0-7/{length}"));
    assert_eq!(res.bytes().await.unwrap(), bytes.slice(0..8));
    let res = get(&[("range", "bytes=-4")]).await.unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(res.bytes().await.unwrap(), bytes.slice(length - 4..));
    let res = get(&[("range", &format!("bytes={length}-"))]).await.unwrap();
    assert_eq!(res.status(), 416);
    assert_eq!(res.headers()["content-range"].to_str().unwrap(), format!("bytes */{length}"));
    let res = get(&[("range", "bytes=0-7"), ("if-range", "\"stale\"")]).await.unwrap();
    assert_eq!(res.status(), 200, "a stale If-Range gets the whole image");
    assert_eq!(res.bytes().await.unwrap(), bytes);

    let head = app.client.head(&link).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), length.to_string());
}

#[tokio::test]
async fn tampered_guessed_and_expired_links_are_refused() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let link = links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "t"})).await)
        .await
        .remove(0);
    let url = url::Url::parse(&link).unwrap();
    let query: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    let name = url.path_segments().unwrap().next_back().unwrap().to_owned();
    let files = format!("{}/images/files", app.root);

    let tampered = [
        format!("{files}/{name}?expires={}&signature=AAAA", query["expires"]),
        format!(
            "{files}/{name}?expires={}&signature={}",
            query["expires"].parse::<i64>().unwrap() + 1,
            query["signature"]
        ),
        format!(
            "{files}/{}?expires={}&signature={}",
            name.replace(&name[..4], "0000"),
            query["expires"],
            query["signature"]
        ),
        format!("{files}/{name}"),
    ];
    for bad in &tampered {
        let (status, error) = error_of(app.client.get(bad).send().await.unwrap()).await;
        assert_eq!(status, 403, "{bad}");
        assert!(error["message"].as_str().unwrap().contains("signature"), "{error}");
    }

    // Links signed with the gateway's key: expired, and for an image that does not exist.
    let key = std::fs::read(app.data_dir.path().join("signing.key")).unwrap();
    let signer = imagegate::rehost::links::LinkSigner::new(key, url::Url::parse(&app.root).unwrap());
    let (status, error) = error_of(app.client.get(signer.url(&name, 1_000)).send().await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(error["message"].as_str().unwrap().contains("expired"), "{error}");
    let ghost = format!("{}.png", "ab".repeat(16));
    let (status, _) = error_of(app.client.get(signer.url(&ghost, 4_000_000_000)).send().await.unwrap()).await;
    assert_eq!(status, 404);
}

/// A gateway whose downloads are guarded as `tweak` says, and a DALL·E request whose image is at `image_url`.
async fn hostile(
    fake: &FakeOpenAi,
    image_url: &str,
    tweak: impl FnOnce(&mut imagegate::config::Settings),
) -> (TestApp, u16, Value) {
    let app = TestApp::spawn_with(&fake.url, tweak).await;
    let prompt = format!("x #image_url={image_url}");
    let res = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": prompt})).await;
    let (status, error) = error_of(res).await;
    (app, status, error)
}

async fn assert_nothing_stored(app: &TestApp) {
    assert_eq!(images_rows(app).await, 0, "no image row");
    assert_eq!(stored_files(app), 0, "no stored file");
}

#[tokio::test]
async fn an_image_url_on_a_private_address_is_refused_without_connecting() {
    let fake = FakeOpenAi::start().await;
    let (app, status, error) = hostile(&fake, "/_fake/html", |s| s.images.download.private_hosts.clear()).await;

    assert_eq!(status, 502);
    assert_eq!(error["code"], "image_rehost_failed");
    assert!(error["message"].as_str().unwrap().contains("private or loopback"), "{error}");
    assert_eq!(fake.file_fetch_count(), 0, "never connected");
    assert_nothing_stored(&app).await;
    // A host name resolving to loopback is refused the same way.
    let url = fake.base.replace("127.0.0.1", "localhost");
    let (app, status, error) = hostile(&fake, &format!("{url}/_fake/html"), |s| {
        s.images.download.allowed_hosts.push("localhost".into());
    })
    .await;
    assert_eq!(status, 502);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("points at a private"), "{error}");
    assert!(!message.contains("localhost") && !message.contains("127.0.0.1"), "an internal host told: {error}");
    assert_eq!(fake.file_fetch_count(), 0);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn an_image_url_on_a_host_off_the_allowlist_is_refused() {
    let fake = FakeOpenAi::start().await;
    let (app, status, error) = hostile(&fake, "/_fake/files/x.png", |s| {
        s.images.download.allowed_hosts = vec!["*.blob.core.windows.net".into()];
    })
    .await;

    assert_eq!(status, 502);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("not in images.download.allowed_hosts"), "{error}");
    assert!(!message.contains("127.0.0.1"), "an internal address told to the caller: {error}");
    assert_eq!(fake.file_fetch_count(), 0);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_redirect_to_loopback_is_refused_at_the_hop() {
    let fake = FakeOpenAi::start().await;
    // The first hop is on an allowed name that may be private (an in-cluster host); its redirect to a loopback
    // address that may not is refused.
    let first = format!("{}/_fake/redirect?to={}/_fake/html", fake.base.replace("127.0.0.1", "localhost"), fake.base);
    let (app, status, error) = hostile(&fake, &first, |s| {
        s.images.download.allowed_hosts = vec!["localhost".into(), "127.0.0.1".into()];
        s.images.download.private_hosts = vec!["localhost".into()];
    })
    .await;

    assert_eq!(status, 502);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("points at a private") && !message.contains("127.0.0.1"), "{error}");
    assert_eq!(fake.file_fetch_count(), 1, "the redirect was fetched, its target never");
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn endless_bodies_non_images_and_redirect_loops_are_refused() {
    let fake = FakeOpenAi::start().await;
    let cases = [
        ("/_fake/endless", "larger than 1048576 bytes"),
        ("/_fake/html", "content type 'text/html'"),
        ("/_fake/lying_png", "not a PNG, JPEG or WebP"),
        ("/_fake/files/img-unknown.png", "answered HTTP 404"),
    ];
    for (path, reason) in cases {
        let (app, status, error) =
            hostile(&fake, path, |s| s.images.download.max_bytes = bytesize::ByteSize::mib(1)).await;
        assert_eq!(status, 502, "{path}");
        assert!(error["message"].as_str().unwrap().contains(reason), "{path}: {error}");
        assert_nothing_stored(&app).await;
    }
    let mut url = format!("{}/_fake/html", fake.base);
    for _ in 0..4 {
        url = format!("{}/_fake/redirect?to={}", fake.base, urlencode(&url));
    }
    let (app, status, error) = hostile(&fake, &url, |_| {}).await;
    assert_eq!(status, 502);
    assert!(error["message"].as_str().unwrap().contains("more than 3 redirects"), "{error}");
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn an_answer_with_one_bad_image_stores_none_of_its_good_ones() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    // Images 0 and 2 are real PNGs, image 1 a web page.
    let res = app
        .post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "trio #bad_image=1", "n": 3}))
        .await;

    let (status, error) = error_of(res).await;
    assert_eq!((status, error["code"].as_str()), (502, Some("image_rehost_failed")));
    assert!(error["message"].as_str().unwrap().contains("image 1"), "{error}");
    assert_nothing_stored(&app).await;
    // The same prompt without the bad image stores all three.
    let links =
        links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "trio", "n": 3})).await)
            .await;
    assert_eq!((links.len(), images_rows(&app).await), (3, 3));
}

#[tokio::test]
async fn head_is_answered_from_the_metadata_without_reading_the_object() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let link = links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "h"})).await)
        .await
        .remove(0);
    let length = app.client.get(&link).send().await.unwrap().bytes().await.unwrap().len();
    // Take the object away behind the gateway's back: only a read of it can notice.
    fn remove_all(dir: &std::path::Path) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_dir() { remove_all(&entry.path()) } else { std::fs::remove_file(entry.path()).unwrap() }
        }
    }
    remove_all(&app.data_dir.path().join("images"));

    let head = app.client.head(&link).send().await.unwrap();
    assert_eq!(head.status(), 200, "HEAD never opens the object");
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), length.to_string());
    assert!(head.headers()["etag"].to_str().unwrap().starts_with('"'));
    let head = app.client.head(&link).header("range", "bytes=0-3").send().await.unwrap();
    assert_eq!((head.status().as_u16(), head.headers()["content-length"].to_str().unwrap()), (206, "4"));
    assert_eq!(app.client.get(&link).send().await.unwrap().status(), 404, "a GET does read it");
}

#[tokio::test]
async fn only_the_signed_spelling_of_expires_verifies() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let link = links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "e"})).await)
        .await
        .remove(0);
    let expires = url::Url::parse(&link).unwrap().query_pairs().find(|(k, _)| k == "expires").unwrap().1.into_owned();
    assert_eq!(app.client.get(&link).send().await.unwrap().status(), 200);
    for spelling in [format!("0{expires}"), format!("%2B{expires}"), format!("00{expires}")] {
        let other = link.replace(&format!("expires={expires}"), &format!("expires={spelling}"));
        assert_eq!(app.client.get(&other).send().await.unwrap().status(), 403, "{other}");
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn a_failed_download_keeps_the_cost_in_usage_or_passes_the_link_on_when_the_tenant_opts_in() {
    let fake = FakeOpenAi::start().await;
    let (app, status, _) = hostile(&fake, "/_fake/html", |s| {
        s.tenants[1].images.on_download_error = Some(imagegate::domain::DownloadFallback::PassThrough);
    })
    .await;
    assert_eq!(status, 502);
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["status"], 502);
    assert!(rows[0]["cost_usd"].as_f64().unwrap() > 0.0, "the upstream billed for it: {}", rows[0]);

    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&json!({"model": "dall-e-2", "prompt": "y #image_url=/_fake/html"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["data"][0]["url"], format!("{}/_fake/html", fake.base), "the upstream's own link");
}

#[tokio::test]
async fn with_rehosting_off_answers_pass_through_and_gpt_models_refuse_response_format() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.images.rehost = false).await;

    let links =
        links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "p"})).await).await;
    assert!(links[0].starts_with(&fake.base), "{}", links[0]);
    assert_eq!(fake.file_fetch_count(), 0);
    let res = app
        .post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "p", "response_format": "url"}))
        .await;
    let (status, error) = error_of(res).await;
    assert_eq!(
        (status, error["param"].as_str(), error["code"].as_str()),
        (400, Some("response_format"), Some("unknown_parameter"))
    );
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn expired_images_are_swept_from_the_database_and_the_disk() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.images.sweep_interval = Duration::from_millis(200);
        s.tenants[0].images.retention = Some(Duration::from_secs(1));
    })
    .await;
    let link = links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "s"})).await)
        .await
        .remove(0);
    let kept = links_of(
        app.client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(&app.other_key)
            .json(&json!({"model": "dall-e-2", "prompt": "kept"}))
            .send()
            .await
            .unwrap(),
    )
    .await
    .remove(0);
    assert_eq!(stored_files(&app), 2);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stored_files(&app) > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored_files(&app), 1, "the expired image's file is deleted, the other tenant's stays");
    assert_eq!(images_rows(&app).await, 1);
    assert_eq!(app.client.get(&link).send().await.unwrap().status(), 403, "its link has expired");
    assert_eq!(app.client.get(&kept).send().await.unwrap().status(), 200);
}

/// The S3-compatible server `.ci/run` starts (moto), or `None` outside CI when none is configured.
fn s3() -> Option<(String, String)> {
    match (std::env::var("IMAGEGATE_TEST_S3_ENDPOINT"), std::env::var("IMAGEGATE_TEST_S3_BUCKET")) {
        (Ok(endpoint), Ok(bucket)) => Some((endpoint, bucket)),
        _ => {
            assert!(std::env::var_os("CI").is_none(), "IMAGEGATE_TEST_S3_ENDPOINT is not set: run `bash .ci/run`");
            eprintln!("skipping: no S3-compatible server (IMAGEGATE_TEST_S3_ENDPOINT); `bash .ci/run` starts one");
            None
        }
    }
}

fn use_s3(s: &mut imagegate::config::Settings, endpoint: &str, bucket: &str, prefix: &str) {
    use imagegate::config::{Secret, StorageBackend};
    s.storage.backend = StorageBackend::S3;
    s.storage.s3.bucket = Some(bucket.to_owned());
    s.storage.s3.endpoint = Some(url::Url::parse(endpoint).unwrap());
    s.storage.s3.allow_http = true;
    s.storage.s3.access_key_id = Some(Secret::new("test"));
    s.storage.s3.secret_access_key = Some(Secret::new("test"));
    s.storage.s3.prefix = prefix.to_owned();
    s.images.signing_key = Some(Secret::new("a-signing-key-shared-by-every-replica-0123"));
}

#[tokio::test]
async fn replicas_sharing_postgres_and_s3_serve_each_others_links() {
    let Some((endpoint, bucket)) = s3() else { return };
    let fake = FakeOpenAi::start().await;
    let prefix = format!("test-{}", hex::encode(rand::random::<[u8; 6]>()));
    let a = TestApp::spawn_on(TestDb::Postgres, &fake.url, |s| use_s3(s, &endpoint, &bucket, &prefix)).await;
    let mut settings = a.settings.clone();
    let dir_b = std::sync::Arc::new(tempfile::tempdir().unwrap());
    settings.storage.data_dir = dir_b.path().to_path_buf();
    let b = a.replica(settings, dir_b).await;

    let res = a
        .post_json(
            "/images/generations",
            &json!({"model": "gpt-image-1", "prompt": "shared", "response_format": "url"}),
        )
        .await;
    let link = links_of(res).await.remove(0);
    let expected = sha256(&render_image("shared", 3, false, "png"));

    let res = b.client.get(on_origin(&link, &b.root)).send().await.unwrap();
    assert_eq!(res.status(), 200, "replica B serves replica A's link");
    assert_eq!(sha256(&res.bytes().await.unwrap()), expected);
    let res = b.client.get(on_origin(&link, &b.root)).header("range", "bytes=1-3").send().await.unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(&res.bytes().await.unwrap()[..], b"PNG");
    assert_eq!(stored_files(&a) + stored_files(&b), 0, "nothing on local disk");

    // The object is in the bucket under the prefix, keyed by its SHA-256.
    use object_store::ObjectStore as _;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_bucket_name(&bucket)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    let path = object_store::path::Path::from(format!("{prefix}/images/{}/{expected}", &expected[..2]));
    assert_eq!(sha256(&store.get(&path).await.unwrap().bytes().await.unwrap()), expected);
}

#[tokio::test]
async fn s3_links_survive_a_restart() {
    let Some((endpoint, bucket)) = s3() else { return };
    let fake = FakeOpenAi::start().await;
    let prefix = format!("test-{}", hex::encode(rand::random::<[u8; 6]>()));
    let app = TestApp::spawn_with(&fake.url, |s| use_s3(s, &endpoint, &bucket, &prefix)).await;
    let links =
        links_of(app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "a kite"})).await).await;
    let app = app.restart().await;
    let res = app.client.get(on_origin(&links[0], &app.root)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(sha256(&res.bytes().await.unwrap()), sha256(&render_image("a kite", 3, false, "png")));
}

#[tokio::test]
async fn a_mock_upstream_does_not_open_the_download_guard_to_the_gateways_host_for_a_real_upstream() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        // The real upstream's links (http://127.0.0.1:<fake port>/…) are not allowed here…
        s.images.download = imagegate::config::DownloadSettings::default();
        // …and a mock upstream on the same gateway must not make them allowed (the gateway is on 127.0.0.1).
        let offline = imagegate::config::UpstreamSettings {
            kind: imagegate::config::UpstreamKind::Mock,
            ..imagegate::config::UpstreamSettings::default()
        };
        s.upstreams.insert("offline".into(), offline);
        s.tenants[1].upstream = Some("offline".into());
    })
    .await;

    let res = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "a pier"})).await;
    assert_eq!(res.status(), 502, "a loopback plain-HTTP link of a real upstream was downloaded");
    assert_eq!(fake.file_fetch_count(), 0, "never fetched");

    // The mock's own links are still re-hosted.
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&json!({"model": "dall-e-2", "prompt": "offline", "size": "256x256"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

#[tokio::test]
async fn a_link_with_a_duplicated_query_parameter_gets_an_openai_shaped_400() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let links =
        links_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "a pier"})).await).await;

    let (status, error) = error_of(app.client.get(format!("{}&signature=x", links[0])).send().await.unwrap()).await;

    assert_eq!(status, 400);
    assert_eq!(error["param"], "signature", "{error}");
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(app.client.get(&links[0]).send().await.unwrap().status(), 200);
}
