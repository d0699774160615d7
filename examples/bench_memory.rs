//! Memory benchmark (issue 17): the peak resident memory (VmHWM) of the release gateway while it holds large
//! uploads or many waiting requests, against a fake OpenAI upstream in this process.
//!
//! - `edits`: multipart edits of `--images` PNG files of `--size-mb` each, `--concurrency` at a time; the
//!   fake reads every upload to its end (and checks its length) before it answers. The figure to compare is
//!   the gateway's peak against the bytes in flight (concurrency × body size).
//! - `held`: `--requests` generations sent at once, which the fake answers only after `--hold-s` seconds, so
//!   the gateway holds them all at the same time; every one must complete. The figure is the peak per held
//!   request.
//!
//! Each `--bin` given runs in turn, `--rounds` times, alternating, one gateway at a time. Run it through
//! `scripts/bench-edits.sh` or `scripts/bench-held.sh`, which build it and the gateway and raise the
//! open-files limit. Results: docs/performance.md.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark program run by hand: it prints its report and stops loudly on any failure"
)]

#[allow(dead_code, reason = "shared with the other benchmarks, which use more of it")]
#[path = "support/bench.rs"]
mod bench;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use clap::Parser;
use http_body_util::BodyExt as _;
use imagegate::domain::keys;

use crate::bench::{Gateway, Memory, mib};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Edits,
    Held,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Peak memory of the gateway holding big uploads or many waiting requests")]
struct Args {
    #[arg(value_enum)]
    scenario: Scenario,
    /// Gateway binaries, run one after another in each round (default: target/release/imagegate).
    #[arg(long = "bin")]
    bins: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// edits: requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// edits: requests in all; held: requests held at once.
    #[arg(long)]
    requests: Option<usize>,
    /// edits: files per request.
    #[arg(long, default_value_t = 16)]
    images: usize,
    /// edits: size of each file in MB (10^6 bytes): random RGB pixels, PNG-encoded.
    #[arg(long, default_value_t = 4.0)]
    size_mb: f64,
    /// held: seconds the fake waits before it answers.
    #[arg(long, default_value_t = 15)]
    hold_s: u64,
    /// held: pause after every 10 requests started, in ms (5,000 requests start within 5 s).
    #[arg(long, default_value_t = 10)]
    ramp_ms: u64,
    /// The fake speaks TLS and offers HTTP/2 by ALPN, as OpenAI's and Azure's front ends do (its certificate
    /// is the test CA's in `tests/fixtures/tls`, which the gateway trusts through `upstream.ca_file`), so the
    /// gateway's requests share a few HTTP/2 connections; without it, plain HTTP/1.1, one connection per
    /// request in flight.
    #[arg(long)]
    tls: bool,
    /// With `--tls`: the most streams the fake lets one HTTP/2 connection carry at once (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; default: no limit).
    #[arg(long)]
    max_streams: Option<u32>,
}

/// The fake upstream: answers edits once it has read the whole upload, generations after `hold`.
struct Fake {
    hold: Duration,
    /// Smallest upload an edit must carry (the files alone).
    min_upload: u64,
    uploads: AtomicUsize,
    short_uploads: AtomicUsize,
    held_now: AtomicUsize,
    held_peak: AtomicUsize,
    received: AtomicU64,
}

