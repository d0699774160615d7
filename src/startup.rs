//! `Application`: settings in, a bound listener and wired state out; then serve until a shutdown signal and
//! drain with a deadline. Tests build it on port 0 and read `local_addr()`.
//!
//! Background tasks (the usage writer, the `last_used_at` flusher, the image sweeper) are owned here and
//! stopped in order on shutdown: `/readyz` turns 503 → keep serving for the grace period → stop accepting →
//! drain requests → stop the sweeper → flush key usage → write queued usage rows → close the database.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use url::Url;

use crate::cache::ResponseCache;
use crate::cache::shared::SharedCache;
use crate::config::{CacheBackend, DownloadSettings, LimitsBackend, Settings, StorageBackend, UpstreamKind};
use crate::db::Db;
use crate::images::validate::ValidationPolicy;
use crate::ledger::{Ledger, LedgerWriter};
use crate::limits::local::LocalBackend;
use crate::limits::redis::RedisBackend;
use crate::limits::{Backend, Limiter, system_clock};
use crate::pipeline::ImagesService;

/// How long shutdown waits for rate-limit settlements (releasing the holds of requests still in flight).
const LIMITS_SHUTDOWN: Duration = Duration::from_secs(5);
use crate::metrics::Metrics;
use crate::rehost::Rehoster;
use crate::rehost::fetch::{Fetcher, OwnLinks};
use crate::rehost::links::{self, LinkSigner};
use crate::server::access::Access;
use crate::server::conn::{self, ConnLimits};
use crate::server::layers;
use crate::state::AppState;
use crate::storage::ImageStore;
use crate::storage::sweeper::Sweeper;
use crate::tenants::repo::TenantRepo;
use crate::tenants::store::TenantStore;
use crate::tenants::sync;
use crate::upstream::Upstreams;
use crate::upstream::mock::MockLinks;

/// A gateway ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    public_url: Url,
    state: AppState,
    writer: LedgerWriter,
    store: ImageStore,
    /// `metrics.listen`'s own listener, when set.
    metrics_listener: Option<TcpListener>,
}

impl Application {
    /// Open the database, apply configured tenants, bind the socket and wire everything.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let db = Db::connect(&settings.database, &settings.storage.data_dir).await?;
        let repo = TenantRepo::with_upstreams(db.clone(), settings.route_names());
        sync::apply(&repo, &settings.tenants)
            .await
            .map_err(|e| anyhow::anyhow!("cannot apply the tenants of the configuration: {e}"))?;
        warn_about_unknown_upstreams(&repo, &settings).await;
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        let public_url = match &settings.server.public_url {
            Some(url) => url.clone(),
            None => Url::parse(&format!("http://{addr}"))?,
        };
        for warning in deployment_warnings(&settings, addr) {
            tracing::warn!("{warning}");
        }
        let key = links::load_or_create_key(
            settings.images.signing_key.as_ref().map(crate::config::Secret::expose),
            &settings.storage.data_dir,
        )?;
        let signer = LinkSigner::new(key, public_url.clone());
        let mock_links = MockLinks::new(signer.derive(crate::routes::MOCK_LINKS_KEY));
        let catalog = Arc::new(settings.catalog().map_err(crate::config::ConfigError)?);
        let metrics = Arc::new(Metrics::new(catalog.ids()));
        let upstreams =
            Arc::new(Upstreams::from_settings_observed(&settings, &public_url, &mock_links, Some(&metrics))?);
        let tenants = Arc::new(TenantStore::new(repo, settings.auth.key_cache_ttl, settings.auth.max_key_lookups));
        let (ledger, writer) = Ledger::start_observed(db.clone(), &settings.usage, Some(metrics.clone()));
        let limiter = limiter(&settings, &db, &ledger).await?;
        tracing::debug!(backend = limiter.backend_name(), "rate limits ready");
        let (rehoster, store) = rehoster(&settings, &db, &public_url, signer, &metrics)?;
        let prices = Arc::new(settings.pricing.clone().with_catalog(&catalog));
        let policy = ValidationPolicy {
            unknown_models: settings.validation.unknown_models,
            rehost: settings.images.rehost,
            catalog,
            mend_file_types: settings.validation.mend_file_types,
            builtin_lifecycle: settings.builtin_lifecycle(),
        };
        let cache = response_cache(&settings)?;
        let images = ImagesService::new(upstreams, policy, prices, ledger.clone(), limiter, rehoster, cache)
            .with_end_user(settings.attribution.end_user)
            .with_replay(settings.replay.enabled.then_some(settings.replay.window));
        let metrics_listener = match settings.metrics.listen.filter(|_| settings.metrics.enabled) {
            Some(at) => Some(
                TcpListener::bind(at)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {at} (metrics.listen): {e}"))?,
            ),
            None => None,
        };
        let state = AppState::new(Arc::new(settings), db, tenants, images, metrics, ledger);
        Ok(Self { listener, addr, public_url, state, writer, store, metrics_listener })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served when `metrics.listen` gives it a listener of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The base URL callers use.
    pub fn public_url(&self) -> &Url {
        &self.public_url
    }

