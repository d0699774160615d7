//! Re-hosting benchmark (issue 6): owns its fake OpenAI upstream serving ~2 MB PNGs, two release gateway
//! processes (re-hosting off as the reference, on as the subject), the load, the memory readings, an
//! in-process breakdown of the re-hosting steps and the Markdown report printed at the end.
//!
//! Run it through `bash scripts/bench-rehost.sh [--images N] [--concurrency C] [--size-mb 2]`, which builds
//! `target/release/imagegate` and this example first; `--help` lists every option. Results: docs/performance.md.
//!
//! Every image the fake hands out is distinct (a few pre-rendered pictures of incompressible random pixels,
//! each answer stamped with its own PNG `tEXt` chunk), so content-hash deduplication never flatters the numbers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark program run by hand: it prints its report and stops loudly on any failure"
)]

#[path = "support/bench.rs"]
mod bench;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::Parser;
use imagegate::config::{DatabaseSettings, DownloadSettings, StorageSettings};
use imagegate::db::Db;
use imagegate::domain::keys::{self, NewKey};
use imagegate::rehost::fetch::Fetcher;
use imagegate::storage::repo::ImageRepo;
use imagegate::storage::{Content, ImageStore, NewImage, StoredImage};
use object_store::ObjectStore as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::bench::{Gateway, Memory, mib, percentile, unix_now};

/// PNG signature (8 bytes) plus the IHDR chunk (25 bytes): the part of a picture before the stamp.
const HEAD_LEN: usize = 33;
/// Length of the text of the `tEXt` stamp: `Comment\0` and a 19-digit counter.
const STAMP_TEXT_LEN: usize = 27;
/// Signature, IHDR and stamp chunk: 72 bytes, a multiple of 3, so the base64 of a stamped image is the base64
/// of this prefix followed by the pre-computed base64 of the rest of the picture.
const PREFIX_LEN: usize = HEAD_LEN + 12 + STAMP_TEXT_LEN;

#[derive(Parser, Debug, Clone)]
#[command(about = "Measure what re-hosting images costs: a gateway with images.rehost off against one with it on")]
struct Args {
    /// Measured requests per gateway and scenario.
    #[arg(long, default_value_t = 200)]
    images: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Size of each image in MB (10^6 bytes); pictures are square, random RGB, PNG-encoded.
    #[arg(long, default_value_t = 2.0)]
    size_mb: f64,
    /// Images per request (`n`).
    #[arg(long, default_value_t = 1)]
    n: u32,
    /// Untimed requests per gateway and scenario before the measured ones.
    #[arg(long, default_value_t = 32)]
    warmup: usize,
    /// Distinct pre-rendered pictures (every answer is stamped on top, so no two images are identical).
    #[arg(long, default_value_t = 8)]
    pictures: usize,
    /// Which scenarios to run.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    scenario: Only,
    /// Iterations of the in-process, one-at-a-time breakdown of the re-hosting steps (0 skips it).
    #[arg(long, default_value_t = 20)]
    breakdown: usize,
    /// The gateway binary; default: `imagegate` next to this example's directory (target/release).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    Both,
    Dalle,
    Gpt,
}

/// The two workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// `dall-e-2`: the upstream answers links; B downloads, stores and re-links them.
    Dalle,
    /// `gpt-image-1`: the upstream answers base64; B (asked for `response_format: "url"`) decodes, stores and
    /// links, A passes the base64 on.
    Gpt,
}

