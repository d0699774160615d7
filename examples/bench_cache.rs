//! Response-cache benchmark (issue 7): owns its in-process fake OpenAI upstream (small GPT image answers, calls
//! counted by kind of prompt), one release gateway process with `[cache] enabled = true`, the closed-loop load
//! of the three series (straight to the fake, through the gateway as cache misses, through the gateway as cache
//! hits), the checks on every answer, the memory and CPU readings (per gateway thread too), the usage ledger's
//! progress, the admin counters and the Markdown report printed at the end.
//!
//! Run it through `bash scripts/bench-cache.sh [--requests N] [--concurrency C] [--duration-s S]`, which builds
//! `target/release/imagegate` and this example first; `--help` lists every option. Results: docs/performance.md.
//!
//! The three series, each `--warmup` untimed requests and then the measured ones:
//! (a) direct: `POST /v1/images/generations` straight to the fake, the reference (the fake's own answer time);
//! (b) gateway miss: every request a distinct prompt, so each one goes through the gateway to the fake;
//! (c) gateway hit: one request alone (a miss that fills the entry), then the same request over and over; every
//!     answer must carry `x-imagegate-cache: hit`, be byte-identical to the first one, and the fake must have seen
//!     that prompt exactly once.
//! After each gateway series the benchmark waits for the usage ledger (one row per request, written off the
//! request path) and reports how far behind it was and whether rows were dropped.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark program run by hand: it prints its report and stops loudly on any failure"
)]

#[path = "support/bench.rs"]
mod bench;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::Parser;
use imagegate::domain::keys::{self, NewKey};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::bench::{Gateway, Memory, UPSTREAM_KEY, mib, percentile, unix_now};

/// The gateway's admin token (for `GET /admin/v1/cache` and `/admin/v1/usage`).
const ADMIN_TOKEN: &str = "bench-cache-admin-token-0123456789";
/// The one prompt of series (c).
const HIT_PROMPT: &str = "a lighthouse at dawn, asked again and again";
/// The gateway's answer header naming the cache outcome.
const CACHE_HEADER: &str = "x-imagegate-cache";
/// Linux's USER_HZ: the unit of utime/stime in /proc/<pid>/stat.
const CLOCK_TICKS_PER_S: f64 = 100.0;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Measure the response cache: a cache hit beside a cache miss and beside the fake upstream's own answer"
)]
struct Args {
    /// Measured requests per series (ignored when --duration-s is given).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once (closed loop: each task sends its next request when the last one is answered).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Measure each series for this many seconds instead of a number of requests.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Untimed requests per series before the measured ones.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Side in pixels of the square PNG the fake answers (random RGB, so about side² × 3 bytes; 32 ≈ 3 KB).
    #[arg(long, default_value_t = 32)]
    image_side: u32,
    /// The gateway binary; default: `imagegate` next to this example's directory (target/release).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------------------
// The fake upstream
// ---------------------------------------------------------------------------------------------------------

/// The fake OpenAI: `POST /v1/images/generations` for GPT image models, answered at once with one small PNG.
struct Fake {
    /// `http://127.0.0.1:PORT`
    base: String,
    png_len: usize,
    /// Everything of the answer after `{"created":<unix time>`.
    tail: Vec<u8>,
    direct_calls: AtomicU64,
    miss_calls: AtomicU64,
    hit_calls: AtomicU64,
    other_calls: AtomicU64,
}

/// What the fake reads of a request.
#[derive(Deserialize)]
struct GenerationRequest {
    model: String,
    prompt: String,
    #[serde(default)]
    n: Option<u64>,
}

impl Fake {
    /// A GPT image answer like OpenAI's for `quality: low` at 1024×1024 (272 output tokens), fresh `created`.
    fn answer(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.tail.len() + 24);
        out.extend_from_slice(b"{\"created\":");
        out.extend_from_slice(unix_now().to_string().as_bytes());
        out.extend_from_slice(&self.tail);
        out
    }

    /// Length of every answer (`created` has 10 digits until 2286).
    fn answer_len(&self) -> usize {
        self.answer().len()
    }
}

