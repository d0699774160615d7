//! Fake OpenAI Images API upstream for the integration tests: an axum server on `127.0.0.1:0` that answers
//! `POST /v1/images/{generations,edits,variations}` like OpenAI does (auth, per-model response shapes, DALL·E URLs that
//! expire, SSE streams, OpenAI-shaped errors and headers) and records every call so tests can count and inspect what
//! reached it. It deliberately does not use the `imagegate` library, so it is an independent stand-in.
//!
//! The server runs on its own thread with its own Tokio runtime, so it keeps answering while a test blocks its own
//! thread (e.g. waiting for a Python or Node SDK subprocess) and it ignores `tokio::time::pause()` in the test.
//! Dropping the [`FakeOpenAi`] stops the server and closes its port.
//!
//! Control endpoints on the same server (for the SDK tests that only see HTTP):
//! - `GET /_fake/calls`: JSON array of [`RecordedCall`], in arrival order;
//! - `POST /_fake/reset`: forget recorded calls (answers `{"ok":true}`);
//! - `GET /_fake/files/{name}?se=...`: the DALL·E images behind the returned URLs (403 Azure-style once expired);
//! - `GET /_fake/redirect?to=URL` (302), `/_fake/endless` (a PNG that never ends), `/_fake/html` (a web page),
//!   `/_fake/lying_png` (a web page sent as `image/png`): hostile image hosts for the re-hosting tests. Every
//!   fetch of these and of the files counts in [`FakeOpenAi::file_fetch_count`].
//!
//! Trigger words, looked up in `prompt` and in `user` (variations have no prompt):
//! - `#status=NNN`: answer that status with an OpenAI-shaped error (429 carries `retry-after: 1`, `retry-after-ms: 1000`);
//! - `#sleep=MS`: wait before answering (after the auth check);
//! - `#gap=MS`: wait between SSE events;
//! - `#drop`: streams send one partial-image event, then the connection is aborted;
//! - `#sse_error`: streams send one partial-image event, then `event: error` with an OpenAI error body, then end;
//! - `#side=N`: GPT image answers are N×N pixels (default 64);
//! - `#count=N`: answer with at most N images, whatever `n` asked (as when moderation drops some);
//! - `#image_url=URL`: DALL·E answers point at URL (a leading `/` is relative to the fake) instead of a stored file;
//! - `#bad_image=N`: DALL·E image N (0-based) points at `/_fake/html`, the others at stored files;
//! - `#body_delay=MS`: the status and headers go out at once, the body MS later;
//! - `#trickle=N`: the body goes out in chunks of N bytes, without a `content-length` (chunked);
//! - `#framing=crlf|cr|nospace`: SSE frames use CRLF or CR line breaks, or `data:`/`event:` without the space;
//! - `#redirect=URL`: answer `307 Temporary Redirect` to URL (a leading `/` is relative to the fake);
//! - `#huge=MIB` / `#huge_declared=MIB`: a 200 JSON answer of MIB mebibytes (for `stream=true`: MIB partial-image
//!   events of 1 MiB each and no completed one), streamed without a length or with
//!   its `content-length` declared; the bytes the gateway pulled are in [`FakeOpenAi::huge_bytes_sent`];
//! - `#items=N`: answer exactly N images, whatever `n` asked (a broken upstream);
//! - `#sse_error_first`: streams send `event: error` before any image event, then end;
//! - `#reset_body`: the status, headers and the first bytes of a JSON body go out, then the connection is aborted;
//! - `#stall`: the first half of the answer goes out at once, the rest [`STALL`] later (chunked, no length);
//! - `#cut`: the first half of the answer goes out, then the connection is aborted.
//!
//! [`FakeOptions::triggers`] adds trigger words to every call of one fake (so deployments of a pool, sent the
//! same prompt, can misbehave differently), and [`FakeOptions::azure`] makes the fake an Azure OpenAI resource.

use std::collections::HashMap;
use std::future::IntoFuture as _;
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The API key the fake expects unless [`FakeOptions::expected_key`] says otherwise.
pub const DEFAULT_KEY: &str = "sk-upstream-test";
/// How long DALL·E URLs stay valid unless [`FakeOptions::url_ttl`] says otherwise (OpenAI: 60 minutes).
pub const DEFAULT_URL_TTL: Duration = Duration::from_secs(3600);
/// Width and height of every generated image, whatever size was asked for (keeps tests fast).
pub const IMAGE_SIDE: u32 = 64;
/// Value of `x-ratelimit-limit-requests`; `x-ratelimit-remaining-requests` counts down from it.
pub const RATE_LIMIT_REQUESTS: usize = 500;
/// Input image tokens the fake charges per input image of a GPT image edit.
pub const INPUT_IMAGE_TOKENS: u64 = 323;
/// Extra output tokens the fake charges per streamed partial image.
pub const PARTIAL_IMAGE_TOKENS: u64 = 100;
/// How long `#stall` holds the second half of an answer.
pub const STALL: Duration = Duration::from_secs(2);

/// Minimum pause between the partial event of a `#drop` stream and the abort, so the event reliably goes out first.
const DROP_DELAY: Duration = Duration::from_millis(100);

/// Options for [`FakeOpenAi::start_with`].
#[derive(Clone, Debug, Default)]
pub struct FakeOptions {
    /// Lifetime of DALL·E URLs; `None` means [`DEFAULT_URL_TTL`].
    pub url_ttl: Option<Duration>,
    /// Key expected in `Authorization: Bearer <key>`; `None` means [`DEFAULT_KEY`].
    pub expected_key: Option<String>,
    /// Parse multipart bodies with the *last* `boundary` parameter of their content type (as some servers
    /// do), instead of the first.
    pub last_boundary: bool,
    /// Trigger words applied to every call, as if they were in the prompt.
    pub triggers: Option<String>,
    /// Answer as an Azure OpenAI resource instead of OpenAI.
    pub azure: Option<AzureOptions>,
}

/// An Azure OpenAI resource: the key comes in the `api-key` header, and images are served on the v1 route
/// (`/openai/v1/images/…`, the deployment named in `model`) and on the deployment route
/// (`/openai/deployments/<deployment>/images/…?api-version=…`). Anything else is 404, a wrong or missing
/// `api-version` 404 as Azure answers it, a wrong key 401.
#[derive(Clone, Debug)]
pub struct AzureOptions {
    /// The `api-version` the deployment route requires.
    pub api_version: String,
    /// Deployment name → the model it runs.
    pub deployments: Vec<(String, String)>,
}