impl Scenario {
    fn short(self) -> &'static str {
        match self {
            Scenario::Dalle => "(a) DALL·E url",
            Scenario::Gpt => "(b) GPT b64→url",
        }
    }

    fn body(self, n: u32, rehost: bool) -> Bytes {
        let body = match (self, rehost) {
            (Scenario::Dalle, _) => json!({"model": "dall-e-2", "prompt": "bench", "size": "1024x1024", "n": n}),
            (Scenario::Gpt, false) => json!({"model": "gpt-image-1", "prompt": "bench", "size": "1024x1024", "n": n}),
            (Scenario::Gpt, true) => json!({
                "model": "gpt-image-1", "prompt": "bench", "size": "1024x1024", "n": n, "response_format": "url"
            }),
        };
        Bytes::from(serde_json::to_vec(&body).unwrap())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Pictures and the fake upstream
// ---------------------------------------------------------------------------------------------------------

/// One pre-rendered picture, split where the stamp goes.
struct Picture {
    head: [u8; HEAD_LEN],
    rest: Bytes,
    rest_b64: Bytes,
}

/// PNG's CRC-32 (ISO 3309), bit by bit: it only ever covers a 31-byte stamp.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// Signature + IHDR + a `tEXt` chunk `Comment\0<counter>`: what makes every served image unique.
fn stamped_prefix(head: &[u8; HEAD_LEN], counter: u64) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[..HEAD_LEN].copy_from_slice(head);
    let text = format!("Comment\0{counter:019}");
    assert_eq!(text.len(), STAMP_TEXT_LEN, "counter too large for the stamp");
    p[HEAD_LEN..HEAD_LEN + 4].copy_from_slice(&(STAMP_TEXT_LEN as u32).to_be_bytes());
    p[HEAD_LEN + 4..HEAD_LEN + 8].copy_from_slice(b"tEXt");
    p[HEAD_LEN + 8..HEAD_LEN + 8 + STAMP_TEXT_LEN].copy_from_slice(text.as_bytes());
    let crc = crc32(&p[HEAD_LEN + 4..HEAD_LEN + 8 + STAMP_TEXT_LEN]);
    p[PREFIX_LEN - 4..].copy_from_slice(&crc.to_be_bytes());
    p
}

/// The counter stamped into an image served by the fake, if it is one.
fn stamp_of(bytes: &[u8]) -> Option<u64> {
    let text = bytes.get(HEAD_LEN + 8..HEAD_LEN + 8 + STAMP_TEXT_LEN)?;
    let digits = text.strip_prefix(b"Comment\0")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The fake OpenAI: `POST /v1/images/generations` and `GET /files/{counter}.png`.
struct Fake {
    base: String,
    pictures: Vec<Picture>,
    counter: AtomicU64,
    generations: AtomicU64,
    file_fetches: AtomicU64,
}

impl Fake {
    fn picture(&self, counter: u64) -> &Picture {
        &self.pictures[(counter % self.pictures.len() as u64) as usize]
    }

    /// The image with stamp `counter`.
    fn image(&self, counter: u64) -> Bytes {
        let picture = self.picture(counter);
        let mut out = Vec::with_capacity(PREFIX_LEN + picture.rest.len());
        out.extend_from_slice(&stamped_prefix(&picture.head, counter));
        out.extend_from_slice(&picture.rest);
        Bytes::from(out)
    }

    fn image_len(&self) -> usize {
        PREFIX_LEN + self.pictures[0].rest.len()
    }

    fn b64_len(&self) -> usize {
        PREFIX_LEN / 3 * 4 + self.pictures[0].rest_b64.len()
    }

    /// A DALL·E answer: `n` links to fresh images on this fake.
    fn dalle_answer(&self, n: u64) -> Vec<u8> {
        let data: Vec<Value> = (0..n)
            .map(|_| {
                let counter = self.counter.fetch_add(1, Ordering::Relaxed);
                json!({"url": format!("{}/files/{counter}.png", self.base)})
            })
            .collect();
        serde_json::to_vec(&json!({"created": unix_now(), "data": data})).unwrap()
    }

    /// A GPT image answer: `n` fresh images as base64, plus `usage`; written by hand to avoid re-encoding.
    fn gpt_answer(&self, n: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((n as usize) * (self.b64_len() + 20) + 400);
        out.extend_from_slice(format!("{{\"created\":{},\"data\":[", unix_now()).as_bytes());
        for i in 0..n {
            let counter = self.counter.fetch_add(1, Ordering::Relaxed);
            let picture = self.picture(counter);
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"b64_json\":\"");
            out.extend_from_slice(BASE64.encode(stamped_prefix(&picture.head, counter)).as_bytes());
            out.extend_from_slice(&picture.rest_b64);
            out.extend_from_slice(b"\"}");
        }
        let output_tokens = 4160 * n;
        out.extend_from_slice(
            format!(
                "],\"background\":\"opaque\",\"output_format\":\"png\",\"size\":\"1024x1024\",\"quality\":\"high\",\
                 \"usage\":{{\"total_tokens\":{},\"input_tokens\":7,\"output_tokens\":{output_tokens},\
                 \"input_tokens_details\":{{\"text_tokens\":7,\"image_tokens\":0}},\
                 \"output_tokens_details\":{{\"image_tokens\":{output_tokens},\"text_tokens\":0}}}}}}",
                output_tokens + 7
            )
            .as_bytes(),
        );
        out
    }
}