async fn generations(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    let request: GenerationRequest = match bench::read_request(&headers, &body) {
        Ok(request) => request,
        Err(answer) => return *answer,
    };
    if !request.model.starts_with("gpt-image") || request.n.unwrap_or(1) != 1 {
        return bench::openai_error(StatusCode::BAD_REQUEST, "This fake answers gpt-image-* with n = 1 only.");
    }
    let counter = if request.prompt == HIT_PROMPT {
        &fake.hit_calls
    } else if request.prompt.starts_with("miss #") {
        &fake.miss_calls
    } else if request.prompt.starts_with("direct #") {
        &fake.direct_calls
    } else {
        &fake.other_calls
    };
    counter.fetch_add(1, Ordering::Relaxed);
    ([(header::CONTENT_TYPE, "application/json")], fake.answer()).into_response()
}

/// Render the picture, build the answer and serve the fake on 127.0.0.1:0.
async fn start_fake(side: u32) -> Arc<Fake> {
    let png = bench::render_png(7, side.max(1));
    let tail = format!(
        ",\"data\":[{{\"b64_json\":\"{}\"}}],\"background\":\"opaque\",\"output_format\":\"png\",\
         \"size\":\"1024x1024\",\"quality\":\"low\",\"usage\":{{\"total_tokens\":279,\"input_tokens\":7,\
         \"output_tokens\":272,\"input_tokens_details\":{{\"text_tokens\":7,\"image_tokens\":0}},\
         \"output_tokens_details\":{{\"image_tokens\":272,\"text_tokens\":0}}}}}}",
        BASE64.encode(&png)
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake upstream");
    let fake = Arc::new(Fake {
        base: format!("http://{}", listener.local_addr().unwrap()),
        png_len: png.len(),
        tail: tail.into_bytes(),
        direct_calls: AtomicU64::new(0),
        miss_calls: AtomicU64::new(0),
        hit_calls: AtomicU64::new(0),
        other_calls: AtomicU64::new(0),
    });
    // The answer must be JSON whose image decodes to the picture.
    let answer: Value = serde_json::from_slice(&fake.answer()).expect("the answer is JSON");
    let decoded = BASE64.decode(answer["data"][0]["b64_json"].as_str().unwrap()).expect("valid base64");
    assert_eq!(decoded, png);
    assert_eq!(image::load_from_memory(&decoded).expect("a PNG").width(), side.max(1));
    eprintln!(
        "fake upstream on {}: {}×{} px PNG of {} bytes, answers of {} bytes",
        fake.base,
        side,
        side,
        fake.png_len,
        fake.answer_len()
    );
    let app = Router::new().route("/v1/images/generations", post(generations)).with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("fake upstream serves") });
    fake
}

// ---------------------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------------------

/// The one gateway: the cache and re-hosting on, the admin API for the cache counters and the usage ledger.
fn start_gateway(bin: &Path, upstream: &str, key: &NewKey) -> Gateway {
    let dir = tempfile::Builder::new().prefix("imagegate-bench-cache-").tempdir().expect("temp dir");
    let sections = format!("[images]\nrehost = true\n[cache]\nenabled = true\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n");
    let gateway = Gateway::start(bin, dir, "the gateway", upstream, &sections, key);
    eprintln!("gateway pid {} on {} (cache on, images.rehost = true)", gateway.pid(), gateway.root);
    gateway
}

/// How many usage rows the gateway said it dropped (one log line each).
fn dropped_usage_rows(gateway: &Gateway) -> usize {
    gateway.lines(|l| l.contains("a usage row was dropped")).len()
}

/// CPU time (user + system) in clock ticks from a `/proc/.../stat` file: a process's (all its threads, also
/// those that ended) or one thread's (`/proc/<pid>/task/<tid>/stat`).
fn cpu_ticks(stat_path: &Path) -> u64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); the rest starts at field 3.
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Busy CPU ticks of the whole machine (all cores, every process and the kernel), from the first line of
/// `/proc/stat`: everything but idle and iowait.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next().and_then(|l| l.strip_prefix("cpu ")) else { return 0 };
    let fields: Vec<u64> = cpu.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already counted in user).
    fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

