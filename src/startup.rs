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
use crate::config::{CacheBackend, LimitsBackend, Settings, StorageBackend, UpstreamKind};
use crate::db::Db;
use crate::images::ImagesService;
use crate::images::validate::ValidationPolicy;
use crate::ledger::{Ledger, LedgerWriter};
use crate::limits::local::LocalBackend;
use crate::limits::redis::RedisBackend;
use crate::limits::{Backend, Limiter, system_clock};
use crate::rehost::Rehoster;
use crate::rehost::fetch::Fetcher;
use crate::rehost::links::{self, LinkSigner};
use crate::server::layers;
use crate::state::AppState;
use crate::storage::ImageStore;
use crate::storage::sweeper::Sweeper;
use crate::tenants::repo::TenantRepo;
use crate::tenants::store::TenantStore;
use crate::tenants::sync;
use crate::upstream::Upstream;
use crate::upstream::mock::{MockLinks, MockUpstream};
use crate::upstream::openai::OpenAiUpstream;

/// A gateway ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    public_url: Url,
    state: AppState,
    writer: LedgerWriter,
    store: ImageStore,
}

impl Application {
    /// Open the database, apply configured tenants, bind the socket and wire everything.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let db = Db::connect(&settings.database, &settings.storage.data_dir).await?;
        let repo = TenantRepo::new(db.clone());
        sync::apply(&repo, &settings.tenants)
            .await
            .map_err(|e| anyhow::anyhow!("cannot apply the tenants of the configuration: {e}"))?;
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
        let upstream: Arc<dyn Upstream> = match settings.upstream.kind {
            UpstreamKind::Openai => Arc::new(OpenAiUpstream::new(&settings.upstream)?),
            UpstreamKind::Mock => Arc::new(MockUpstream::new(
                public_url.clone(),
                MockLinks::new(signer.derive(crate::routes::MOCK_LINKS_KEY)),
            )),
        };
        let tenants = Arc::new(TenantStore::new(repo, settings.auth.key_cache_ttl));
        let (ledger, writer) = Ledger::start(db.clone(), &settings.usage);
        let limiter = limiter(&settings, &db).await?;
        tracing::debug!(backend = limiter.backend_name(), "rate limits ready");
        let (rehoster, store) = rehoster(&settings, &db, &public_url, signer)?;
        let policy =
            ValidationPolicy { unknown_models: settings.validation.unknown_models, rehost: settings.images.rehost };
        let cache = response_cache(&settings).await?;
        let images =
            ImagesService::new(upstream, policy, Arc::new(settings.pricing.clone()), ledger, limiter, rehoster, cache);
        let state = AppState::new(Arc::new(settings), db, tenants, images);
        Ok(Self { listener, addr, public_url, state, writer, store })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        let Self { listener, public_url, state, writer, store, .. } = self;
        let settings = state.settings.clone();
        tracing::info!(
            upstream = state.images.upstream_name(),
            db = ?state.db.backend(),
            images = ?store.backend(),
            rehost = settings.images.rehost,
            "listening on {public_url}"
        );
        let flusher = tokio::spawn(flush_last_used(state.tenants.clone(), settings.auth.last_used_flush));
        let sweeper = Sweeper::start(store, settings.images.sweep_interval);
        let app = layers::apply(crate::routes::router(state.clone()), settings.server.request_timeout);
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
        let serve = axum::serve(listener, app).with_graceful_shutdown(graceful);
        let served = tokio::select! {
            result = serve.into_future() => result.map(|()| tracing::info!("drained, exiting")),
            () = drain_deadline(signalled, deadline) => {
                tracing::warn!(deadline_secs = deadline.as_secs(), "drain deadline passed with requests in flight, exiting");
                Ok(())
            }
        };
        flusher.abort();
        sweeper.stop().await;
        if let Err(e) = state.tenants.flush_last_used().await {
            tracing::warn!(error = %e, "could not record key last-used times");
        }
        writer.close().await;
        state.db.close().await;
        Ok(served?)
    }
}

/// The image store and the re-hoster around it. The mock upstream's own links point at this gateway, so its
/// host is allowed (and may be loopback) for downloads.
fn rehoster(
    settings: &Settings,
    db: &Db,
    public_url: &Url,
    signer: LinkSigner,
) -> anyhow::Result<(Arc<Rehoster>, ImageStore)> {
    let store = ImageStore::open(&settings.storage, db.clone())?;
    let mut download = settings.images.download.clone();
    if settings.upstream.kind == UpstreamKind::Mock
        && let Some(host) = public_url.host_str()
    {
        download.allowed_hosts.push(host.to_owned());
        download.private_hosts.push(host.to_owned());
        download.allow_http = download.allow_http || public_url.scheme() == "http";
    }
    let fetcher = Fetcher::new(&download)?;
    let rehoster = Rehoster::new(store.clone(), fetcher, signer, Arc::new(settings.images.clone()));
    Ok((Arc::new(rehoster), store))
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

/// The response cache, with its Redis tier when `cache.backend = "redis"`.
async fn response_cache(settings: &Settings) -> anyhow::Result<ResponseCache> {
    let c = &settings.cache;
    let shared = match (c.backend, &c.redis_url) {
        (CacheBackend::Redis, Some(url)) => Some(
            SharedCache::connect(url.expose(), &c.redis_prefix, c.redis_timeout)
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach Redis for the response cache: {e}"))?,
        ),
        (CacheBackend::Redis, None) => anyhow::bail!("cache.redis_url is required when cache.backend = \"redis\""),
        (CacheBackend::Memory, _) => None,
    };
    Ok(ResponseCache::new(c, shared))
}

/// The rate-limit backend the settings ask for.
async fn limiter(settings: &Settings, db: &Db) -> anyhow::Result<Limiter> {
    let l = &settings.limits;
    let backend: Arc<dyn Backend> = match (l.backend, &l.redis_url) {
        (LimitsBackend::Redis, Some(url)) => Arc::new(
            RedisBackend::connect(url.expose(), &l.redis_prefix, l.redis_timeout, db.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach Redis for rate limits: {e}"))?,
        ),
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
    use crate::config::Secret;

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