async fn generations(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    let request: Value = match bench::read_request(&headers, &body) {
        Ok(request) => request,
        Err(answer) => return *answer,
    };
    fake.generations.fetch_add(1, Ordering::Relaxed);
    let model = request.get("model").and_then(Value::as_str).unwrap_or("dall-e-2");
    let n = request.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 10);
    let answer = if model.starts_with("gpt-image") { fake.gpt_answer(n) } else { fake.dalle_answer(n) };
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}

async fn file(State(fake): State<Arc<Fake>>, UrlPath(name): UrlPath<String>) -> Response {
    let Some(counter) = name.strip_suffix(".png").and_then(|c| c.parse::<u64>().ok()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    fake.file_fetches.fetch_add(1, Ordering::Relaxed);
    ([(header::CONTENT_TYPE, "image/png")], fake.image(counter)).into_response()
}

/// Render the pictures, check them, and serve the fake on 127.0.0.1:0.
async fn start_fake(args: &Args) -> Arc<Fake> {
    let side = ((args.size_mb * 1e6 / 3.0).sqrt().round() as u32).max(16);
    let started = Instant::now();
    let mut pictures = Vec::with_capacity(args.pictures);
    for seed in 0..args.pictures.max(1) as u64 {
        let png = bench::render_png(seed, side);
        assert_eq!(&png[12..16], b"IHDR", "IHDR must follow the signature");
        let head: [u8; HEAD_LEN] = png[..HEAD_LEN].try_into().unwrap();
        let rest = Bytes::copy_from_slice(&png[HEAD_LEN..]);
        let rest_b64 = Bytes::from(BASE64.encode(&rest));
        pictures.push(Picture { head, rest, rest_b64 });
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake upstream");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let fake = Arc::new(Fake {
        base,
        pictures,
        counter: AtomicU64::new(1),
        generations: AtomicU64::new(0),
        file_fetches: AtomicU64::new(0),
    });
    // A stamped image must still be a valid PNG, and its base64 must be what the fake sends.
    let sample = fake.image(u64::MAX / 1000);
    let decoded = image::load_from_memory(&sample).expect("a stamped image decodes as a PNG");
    assert_eq!((decoded.width(), decoded.height()), (side, side));
    assert_eq!(stamp_of(&sample), Some(u64::MAX / 1000));
    let answer: Value = serde_json::from_slice(&fake.gpt_answer(1)).expect("the GPT answer is JSON");
    let b64 = answer["data"][0]["b64_json"].as_str().unwrap();
    let bytes = BASE64.decode(b64).expect("valid base64");
    assert_eq!(bytes.len(), fake.image_len());
    assert_eq!(bytes, fake.image(stamp_of(&bytes).unwrap()));
    eprintln!(
        "fake upstream on {}: {} pictures of {side}×{side} px, {} bytes each ({} as base64), rendered in {:.1?}",
        fake.base,
        fake.pictures.len(),
        fake.image_len(),
        fake.b64_len(),
        started.elapsed()
    );
    let app = Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/files/{name}", get(file))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("fake upstream serves") });
    fake
}