    /// Serve until `shutdown` resolves; then `/readyz` answers 503 while the listener keeps accepting for
    /// `server.shutdown_grace` (a second SIGTERM/SIGINT ends the grace at once), then stop accepting, let
    /// in-flight requests finish until `server.shutdown_timeout` after the signal, write what is pending, and
    /// return.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self { listener, public_url, state, writer, store, metrics_listener, .. } = self;
        let settings = state.settings.clone();
        tracing::info!(
            upstream = state.images.upstream_name(),
            upstreams = settings.upstreams.len(),
            db = ?state.db.backend(),
            images = ?store.backend(),
            rehost = settings.images.rehost,
            "listening on {public_url}"
        );
        let flusher = tokio::spawn(flush_last_used(state.tenants.clone(), settings.auth.last_used_flush));
        let sweeper = Sweeper::start(store, settings.images.sweep_interval);
        let access = Access { metrics: state.metrics.clone(), log: settings.log.access };
        let app = layers::apply(crate::routes::router(state.clone()), settings.server.request_timeout, access);
        let metrics_server = metrics_listener.map(|l| {
            tracing::info!(addr = ?l.local_addr().ok(), "metrics on their own listener");
            tokio::spawn(axum::serve(l, crate::routes::metrics_router(state.clone())).into_future())
        });
        let signalled = Arc::new(tokio::sync::Notify::new());
        let notify = signalled.clone();
        let drain_state = state.clone();
        let (grace, deadline) = (settings.server.shutdown_grace, settings.server.shutdown_timeout);
        let graceful = async move {
            shutdown.await;
            drain_state.begin_draining();
            notify.notify_one();
            if !grace.is_zero() {
                let again = crate::server::shutdown::signal();
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    "shutting down: /readyz answers 503; still serving until load balancers notice (signal again \
                     to stop at once)"
                );
                tokio::select! {
                    () = tokio::time::sleep(grace) => {}
                    () = again => tracing::info!("second signal: skipping the grace period"),
                }
            }
            tracing::info!(deadline_secs = deadline.as_secs(), "stopped accepting; draining in-flight requests");
        };
        let limits = ConnLimits {
            header_read_timeout: settings.server.header_read_timeout,
            idle_timeout: settings.server.idle_timeout,
            max_connections: settings.server.max_connections,
        };
        // conn::serve puts each connection's peer address on its requests (the console's sign-in back-off).
        let served: anyhow::Result<()> = tokio::select! {
            () = conn::serve(listener, app, limits, graceful) => {
                tracing::info!("drained, exiting");
                Ok(())
            }
            () = drain_deadline(signalled, deadline) => {
                tracing::warn!(deadline_secs = deadline.as_secs(), "drain deadline passed with requests in flight, exiting");
                Ok(())
            }
        };
        // Requests still running past the drain deadline: release their slots and holds in a shared Redis now,
        // rather than leave them to their leases.
        state.images.limiter().shutdown(LIMITS_SHUTDOWN).await;
        flusher.abort();
        if let Some(m) = metrics_server {
            m.abort();
        }
        sweeper.stop().await;
        if let Err(e) = state.tenants.flush_last_used().await {
            tracing::warn!(error = %e, "could not record key last-used times");
        }
        writer.close().await;
        state.db.close().await;
        served
    }
}

/// The image store and the re-hoster around it.
fn rehoster(
    settings: &Settings,
    db: &Db,
    public_url: &Url,
    signer: LinkSigner,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<Rehoster>, ImageStore)> {
    let store = ImageStore::open(&settings.storage, db.clone())?;
    let download = download_settings(settings);
    let fetcher = Fetcher::with_own_links(&download, mock_links(settings, public_url))?;
    let rehoster =
        Rehoster::new(store.clone(), fetcher, signer, Arc::new(settings.images.clone())).observed(metrics.clone());
    Ok((Arc::new(rehoster), store))
}