/// CPU ticks of a process's live threads, summed by thread name (`tokio-rt-worker`, `sqlx-sqlite-wor`, …).
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return by_name };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_owned();
        *by_name.entry(name).or_default() += cpu_ticks(&path.join("stat"));
    }
    by_name
}

// ---------------------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Series {
    Direct,
    Miss,
    Hit,
}

impl Series {
    fn title(self) -> &'static str {
        match self {
            Series::Direct => "(a) direct to the fake",
            Series::Miss => "(b) gateway, cache miss",
            Series::Hit => "(c) gateway, cache hit",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Series::Direct => "client → fake",
            Series::Miss => "client → gateway → fake",
            Series::Hit => "client → gateway (memory)",
        }
    }

    /// The `x-imagegate-cache` every answer must carry (`None`: none, the fake sends no such header).
    fn cache_header(self) -> Option<&'static str> {
        match self {
            Series::Direct => None,
            Series::Miss => Some("miss"),
            Series::Hit => Some("hit"),
        }
    }
}

/// How long a run lasts.
#[derive(Debug, Clone, Copy)]
enum Amount {
    Requests(usize),
    For(Duration),
}

/// What every request of a series sends and expects.
#[derive(Clone)]
struct Target {
    series: Series,
    url: String,
    authorization: HeaderValue,
    /// Numbers distinct prompts (series (a) and (b)).
    prompts: Arc<AtomicU64>,
    /// Series (c): the one request body, and the exact answer every request must get.
    fixed: Option<(Bytes, Bytes)>,
    /// Length of every answer of series (a) and (b).
    answer_len: usize,
}