// ---------------------------------------------------------------------------------------------------------
// Gateway processes
// ---------------------------------------------------------------------------------------------------------

/// Gateway A (images.rehost off, the reference) or B (on, the one measured).
struct Side {
    label: &'static str,
    rehost: bool,
    /// Its data directory: the stored images and the SQLite files.
    data: PathBuf,
    gateway: Gateway,
}

impl Side {
    fn start(bin: &Path, label: &'static str, rehost: bool, upstream: &str, key: &NewKey) -> Side {
        let dir = tempfile::Builder::new().prefix("imagegate-bench-").tempdir().expect("temp dir");
        let data = bench::data_dir(dir.path());
        let sections = format!(
            "[cache]\nenabled = false\n\
             [images]\nrehost = {rehost}\n\
             [images.download]\nallowed_hosts = [\"127.0.0.1\"]\nprivate_hosts = [\"127.0.0.1\"]\nallow_http = true\n"
        );
        let gateway = Gateway::start(bin, dir, &format!("gateway {label}"), upstream, &sections, key);
        eprintln!("gateway {label} (images.rehost = {rehost}) pid {} on {}", gateway.pid(), gateway.root);
        Side { label, rehost, data, gateway }
    }

    /// Bytes and files under the local image store, and the size of the SQLite files.
    fn disk_usage(&self) -> (u64, u64, u64) {
        let (bytes, files) = dir_usage(&self.data.join("images"));
        let db: u64 = ["imagegate.db", "imagegate.db-wal", "imagegate.db-shm"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.data.join(f)).ok())
            .map(|m| m.len())
            .sum();
        (bytes, files, db)
    }
}

fn dir_usage(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else { return total };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (b, f) = dir_usage(&entry.path());
            total = (total.0 + b, total.1 + f);
        } else {
            total = (total.0 + meta.len(), total.1 + 1);
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------------------

/// What a successful answer must contain.
#[derive(Debug, Clone)]
enum Expect {
    /// `n` links starting with this prefix (the fake's files, or the gateway's signed links).
    Links(String),
    /// `n` base64 images: only the length is checked, to keep the client's CPU out of the way.
    Base64 { min_len: usize },
}

/// One measured batch.
#[derive(Debug, Default)]
struct Run {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
    bytes_in: u64,
    /// A few of the links handed out, to check afterwards that they serve the right bytes.
    links: Vec<String>,
}

struct Outcome {
    latency: Duration,
    result: Result<(u64, Vec<String>), String>,
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: Bytes,
    n: usize,
    expect: &Expect,
) -> Outcome {
    let started = Instant::now();
    let sent =
        client.post(url).bearer_auth(key).header(header::CONTENT_TYPE, "application/json").body(body).send().await;
    let (latency, answer) = bench::read_answer(started, sent).await;
    let body = match answer {
        Ok((_, body)) => body,
        Err(e) => return Outcome { latency, result: Err(e) },
    };
    let result = match expect {
        Expect::Base64 { min_len } => {
            if body.len() >= *min_len && body.starts_with(b"{") {
                Ok((body.len() as u64, Vec::new()))
            } else {
                Err(format!("answer of {} bytes, expected at least {min_len}", body.len()))
            }
        }
        Expect::Links(prefix) => {
            let parsed: Result<Value, _> = serde_json::from_slice(&body);
            let links: Vec<String> = parsed
                .ok()
                .and_then(|v| v.get("data").and_then(Value::as_array).cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|item| item.get("url").and_then(Value::as_str).map(str::to_owned))
                .filter(|u| u.starts_with(prefix.as_str()))
                .collect();
            if links.len() == n {
                Ok((body.len() as u64, links))
            } else {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                Err(format!("expected {n} links starting with {prefix}: {text}"))
            }
        }
    };
    Outcome { latency, result }
}

/// What every request of a run sends and expects.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    key: String,
    body: Bytes,
    n: usize,
    expect: Expect,
}

