//! `AppState`: what every handler and layer shares, behind one `Arc`.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Settings;
use crate::db::Db;
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
    pub images: ImagesService,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(settings: Arc<Settings>, db: Db, tenants: Arc<TenantStore>, images: ImagesService) -> Self {
        Self(Arc::new(Inner { settings, db, tenants, images, draining: AtomicBool::new(false) }))
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
