//! What the benchmark examples (`bench_rehost`, `bench_cache`) share: a gateway process (its config, start, memory,
//! warnings and stop), the fake upstream's key check and error answers, the closed-loop load, the end of a timed
//! request, percentiles and the machine rows at the top of a report.
//!
//! Each example includes this file with `#[path = "support/bench.rs"] mod bench;` and compiles it on its own, so
//! only what both use belongs here: an item one of them left unused would be dead code in that one.

use std::io::{BufRead as _, BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use imagegate::domain::keys::NewKey;
use rand::{RngCore as _, SeedableRng as _};
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The upstream key the fake expects: from the gateways, and from a load generator calling the fake directly.
pub const UPSTREAM_KEY: &str = "sk-bench-upstream";

// ---------------------------------------------------------------------------------------------------------
// The fake upstream
// ---------------------------------------------------------------------------------------------------------

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn openai_error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// What the fake checks first of every request: the upstream key, then that the body is JSON of type `T`; either
/// failure comes back as the answer OpenAI would give.
pub fn read_request<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, Box<Response>> {
    let expected = format!("Bearer {UPSTREAM_KEY}");
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Err(Box::new(openai_error(StatusCode::UNAUTHORIZED, "Incorrect API key provided.")));
    }
    serde_json::from_slice(body).map_err(|_| {
        Box::new(openai_error(StatusCode::BAD_REQUEST, "We could not parse the JSON body of your request."))
    })
}

/// A square PNG of random RGB pixels (incompressible, so its size is about side² × 3 bytes).
pub fn render_png(seed: u64, side: u32) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pixels = vec![0u8; (side as usize) * (side as usize) * 3];
    rng.fill_bytes(&mut pixels);
    let image = image::RgbImage::from_raw(side, side, pixels).expect("pixel buffer size");
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).expect("encode PNG");
    out.into_inner()
}

// ---------------------------------------------------------------------------------------------------------
// Gateway processes
// ---------------------------------------------------------------------------------------------------------