fn generation_body(prompt: &str) -> Bytes {
    let body = json!({"model": "gpt-image-1", "prompt": prompt, "size": "1024x1024", "quality": "low"});
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

impl Target {
    fn body(&self) -> Bytes {
        match (&self.fixed, self.series) {
            (Some((body, _)), _) => body.clone(),
            (None, Series::Miss) => generation_body(&format!("miss #{}", self.prompts.fetch_add(1, Ordering::Relaxed))),
            (None, _) => generation_body(&format!("direct #{}", self.prompts.fetch_add(1, Ordering::Relaxed))),
        }
    }
}

/// One worker's (or one run's) results.
#[derive(Debug, Default)]
struct Run {
    /// Latencies of successful requests, in nanoseconds.
    latencies: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
}

impl Run {
    /// One request's latency and outcome.
    fn record(&mut self, (latency, result): (Duration, Result<(), String>)) {
        match result {
            Ok(()) => self.latencies.push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Run) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// One request, timed from sending it to the last byte of the answer, and checked.
async fn one_request(client: &reqwest::Client, target: &Target) -> (Duration, Result<(), String>) {
    let body = target.body();
    let started = Instant::now();
    let sent = client
        .post(&target.url)
        .header(header::AUTHORIZATION, target.authorization.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let (latency, answer) = bench::read_answer(started, sent).await;
    let (headers, answer) = match answer {
        Ok(answer) => answer,
        Err(e) => return (latency, Err(e)),
    };
    let cache = headers.get(CACHE_HEADER).map(|v| v.to_str().unwrap_or("<not UTF-8>"));
    if cache != target.series.cache_header() {
        return (latency, Err(format!("{CACHE_HEADER}: {cache:?}, expected {:?}", target.series.cache_header())));
    }
    let ok = match &target.fixed {
        Some((_, expected)) => answer == *expected,
        None => answer.len() == target.answer_len,
    };
    if !ok {
        let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
        return (latency, Err(format!("unexpected answer of {} bytes: {text}", answer.len())));
    }
    (latency, Ok(()))
}

/// Closed loop: `concurrency` tasks share one client; each sends its next request when its last one is answered,
/// until `amount` is reached.
async fn load(client: &reqwest::Client, target: &Target, amount: Amount, concurrency: usize) -> Run {
    let (total, duration) = match amount {
        Amount::Requests(n) => (n, None),
        Amount::For(d) => (usize::MAX, Some(d)),
    };
    let (client, target) = (client.clone(), Arc::new(target.clone()));
    let request = move || {
        let (client, target) = (client.clone(), target.clone());
        async move { one_request(&client, &target).await }
    };
    let (runs, wall) = bench::closed_loop(concurrency, total, duration, request, Run::record).await;
    let mut run = Run { wall, ..Run::default() };
    for other in runs {
        run.merge(other);
    }
    run
}

// ---------------------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------------------

/// One measured series, latencies in microseconds.
#[derive(Debug, Clone, Default)]
struct Stats {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
    wall_s: f64,
    /// CPU used per answered request, µs: by the gateway, and by this process (load generator + fake).
    gateway_cpu_us: f64,
    bench_cpu_us: f64,
    /// The gateway's CPU per request by thread name, µs, largest first.
    gateway_threads: Vec<(String, f64)>,
    /// Share of the machine's cores busy during the run (gateway, this process), in %.
    gateway_cores: f64,
    bench_cores: f64,
    /// Everything else the machine did meanwhile (other processes, the kernel's own work), in %: a noisy
    /// neighbour shows here.
    other_cores: f64,
    memory_after: Memory,
    /// Failed or unexpected answers among the warm-up requests.
    warmup_errors: usize,
}

/// CPU ticks used so far: by the gateway, by this process, and by the gateway's threads by name.
struct CpuMark {
    gateway: u64,
    bench: u64,
    machine: u64,
    threads: BTreeMap<String, u64>,
}

fn cpu_now(gateway: &Gateway) -> CpuMark {
    let pid = gateway.pid();
    CpuMark {
        gateway: cpu_ticks(Path::new(&format!("/proc/{pid}/stat"))),
        bench: cpu_ticks(Path::new("/proc/self/stat")),
        machine: machine_busy_ticks(),
        threads: thread_ticks(pid),
    }
}

fn stats(mut run: Run, before: &CpuMark, after: &CpuMark, memory_after: Memory) -> Stats {
    run.latencies.sort_unstable();
    let micros: Vec<f64> = run.latencies.iter().map(|&ns| ns as f64 / 1000.0).collect();
    let ok = run.latencies.len();
    let wall_s = run.wall.as_secs_f64().max(1e-9);
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let seconds = |ticks: u64| ticks as f64 / CLOCK_TICKS_PER_S;
    let gateway_s = seconds(after.gateway.saturating_sub(before.gateway));
    let bench_s = seconds(after.bench.saturating_sub(before.bench));
    let machine_s = seconds(after.machine.saturating_sub(before.machine));
    let per_request = |s: f64| if ok == 0 { f64::NAN } else { s * 1e6 / ok as f64 };
    let mut gateway_threads: Vec<(String, f64)> = after
        .threads
        .iter()
        .map(|(name, &t)| (name.clone(), seconds(t.saturating_sub(before.threads.get(name).copied().unwrap_or(0)))))
        .collect();
    let live: f64 = gateway_threads.iter().map(|(_, s)| s).sum();
    gateway_threads.push(("threads that ended".to_owned(), (gateway_s - live).max(0.0)));
    gateway_threads.retain(|(_, s)| *s > 0.0);
    gateway_threads.sort_by(|x, y| y.1.total_cmp(&x.1));
    let gateway_threads = gateway_threads.into_iter().map(|(name, s)| (name, per_request(s))).collect();
    Stats {
        ok,
        errors: run.errors,
        first_error: run.first_error,
        rps: ok as f64 / wall_s,
        p50: percentile(&micros, 50.0),
        p90: percentile(&micros, 90.0),
        p99: percentile(&micros, 99.0),
        max: micros.last().copied().unwrap_or(f64::NAN),
        mean: if ok == 0 { f64::NAN } else { run.latencies.iter().sum::<u64>() as f64 / ok as f64 / 1000.0 },
        wall_s,
        gateway_cpu_us: per_request(gateway_s),
        bench_cpu_us: per_request(bench_s),
        gateway_threads,
        gateway_cores: gateway_s / wall_s / cores * 100.0,
        bench_cores: bench_s / wall_s / cores * 100.0,
        other_cores: (machine_s - gateway_s - bench_s).max(0.0) / wall_s / cores * 100.0,
        memory_after,
        warmup_errors: 0,
    }
}

/// Warm up, then measure one series.
async fn series(
    client: &reqwest::Client,
    gateway: &Gateway,
    target: &Target,
    args: &Args,
    amount: Amount,
) -> (Stats, usize) {
    eprintln!("{}: warm-up, {} requests…", target.series.title(), args.warmup);
    let warm = load(client, target, Amount::Requests(args.warmup), args.concurrency).await;
    if let Some(e) = &warm.first_error {
        eprintln!("  warm-up errors: {} (first: {e})", warm.errors);
    }
    let warm_sent = warm.latencies.len() + warm.errors;
    eprintln!("{}: measuring {amount:?}, concurrency {}…", target.series.title(), args.concurrency);
    let before = cpu_now(gateway);
    let run = load(client, target, amount, args.concurrency).await;
    let after = cpu_now(gateway);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = stats(run, &before, &after, gateway.memory());
    s.warmup_errors = warm.errors;
    eprintln!(
        "  ok {} errors {} {:.0} req/s p50 {} µs p99 {} µs max {} µs{}",
        s.ok,
        s.errors,
        s.rps,
        us(s.p50),
        us(s.p99),
        us(s.max),
        s.first_error.as_ref().map(|e| format!(" (first error: {e})")).unwrap_or_default()
    );
    (s, warm_sent)
}

// ---------------------------------------------------------------------------------------------------------
// Admin API
// ---------------------------------------------------------------------------------------------------------

async fn admin_get(client: &reqwest::Client, gateway: &Gateway, path: &str) -> Value {
    let response = client
        .get(format!("{}/admin/v1{path}", gateway.root))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /admin/v1{path}: {e}"));
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_else(|e| panic!("GET /admin/v1{path}: {e}"));
    assert!(status.is_success(), "GET /admin/v1{path}: HTTP {status}: {body}");
    body
}

/// What the usage ledger held after a series.
#[derive(Debug, Clone, Copy, Default)]
struct LedgerReading {
    /// Rows for the bench tenant, and those of them that are cache hits.
    rows: u64,
    hits: u64,
    /// Requests the gateway had answered by then (one row each).
    expected: u64,
    /// From the end of the series until the rows stopped growing or reached `expected`.
    waited: Duration,
    /// Rows the gateway logged as dropped (usage queue full) so far.
    dropped: usize,
}

/// Wait until the usage ledger (written in batches, off the request path) holds `expected` rows for the bench
/// tenant, or its count stops growing for 3 s (rows that were dropped never come), at most 120 s.
async fn ledger_after(client: &reqwest::Client, gateway: &Gateway, expected: u64) -> LedgerReading {
    let started = Instant::now();
    let (mut last, mut last_change) = (u64::MAX, Instant::now());
    loop {
        let report = admin_get(client, gateway, "/usage?tenant=bench").await;
        let rows = report["data"].as_array().cloned().unwrap_or_default();
        let sum = |field: &str| rows.iter().filter_map(|r| r[field].as_u64()).sum::<u64>();
        let (count, hits) = (sum("requests"), sum("cache_hits"));
        if count != last {
            (last, last_change) = (count, Instant::now());
        }
        let stalled = last_change.elapsed() > Duration::from_secs(3);
        if count >= expected || stalled || started.elapsed() > Duration::from_secs(120) {
            let waited = if stalled { last_change - started } else { started.elapsed() };
            let dropped = dropped_usage_rows(gateway);
            return LedgerReading { rows: count, hits, expected, waited, dropped };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------------------

/// Microseconds, rounded to a whole number.
fn us(v: f64) -> String {
    if v.is_nan() { "–".into() } else { format!("{v:.0}") }
}

fn signed_us(v: f64) -> String {
    if v.is_nan() { "–".into() } else { format!("{}{v:.0}", if v >= 0.0 { "+" } else { "" }) }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = bench::gateway_binary(args.gateway_bin.as_deref());
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the benchmark; run it with --release");
    }
    let amount = match args.duration_s {
        Some(s) => {
            assert!(s > 0.0, "--duration-s must be positive");
            Amount::For(Duration::from_secs_f64(s))
        }
        None => Amount::Requests(args.requests.max(1)),
    };
    let fake = start_fake(args.image_side).await;
    let key = keys::generate();
    let mut gateway = start_gateway(&bin, &fake.base, &key);
    let client = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.concurrency.max(1) * 2)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let memory_start = gateway.memory();
    let mut failures: Vec<String> = Vec::new();

    // (a) Straight to the fake.
    let direct = Target {
        series: Series::Direct,
        url: format!("{}/v1/images/generations", fake.base),
        authorization: HeaderValue::from_str(&format!("Bearer {UPSTREAM_KEY}")).unwrap(),
        prompts: Arc::new(AtomicU64::new(0)),
        fixed: None,
        answer_len: fake.answer_len(),
    };
    let (a, _) = series(&client, &gateway, &direct, &args, amount).await;

    // (b) Through the gateway, every prompt new.
    let gateway_url = format!("{}/v1/images/generations", gateway.root);
    let tenant_auth = HeaderValue::from_str(&format!("Bearer {}", key.key)).unwrap();
    let miss = Target {
        series: Series::Miss,
        url: gateway_url.clone(),
        authorization: tenant_auth.clone(),
        prompts: Arc::new(AtomicU64::new(0)),
        fixed: None,
        answer_len: fake.answer_len(),
    };
    let (b, _) = series(&client, &gateway, &miss, &args, amount).await;
    let miss_sent = miss.prompts.load(Ordering::Relaxed);
    eprintln!("(b): waiting for the usage ledger…");
    let ledger_b = ledger_after(&client, &gateway, miss_sent).await;

    // (c) Through the gateway, one request again and again: the first fills the entry.
    let hit_body = generation_body(HIT_PROMPT);
    let first = client
        .post(&gateway_url)
        .header(header::AUTHORIZATION, tenant_auth.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .body(hit_body.clone())
        .send()
        .await
        .expect("the first request of series (c)");
    assert_eq!(first.status(), 200, "the first request of series (c) failed");
    let first_outcome = first.headers().get(CACHE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let first_answer = first.bytes().await.expect("the first answer of series (c)");
    if first_outcome != "miss" {
        failures.push(format!("the first request of series (c) was answered `{CACHE_HEADER}: {first_outcome}`"));
    }
    let hit = Target {
        series: Series::Hit,
        url: gateway_url.clone(),
        authorization: tenant_auth.clone(),
        prompts: Arc::new(AtomicU64::new(0)),
        fixed: Some((hit_body, first_answer.clone())),
        answer_len: first_answer.len(),
    };
    let (c, hit_warm) = series(&client, &gateway, &hit, &args, amount).await;

    // Counters and checks.
    let cache_stats = admin_get(&client, &gateway, "/cache").await;
    let hit_requests = (hit_warm + c.ok + c.errors) as u64;
    let gateway_requests = miss_sent + 1 + hit_requests;
    eprintln!("(c): waiting for the usage ledger…");
    let ledger_c = ledger_after(&client, &gateway, gateway_requests).await;
    let calls = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (direct_calls, miss_calls, hit_calls, other_calls) =
        (calls(&fake.direct_calls), calls(&fake.miss_calls), calls(&fake.hit_calls), calls(&fake.other_calls));
    for (s, series) in [(&a, Series::Direct), (&b, Series::Miss), (&c, Series::Hit)] {
        if s.errors > 0 {
            failures.push(format!(
                "{}: {} failed or unexpected answers (first: {})",
                series.title(),
                s.errors,
                s.first_error.clone().unwrap_or_default()
            ));
        }
        if s.warmup_errors > 0 {
            failures.push(format!("{}: {} failed warm-up requests", series.title(), s.warmup_errors));
        }
    }
    if hit_calls != 1 {
        failures.push(format!("the fake saw the prompt of series (c) {hit_calls} times, not once"));
    }
    if miss_calls != miss_sent {
        failures.push(format!("{miss_sent} distinct prompts went through the gateway, the fake saw {miss_calls}"));
    }
    if other_calls != 0 {
        failures.push(format!("the fake saw {other_calls} unexpected prompts"));
    }
    let stat = |name: &str| cache_stats[name].as_u64().unwrap_or(0);
    if stat("hits") != hit_requests || stat("misses") != miss_sent + 1 || stat("coalesced") != 0 {
        failures.push(format!(
            "cache counters: {} hits / {} misses, expected {hit_requests} / {}",
            stat("hits"),
            stat("misses"),
            miss_sent + 1
        ));
    }
    for (ledger, series) in [(&ledger_b, Series::Miss), (&ledger_c, Series::Hit)] {
        if ledger.rows != ledger.expected {
            failures.push(format!(
                "usage ledger after {}: {} rows for {} requests ({} rows logged as dropped)",
                series.title(),
                ledger.rows,
                ledger.expected,
                ledger.dropped
            ));
        }
    }
    if ledger_c.hits != hit_requests {
        failures.push(format!("usage ledger: {} cache-hit rows for {hit_requests} hits", ledger_c.hits));
    }
    let warnings = gateway.warnings();
    let exit = gateway.stop();
    // Its temporary directory goes now: `process::exit` below would skip destructors.
    drop(gateway);

    // ----- the report -----
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    let measured = match amount {
        Amount::Requests(n) => format!("--requests {n}"),
        Amount::For(d) => format!("--duration-s {}", d.as_secs_f64()),
    };
    line(format!(
        "### Run: `{measured} --concurrency {}` (warm-up {} requests per series)",
        args.concurrency, args.warmup
    ));
    line(String::new());
    line("| | |".into());
    line("|---|---|".into());
    for (k, v) in bench::machine(&bin) {
        line(format!("| {k} | {v} |"));
    }
    line(format!(
        "| answer | `gpt-image-1`, one {}×{} PNG of {} bytes as `b64_json`: {} bytes of JSON |",
        args.image_side,
        args.image_side,
        fake.png_len,
        fake.answer_len()
    ));
    line(
        "| gateway | one `imagegate serve --config FILE` process: `[cache] enabled = true` (memory backend, default \
         bounds), `[images] rehost = true`, SQLite (usage ledger), log level warn, one tenant without limits |"
            .into(),
    );
    line(format!(
        "| load | closed loop, {} tasks sharing one reqwest client (HTTP/1.1 keep-alive); the load generator and the \
         fake run in one process on the same cores as the gateway |",
        args.concurrency
    ));
    line(String::new());
    line("Latency per request, µs, from sending it to the last byte of the answer, at the client.".into());
    line(String::new());
    let all = [(&a, Series::Direct), (&b, Series::Miss), (&c, Series::Hit)];
    let mut row = |name: &str, cell: &dyn Fn(&Stats, Series) -> String| {
        let cells: Vec<String> = all.iter().map(|(s, series)| cell(s, *series)).collect();
        line(format!("| {name} | {} |", cells.join(" | ")));
    };
    row("", &|_, series| series.title().to_owned());
    row("---", &|_, _| "---".to_owned());
    row("path", &|_, series| series.path().to_owned());
    row("answers ok / failed", &|s, _| format!("{} / {}", s.ok, s.errors));
    row("measured for", &|s, _| format!("{:.1} s", s.wall_s));
    row("**requests/s**", &|s, _| format!("**{:.0}**", s.rps));
    row("p50 µs", &|s, _| us(s.p50));
    row("p90 µs", &|s, _| us(s.p90));
    row("**p99 µs**", &|s, _| format!("**{}**", us(s.p99)));
    row("max µs", &|s, _| us(s.max));
    row("mean µs", &|s, _| us(s.mean));
    row("gateway CPU per request, µs", &|s, series| {
        if series == Series::Direct { "–".to_owned() } else { us(s.gateway_cpu_us) }
    });
    row("… by gateway thread, µs", &|s, series| {
        if series == Series::Direct {
            return "–".to_owned();
        }
        s.gateway_threads.iter().map(|(name, v)| format!("{name} {}", us(*v))).collect::<Vec<_>>().join(", ")
    });
    row("bench process (load + fake) CPU per request, µs", &|s, _| us(s.bench_cpu_us));
    row("CPU busy: gateway / bench / rest (other processes, interrupts), % of all cores", &|s, _| {
        format!("{:.0} % / {:.0} % / {:.0} %", s.gateway_cores, s.bench_cores, s.other_cores)
    });
    let ledgers = [None, Some(ledger_b), Some(ledger_c)];
    let ledger_cell = |series: Series, cell: &dyn Fn(&LedgerReading) -> String| {
        let index = [Series::Direct, Series::Miss, Series::Hit].iter().position(|&x| x == series).unwrap_or(0);
        ledgers[index].as_ref().map_or_else(|| "–".to_owned(), cell)
    };
    row("usage rows in the ledger / requests so far", &|_, series| {
        ledger_cell(series, &|l| format!("{} / {}", l.rows, l.expected))
    });
    row("… written within (after the run)", &|_, series| {
        ledger_cell(series, &|l| format!("{:.1} s", l.waited.as_secs_f64()))
    });
    row("… dropped so far (queue full)", &|_, series| ledger_cell(series, &|l| l.dropped.to_string()));
    row("gateway VmRSS after, MiB", &|s, _| mib(s.memory_after.rss_kib));
    row("gateway VmHWM (peak so far), MiB", &|s, _| mib(s.memory_after.hwm_kib));
    line(String::new());
    line(format!(
        "Gateway RSS at start {} MiB (peak {} MiB). CPU busy: share of all {} cores during the measured run.",
        mib(memory_start.rss_kib),
        mib(memory_start.hwm_kib),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    ));
    line(String::new());
    line("Against the direct answer (a):".into());
    line(String::new());
    line("| series | p50 | p90 | p99 | req/s ratio |".into());
    line("|---|---|---|---|---|".into());
    for (s, series) in [(&b, Series::Miss), (&c, Series::Hit)] {
        line(format!(
            "| {} | {} µs | {} µs | {} µs | {:.2} |",
            series.title(),
            signed_us(s.p50 - a.p50),
            signed_us(s.p90 - a.p90),
            signed_us(s.p99 - a.p99),
            s.rps / a.rps
        ));
    }
    line(String::new());
    line("`GET /admin/v1/cache` at the end:".into());
    line(String::new());
    line("| counter | value |".into());
    line("|---|---|".into());
    if let Some(map) = cache_stats.as_object() {
        for (k, v) in map {
            line(format!("| {k} | {v} |"));
        }
    }
    line(String::new());
    line(format!(
        "Checks: the fake saw {direct_calls} direct calls, {miss_calls} calls for the {miss_sent} distinct prompts of \
         (b) and {hit_calls} for the prompt of (c); the {hit_requests} requests of (c) after the first were all \
         answered `{CACHE_HEADER}: hit` with the first answer's exact bytes{}; the usage ledger holds {} rows \
         ({} cache hits) for {gateway_requests} gateway requests ({hit_requests} hits).",
        if c.errors == 0 { "" } else { " (EXCEPT the errors above)" },
        ledger_c.rows,
        ledger_c.hits
    ));
    if !warnings.is_empty() {
        line(String::new());
        // The same message many times over: count them by their text after the timestamp.
        let mut distinct: Vec<(String, usize)> = Vec::new();
        for w in &warnings {
            let text = w.split_once(' ').map_or(w.as_str(), |(_, rest)| rest).trim().to_owned();
            match distinct.iter_mut().find(|(t, _)| *t == text) {
                Some((_, n)) => *n += 1,
                None => distinct.push((text, 1)),
            }
        }
        line(format!("The gateway logged {} warning/error lines:", warnings.len()));
        line(String::new());
        for (text, n) in distinct.iter().take(8) {
            line(format!("    {n} × {text}"));
        }
    }
    line(String::new());
    line(format!("The gateway stopped on SIGTERM: {exit}."));
    println!("{out}");
    if !failures.is_empty() {
        eprintln!("\nFAILED CHECKS:");
        for f in &failures {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
}