/// `total` requests, `concurrency` at a time, each timed from send to the last byte of the answer.
async fn load(client: &reqwest::Client, target: &Target, total: usize, concurrency: usize) -> Run {
    let (client, target) = (client.clone(), Arc::new(target.clone()));
    let request = move || {
        let (client, t) = (client.clone(), target.clone());
        async move { one_request(&client, &t.url, &t.key, t.body.clone(), t.n, &t.expect).await }
    };
    let (outcomes, wall) = bench::closed_loop(concurrency, total, None, request, Vec::push).await;
    let mut run = Run { wall, ..Run::default() };
    for worker in outcomes {
        for outcome in worker {
            match outcome.result {
                Ok((bytes, links)) => {
                    run.latencies.push(outcome.latency);
                    run.bytes_in += bytes;
                    if run.links.len() < 4 {
                        run.links.extend(links.into_iter().take(1));
                    }
                }
                Err(e) => {
                    run.errors += 1;
                    run.first_error.get_or_insert(e);
                }
            }
        }
    }
    run
}

/// Latency figures of one run, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    ok: usize,
    errors: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
    max: f64,
    rps: f64,
    avg_answer: f64,
}

fn stats(run: &Run) -> Stats {
    let mut ms: Vec<f64> = run.latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let ok = ms.len();
    Stats {
        ok,
        errors: run.errors,
        p50: percentile(&ms, 50.0),
        p90: percentile(&ms, 90.0),
        p99: percentile(&ms, 99.0),
        mean: if ok == 0 { f64::NAN } else { ms.iter().sum::<f64>() / ok as f64 },
        max: ms.last().copied().unwrap_or(f64::NAN),
        rps: ok as f64 / run.wall.as_secs_f64().max(1e-9),
        avg_answer: if ok == 0 { 0.0 } else { run.bytes_in as f64 / ok as f64 },
    }
}

/// Download links the gateway handed out and check they serve exactly the image the fake produced.
async fn verify_links(client: &reqwest::Client, fake: &Fake, links: &[String]) -> Result<usize, String> {
    for link in links {
        let response = client.get(link).send().await.map_err(|e| format!("GET {link}: {e}"))?;
        let status = response.status();
        let content_type =
            response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let bytes = response.bytes().await.map_err(|e| format!("GET {link}: {e}"))?;
        if !status.is_success() || content_type != "image/png" {
            return Err(format!("GET {link}: HTTP {status}, content type {content_type:?}"));
        }
        let counter = stamp_of(&bytes).ok_or_else(|| format!("{link} serves an image without the fake's stamp"))?;
        if bytes != fake.image(counter) {
            return Err(format!("{link} does not serve the bytes of image {counter}"));
        }
    }
    Ok(links.len())
}

// ---------------------------------------------------------------------------------------------------------
// In-process breakdown of the re-hosting steps
// ---------------------------------------------------------------------------------------------------------