/// The gateway binary: `given`, else `target/<profile>/imagegate` (this example lives in
/// `target/<profile>/examples/`); absolute, since each gateway runs in its own temporary directory, where a relative
/// path would not resolve.
pub fn gateway_binary(given: Option<&Path>) -> PathBuf {
    let bin = match given {
        Some(bin) => bin.to_path_buf(),
        None => {
            let exe = std::env::current_exe().expect("own path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
            profile_dir.join("imagegate")
        }
    };
    assert!(bin.is_file(), "{} not found: run `cargo build --release --bin imagegate` first", bin.display());
    std::fs::canonicalize(&bin).expect("gateway binary path")
}

/// Where a gateway started in `dir` keeps its data (`[storage] data_dir`): image files and SQLite.
pub fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

/// One `imagegate serve --config FILE` process, run in its own temporary directory (config, data, SQLite), which
/// goes with it.
pub struct Gateway {
    /// `http://127.0.0.1:PORT`, from the line the gateway logs when it listens.
    pub root: String,
    child: Child,
    /// Every line it printed, stdout and stderr.
    output: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Gateway {
    /// Write `imagegate.toml` into `dir` and start `bin serve --config` there, with nothing but that file
    /// configuring it: a free loopback port, warnings only (plus the startup line saying where it listens), the
    /// fake at `upstream` with [`UPSTREAM_KEY`], its data in [`data_dir`], the benchmark's own `sections` (each
    /// line ending in `\n`) and one tenant `bench` holding `key`. Returns once the gateway listens; `who` names it
    /// if it does not within 30 s.
    pub fn start(
        bin: &Path,
        dir: tempfile::TempDir,
        who: &str,
        upstream: &str,
        sections: &str,
        key: &NewKey,
    ) -> Gateway {
        Self::start_with(bin, dir, who, upstream, "", sections, key)
    }

    /// [`Gateway::start`] with `server` (lines ending in `\n`) added to the `[server]` section.
    pub fn start_with(
        bin: &Path,
        dir: tempfile::TempDir,
        who: &str,
        upstream: &str,
        server: &str,
        sections: &str,
        key: &NewKey,
    ) -> Gateway {
        Self::start_full(bin, dir, who, (upstream, ""), server, sections, key)
    }

    /// [`Gateway::start_with`] with lines (each ending in `\n`) added to the `[upstream]` section too.
    pub fn start_full(
        bin: &Path,
        dir: tempfile::TempDir,
        who: &str,
        (upstream, upstream_lines): (&str, &str),
        server: &str,
        sections: &str,
        key: &NewKey,
    ) -> Gateway {
        // log.level: warnings only, plus the startup line that says where the gateway listens (info level).
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"10s\"\n{server}\
             [log]\nlevel = \"warn,imagegate::startup=info\"\n\
             [upstream]\nbase_url = \"{upstream}/v1\"\napi_key = \"{UPSTREAM_KEY}\"\n{upstream_lines}\
             [storage]\ndata_dir = '{}'\n\
             {sections}\
             [[tenants]]\nname = \"bench\"\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
            data_dir(dir.path()).display(),
            key.id,
            key.sha256
        );
        let path = dir.path().join("imagegate.toml");
        std::fs::write(&path, config).expect("write the gateway config");
        let mut command = Command::new(bin);
        command.arg("serve").arg("--config").arg(&path).current_dir(dir.path());
        // Only the file configures the gateway.
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("IMAGEGATE") || text == "OPENAI_API_KEY" || text == "RUST_LOG" {
                command.env_remove(&name);
            }
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| {
            panic!("cannot start {}: {e} (build it: cargo build --release --bin imagegate)", bin.display())
        });
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let streams: [Box<dyn std::io::Read + Send>; 2] =
            [Box::new(child.stdout.take().unwrap()), Box::new(child.stderr.take().unwrap())];
        for stream in streams {
            let (output, tx) = (output.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(i) = line.find("listening on http://") {
                        let url = line[i + "listening on ".len()..].split(['"', ' ', '\\']).next().unwrap_or("");
                        let _ = tx.send(url.trim_end_matches('/').to_owned());
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        let Ok(root) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{who} did not start: {:#?}", output.lock().unwrap());
        };
        Gateway { root, child, output, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `VmRSS` (now) and `VmHWM` (peak since start) from `/proc/<pid>/status`.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Memory { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:") }
    }

    /// The lines the process printed so far that `keep` accepts, without colour codes.
    pub fn lines(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let output = self.output.lock().unwrap();
        output.iter().filter(|l| keep(l)).map(|l| strip_ansi(l)).collect()
    }

    /// Lines the process printed at warn level or above, without colour codes.
    pub fn warnings(&self) -> Vec<String> {
        self.lines(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
    }

    /// SIGTERM, then wait for the drain (SIGKILL after 20 s).
    pub fn stop(&mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("{status}");
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return "killed after 20 s".to_owned();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `line` without ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------------------

/// Closed loop: `concurrency` tasks (no more than `total`), each calling `request` again as soon as its last call
/// returned, until `total` calls have started or, with `duration`, until that is over; each task folds what its
/// calls return into its own `A`. Returns the tasks' `A`s and the wall time, from the start to the last answer.
pub async fn closed_loop<A, T: 'static, F, Fut>(
    concurrency: usize,
    total: usize,
    duration: Option<Duration>,
    request: F,
    fold: fn(&mut A, T),
) -> (Vec<A>, Duration)
where
    A: Default + Send + 'static,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let tasks = concurrency.max(1).min(total.max(1));
    let mut workers = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (request, next) = (request.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut folded = A::default();
            loop {
                let more = match deadline {
                    Some(d) => Instant::now() < d,
                    None => next.fetch_add(1, Ordering::Relaxed) < total,
                };
                if !more {
                    break;
                }
                fold(&mut folded, request().await);
            }
            folded
        }));
    }
    let mut results = Vec::with_capacity(tasks);
    for worker in workers {
        results.push(worker.await.expect("load worker"));
    }
    (results, started.elapsed())
}

/// The end of one timed request: the answer read to its last byte and the latency since `started`; a failed send,
/// a failed read or a status other than 2xx (with the start of the answer) is an error.
pub async fn read_answer(
    started: Instant,
    sent: reqwest::Result<reqwest::Response>,
) -> (Duration, Result<(HeaderMap, Bytes), String>) {
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => return (started.elapsed(), Err(format!("send: {e}"))),
    };
    let status = response.status();
    let headers = std::mem::take(response.headers_mut());
    let body = response.bytes().await;
    let latency = started.elapsed();
    let body = match body {
        Ok(b) => b,
        Err(e) => return (latency, Err(format!("body: {e}"))),
    };
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return (latency, Err(format!("HTTP {status}: {text}")));
    }
    (latency, Ok((headers, body)))
}

/// Nearest-rank percentile `p` (0 to 100) of sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------------------

/// The rows at the top of a report: the machine, the build, and which gateway binary ran.
pub fn machine(bin: &Path) -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(|| "unknown".into(), |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0));
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let commit = command_output("git", &["rev-parse", "--short=12", "HEAD"], repo).unwrap_or_else(|| "unknown".into());
    let dirty =
        command_output("git", &["status", "--porcelain", "--untracked-files=no"], repo).is_some_and(|s| !s.is_empty());
    let rustc = command_output("rustc", &["--version"], repo).unwrap_or_else(|| "unknown".into());
    let tmp = std::env::temp_dir();
    vec![
        ("CPU", format!("{model}, nproc = {nproc}")),
        ("memory", memory),
        ("kernel", kernel),
        ("data dirs", format!("{} ({})", tmp.display(), filesystem_of(&tmp))),
        ("imagegate commit", format!("{commit}{}", if dirty { " + uncommitted changes" } else { "" })),
        ("rustc", rustc),
        ("build", if cfg!(debug_assertions) { "DEBUG (numbers meaningless; use --release)" } else { "release" }.into()),
        ("gateway binary", binary_identity(bin)),
    ]
}

fn command_output(program: &str, args: &[&str], dir: &Path) -> Option<String> {
    let out = Command::new(program).args(args).current_dir(dir).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Which gateway binary ran: the tree may have moved on since it was built.
fn binary_identity(bin: &Path) -> String {
    let bytes = std::fs::read(bin).unwrap_or_default();
    let sha = hex::encode(Sha256::digest(&bytes));
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .map_or_else(|_| "unknown".to_owned(), |t| humantime::format_rfc3339_seconds(t).to_string());
    format!("{} (built {built}, sha256 {})", bin.display(), &sha[..12])
}

/// The file-system type of the mount holding `path`, from /proc/mounts.
fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (_, mount, fs) = (parts.next()?, parts.next()?, parts.next()?);
            path.starts_with(mount).then(|| (mount.len(), fs.to_owned()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

/// KiB as MiB, one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
