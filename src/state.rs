//! `AppState`: what every handler and layer shares, behind one `Arc`.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Settings;
use crate::db::Db;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pipeline::ImagesService;
use crate::tenants::store::TenantStore;

/// Shared state; clone freely.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The contents of [`AppState`].
pub struct Inner {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub tenants: Arc<TenantStore>,
    /// Shared, so an upstream call's own task holds the pipeline by one pointer.
    pub images: Arc<ImagesService>,
    /// This gateway's metrics (`/metrics`).
    pub metrics: Arc<Metrics>,
    /// The usage ledger, for its queue and counters on `/metrics`.
    pub ledger: Ledger,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(
        settings: Arc<Settings>,
        db: Db,
        tenants: Arc<TenantStore>,
        images: ImagesService,
        metrics: Arc<Metrics>,
        ledger: Ledger,
    ) -> Self {
        Self(Arc::new(Inner {
            settings,
            db,
            tenants,
            images: Arc::new(images),
            metrics,
            ledger,
            draining: AtomicBool::new(false),
        }))
    }

    /// Mark the gateway as shutting down: `/readyz` turns 503.
    pub fn begin_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