/// One request that reached `/v1/images/*`, as received.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecordedCall {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// e.g. `/v1/images/generations`.
    pub path: String,
    pub query: Option<String>,
    /// Lowercase names, every header as received (repeated headers appear repeatedly).
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// The parsed body when it was JSON.
    pub json: Option<Value>,
    /// Multipart parts in arrival order (empty for non-multipart bodies).
    pub parts: Vec<RecordedPart>,
    pub body_len: usize,
    /// Lowercase hex SHA-256 of the whole body as received (to prove a body arrived byte for byte).
    pub body_sha256: String,
    /// The `x-request-id` the fake answered this call with.
    pub request_id: String,
    /// Milliseconds between the fake's start and the arrival of this call (body fully read).
    pub at_ms: u64,
}

/// One multipart part of a [`RecordedCall`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecordedPart {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub len: usize,
    /// Lowercase hex SHA-256 of the part's bytes.
    pub sha256: String,
    /// The part as (lossy) UTF-8 text, for parts without a file name.
    pub text: Option<String>,
}

impl RecordedCall {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// A body field as a string: a JSON string's content, any other JSON value as compact JSON (`true`, `2`,
    /// `null`), or the text of the first multipart text part with that name.
    pub fn field(&self, name: &str) -> Option<String> {
        if let Some(json) = &self.json {
            return json.get(name).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        self.parts.iter().find(|p| p.name == name).and_then(|p| p.text.clone())
    }

    /// First multipart part with this name.
    pub fn part(&self, name: &str) -> Option<&RecordedPart> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Names of the multipart parts, in arrival order.
    pub fn part_names(&self) -> Vec<&str> {
        self.parts.iter().map(|p| p.name.as_str()).collect()
    }
}

/// A running fake OpenAI upstream. Dropping it stops the server.
pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1`, the value for an OpenAI `base_url`.
    pub url: String,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeOpenAi {
    /// Starts a fake with the default options (key [`DEFAULT_KEY`], DALL·E URLs valid for 3600 s).
    pub async fn start() -> FakeOpenAi {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts a fake with the given options (panics if no local port can be bound).
    pub async fn start_with(opts: FakeOptions) -> FakeOpenAi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake OpenAI listener");
        listener.set_nonblocking(true).expect("make the fake OpenAI listener non-blocking");
        let addr = listener.local_addr().expect("local address of the fake OpenAI listener");
        let base = format!("http://{addr}");
        let inner = Arc::new(Inner {
            base: base.clone(),
            expected_key: opts.expected_key.unwrap_or_else(|| DEFAULT_KEY.to_owned()),
            triggers: opts.triggers.unwrap_or_default(),
            azure: opts.azure,
            url_ttl: opts.url_ttl.unwrap_or(DEFAULT_URL_TTL),
            started: Instant::now(),
            calls: Mutex::new(Vec::new()),
            files: Mutex::new(HashMap::new()),
            file_fetches: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            huge_bytes: Arc::new(AtomicUsize::new(0)),
            last_boundary: opts.last_boundary,
        });
        let app = router(Arc::clone(&inner));
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("fake-openai-{}", addr.port()))
            .spawn(move || serve(listener, app, stop))
            .expect("spawn the fake OpenAI thread");
        FakeOpenAi { url: format!("{base}/v1"), base, inner, shutdown: Some(shutdown), thread: Some(thread) }
    }

    /// Every request to `/v1/images/*` since the start (or the last reset), in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.inner.calls).clone()
    }

    /// Number of recorded calls.
    pub fn call_count(&self) -> usize {
        lock(&self.inner.calls).len()
    }

    /// Recorded calls whose path is exactly `path`, e.g. `/v1/images/edits`.
    pub fn calls_to(&self, path: &str) -> Vec<RecordedCall> {
        lock(&self.inner.calls).iter().filter(|c| c.path == path).cloned().collect()
    }

    /// The most recent recorded call.
    pub fn last_call(&self) -> Option<RecordedCall> {
        lock(&self.inner.calls).last().cloned()
    }

    /// Number of `GET /_fake/files/*` requests (DALL·E image downloads), expired or not.
    pub fn file_fetch_count(&self) -> usize {
        self.inner.file_fetches.load(Ordering::SeqCst)
    }

    /// Bytes of `#huge` answers that the gateway has read so far (pulled from the fake's body stream).
    pub fn huge_bytes_sent(&self) -> usize {
        self.inner.huge_bytes.load(Ordering::SeqCst)
    }

    /// Forgets the recorded calls and the file-fetch count (stored images stay downloadable).
    pub fn reset(&self) {
        self.inner.reset();
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs the server on a private current-thread runtime until `stop` fires; dropping the runtime then closes every
/// connection, in-flight or idle.
fn serve(listener: std::net::TcpListener, app: Router, stop: tokio::sync::oneshot::Receiver<()>) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    runtime.block_on(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        tokio::select! {
            _ = axum::serve(listener, app).into_future() => {}
            _ = stop => {}
        }
    });
}

struct Inner {
    base: String,
    expected_key: String,
    triggers: String,
    azure: Option<AzureOptions>,
    url_ttl: Duration,
    started: Instant,
    calls: Mutex<Vec<RecordedCall>>,
    files: Mutex<HashMap<String, StoredFile>>,
    file_fetches: AtomicUsize,
    /// Calls ever served (not reset), for `x-ratelimit-remaining-requests`.
    served: AtomicUsize,
    /// Bytes of `#huge` answers pulled by the client.
    huge_bytes: Arc<AtomicUsize>,
    /// See [`FakeOptions::last_boundary`].
    last_boundary: bool,
}

struct StoredFile {
    bytes: Bytes,
    expires_at: Instant,
    /// The unix expiry put in the URL's `se` parameter.
    se: u64,
}

impl Inner {
    fn record(&self, call: RecordedCall) {
        self.served.fetch_add(1, Ordering::SeqCst);
        lock(&self.calls).push(call);
    }

    fn reset(&self) {
        lock(&self.calls).clear();
        self.file_fetches.store(0, Ordering::SeqCst);
    }

    /// Stores a DALL·E image and returns its expiring URL.
    fn store_file(&self, bytes: Vec<u8>) -> String {
        let name = format!("img-{:024x}.png", rand::random::<u128>() >> 32);
        let expires_at = Instant::now() + self.url_ttl;
        let expiry = SystemTime::now() + self.url_ttl;
        let expiry = expiry.duration_since(UNIX_EPOCH).unwrap_or_default();
        let se = expiry.as_secs() + u64::from(expiry.subsec_nanos() > 0);
        let url = format!("{}/_fake/files/{name}?se={se}", self.base);
        lock(&self.files).insert(name, StoredFile { bytes: Bytes::from(bytes), expires_at, se });
        url
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/_fake/calls", get(list_calls))
        .route("/_fake/reset", post(reset_calls))
        .route("/_fake/files/{name}", get(get_file))
        .route("/_fake/redirect", get(redirect))
        .route("/_fake/endless", get(endless))
        .route("/_fake/html", get(html))
        .route("/_fake/lying_png", get(lying_png))
        .fallback(entry)
        .with_state(inner)
}

/// `302` to the `to` query parameter.
async fn redirect(State(inner): State<Arc<Inner>>, Query(query): Query<HashMap<String, String>>) -> Response {
    inner.file_fetches.fetch_add(1, Ordering::SeqCst);
    let to = query.get("to").cloned().unwrap_or_default();
    (StatusCode::FOUND, [(header::LOCATION, header_value(&to))]).into_response()
}

/// An `image/png` body that starts like a PNG and never ends.
async fn endless(State(inner): State<Arc<Inner>>) -> Response {
    inner.file_fetches.fetch_add(1, Ordering::SeqCst);
    let head = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"\x89PNG\r\n\x1a\n")) });
    let tail = futures::stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 64 * 1024])));
    let mut response = Response::new(Body::from_stream(head.chain(tail)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    response
}

/// A web page, declared as one.
async fn html(State(inner): State<Arc<Inner>>) -> Response {
    inner.file_fetches.fetch_add(1, Ordering::SeqCst);
    ([(header::CONTENT_TYPE, "text/html")], "<html><body>not an image</body></html>").into_response()
}

/// A web page that claims to be a PNG.
async fn lying_png(State(inner): State<Arc<Inner>>) -> Response {
    inner.file_fetches.fetch_add(1, Ordering::SeqCst);
    ([(header::CONTENT_TYPE, "image/png")], "<html><body>not an image</body></html>").into_response()
}

async fn list_calls(State(inner): State<Arc<Inner>>) -> Json<Vec<RecordedCall>> {
    Json(lock(&inner.calls).clone())
}

async fn reset_calls(State(inner): State<Arc<Inner>>) -> Json<Value> {
    inner.reset();
    Json(json!({"ok": true}))
}

async fn get_file(
    State(inner): State<Arc<Inner>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    inner.file_fetches.fetch_add(1, Ordering::SeqCst);
    let file = lock(&inner.files).get(&name).map(|f| (f.bytes.clone(), f.expires_at, f.se));
    let Some((bytes, expires_at, se)) = file else {
        return azure_error(StatusCode::NOT_FOUND, "ResourceNotFound", "The specified resource does not exist.", None);
    };
    if query.get("se") != Some(&se.to_string()) {
        return azure_error(
            StatusCode::FORBIDDEN,
            "AuthenticationFailed",
            AUTH_FAILED_MESSAGE,
            Some("Signature did not match. String to sign used was r"),
        );
    }
    if Instant::now() >= expires_at {
        let detail = format!("Signed expiry time [{se}] must be after signed start time [{}]", unix_now());
        return azure_error(StatusCode::FORBIDDEN, "AuthenticationFailed", AUTH_FAILED_MESSAGE, Some(&detail));
    }
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert("x-ms-request-id", header_value(&uuid_like()));
    response
}

const AUTH_FAILED_MESSAGE: &str = "Server failed to authenticate the request. Make sure the value of Authorization \
                                   header is formed correctly including the signature.";

/// An Azure Blob Storage style XML error, as the real DALL·E URL host sends.
fn azure_error(status: StatusCode, code: &str, message: &str, detail: Option<&str>) -> Response {
    let request_id = uuid_like();
    let detail =
        detail.map(|d| format!("<AuthenticationErrorDetail>{d}</AuthenticationErrorDetail>")).unwrap_or_default();
    let body = format!(
        "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{message}\n\
         RequestId:{request_id}\nTime:{}</Message>{detail}</Error>",
        unix_now()
    );
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    headers.insert("x-ms-request-id", header_value(&request_id));
    headers.insert("x-ms-error-code", header_value(code));
    response
}

fn uuid_like() -> String {
    let hex = format!("{:032x}", rand::random::<u128>());
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Every request that is not a control endpoint lands here.
async fn entry(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let arrived = Instant::now();
    let (head, body) = request.into_parts();
    let path = head.uri.path().to_owned();
    let azure_route = match &inner.azure {
        Some(azure) => match azure_route(azure, &path, head.uri.query()) {
            Ok(route) => Some(route),
            Err(response) => return *response,
        },
        None => None,
    };
    if azure_route.is_none() && !path.starts_with("/v1/images/") {
        let message = format!("Invalid URL ({} {path})", head.method);
        return openai_error(StatusCode::NOT_FOUND, &message, "invalid_request_error", None, None);
    }
    let request_id = format!("req_{:032x}", rand::random::<u128>());
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let content_type =
        head.headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let (json, parts, body_error) = parse_body(content_type.as_deref(), bytes.clone(), inner.last_boundary).await;
    let call = RecordedCall {
        method: head.method.to_string(),
        path,
        query: head.uri.query().map(str::to_owned),
        headers: head
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        content_type,
        json,
        parts,
        body_len: bytes.len(),
        body_sha256: hex::encode(Sha256::digest(&bytes)),
        request_id: request_id.clone(),
        at_ms: u64::try_from(inner.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    inner.record(call.clone());
    let mut response = match azure_route {
        Some((openai_path, deployment)) => {
            azure_handle(&inner, &head.method, call, body_error, &openai_path, deployment.as_deref()).await
        }
        None => handle(&inner, &head.method, &call, body_error).await,
    };
    add_openai_headers(&inner, response.headers_mut(), &request_id, arrived);
    response
}

/// An Azure path as (the OpenAI path it stands for, the deployment the path names), or Azure's 404.
fn azure_route(
    azure: &AzureOptions,
    path: &str,
    query: Option<&str>,
) -> Result<(String, Option<String>), Box<Response>> {
    let not_found = |code: &str, message: &str| {
        let body = json!({"error": {"code": code, "message": message}});
        Box::new((StatusCode::NOT_FOUND, Json(body)).into_response())
    };
    if let Some(tail) = path.strip_prefix("/openai/v1/images/") {
        return Ok((format!("/v1/images/{tail}"), None));
    }
    let Some(rest) = path.strip_prefix("/openai/deployments/") else {
        return Err(not_found("404", "Resource not found"));
    };
    let Some((deployment, tail)) = rest.split_once("/images/") else {
        return Err(not_found("404", "Resource not found"));
    };
    let version = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("api-version=")));
    if version != Some(azure.api_version.as_str()) {
        return Err(not_found("404", "Resource not found"));
    }
    if !azure.deployments.iter().any(|(d, _)| d == deployment) {
        return Err(not_found(
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. If you created the deployment within the last 5 \
             minutes, please wait a moment and try again.",
        ));
    }
    Ok((format!("/v1/images/{tail}"), Some(deployment.to_owned())))
}

/// An Azure call: the `api-key` header, and the model is the deployment's (named by the path, or by `model` on
/// the v1 route).
async fn azure_handle(
    inner: &Inner,
    method: &Method,
    mut call: RecordedCall,
    body_error: Option<String>,
    openai_path: &str,
    deployment: Option<&str>,
) -> Response {
    let Some(azure) = &inner.azure else { return handle(inner, method, &call, body_error).await };
    if call.header("api-key") != Some(inner.expected_key.as_str()) || call.header("authorization").is_some() {
        let body = json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or \
            wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct \
            regional API endpoint for your resource."}});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    let named = deployment.map(str::to_owned).or_else(|| call.field("model"));
    let model = azure.deployments.iter().find(|(d, _)| Some(d) == named.as_ref()).map(|(_, m)| m.clone());
    let Some(model) = model else {
        let body = json!({"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource \
            does not exist."}});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    };
    // Answer as OpenAI would for the model the deployment runs, with OpenAI's own auth already checked.
    call.path = openai_path.to_owned();
    let expected = format!("Bearer {}", inner.expected_key);
    call.headers.retain(|(k, _)| k != "authorization");
    call.headers.push(("authorization".to_owned(), expected));
    if let Some(json) = call.json.as_mut().and_then(Value::as_object_mut) {
        json.insert("model".to_owned(), Value::String(model));
    } else if let Some(part) = call.parts.iter_mut().find(|p| p.name == "model") {
        part.text = Some(model);
    } else {
        call.parts.push(RecordedPart {
            name: "model".to_owned(),
            file_name: None,
            content_type: None,
            len: model.len(),
            sha256: String::new(),
            text: Some(model),
        });
    }
    handle(inner, method, &call, body_error).await
}

/// Parses the body into (JSON, multipart parts, error message for a malformed body).
async fn parse_body(
    content_type: Option<&str>,
    bytes: Bytes,
    last_boundary: bool,
) -> (Option<Value>, Vec<RecordedPart>, Option<String>) {
    let is_multipart = content_type.is_some_and(|ct| ct.to_ascii_lowercase().starts_with("multipart/"));
    if is_multipart {
        let (parts, error) = parse_multipart(content_type.unwrap_or_default(), bytes, last_boundary).await;
        return (None, parts, error);
    }
    if bytes.is_empty() {
        return (None, Vec::new(), None);
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(value) => (Some(value), Vec::new(), None),
        Err(_) => (
            None,
            Vec::new(),
            Some(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your \
                 HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid \
                 JSON. If you have trouble figuring out how to fix this, please contact us through our help center \
                 at help.openai.com.)"
                    .to_owned(),
            ),
        ),
    }
}

async fn parse_multipart(content_type: &str, bytes: Bytes, last_boundary: bool) -> (Vec<RecordedPart>, Option<String>) {
    let last = content_type
        .split(';')
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .next_back();
    let parsed = match last {
        Some(last) if last_boundary => Ok(last),
        _ => multer::parse_boundary(content_type),
    };
    let boundary = match parsed {
        Ok(boundary) => boundary,
        Err(err) => return (Vec::new(), Some(format!("Invalid multipart/form-data body: {err}"))),
    };
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(bytes) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => return (parts, None),
            Err(err) => return (parts, Some(format!("Invalid multipart/form-data body: {err}"))),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(ToString::to_string);
        let data = match field.bytes().await {
            Ok(data) => data,
            Err(err) => return (parts, Some(format!("Invalid multipart/form-data body: {err}"))),
        };
        parts.push(RecordedPart {
            text: file_name.is_none().then(|| String::from_utf8_lossy(&data).into_owned()),
            name,
            file_name,
            content_type,
            len: data.len(),
            sha256: hex::encode(Sha256::digest(&data)),
        });
    }
}

fn add_openai_headers(inner: &Inner, headers: &mut HeaderMap, request_id: &str, arrived: Instant) {
    let processing_ms = u64::try_from(arrived.elapsed().as_millis()).unwrap_or(u64::MAX);
    let remaining = RATE_LIMIT_REQUESTS.saturating_sub(inner.served.load(Ordering::SeqCst));
    headers.insert("x-request-id", header_value(request_id));
    headers.insert("openai-processing-ms", HeaderValue::from(processing_ms));
    headers.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    headers.insert("openai-organization", HeaderValue::from_static("org-upstream"));
    headers.insert("x-ratelimit-limit-requests", HeaderValue::from(RATE_LIMIT_REQUESTS));
    headers.insert("x-ratelimit-remaining-requests", HeaderValue::from(remaining));
    headers.insert("x-ratelimit-reset-requests", HeaderValue::from_static("120ms"));
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_static("__cf_bm=secret; path=/; HttpOnly; Secure; SameSite=None"),
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Generations,
    Edits,
    Variations,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/images/generations" => Some(Endpoint::Generations),
            "/v1/images/edits" => Some(Endpoint::Edits),
            "/v1/images/variations" => Some(Endpoint::Variations),
            _ => None,
        }
    }

    fn default_model(self) -> &'static str {
        match self {
            Endpoint::Generations | Endpoint::Variations => "dall-e-2",
            Endpoint::Edits => "gpt-image-1.5",
        }
    }

    /// Prefix of the SSE event types.
    fn event_prefix(self) -> &'static str {
        match self {
            Endpoint::Edits => "image_edit",
            Endpoint::Generations | Endpoint::Variations => "image_generation",
        }
    }
}

/// Failure modes asked for through trigger words.
#[derive(Default)]
struct Triggers {
    status: Option<u16>,
    sleep: Option<Duration>,
    gap: Duration,
    drop: bool,
    sse_error: bool,
    /// `#sse_error_first`: an error event before any image event.
    sse_error_first: bool,
    /// `#reset_body`: the body starts, then the connection is aborted.
    reset_body: bool,
    /// `#count=N`: at most N images.
    count: Option<u64>,
    /// `#framing=crlf|cr|nospace`: SSE line breaks as CRLF or CR, or `data:` without its space.
    framing: Option<String>,
    /// `#body_delay=MS`: send the status and headers at once, the body this much later.
    body_delay: Option<Duration>,
    /// `#bad_image=N`: DALL·E image N (0-based) points at a web page instead of a stored file.
    bad_image: Option<u64>,
    /// `#huge=MIB` (no length) or `#huge_declared=MIB` (with `content-length`): an answer of MIB mebibytes.
    huge: Option<(u64, bool)>,
    /// `#items=N`: exactly N images.
    items: Option<u64>,
    /// `#trickle=N`: the body in chunks of N bytes, without a length.
    trickle: Option<u64>,
    /// `#stall` / `#cut`: half the body, then the rest later / an abort.
    halves: Option<Halves>,
}

#[derive(Clone, Copy)]
enum Halves {
    Stall,
    Cut,
}

impl Triggers {
    fn parse(text: &str) -> Triggers {
        Triggers {
            status: number_after(text, "#status=").and_then(|n| u16::try_from(n).ok()),
            sleep: number_after(text, "#sleep=").map(Duration::from_millis),
            gap: number_after(text, "#gap=").map(Duration::from_millis).unwrap_or_default(),
            drop: text.contains("#drop"),
            sse_error: text.contains("#sse_error") && !text.contains("#sse_error_first"),
            sse_error_first: text.contains("#sse_error_first"),
            reset_body: text.contains("#reset_body"),
            count: number_after(text, "#count="),
            framing: text
                .find("#framing=")
                .and_then(|at| text[at + "#framing=".len()..].split_whitespace().next())
                .map(str::to_owned),
            body_delay: number_after(text, "#body_delay=").map(Duration::from_millis),
            bad_image: number_after(text, "#bad_image="),
            huge: number_after(text, "#huge_declared=")
                .map(|m| (m, true))
                .or_else(|| number_after(text, "#huge=").map(|m| (m, false))),
            items: number_after(text, "#items="),
            trickle: number_after(text, "#trickle="),
            halves: if text.contains("#stall") {
                Some(Halves::Stall)
            } else if text.contains("#cut") {
                Some(Halves::Cut)
            } else {
                None
            },
        }
    }
}

/// The word after `key` (up to whitespace).
fn text_after(text: &str, key: &str) -> Option<String> {
    let at = text.find(key)?;
    text[at + key.len()..].split_whitespace().next().map(str::to_owned)
}

/// A 200 JSON answer of `mib` MiB (one huge `b64_json`), each chunk counted in `huge_bytes` as it is pulled.
fn huge_answer(inner: &Inner, mib: u64, declared: bool) -> Response {
    const CHUNK: usize = 64 * 1024;
    let total = usize::try_from(mib).unwrap_or(usize::MAX).saturating_mul(1024 * 1024);
    let head: &'static [u8] = b"{\"created\":1,\"data\":[{\"b64_json\":\"";
    let tail: &'static [u8] = b"\"}]}";
    let filler = total.saturating_sub(head.len() + tail.len());
    let counter = inner.huge_bytes.clone();
    let chunks = std::iter::once(Bytes::from_static(head))
        .chain((0..filler.div_ceil(CHUNK)).map(move |i| Bytes::from(vec![b'A'; CHUNK.min(filler - i * CHUNK)])))
        .chain(std::iter::once(Bytes::from_static(tail)));
    let stream = futures::stream::iter(chunks).map(move |chunk| {
        counter.fetch_add(chunk.len(), Ordering::SeqCst);
        Ok::<_, std::io::Error>(chunk)
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if declared {
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(filler + head.len() + tail.len()));
    }
    response
}

/// A 200 event stream of `mib` partial-image events of 1 MiB each (never a completed one), each chunk counted
/// in `huge_bytes` as it is pulled.
fn huge_stream(inner: &Inner, mib: u64) -> Response {
    const CHUNK: usize = 64 * 1024;
    let counter = inner.huge_bytes.clone();
    let event = |i: u64| {
        let head = format!(
            "event: image_generation.partial_image\ndata: {{\"type\":\"image_generation.partial_image\",\
             \"partial_image_index\":{i},\"b64_json\":\""
        );
        std::iter::once(Bytes::from(head))
            .chain((0..16).map(|_| Bytes::from(vec![b'A'; CHUNK])))
            .chain(std::iter::once(Bytes::from_static(b"\"}\n\n")))
    };
    let stream = futures::stream::iter((0..mib).flat_map(event)).map(move |chunk| {
        counter.fetch_add(chunk.len(), Ordering::SeqCst);
        Ok::<_, std::io::Error>(chunk)
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response
}

/// The URL after `#image_url=` (up to whitespace): DALL·E answers point there instead of at a stored file.
fn image_url_trigger(prompt: &str) -> Option<String> {
    let at = prompt.find("#image_url=")?;
    prompt[at + "#image_url=".len()..].split_whitespace().next().map(str::to_owned)
}

/// The decimal number right after the first `key` in `text` that is followed by one.
fn number_after(text: &str, key: &str) -> Option<u64> {
    text.match_indices(key).find_map(|(at, _)| {
        let digits: String = text[at + key.len()..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// Request parameters, from the JSON body or from multipart text parts.
struct Params<'a> {
    call: &'a RecordedCall,
}

impl Params<'_> {
    /// The parameter as a string; JSON `null` counts as absent.
    fn text(&self, name: &str) -> Option<String> {
        self.call.field(name).filter(|v| self.call.json.is_none() || v != "null")
    }

    fn flag(&self, name: &str) -> bool {
        self.text(name).as_deref() == Some("true")
    }

    fn int(&self, name: &str) -> Option<u64> {
        self.text(name).and_then(|v| v.trim().parse().ok())
    }

    /// Number of input images (multipart `image`, `image[]`, `image[N]` parts, or JSON `images`).
    fn input_images(&self) -> u64 {
        let count = match &self.call.json {
            Some(json) => json.get("images").and_then(Value::as_array).map_or(0, Vec::len),
            None => self
                .call
                .parts
                .iter()
                .filter(|p| p.text.is_none() && (p.name == "image" || p.name.starts_with("image[")))
                .count(),
        };
        u64::try_from(count).unwrap_or(u64::MAX)
    }
}

fn is_gpt_image_model(model: &str) -> bool {
    model.starts_with("gpt-image") || model == "chatgpt-image-latest"
}

async fn handle(inner: &Inner, method: &Method, call: &RecordedCall, body_error: Option<String>) -> Response {
    let Some(endpoint) = Endpoint::from_path(&call.path) else {
        let message = format!("Invalid URL ({method} {})", call.path);
        return openai_error(StatusCode::NOT_FOUND, &message, "invalid_request_error", None, None);
    };
    if method != Method::POST {
        let message = format!("Invalid method for URL ({method} {})", call.path);
        return openai_error(StatusCode::METHOD_NOT_ALLOWED, &message, "invalid_request_error", None, None);
    }
    if let Some(response) = check_auth(inner, call) {
        return response;
    }
    if let Some(message) = body_error {
        return openai_error(StatusCode::BAD_REQUEST, &message, "invalid_request_error", None, None);
    }

    let params = Params { call };
    let prompt = params.text("prompt").unwrap_or_default();
    let user = params.text("user").unwrap_or_default();
    let model = params.text("model").unwrap_or_else(|| endpoint.default_model().to_owned());
    let triggers = Triggers::parse(&format!("{prompt} {user} {}", inner.triggers));
    if let Some(sleep) = triggers.sleep {
        tokio::time::sleep(sleep).await;
    }
    if let Some(status) = triggers.status {
        return triggered_error(status, &model);
    }
    if let Some(to) = text_after(&format!("{prompt} {user}"), "#redirect=") {
        let to = if to.starts_with('/') { format!("{}{to}", inner.base) } else { to };
        return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, header_value(&to))]).into_response();
    }
    if let Some((mib, declared)) = triggers.huge {
        if params.flag("stream") {
            return huge_stream(inner, mib);
        }
        return huge_answer(inner, mib, declared);
    }
    if triggers.reset_body {
        let head = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{\"created\": 17")) });
        let cut = futures::stream::once(async {
            tokio::time::sleep(DROP_DELAY).await;
            Err::<Bytes, _>(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "fake OpenAI reset (#reset_body)"))
        });
        let mut response = Response::new(Body::from_stream(head.chain(cut)));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return response;
    }
    if let Some(delay) = triggers.body_delay {
        return delay_body(answer(inner, &params, endpoint, &model, &prompt, &triggers), delay).await;
    }
    if let Some(size) = triggers.trickle {
        return trickle_body(answer(inner, &params, endpoint, &model, &prompt, &triggers), size).await;
    }
    if let Some(halves) = triggers.halves {
        return halve_body(answer(inner, &params, endpoint, &model, &prompt, &triggers), halves).await;
    }
    answer(inner, &params, endpoint, &model, &prompt, &triggers)
}

/// The answer after the triggers that fail or delay it.
fn answer(
    inner: &Inner,
    params: &Params<'_>,
    endpoint: Endpoint,
    model: &str,
    prompt: &str,
    triggers: &Triggers,
) -> Response {
    let (call, model, prompt) = (params.call, model.to_owned(), prompt.to_owned());

    let gpt = is_gpt_image_model(&model);
    if gpt && params.text("response_format").is_some() {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Unknown parameter: 'response_format'.",
            "invalid_request_error",
            Some("response_format"),
            Some("unknown_parameter"),
        );
    }
    let stream = params.flag("stream");
    if stream && !gpt {
        let message = format!("Streaming is not supported for model '{model}'.");
        return openai_error(
            StatusCode::BAD_REQUEST,
            &message,
            "invalid_request_error",
            Some("stream"),
            Some("unsupported_value"),
        );
    }

    let n = params.int("n").unwrap_or(1).clamp(1, 10).min(triggers.count.unwrap_or(u64::MAX));
    let n = triggers.items.unwrap_or(n);
    let seed = if prompt.is_empty() {
        call.parts.iter().find(|p| p.text.is_none()).map(|p| p.sha256.clone()).unwrap_or_default()
    } else {
        prompt.clone()
    };
    if !gpt {
        return dalle_response(inner, params, &model, n, &seed, &prompt, triggers.bad_image);
    }
    let look = GptLook::resolve(params);
    let text_tokens = u64::try_from(prompt.chars().count().div_ceil(4)).unwrap_or(u64::MAX).max(1);
    let image_tokens = params.input_images() * INPUT_IMAGE_TOKENS;
    if stream {
        let partial_images = params.int("partial_images").unwrap_or(0).min(3);
        sse_response(endpoint, &look, n, partial_images, &seed, (text_tokens, image_tokens), triggers)
    } else {
        gpt_response(&look, n, &seed, (text_tokens, image_tokens))
    }
}

fn check_auth(inner: &Inner, call: &RecordedCall) -> Option<Response> {
    let expected = format!("Bearer {}", inner.expected_key);
    match call.header("authorization") {
        Some(value) if value == expected => None,
        Some(value) => {
            let key = value.strip_prefix("Bearer ").unwrap_or(value);
            let message = format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask_key(key)
            );
            Some(openai_error(
                StatusCode::UNAUTHORIZED,
                &message,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ))
        }
        None => Some(openai_error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer \
             auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're \
             accessing the API from your browser and are prompted for a username and password. You can obtain an \
             API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        )),
    }
}

/// OpenAI-style masking: the first 3 and last 4 characters survive.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

/// `{"error":{"message","type","param","code"}}` with the given status.
fn openai_error(status: StatusCode, message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}

/// The error asked for with `#status=NNN`.
fn triggered_error(status: u16, model: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match code.as_u16() {
        400 => openai_error(
            code,
            "Your request was rejected as a result of our safety system. Your prompt may contain text that is not \
             allowed by our safety system.",
            "invalid_request_error",
            None,
            Some("content_policy_violation"),
        ),
        401 => openai_error(
            code,
            "Incorrect API key provided: sk-***********test. You can find your API key at \
             https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ),
        403 => openai_error(
            code,
            &format!(
                "Your organization must be verified to use the model `{model}`. Please go to: \
                 https://platform.openai.com/settings/organization/general and click on Verify Organization. If you \
                 just verified, it can take up to 15 minutes for access to propagate."
            ),
            "invalid_request_error",
            None,
            Some("organization_must_be_verified"),
        ),
        404 => openai_error(
            code,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        ),
        429 => {
            let mut response = openai_error(
                code,
                "Rate limit exceeded for images per minute in organization org-upstream. Limit: 5/1min. Current: \
                 6/1min. Please visit https://platform.openai.com/docs/guides/rate-limits to learn how to increase \
                 your rate limit.",
                "requests",
                None,
                Some("rate_limit_exceeded"),
            );
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            headers.insert("retry-after-ms", HeaderValue::from_static("1000"));
            response
        }
        500 => openai_error(
            code,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        ),
        502 | 503 => {
            openai_error(code, "The engine is currently overloaded, please try again later", "server_error", None, None)
        }
        other => {
            let kind = if other >= 500 { "server_error" } else { "invalid_request_error" };
            openai_error(code, &format!("Fake upstream error {other}."), kind, None, None)
        }
    }
}

/// Send `response`'s status and headers now and its body `delay` later.
async fn delay_body(response: Response, delay: Duration) -> Response {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let later = futures::stream::once(async move {
        tokio::time::sleep(delay).await;
        Ok::<_, std::io::Error>(bytes)
    });
    Response::from_parts(parts, Body::from_stream(later))
}

/// Send the first half of `response`'s body now, and the rest after [`STALL`] or never (the connection is
/// aborted), with no `content-length`.
async fn halve_body(response: Response, halves: Halves) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let (first, rest) = (bytes.slice(..bytes.len() / 2), bytes.slice(bytes.len() / 2..));
    let later = futures::stream::once(async move {
        match halves {
            Halves::Stall => {
                tokio::time::sleep(STALL).await;
                Ok(rest)
            }
            Halves::Cut => {
                tokio::time::sleep(DROP_DELAY).await;
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "fake OpenAI reset (#cut)"))
            }
        }
    });
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(later);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Send `response`'s body in chunks of `size` bytes, each its own write, with no `content-length`.
async fn trickle_body(response: Response, size: u64) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let size = usize::try_from(size).unwrap_or(1).max(1);
    let chunks: Vec<Bytes> =
        (0..bytes.len()).step_by(size).map(|at| bytes.slice(at..(at + size).min(bytes.len()))).collect();
    let stream = futures::stream::iter(chunks).then(|chunk| async move {
        tokio::task::yield_now().await;
        Ok::<_, std::io::Error>(chunk)
    });
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from_stream(stream))
}

/// DALL·E answer: `url` (default) or `b64_json` images, plus `revised_prompt` for dall-e-3.
fn dalle_response(
    inner: &Inner,
    params: &Params<'_>,
    model: &str,
    n: u64,
    seed: &str,
    prompt: &str,
    bad_image: Option<u64>,
) -> Response {
    let as_b64 = params.text("response_format").as_deref() == Some("b64_json");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let png = render_image(seed, i * 4 + 3, false, "png");
            let url = match image_url_trigger(prompt) {
                _ if bad_image == Some(i) && !as_b64 => format!("{}/_fake/html", inner.base),
                Some(url) if url.starts_with('/') => format!("{}{url}", inner.base),
                Some(url) => url,
                None if as_b64 => String::new(),
                None => inner.store_file(png.clone()),
            };
            let mut image = if as_b64 { json!({"b64_json": b64(&png)}) } else { json!({ "url": url }) };
            if model == "dall-e-3" {
                image["revised_prompt"] = json!(format!("A detailed, vivid rendering of: {prompt}"));
            }
            image
        })
        .collect();
    Json(json!({"created": unix_now(), "data": data})).into_response()
}

/// The resolved look of a GPT image answer (never `auto`).
struct GptLook {
    size: String,
    quality: String,
    background: String,
    output_format: String,
    /// Pixels per side of non-streamed images (`#side=N`, default [`IMAGE_SIDE`]).
    side: u32,
}

impl GptLook {
    fn resolve(params: &Params<'_>) -> GptLook {
        let size = params.text("size").filter(|s| s != "auto").unwrap_or_else(|| "1024x1024".to_owned());
        let quality = match params.text("quality").as_deref() {
            Some(q @ ("low" | "medium" | "high")) => q.to_owned(),
            _ => "high".to_owned(),
        };
        let background = match params.text("background").as_deref() {
            Some("transparent") => "transparent",
            _ => "opaque",
        };
        let output_format = match params.text("output_format").as_deref() {
            Some(f @ ("png" | "jpeg" | "webp")) => f.to_owned(),
            _ => "png".to_owned(),
        };
        let triggers =
            format!("{} {}", params.text("prompt").unwrap_or_default(), params.text("user").unwrap_or_default());
        let side =
            number_after(&triggers, "#side=").and_then(|n| u32::try_from(n).ok()).unwrap_or(IMAGE_SIDE).min(2048);
        GptLook { size, quality, background: background.to_owned(), output_format, side }
    }

    fn transparent(&self) -> bool {
        self.background == "transparent" && self.output_format != "jpeg"
    }

    /// Output image tokens per image (gpt-image-1 family table; other sizes scale with the pixel count).
    fn output_tokens(&self) -> u64 {
        let [square, portrait, landscape]: [u64; 3] = match self.quality.as_str() {
            "low" => [272, 408, 400],
            "medium" => [1056, 1584, 1568],
            _ => [4160, 6240, 6208],
        };
        match self.size.as_str() {
            "1024x1024" => square,
            "1024x1536" => portrait,
            "1536x1024" => landscape,
            other => other
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<u64>().ok()?, h.parse::<u64>().ok()?)))
                .map_or(square, |(w, h)| (square * w * h / (1024 * 1024)).max(1)),
        }
    }
}

fn usage(input: (u64, u64), output_tokens: u64, with_output_details: bool) -> Value {
    let (text_tokens, image_tokens) = input;
    let input_tokens = text_tokens + image_tokens;
    let mut usage = json!({
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
    });
    if with_output_details {
        usage["output_tokens_details"] = json!({"image_tokens": output_tokens, "text_tokens": 0});
    }
    usage
}

/// GPT image answer: only `b64_json`, plus the resolved look and `usage`.
fn gpt_response(look: &GptLook, n: u64, seed: &str, input: (u64, u64)) -> Response {
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let image = render_image_sized(seed, i * 4 + 3, look.transparent(), &look.output_format, look.side);
            json!({"b64_json": b64(&image)})
        })
        .collect();
    Json(json!({
        "created": unix_now(),
        "data": data,
        "background": look.background,
        "output_format": look.output_format,
        "size": look.size,
        "quality": look.quality,
        "usage": usage(input, n * look.output_tokens(), true),
    }))
    .into_response()
}

/// One SSE frame: `event: X\ndata: <compact json>\n\n`.
fn sse_frame(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// GPT image stream: per image, `partial_images` partial events then one completed event (its `usage` covers that
/// image), each sent on its own, `#gap` apart.
fn sse_response(
    endpoint: Endpoint,
    look: &GptLook,
    n: u64,
    partial_images: u64,
    seed: &str,
    input: (u64, u64),
    triggers: &Triggers,
) -> Response {
    let prefix = endpoint.event_prefix();
    let created_at = unix_now();
    let partial = |image: u64, index: u64| {
        let kind = format!("{prefix}.partial_image");
        let png = render_image(seed, image * 4 + index, look.transparent(), &look.output_format);
        let data = json!({
            "type": kind,
            "b64_json": b64(&png),
            "created_at": created_at,
            "size": look.size,
            "quality": look.quality,
            "background": look.background,
            "output_format": look.output_format,
            "partial_image_index": index,
        });
        sse_frame(&kind, &data)
    };
    let mut items: Vec<Result<Bytes, std::io::Error>> = Vec::new();
    if triggers.drop {
        items.push(Ok(partial(0, 0)));
        items.push(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "fake OpenAI dropped the stream (#drop)",
        )));
    } else if triggers.sse_error_first {
        let error = json!({"type": "error", "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": null,
            "code": null,
        }});
        items.push(Ok(sse_frame("error", &error)));
    } else if triggers.sse_error {
        items.push(Ok(partial(0, 0)));
        let error = json!({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": null,
            "code": null,
        }});
        items.push(Ok(sse_frame("error", &error)));
    } else {
        for image in 0..n {
            for index in 0..partial_images {
                items.push(Ok(partial(image, index)));
            }
            let kind = format!("{prefix}.completed");
            let png = render_image(seed, image * 4 + 3, look.transparent(), &look.output_format);
            let output_tokens = look.output_tokens() + partial_images * PARTIAL_IMAGE_TOKENS;
            let data = json!({
                "type": kind,
                "b64_json": b64(&png),
                "created_at": created_at,
                "size": look.size,
                "quality": look.quality,
                "background": look.background,
                "output_format": look.output_format,
                "usage": usage(input, output_tokens, false),
            });
            items.push(Ok(sse_frame(&kind, &data)));
        }
    }
    let gap = triggers.gap;
    let framing = triggers.framing.clone();
    let items = items.into_iter().map(move |item| item.map(|frame| reframe(frame, framing.as_deref())));
    let events = futures::stream::iter(items.enumerate()).then(move |(i, item)| async move {
        // An abort must not overtake the partial event still in hyper's write buffer, hence the minimum pause.
        let pause = if item.is_err() { gap.max(DROP_DELAY) } else { gap };
        if i > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        item
    });
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A frame with other (valid) SSE framing: `crlf` or `cr` line breaks, or `nospace` after `data:`.
fn reframe(frame: Bytes, framing: Option<&str>) -> Bytes {
    let text = String::from_utf8_lossy(&frame);
    match framing {
        Some("crlf") => Bytes::from(text.replace('\n', "\r\n")),
        Some("cr") => Bytes::from(text.replace('\n', "\r")),
        Some("nospace") => Bytes::from(text.replace("data: ", "data:").replace("event: ", "event:")),
        _ => frame,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A small deterministic image for (`seed`, `variant`) in the given output format (`png`, `jpeg` or `webp`).
pub fn render_image(seed: &str, variant: u64, transparent: bool, format: &str) -> Vec<u8> {
    render_image_sized(seed, variant, transparent, format, IMAGE_SIDE)
}

/// [`render_image`] at `side`×`side` pixels.
pub fn render_image_sized(seed: &str, variant: u64, transparent: bool, format: &str, side: u32) -> Vec<u8> {
    let digest = Sha256::new().chain_update(seed.as_bytes()).chain_update(variant.to_le_bytes()).finalize();
    let (r, g, b) = (digest[0], digest[1], digest[2]);
    let pixels = image::RgbaImage::from_fn(side, side, |x, y| {
        let (x, y) = (u8::try_from(x % 64).unwrap_or(0), u8::try_from(y % 64).unwrap_or(0));
        let alpha = if transparent && (x < 8 || y < 8) { 0 } else { 255 };
        image::Rgba([r ^ (x * 4), g ^ (y * 4), b ^ (x ^ y), alpha])
    });
    let picture = image::DynamicImage::ImageRgba8(pixels);
    let mut out = Cursor::new(Vec::new());
    let written = match format {
        "jpeg" => image::DynamicImage::ImageRgb8(picture.to_rgb8()).write_to(&mut out, image::ImageFormat::Jpeg),
        "webp" => picture.write_to(&mut out, image::ImageFormat::WebP),
        _ => picture.write_to(&mut out, image::ImageFormat::Png),
    };
    if written.is_err() {
        return Vec::new();
    }
    out.into_inner()
}