/// Each step the gateway performs per re-hosted image, timed alone, one at a time, with the library's own code
/// where it is public (fetcher, store, repository) and the same crates elsewhere.
async fn breakdown(fake: &Arc<Fake>, iterations: usize) -> Vec<(&'static str, Vec<Duration>)> {
    let dir = tempfile::Builder::new().prefix("imagegate-bench-steps-").tempdir().expect("temp dir");
    let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.expect("SQLite");
    let storage = StorageSettings { data_dir: dir.path().to_path_buf(), ..StorageSettings::default() };
    let store = ImageStore::open(&storage, db.clone()).expect("image store");
    let repo = ImageRepo::new(db.clone());
    let raw_dir = dir.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let objects = object_store::local::LocalFileSystem::new_with_prefix(&raw_dir).unwrap();
    let fetcher = Fetcher::new(&DownloadSettings {
        allowed_hosts: vec!["127.0.0.1".into()],
        private_hosts: vec!["127.0.0.1".into()],
        allow_http: true,
        ..DownloadSettings::default()
    })
    .expect("fetcher");

    let names = [
        "download over loopback (guarded fetcher)",
        "parse the upstream GPT answer (JSON → Value)",
        "take the base64 string out of the Value (moved)",
        "base64 decode",
        "SHA-256 of the image",
        "write the object (object_store local put)",
        "SQLite: upsert blob row + insert image row",
        "re-encode the rewritten answer (Value → JSON)",
        "ImageStore::put, whole (sniff, inspect, SHA-256, 2 SQL, write)",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    for i in 0..iterations {
        // Download a fresh image, as the DALL·E path does.
        let counter = fake.counter.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let fetched = fetcher.fetch(&format!("{}/files/{counter}.png", fake.base)).await.expect("download");
        times[0].push(t.elapsed());
        assert_eq!(fetched.bytes.len(), fake.image_len());

        // Decode a fresh GPT answer, as the GPT path does.
        let answer = Bytes::from(fake.gpt_answer(1));
        let t = Instant::now();
        let mut value: Value = serde_json::from_slice(&answer).unwrap();
        times[1].push(t.elapsed());
        let t = Instant::now();
        // Moved out of the parsed answer, as `Job::take_from` does (no copy).
        let b64 = match &mut value["data"][0]["b64_json"] {
            Value::String(b64) => std::mem::take(b64),
            other => panic!("the fake's answer has no b64_json string: {other}"),
        };
        times[2].push(t.elapsed());
        let t = Instant::now();
        let image = Bytes::from(BASE64.decode(b64.as_bytes()).unwrap());
        times[3].push(t.elapsed());
        drop(b64);

        let t = Instant::now();
        let sha = hex::encode(Sha256::digest(&image));
        times[4].push(t.elapsed());

        let t = Instant::now();
        let path = object_store::path::Path::from(format!("images/{}/{sha}", &sha[..2]));
        objects.put(&path, object_store::PutPayload::from_bytes(image.clone())).await.unwrap();
        times[5].push(t.elapsed());

        let now = i64::try_from(unix_now()).unwrap_or(0) * 1000;
        let row = StoredImage {
            id: format!("{:032x}", rand::random::<u128>()),
            tenant_id: "bench".into(),
            sha256: sha.clone(),
            content_type: "image/png".into(),
            bytes: image.len() as u64,
            width: Some(1),
            height: Some(1),
            model: "gpt-image-1".into(),
            request_id: format!("req-{i}"),
            created_at: now,
            expires_at: now + 86_400_000,
        };
        let t = Instant::now();
        repo.upsert_blob(&row).await.unwrap();
        repo.insert_image(&row).await.unwrap();
        times[6].push(t.elapsed());

        let t = Instant::now();
        if let Some(item) = value["data"][0].as_object_mut() {
            item.remove("b64_json");
            item.insert("url".into(), json!(format!("http://gw/images/files/{}.png?expires=1&signature=x", row.id)));
        }
        let encoded = serde_json::to_vec(&value).unwrap();
        times[7].push(t.elapsed());
        assert!(encoded.len() < 2000);

        let fresh = fake.image(fake.counter.fetch_add(1, Ordering::Relaxed));
        let t = Instant::now();
        store
            .put(NewImage {
                tenant_id: "bench",
                model: "gpt-image-1",
                request_id: "req",
                content: Content::bytes(fresh),
                retention: Duration::from_secs(86_400),
            })
            .await
            .unwrap();
        times[8].push(t.elapsed());
    }
    db.close().await;
    names.into_iter().zip(times).collect()
}

// ---------------------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------------------

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn signed_ms(v: f64) -> String {
    if v.is_nan() { "–".into() } else { format!("{}{}", if v >= 0.0 { "+" } else { "" }, ms(v)) }
}

fn bytes_human(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(args.n >= 1 && args.n <= 10, "--n must be 1..=10");
    let bin = bench::gateway_binary(args.gateway_bin.as_deref());
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the benchmark; run it with --release");
    }
    let fake = start_fake(&args).await;
    let key = keys::generate();
    let mut sides = [Side::start(&bin, "A", false, &fake.base, &key), Side::start(&bin, "B", true, &fake.base, &key)];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(args.concurrency.max(1) * 2)
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline: Vec<Memory> = sides.iter().map(|s| s.gateway.memory()).collect();

    let scenarios: Vec<Scenario> = match args.scenario {
        Only::Both => vec![Scenario::Dalle, Scenario::Gpt],
        Only::Dalle => vec![Scenario::Dalle],
        Only::Gpt => vec![Scenario::Gpt],
    };
    let n = args.n as usize;
    // (scenario, gateway index, stats)
    let mut results: Vec<(Scenario, usize, Stats)> = Vec::new();
    let mut memory_after: Vec<(Scenario, Vec<Memory>)> = Vec::new();
    let mut verified = Vec::new();
    for &scenario in &scenarios {
        for (g, side) in sides.iter().enumerate() {
            let expect = match (scenario, side.rehost) {
                (_, true) => Expect::Links(format!("{}/images/files/", side.gateway.root)),
                (Scenario::Dalle, false) => Expect::Links(format!("{}/files/", fake.base)),
                (Scenario::Gpt, false) => Expect::Base64 { min_len: n * fake.b64_len() },
            };
            let target = Target {
                url: format!("{}/v1/images/generations", side.gateway.root),
                key: key.key.clone(),
                body: scenario.body(args.n, side.rehost),
                n,
                expect,
            };
            eprintln!("{} on gateway {}: warm-up ({} requests)…", scenario.short(), side.label, args.warmup);
            let warm = load(&client, &target, args.warmup, args.concurrency).await;
            if let Some(e) = &warm.first_error {
                eprintln!("  warm-up errors: {} (first: {e})", warm.errors);
            }
            eprintln!(
                "{} on gateway {}: {} requests, concurrency {}…",
                scenario.short(),
                side.label,
                args.images,
                args.concurrency
            );
            let run = load(&client, &target, args.images, args.concurrency).await;
            let s = stats(&run);
            eprintln!(
                "  ok {} errors {} p50 {} ms p99 {} ms {:.1} req/s{}",
                s.ok,
                s.errors,
                ms(s.p50),
                ms(s.p99),
                s.rps,
                run.first_error.as_ref().map(|e| format!(" (first error: {e})")).unwrap_or_default()
            );
            if side.rehost {
                match verify_links(&client, &fake, &run.links).await {
                    Ok(k) => verified.push(format!("{}: {k} links served the exact bytes", scenario.short())),
                    Err(e) => verified.push(format!("{}: LINK CHECK FAILED: {e}", scenario.short())),
                }
            }
            results.push((scenario, g, s));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        memory_after.push((scenario, sides.iter().map(|s| s.gateway.memory()).collect()));
    }

    let steps = if args.breakdown > 0 {
        eprintln!("in-process breakdown: {} iterations…", args.breakdown);
        breakdown(&fake, args.breakdown).await
    } else {
        Vec::new()
    };

    let disk = sides[1].disk_usage();
    let warnings: Vec<(&str, Vec<String>)> = sides.iter().map(|s| (s.label, s.gateway.warnings())).collect();
    let exits: Vec<(&str, String)> = sides.iter_mut().map(|s| (s.label, s.gateway.stop())).collect();

    // ----- the report -----
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "### Run: `--images {} --concurrency {} --size-mb {} --n {}` (warm-up {})",
        args.images, args.concurrency, args.size_mb, args.n, args.warmup
    ));
    line(String::new());
    line("| | |".into());
    line("|---|---|".into());
    for (k, v) in bench::machine(&bin) {
        line(format!("| {k} | {v} |"));
    }
    line(format!(
        "| image | {} bytes PNG ({} bytes as base64), {} distinct pictures, every answer unique |",
        fake.image_len(),
        fake.b64_len(),
        fake.pictures.len()
    ));
    line(String::new());
    line("Latency is per request, from sending it to the last byte of the answer, at the client.".into());
    line(String::new());
    line("| scenario | gateway | ok/err | p50 ms | p90 ms | p99 ms | mean ms | max ms | req/s | images/s | answer size |".into());
    line("|---|---|---|---|---|---|---|---|---|---|---|".into());
    for (scenario, g, s) in &results {
        let gw = if sides[*g].rehost { "B re-host" } else { "A reference" };
        line(format!(
            "| {} | {gw} | {}/{} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} |",
            scenario.short(),
            s.ok,
            s.errors,
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.mean),
            ms(s.max),
            s.rps,
            s.rps * n as f64,
            bytes_human(s.avg_answer)
        ));
    }
    line(String::new());
    line(format!("Added latency per image, B − A (divided by n = {n}):"));
    line(String::new());
    line("| scenario | p50 | p90 | p99 | mean | throughput B/A |".into());
    line("|---|---|---|---|---|---|".into());
    for &scenario in &scenarios {
        let get = |g: usize| results.iter().find(|(s, i, _)| *s == scenario && *i == g).map(|(_, _, st)| *st);
        if let (Some(a), Some(b)) = (get(0), get(1)) {
            let d = |x: f64, y: f64| (y - x) / n as f64;
            line(format!(
                "| {} | {} ms | {} ms | {} ms | {} ms | {:.2} |",
                scenario.short(),
                signed_ms(d(a.p50, b.p50)),
                signed_ms(d(a.p90, b.p90)),
                signed_ms(d(a.p99, b.p99)),
                signed_ms(d(a.mean, b.mean)),
                b.rps / a.rps
            ));
        }
    }
    line(String::new());
    line("Memory of each gateway process (MiB, from /proc/<pid>/status; VmHWM is the peak since start):".into());
    line(String::new());
    let mut header = "| gateway | RSS at start |".to_owned();
    let mut rule = "|---|---|".to_owned();
    for (scenario, _) in &memory_after {
        header.push_str(&format!(" after {}: RSS / peak |", scenario.short()));
        rule.push_str("---|");
    }
    line(header);
    line(rule);
    for (g, side) in sides.iter().enumerate() {
        let mut row =
            format!("| {} | {} |", if side.rehost { "B re-host" } else { "A reference" }, mib(baseline[g].rss_kib));
        for (_, mem) in &memory_after {
            row.push_str(&format!(" {} / **{}** |", mib(mem[g].rss_kib), mib(mem[g].hwm_kib)));
        }
        line(row);
    }
    line(String::new());
    line(format!(
        "Gateway B stored {} files, {} on disk; its SQLite files take {}. Link checks: {}.",
        disk.1,
        bytes_human(disk.0 as f64),
        bytes_human(disk.2 as f64),
        if verified.is_empty() { "none".into() } else { verified.join("; ") }
    ));
    let expected = scenarios.len() * sides.len() * (args.warmup + args.images);
    let generations = fake.generations.load(Ordering::Relaxed) as usize;
    line(format!(
        "The fake answered {generations} generation requests ({}) and served {} image downloads.",
        if generations == expected { "every request reached it".to_owned() } else { format!("EXPECTED {expected}") },
        fake.file_fetches.load(Ordering::Relaxed)
    ));
    if !steps.is_empty() {
        line(String::new());
        line(format!(
            "Steps of re-hosting one image, timed alone in-process, one at a time ({} iterations):",
            args.breakdown
        ));
        line(String::new());
        line("| step | median ms | mean ms |".into());
        line("|---|---|---|".into());
        for (name, times) in &steps {
            let mut v: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            v.sort_by(f64::total_cmp);
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            line(format!("| {name} | {:.2} | {:.2} |", percentile(&v, 50.0), mean));
        }
    }
    line(String::new());
    for (label, lines) in &warnings {
        if !lines.is_empty() {
            line(format!("Gateway {label} logged {} warning/error lines; first:", lines.len()));
            for l in lines.iter().take(3) {
                line(format!("    {l}"));
            }
        }
    }
    for (label, exit) in &exits {
        line(format!("Gateway {label} stopped on SIGTERM: {exit}."));
    }
    println!("{out}");
}