/// The mock upstream's links, on this gateway's own origin, when any upstream is the mock: re-hosting downloads
/// exactly those (`/_mock/files/…` on that scheme, host and port) without opening the download guard to that
/// host for every upstream.
pub fn mock_links(settings: &Settings, public_url: &Url) -> Option<OwnLinks> {
    let any_mock =
        std::iter::once(&settings.upstream).chain(settings.upstreams.values()).any(|up| up.kind == UpstreamKind::Mock);
    if !any_mock {
        return None;
    }
    OwnLinks::new(public_url, &format!("{}/", crate::wire::paths::MOCK_FILES))
}

/// `images.download` covering the image hosts of every configured upstream (`[upstream]` and each
/// `[upstreams.<name>]`): each upstream's `image_hosts` are allowed. (A mock upstream's links are exempted
/// one by one by [`mock_links`], never by allowing the gateway's host.)
pub fn download_settings(settings: &Settings) -> DownloadSettings {
    let mut download = settings.images.download.clone();
    let allow = |list: &mut Vec<String>, host: &str| {
        if !list.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            list.push(host.to_owned());
        }
    };
    for up in std::iter::once(&settings.upstream).chain(settings.upstreams.values()) {
        for host in &up.image_hosts {
            allow(&mut download.allowed_hosts, host);
        }
    }
    download
}

/// Tenants in the database (created through the admin API or the CLI, perhaps by a gateway with another
/// configuration) whose upstream this gateway does not know: their requests will fail with 500 until it does.
async fn warn_about_unknown_upstreams(repo: &TenantRepo, settings: &Settings) {
    let Ok(tenants) = repo.list_tenants().await else { return };
    for t in tenants {
        if let Some(name) = t.upstream.as_deref()
            && !settings.routes_to(name)
        {
            tracing::warn!(
                tenant = %t.name,
                upstream = name,
                "the tenant's upstream is not configured here: add [upstreams.{name}] or change the tenant's upstream"
            );
        }
    }
}

/// Deployment mistakes that still start, said once at startup: links other replicas refuse, links callers
/// cannot reach.
pub fn deployment_warnings(settings: &Settings, bound: SocketAddr) -> Vec<String> {
    let mut warnings = Vec::new();
    let postgres = settings.database.url.as_ref().is_some_and(|u| u.expose().starts_with("postgres"));
    if postgres && settings.images.signing_key.is_none() {
        warnings.push(
            "database.url is PostgreSQL (several replicas?) but images.signing_key is unset: each replica signs \
             image links with its own generated <data_dir>/signing.key, so another replica answers them 403. Set \
             IMAGEGATE__IMAGES__SIGNING_KEY to one shared key on every replica"
                .to_owned(),
        );
    }
    if postgres && settings.storage.backend == StorageBackend::Local && settings.images.rehost {
        warnings.push(format!(
            "database.url is PostgreSQL but re-hosted images are stored on local disk ({}): replicas that do not \
             share that directory answer each other's links 404. Use storage.backend = \"s3\" or a shared volume",
            settings.storage.images_dir().display()
        ));
    }
    if settings.server.public_url.is_none() && bound.ip().is_unspecified() {
        warnings.push(format!(
            "server.public_url is unset and the gateway listens on {bound}: image links will point at \
             http://{bound}, which callers cannot reach. Set server.public_url (IMAGEGATE__SERVER__PUBLIC_URL) to \
             the address callers use"
        ));
    }
    warnings
}

/// The response cache, with its Redis tier when `cache.backend = "redis"`. Redis need not be up: the tier
/// connects in the background, and the cache works from memory until it does.
fn response_cache(settings: &Settings) -> anyhow::Result<ResponseCache> {
    let c = &settings.cache;
    let shared = match (c.backend, &c.redis_url) {
        (CacheBackend::Redis, Some(url)) => Some(
            SharedCache::new(url.expose(), &c.redis_prefix, c.redis_timeout, c.redis_backoff)
                .map_err(|e| anyhow::anyhow!("cache.redis_url is not a usable Redis URL: {e}"))?,
        ),
        (CacheBackend::Redis, None) => anyhow::bail!("cache.redis_url is required when cache.backend = \"redis\""),
        (CacheBackend::Memory, _) => None,
    };
    Ok(ResponseCache::new(c, shared))
}

