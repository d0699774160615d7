//! The floor under issue 17's targets: servers built from the gateway's own stack (tokio's runtime as the
//! gateway starts it, mimalloc, hyper's HTTP/1.1 server, hyper's pooled client) that do nothing but the
//! HTTP part of a request, so that `scripts/bench.sh --floor` can measure them in the same run as nginx and
//! the gateway:
//!
//! - `answer`: reads each request's body to its end and answers a fixed body (`--body`) with its content
//!   type: what a cache hit costs with no key check, no JSON, no validation, no limits and no ledger row;
//! - `axum`: the same answer from an axum `Router` with one route, each request passed to it by
//!   `oneshot` as the gateway's connection loop does: what axum's routing and body types add;
//! - `proxy`: reads each request's body, sends it with the same method, path and headers to `--upstream`
//!   over a pooled keep-alive connection and relays the answer it read whole: what an uncached request costs
//!   with nothing of the gateway's own but the exchange.
//!
//! `serve --config FILE` is `proxy` as the memory benchmark starts a gateway (`bench_memory --bin`): on port 0,
//! to the `[upstream] base_url` of the gateway configuration it is given, saying where it listens as the gateway
//! does.
//!
//! None of them is a gateway; they are references for docs/performance.md ("Tenth round").
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    reason = "a benchmark program run by hand: it stops loudly on any failure"
)]

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Answer,
    Axum,
    Proxy,
    /// `proxy`, started as a gateway is: `serve --config FILE`.
    Serve,
}

#[derive(Parser, Debug)]
#[command(about = "HTTP-only reference servers on the gateway's stack (docs/performance.md)")]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The answer of `answer` and `axum` (JSON text).
    #[arg(long, default_value = "{}")]
    body: String,
    /// The upstream of `proxy`, as `http://host:port` (the request's path is appended).
    #[arg(long, default_value = "http://127.0.0.1:1")]
    upstream: String,
    /// For `serve`: a gateway configuration, whose `[upstream] base_url` (without its `/v1`) is the upstream.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

/// The upstream of a gateway configuration file: its `[upstream] base_url` without the trailing `/v1`.
fn upstream_of(config: &std::path::Path) -> String {
    let text = std::fs::read_to_string(config).expect("read the configuration");
    let table: toml::Table = text.parse().expect("a TOML configuration");
    let base = table["upstream"]["base_url"].as_str().expect("[upstream] base_url");
    base.trim_end_matches('/').trim_end_matches("/v1").to_owned()
}

type Answer = Response<Full<Bytes>>;

fn fixed(body: &Bytes) -> Answer {
    let mut response = Response::new(Full::new(body.clone()));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    if let Mode::Serve = args.mode {
        args.upstream = upstream_of(args.config.as_deref().expect("serve needs --config"));
        args.mode = Mode::Proxy;
    }
    let listener = TcpListener::bind(args.listen).await.expect("bind");
    // As the gateway says it, so that the memory benchmark's harness finds the port of `--listen 127.0.0.1:0`.
    eprintln!("listening on http://{}", listener.local_addr().expect("local address"));
    let body = Bytes::from(args.body.clone());
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let upstream = args.upstream.trim_end_matches('/').to_owned();
    let router = Router::new().route(
        "/v1/images/generations",
        post({
            let body = body.clone();
            move |request: Request<Body>| {
                let body = body.clone();
                async move {
                    let _ = request.into_body().collect().await;
                    fixed(&body).map(Body::new)
                }
            }
        }),
    );
    loop {
        let (tcp, _) = listener.accept().await.expect("accept");
        let _ = tcp.set_nodelay(true);
        let (body, client, upstream, router, mode) =
            (body.clone(), client.clone(), upstream.clone(), router.clone(), args.mode);
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new()).http1_only();
            let io = TokioIo::new(tcp);
            let result = match mode {
                Mode::Answer => {
                    let service = tower::service_fn(move |request: Request<Incoming>| {
                        let body = body.clone();
                        async move {
                            let _ = request.into_body().collect().await;
                            Ok::<_, Infallible>(fixed(&body))
                        }
                    });
                    builder.serve_connection(io, TowerToHyperService::new(service)).await
                }
                Mode::Axum => {
                    let service = tower::service_fn(move |request: Request<Incoming>| {
                        let router = router.clone();
                        async move { router.oneshot(request.map(Body::new)).await }
                    });
                    builder.serve_connection(io, TowerToHyperService::new(service)).await
                }
                Mode::Proxy | Mode::Serve => {
                    let service = tower::service_fn(move |request: Request<Incoming>| {
                        let (client, upstream) = (client.clone(), upstream.clone());
                        async move { Ok::<_, Infallible>(relay(&client, &upstream, request).await) }
                    });
                    builder.serve_connection(io, TowerToHyperService::new(service)).await
                }
            };
            if let Err(e) = result {
                eprintln!("connection: {e}");
            }
        });
    }
}

/// One request relayed: its body read whole, sent upstream with its method, path and headers (but `host`),
/// and the upstream's answer read whole and returned with its status and headers.
async fn relay(client: &Client<HttpConnector, Full<Bytes>>, upstream: &str, request: Request<Incoming>) -> Answer {
    let (mut parts, body) = request.into_parts();
    let body = body.collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{upstream}{path}").parse().expect("upstream URI");
    parts.headers.remove(header::HOST);
    let answer = match client.request(Request::from_parts(parts, Full::new(body))).await {
        Ok(answer) => answer,
        Err(e) => {
            let mut response = Response::new(Full::new(Bytes::from(e.to_string())));
            *response.status_mut() = http::StatusCode::BAD_GATEWAY;
            return response;
        }
    };
    let (parts, body) = answer.into_parts();
    let body = body.collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    Response::from_parts(parts, Full::new(body))
}
