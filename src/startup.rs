//! `Application`: settings in, a bound listener and wired state out; then serve until a shutdown signal and
//! drain with a deadline. Tests build it on port 0 and read `local_addr()`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use url::Url;

use crate::config::{Settings, UpstreamKind};
use crate::images::ImagesService;
use crate::images::validate::ValidationPolicy;
use crate::server::layers;
use crate::state::AppState;
use crate::tenants::store::ConfigTenantStore;
use crate::upstream::Upstream;
use crate::upstream::mock::MockUpstream;
use crate::upstream::openai::OpenAiUpstream;

/// A gateway ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    public_url: Url,
    state: AppState,
}

impl Application {
    /// Bind the socket and wire everything from validated settings.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        let public_url = match &settings.server.public_url {
            Some(url) => url.clone(),
            None => Url::parse(&format!("http://{addr}"))?,
        };
        let upstream: Arc<dyn Upstream> = match settings.upstream.kind {
            UpstreamKind::Openai => Arc::new(OpenAiUpstream::new(&settings.upstream)?),
            UpstreamKind::Mock => Arc::new(MockUpstream::new(public_url.clone())),
        };
        let tenants = Arc::new(ConfigTenantStore::new(&settings.tenants));
        let policy = ValidationPolicy { unknown_models: settings.validation.unknown_models };
        let state = AppState::new(Arc::new(settings), tenants, ImagesService::new(upstream, policy));
        Ok(Self { listener, addr, public_url, state })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL callers use.
    pub fn public_url(&self) -> &Url {
        &self.public_url
    }

    /// Serve until `shutdown` resolves, then stop accepting, let in-flight requests finish for up to
    /// `server.shutdown_timeout`, and return.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let state = self.state.clone();
        let settings = state.settings.clone();
        tracing::info!(
            upstream = state.images.upstream_name(),
            tenants = state.tenants.tenant_count(),
            "listening on {}",
            self.public_url
        );
        if state.tenants.tenant_count() == 0 {
            tracing::warn!("no tenants are configured: every image request will get 401 (see `imagegate keys new`)");
        }
        let app = layers::apply(crate::routes::router(state.clone()), settings.server.request_timeout);
        let started_draining = Arc::new(tokio::sync::Notify::new());
        let notify = started_draining.clone();
        let drain_state = state.clone();
        let graceful = async move {
            shutdown.await;
            drain_state.begin_draining();
            notify.notify_one();
        };
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(graceful);
        let deadline = settings.server.shutdown_timeout;
        tokio::select! {
            result = serve.into_future() => {
                result?;
                tracing::info!("drained, exiting");
            }
            () = drain_deadline(started_draining, deadline) => {
                tracing::warn!(deadline_secs = deadline.as_secs(), "drain deadline passed with requests in flight, exiting");
            }
        }
        Ok(())
    }
}

async fn drain_deadline(started: Arc<tokio::sync::Notify>, deadline: Duration) {
    started.notified().await;
    tracing::info!(deadline_secs = deadline.as_secs(), "draining in-flight requests");
    tokio::time::sleep(deadline).await;
}