/// The rate-limit backend the settings ask for. Redis is connected in the background: unreachable at startup,
/// each request meets `on_backend_error` until it answers (the start waits for it at most `redis_timeout`).
async fn limiter(settings: &Settings, db: &Db, ledger: &Ledger) -> anyhow::Result<Limiter> {
    let l = &settings.limits;
    let backend: Arc<dyn Backend> = match (l.backend, &l.redis_url) {
        (LimitsBackend::Redis, Some(url)) => {
            let lease = l.lease_or(settings.server.request_timeout);
            let redis = RedisBackend::start(url.expose(), &l.redis_prefix, l.redis_timeout, lease, db.clone())
                .map_err(|e| anyhow::anyhow!("cannot use Redis for rate limits: {e}"))?
                .counting_unwritten(ledger.unwritten());
            redis.wait_connected(l.redis_timeout).await;
            Arc::new(redis)
        }
        (LimitsBackend::Redis, None) => anyhow::bail!("limits.redis_url is required when limits.backend = \"redis\""),
        (LimitsBackend::Local, _) => Arc::new(LocalBackend::new(system_clock(), Some(db.clone()))),
    };
    Ok(Limiter::new(backend, l.default.clone(), l.on_backend_error))
}

/// Resolves `deadline` after the shutdown signal.
async fn drain_deadline(signalled: Arc<tokio::sync::Notify>, deadline: Duration) {
    signalled.notified().await;
    tokio::time::sleep(deadline).await;
}

async fn flush_last_used(tenants: Arc<TenantStore>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = tenants.flush_last_used().await {
            tracing::warn!(error = %e, "could not record key last-used times");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, UpstreamSettings};

    #[test]
    fn downloads_are_allowed_from_every_configured_upstreams_image_hosts() {
        let mut settings = Settings::default();
        settings.upstream.image_hosts = vec!["images.openai.example".into()];
        settings.upstreams.insert(
            "inhouse".into(),
            UpstreamSettings {
                base_url: Url::parse("http://gen.internal:8000/v1").unwrap(),
                api_key: Some(Secret::new("k")),
                image_hosts: vec!["*.cdn.internal".into(), "IMAGES.openai.example".into()],
                ..UpstreamSettings::default()
            },
        );
        settings
            .upstreams
            .insert("offline".into(), UpstreamSettings { kind: UpstreamKind::Mock, ..UpstreamSettings::default() });
        let public = Url::parse("http://gateway.local:8080").unwrap();
        let d = download_settings(&settings);
        assert_eq!(d.allowed_hosts, ["*.blob.core.windows.net", "images.openai.example", "*.cdn.internal"]);
        assert!(d.private_hosts.is_empty(), "a mock opens no host to private downloads: {d:?}");
        assert!(!d.allow_http, "a mock allows no plain-HTTP host: {d:?}");
        assert!(mock_links(&settings, &public).is_some(), "the mock's own links are exempt one by one");

        // Without a mock anywhere, plain HTTP stays off and the gateway's own host is not added; an HTTP
        // upstream's base URL host is not an image host unless listed.
        settings.upstreams.remove("offline");
        assert!(mock_links(&settings, &public).is_none());
        let d = download_settings(&settings);
        assert!(!d.allow_http, "{d:?}");
        assert!(!d.allowed_hosts.iter().any(|h| h == "gateway.local" || h == "gen.internal"), "{d:?}");
    }

    #[test]
    fn replica_and_container_mistakes_are_warned_about() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut s = Settings::default();
        assert!(deployment_warnings(&s, local).is_empty(), "the embedded default is fine");

        s.database.url = Some(Secret::new("postgres://db/imagegate"));
        let w = deployment_warnings(&s, local);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("images.signing_key is unset") && w[1].contains("local disk"), "{w:?}");
        s.images.signing_key = Some(Secret::new("k".repeat(32)));
        s.storage.backend = StorageBackend::S3;
        assert!(deployment_warnings(&s, local).is_empty(), "shared key and shared storage");

        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let w = deployment_warnings(&s, any);
        assert!(w.len() == 1 && w[0].contains("http://0.0.0.0:8080"), "{w:?}");
        s.server.public_url = Some(Url::parse("https://images.example.com").unwrap());
        assert!(deployment_warnings(&s, any).is_empty());
        assert!(deployment_warnings(&s, "[::]:8080".parse().unwrap()).is_empty());
    }
}