fn answer() -> Response {
    // A 1×1 PNG as GPT image models answer it: base64, with usage.
    let png = bench::render_png(1, 1);
    let body = serde_json::json!({
        "created": bench::unix_now(),
        "data": [{"b64_json": base64::engine::general_purpose::STANDARD.encode(png)}],
        "usage": {"input_tokens": 10, "output_tokens": 10, "total_tokens": 20,
                  "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}},
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn edits(State(fake): State<Arc<Fake>>, body: Body) -> Response {
    let mut body = body;
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return bench::openai_error(StatusCode::BAD_REQUEST, "broken upload") };
        len += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    fake.uploads.fetch_add(1, Ordering::Relaxed);
    fake.received.fetch_add(len, Ordering::Relaxed);
    if len < fake.min_upload {
        fake.short_uploads.fetch_add(1, Ordering::Relaxed);
    }
    answer()
}

async fn generations(State(fake): State<Arc<Fake>>, _headers: HeaderMap, _body: Bytes) -> Response {
    let now = fake.held_now.fetch_add(1, Ordering::Relaxed) + 1;
    fake.held_peak.fetch_max(now, Ordering::Relaxed);
    tokio::time::sleep(fake.hold).await;
    fake.held_now.fetch_sub(1, Ordering::Relaxed);
    answer()
}

/// Serve `app` on `listener` over TLS with the certificate `server.pem` (for `localhost`; key `server.key`) of
/// `fixtures`, offering `h2` and `http/1.1` by ALPN, at most `max_streams` streams at once per connection.
async fn serve_tls(listener: tokio::net::TcpListener, app: Router, fixtures: PathBuf, max_streams: u32) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(fixtures.join("server.pem")).unwrap().collect::<Result<Vec<_>, _>>();
    let key = PrivateKeyDer::from_pem_file(fixtures.join("server.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs.unwrap(), key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http2().max_concurrent_streams(max_streams);
            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
        });
    }
}

/// A multipart body as an SDK writes it: (content type, body).
fn multipart(files: &[Vec<u8>]) -> (String, Bytes) {
    let boundary = "bench-edits-0123456789abcdef";
    let mut out = Vec::new();
    for (name, value) in [("model", "gpt-image-1"), ("prompt", "a benchmark"), ("size", "1024x1024")] {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    for (i, file) in files.iter().enumerate() {
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"{i}.png\"\r\n\
                 Content-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(file);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), Bytes::from(out))
}

struct Run {
    bin: PathBuf,
    start: Memory,
    end: Memory,
    ok: usize,
    failed: Vec<String>,
    wall: Duration,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bins: Vec<PathBuf> = if args.bins.is_empty() {
        vec![bench::gateway_binary(None)]
    } else {
        args.bins.iter().map(|b| bench::gateway_binary(Some(b))).collect()
    };
    let requests = args.requests.unwrap_or(match args.scenario {
        Scenario::Edits => 4 * args.concurrency,
        Scenario::Held => 5000,
    });
    let side = ((args.size_mb * 1e6 / 3.0).sqrt()).round() as u32;
    let files: Vec<Vec<u8>> = match args.scenario {
        Scenario::Edits => {
            eprintln!("rendering {} PNGs of {side}×{side} random pixels", args.images);
            (0..args.images).map(|i| bench::render_png(i as u64 + 1, side)).collect()
        }
        Scenario::Held => Vec::new(),
    };
    let (content_type, upload) = multipart(&files);
    let fake = Arc::new(Fake {
        hold: Duration::from_secs(args.hold_s),
        min_upload: files.iter().map(|f| f.len() as u64).sum(),
        uploads: AtomicUsize::new(0),
        short_uploads: AtomicUsize::new(0),
        held_now: AtomicUsize::new(0),
        held_peak: AtomicUsize::new(0),
        received: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/images/edits", post(edits))
        .route("/v1/images/generations", post(generations))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let (upstream, upstream_lines) = if args.tls {
        tokio::spawn(serve_tls(listener, app, fixtures.clone(), args.max_streams.unwrap_or(u32::MAX)));
        (format!("https://localhost:{port}"), format!("ca_file = '{}'\n", fixtures.join("ca.pem").display()))
    } else {
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://127.0.0.1:{port}"), String::new())
    };

    let key = keys::generate();
    let sections = "[images]\nrehost = false\n[cache]\nenabled = false\n";
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for bin in &bins {
            eprintln!("round {round}: {}", bin.display());
            let dir = tempfile::tempdir().unwrap();
            // Room for every held request's connection.
            let server = format!("max_connections = {}\n", requests + 100);
            let mut gateway =
                Gateway::start_full(bin, dir, "gateway", (&upstream, &upstream_lines), &server, sections, &key);
            let start = gateway.memory();
            let client = reqwest::Client::builder().pool_max_idle_per_host(usize::MAX).build().unwrap();
            let started = Instant::now();
            let (ok, failed) = match args.scenario {
                Scenario::Edits => {
                    let url = format!("{}/v1/images/edits", gateway.root);
                    let (client, key, ct, upload) =
                        (client.clone(), key.key.clone(), content_type.clone(), upload.clone());
                    let request = move || {
                        let (client, url, key, ct, upload) =
                            (client.clone(), url.clone(), key.clone(), ct.clone(), upload.clone());
                        async move {
                            let sent = client
                                .post(url)
                                .bearer_auth(key)
                                .header(header::CONTENT_TYPE, ct)
                                .body(upload)
                                .send()
                                .await;
                            bench::read_answer(Instant::now(), sent).await.1.map(|_| ())
                        }
                    };
                    let (outcomes, _) = bench::closed_loop(args.concurrency, requests, None, request, Vec::push).await;
                    tally(outcomes.into_iter().flatten())
                }
                Scenario::Held => {
                    let url = format!("{}/v1/images/generations", gateway.root);
                    let mut tasks = Vec::with_capacity(requests);
                    for i in 0..requests {
                        // Started over a few seconds (well within the hold), not in one burst that overflows
                        // the listen queue: every request is still held at the same time.
                        if i > 0 && i % 10 == 0 {
                            tokio::time::sleep(Duration::from_millis(args.ramp_ms)).await;
                        }
                        let (client, url, key) = (client.clone(), url.clone(), key.key.clone());
                        tasks.push(tokio::spawn(async move {
                            let body = serde_json::json!({"model": "gpt-image-1", "prompt": format!("held {i}")});
                            let sent = client
                                .post(url)
                                .bearer_auth(key)
                                .header(header::CONTENT_TYPE, "application/json")
                                .header(header::CACHE_CONTROL, "no-store")
                                .body(body.to_string())
                                .timeout(Duration::from_secs(300))
                                .send()
                                .await;
                            bench::read_answer(Instant::now(), sent).await.1.map(|_| ())
                        }));
                    }
                    let mut outcomes = Vec::with_capacity(requests);
                    for task in tasks {
                        outcomes.push(task.await.unwrap());
                    }
                    tally(outcomes.into_iter())
                }
            };
            let wall = started.elapsed();
            let end = gateway.memory();
            let status = gateway.stop();
            eprintln!(
                "  {ok} ok, {} failed, {:.1} s, peak {} MiB, exit {status}",
                failed.len(),
                wall.as_secs_f64(),
                mib(end.hwm_kib)
            );
            runs.push(Run { bin: bin.clone(), start, end, ok, failed, wall });
        }
    }

    println!("## Gateway memory: {:?}\n", args.scenario);
    match args.scenario {
        Scenario::Edits => {
            let in_flight = args.concurrency as u64 * upload.len() as u64;
            println!(
                "{} multipart edits of {} PNG files ({} bytes per upload), {} at a time: {:.1} MiB in flight. The \
                 fake read {} uploads ({} bytes), {} shorter than their files.\n",
                requests,
                files.len(),
                upload.len(),
                args.concurrency,
                in_flight as f64 / 1048576.0,
                fake.uploads.load(Ordering::Relaxed),
                fake.received.load(Ordering::Relaxed),
                fake.short_uploads.load(Ordering::Relaxed),
            );
            println!(
                "| binary | ok / failed | wall s | RSS at start MiB | peak (VmHWM) MiB | peak ÷ bytes in flight |"
            );
            println!("|---|---|---|---|---|---|");
            for r in &runs {
                println!(
                    "| {} | {} / {} | {:.1} | {} | **{}** | {:.2} |",
                    r.bin.display(),
                    r.ok,
                    r.failed.len(),
                    r.wall.as_secs_f64(),
                    mib(r.start.rss_kib),
                    mib(r.end.hwm_kib),
                    (r.end.hwm_kib * 1024) as f64 / in_flight as f64
                );
            }
        }
        Scenario::Held => {
            println!(
                "{requests} generations held {} s by the fake (most held at once: {}), {}.\n",
                args.hold_s,
                fake.held_peak.load(Ordering::Relaxed),
                if args.tls { "over TLS with HTTP/2 offered" } else { "over plain HTTP/1.1" }
            );
            println!("| binary | ok / failed | wall s | RSS at start MiB | peak (VmHWM) MiB | KiB per held request |");
            println!("|---|---|---|---|---|---|");
            for r in &runs {
                println!(
                    "| {} | {} / {} | {:.1} | {} | **{}** | {:.1} |",
                    r.bin.display(),
                    r.ok,
                    r.failed.len(),
                    r.wall.as_secs_f64(),
                    mib(r.start.rss_kib),
                    mib(r.end.hwm_kib),
                    r.end.hwm_kib.saturating_sub(r.start.rss_kib) as f64 / requests as f64
                );
            }
        }
    }
    for r in &runs {
        if let Some(first) = r.failed.first() {
            println!("\n{}: {} failed, the first: {first}", r.bin.display(), r.failed.len());
        }
    }
}

/// (answers ok, errors).
fn tally(outcomes: impl Iterator<Item = Result<(), String>>) -> (usize, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    for outcome in outcomes {
        match outcome {
            Ok(()) => ok += 1,
            Err(e) => failed.push(e),
        }
    }
    (ok, failed)
}
