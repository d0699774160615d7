//! The database: one sqlx `AnyPool` over SQLite (the embedded default: one WAL-mode file under the data
//! directory) or PostgreSQL (several replicas), the embedded migrations of `migrations/`, and the readiness
//! ping. The SQL in this crate is portable between the two: text ids, BIGINT Unix-millisecond timestamps,
//! JSON as text, `$n` placeholders in order.

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

use crate::config::DatabaseSettings;

/// Migrations compiled into the binary, so a deployment needs nothing but the executable.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Which engine is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool and what it talks to.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connect, and run migrations unless `database.migrate = false`.
    pub async fn connect(settings: &DatabaseSettings, data_dir: &Path) -> anyhow::Result<Self> {
        install_default_drivers();
        let url = match &settings.url {
            Some(url) => url.expose().to_owned(),
            None => {
                std::fs::create_dir_all(data_dir)
                    .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", data_dir.display()))?;
                format!("sqlite://{}?mode=rwc", data_dir.join("imagegate.db").display())
            }
        };
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            anyhow::bail!("database.url must start with sqlite: or postgres:");
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite {
                settings.max_connections.min(8)
            } else {
                settings.max_connections
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers (admin, reports) run beside the usage writer; busy_timeout makes
                        // concurrent writers wait instead of failing.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the {backend:?} database: {e}"))?;
        let db = Self { pool, backend };
        if settings.migrate {
            MIGRATOR.run(&db.pool).await.map_err(|e| anyhow::anyhow!("database migration failed: {e}"))?;
        }
        Ok(db)
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// True when a trivial query answers (used by `/readyz`).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Close the pool (after the usage ledger has flushed).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A random opaque id for rows.
pub fn new_id() -> String {
    crate::wire::hex(&rand::random::<[u8; 12]>())
}
