//! `TestApp`: the real gateway, in-process on port 0, with two tenants, pointed at any upstream URL.
//! Also `GatewayProcess`: the compiled binary started as users start it, for CLI, signal and log tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imagegate::config::{KeySettings, Secret, Settings, TenantSettings, UpstreamKind};
use imagegate::domain::keys;
use imagegate::startup::Application;
use tokio::sync::oneshot;
use url::Url;

/// The upstream key the fake expects; tenants never see it.
pub const UPSTREAM_KEY: &str = "sk-upstream-test";

/// Config-file lines letting a gateway download images from a fake upstream on loopback over plain HTTP.
pub const FAKE_IMAGE_HOSTS: &str =
    "[images.download]\nallowed_hosts = [\"127.0.0.1\"]\nprivate_hosts = [\"127.0.0.1\"]\nallow_http = true\n";

/// The admin token of every test gateway.
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// Which database a test gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestDb {
    /// A fresh SQLite file in a temporary directory (the embedded default).
    Sqlite,
    /// A fresh database on the PostgreSQL server at `IMAGEGATE_TEST_POSTGRES`
    /// (default `postgres://postgres@127.0.0.1:5432/test`).
    Postgres,
}

impl TestDb {
    /// The database of tests that do not choose one: `IMAGEGATE_TEST_DB=postgres` runs them on PostgreSQL
    /// (`.ci/run` runs the whole `tests/api` binary a second time so), anything else on SQLite.
    pub fn from_env() -> Self {
        match std::env::var("IMAGEGATE_TEST_DB").as_deref() {
            Ok("postgres" | "postgresql" | "pg") => Self::Postgres,
            Ok("" | "sqlite") | Err(_) => Self::Sqlite,
            Ok(other) => panic!("IMAGEGATE_TEST_DB={other}: use sqlite or postgres"),
        }
    }
}

/// The PostgreSQL server the tests use (a database on it that always exists).
fn postgres_admin_url() -> String {
    std::env::var("IMAGEGATE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Create an empty PostgreSQL database for one test and return its URL. The database stays after the test
/// (`.ci/run` drops every `ig_test_*` database before a run); [`PostgresDb`] drops its own when dropped.
pub async fn fresh_postgres() -> String {
    use sqlx::Executor;
    let admin = postgres_admin_url();
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for this test (run `bash .ci/run`): {e}"));
    let name = format!("ig_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    conn.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create database");
    let _ = sqlx::Connection::close(conn).await;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_owned();
    format!("{base}/{name}")
}

/// A fresh PostgreSQL database that is dropped (connections and all) when the last handle goes, so a run of
/// the suite on PostgreSQL does not leave hundreds of databases behind.
#[derive(Debug)]
pub struct PostgresDb {
    pub url: String,
}

impl PostgresDb {
    pub async fn create() -> Arc<Self> {
        Arc::new(Self { url: fresh_postgres().await })
    }
}

impl Drop for PostgresDb {
    fn drop(&mut self) {
        let Some((_, name)) = self.url.rsplit_once('/') else { return };
        if !name.starts_with("ig_test_") || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return;
        }
        let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread with its own runtime can.
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                use sqlx::Executor;
                sqlx::any::install_default_drivers();
                let admin = postgres_admin_url();
                if let Ok(mut conn) = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await {
                    let _ = conn.execute(statement.as_str()).await;
                    let _ = sqlx::Connection::close(conn).await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// A running gateway and keys for two tenants.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub root: String,
    /// `http://127.0.0.1:PORT/v1`
    pub base_url: String,
    /// Tenant `team-a` (organization `org-team-a`, project `proj_team_a`).
    pub key: String,
    /// Tenant `team-b` (no attribution).
    pub other_key: String,
    pub client: reqwest::Client,
    /// The data directory (SQLite file, stored images); kept alive as long as the app.
    pub data_dir: Arc<tempfile::TempDir>,
    /// The database URL the gateway uses.
    pub database_url: String,
    /// The settings it runs with (to restart it on the same data).
    pub settings: Settings,
    /// The PostgreSQL database this app created, dropped with the last app using it.
    pub postgres: Option<Arc<PostgresDb>>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

/// Settings for a gateway in front of `upstream_url`, two tenants, port 0. Returns the tenants' keys too.
pub fn settings_for(upstream_url: &str) -> (Settings, String, String) {
    let a = keys::generate();
    let b = keys::generate();
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().expect("addr");
    // No load balancer to wait for: stop accepting at once (process tests cover the grace period).
    s.server.shutdown_grace = Duration::ZERO;
    s.upstream.kind = UpstreamKind::Openai;
    s.upstream.base_url = Url::parse(upstream_url).expect("upstream url");
    s.upstream.api_key = Some(Secret::new(UPSTREAM_KEY));
    // The fake upstream's image links point at itself, on loopback over plain HTTP.
    s.images.download.allowed_hosts = vec!["127.0.0.1".into()];
    s.images.download.private_hosts = vec!["127.0.0.1".into()];
    s.images.download.allow_http = true;
    s.tenants = vec![
        TenantSettings {
            name: "team-a".into(),
            organization: Some("org-team-a".into()),
            project: Some("proj_team_a".into()),
            keys: vec![KeySettings { id: a.id.clone(), sha256: a.sha256.clone(), ..KeySettings::default() }],
            ..TenantSettings::default()
        },
        TenantSettings {
            name: "team-b".into(),
            organization: None,
            project: None,
            keys: vec![KeySettings { id: b.id.clone(), sha256: b.sha256.clone(), ..KeySettings::default() }],
            ..TenantSettings::default()
        },
    ];
    (s, a.key, b.key)
}

impl TestApp {
    /// Gateway in front of `upstream_url` with default settings.
    pub async fn spawn(upstream_url: &str) -> TestApp {
        Self::spawn_with(upstream_url, |_| {}).await
    }

    /// Gateway with settings adjusted by `tweak` (validated like a real deployment's), on the database
    /// `IMAGEGATE_TEST_DB` chooses ([`TestDb::from_env`]).
    pub async fn spawn_with(upstream_url: &str, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        Self::spawn_on(TestDb::from_env(), upstream_url, tweak).await
    }

    /// The settings, keys and data directory a gateway on `db` would start with, before `tweak`.
    pub async fn prepare(db: TestDb, upstream_url: &str) -> Prepared {
        let data_dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let (postgres, database_url) = match db {
            TestDb::Sqlite => (None, format!("sqlite://{}?mode=rwc", data_dir.path().join("imagegate.db").display())),
            TestDb::Postgres => {
                let pg = PostgresDb::create().await;
                let url = pg.url.clone();
                (Some(pg), url)
            }
        };
        let (mut settings, key, other_key) = settings_for(upstream_url);
        settings.storage.data_dir = data_dir.path().to_path_buf();
        settings.database.url = Some(Secret::new(database_url.clone()));
        settings.admin.token = Some(Secret::new(ADMIN_TOKEN));
        settings.usage.flush_interval = Duration::from_millis(50);
        Prepared { settings, key, other_key, data_dir, database_url, postgres }
    }

    /// Gateway on the chosen database.
    pub async fn spawn_on(db: TestDb, upstream_url: &str, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        let mut p = Self::prepare(db, upstream_url).await;
        tweak(&mut p.settings);
        let mut app = Self::start(p.settings, p.key, p.other_key, p.data_dir, p.database_url).await;
        app.postgres = p.postgres;
        app
    }

    /// Start a gateway from complete settings (restarts reuse the same data directory and database).
    pub async fn start(
        settings: Settings,
        key: String,
        other_key: String,
        data_dir: Arc<tempfile::TempDir>,
        database_url: String,
    ) -> TestApp {
        init_test_logging();
        settings.validate().expect("test settings must be valid");
        let app = Application::build(settings.clone()).await.expect("build app");
        let root = format!("http://{}", app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            app.run_until(async move {
                let _ = stopped.await;
            })
            .await
            .expect("server ran");
        });
        TestApp {
            base_url: format!("{root}/v1"),
            root,
            key,
            other_key,
            client: reqwest::Client::new(),
            data_dir,
            database_url,
            settings,
            postgres: None,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Another replica beside this one: the same database and tenant keys, with settings and a data directory
    /// of its own. It holds the PostgreSQL database alive too, so it keeps working after this one stops.
    pub async fn replica(&self, settings: Settings, data_dir: Arc<tempfile::TempDir>) -> TestApp {
        let (key, other, db) = (self.key.clone(), self.other_key.clone(), self.database_url.clone());
        let mut app = Self::start(settings, key, other, data_dir, db).await;
        app.postgres = self.postgres.clone();
        app
    }

    /// POST JSON to `/v1{path}` with the tenant key.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// POST a multipart form to `/v1{path}` with the tenant key.
    pub async fn post_form(&self, path: &str, form: reqwest::multipart::Form) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.key)
            .multipart(form)
            .send()
            .await
            .expect("request sent")
    }

    /// Stop this gateway gracefully and start a new one on the same database, data directory and port 0.
    pub async fn restart(self) -> TestApp {
        let settings = self.settings.clone();
        self.restart_with(settings).await
    }

    /// Stop this gateway gracefully and start one with other settings on the same database and data.
    pub async fn restart_with(mut self, settings: Settings) -> TestApp {
        let (key, other_key) = (self.key.clone(), self.other_key.clone());
        let (data_dir, database_url) = (self.data_dir.clone(), self.database_url.clone());
        let postgres = self.postgres.take();
        self.shutdown().await;
        let mut app = Self::start(settings, key, other_key, data_dir, database_url).await;
        app.postgres = postgres;
        app
    }

    /// A connection pool on this gateway's database (for tests that look inside).
    pub async fn pool(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::AnyPool::connect(&self.database_url).await.expect("connect to the test database")
    }

    /// Rows of the usage ledger, oldest first, as JSON objects (polls up to 3 s for `expected` rows).
    pub async fn usage_rows(&self, expected: usize) -> Vec<serde_json::Value> {
        use sqlx::{Column, Row};
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&self.database_url).await.expect("connect to the test database");
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let rows = sqlx::query(
                "SELECT request_id, tenant_id, key_id, endpoint, model, images_requested, images_returned, size, \
                 quality, input_tokens, output_tokens, cost_usd, status, stream, cache_hit, upstream_request_id, \
                 prompt, refused_by, (SELECT name FROM tenants t WHERE t.id = u.tenant_id) AS tenant, deployment, \
                 possibly_billed \
                 FROM usage_events u ORDER BY created_at, request_id",
            )
            .fetch_all(&pool)
            .await
            .expect("query usage");
            if rows.len() >= expected || std::time::Instant::now() > deadline {
                pool.close().await;
                return rows
                    .iter()
                    .map(|r| {
                        let mut obj = serde_json::Map::new();
                        for (i, col) in r.columns().iter().enumerate() {
                            let v = if let Ok(v) = r.try_get::<Option<i64>, _>(i) {
                                serde_json::json!(v)
                            } else if let Ok(v) = r.try_get::<Option<f64>, _>(i) {
                                serde_json::json!(v)
                            } else {
                                serde_json::json!(r.try_get::<Option<String>, _>(i).ok().flatten())
                            };
                            obj.insert(col.name().to_owned(), v);
                        }
                        serde_json::Value::Object(obj)
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Trigger graceful shutdown and wait for the server task to end.
    pub async fn shutdown(mut self) {
        self.stop_and_wait().await;
    }

    async fn stop_and_wait(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What [`TestApp::prepare`] made: settings to adjust, then [`Prepared::start`].
pub struct Prepared {
    pub settings: Settings,
    pub key: String,
    pub other_key: String,
    pub data_dir: Arc<tempfile::TempDir>,
    pub database_url: String,
    pub postgres: Option<Arc<PostgresDb>>,
}

impl Prepared {
    /// Start the gateway with these (possibly adjusted) settings.
    pub async fn start(self) -> TestApp {
        let mut app = TestApp::start(self.settings, self.key, self.other_key, self.data_dir, self.database_url).await;
        app.postgres = self.postgres;
        app
    }
}

/// Logs for failing tests: `TEST_LOG=1 cargo test`.
pub fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        imagegate::telemetry::init(&imagegate::config::LogSettings { level: "debug".into(), ..Default::default() });
    }
}

/// An error body in OpenAI's shape; panics with the body if it is not.
pub async fn error_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    let error = body.get("error").unwrap_or_else(|| panic!("no error object: {text}")).clone();
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error.{key} missing in {text}");
    }
    (status, error)
}

/// A tiny valid PNG of the given size (RGBA when `alpha`).
pub fn png(width: u32, height: u32, alpha: bool) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    if alpha {
        image::RgbaImage::from_pixel(width, height, image::Rgba([10, 20, 30, 0]))
            .write_to(&mut out, image::ImageFormat::Png)
            .expect("encode");
    } else {
        image::RgbImage::from_pixel(width, height, image::Rgb([200, 100, (width % 255) as u8]))
            .write_to(&mut out, image::ImageFormat::Png)
            .expect("encode");
    }
    out.into_inner()
}

/// The compiled `imagegate` binary, started with `serve --config FILE`, its output captured.
pub struct GatewayProcess {
    pub child: Child,
    pub root: String,
    pub output: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Start the binary with `args` and wait for its "listening on" line.
    pub fn start(args: &[&str], dir: &Path) -> GatewayProcess {
        Self::start_with_env(args, dir, &[])
    }

    /// Like [`GatewayProcess::start`], with these environment variables set (`OPENAI_API_KEY` too, if given).
    pub fn start_with_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> GatewayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imagegate"))
            .args(args)
            .current_dir(dir)
            .env_remove("OPENAI_API_KEY")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start imagegate");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(i) = line.find("listening on http://") {
                        let url = line[i + "listening on ".len()..].split(['"', ' ', '\\']).next().unwrap_or("");
                        let _ = tx.send(url.trim_end_matches('/').to_owned());
                    }
                    output.lock().expect("lock").push(line);
                }
            });
        }
        let root = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("gateway did not start: {:?}", output.lock().expect("lock"))
        });
        GatewayProcess { child, root, output }
    }

    /// Everything the process printed so far.
    pub fn printed(&self) -> String {
        self.output.lock().expect("lock").join("\n")
    }

    /// Send SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success());
    }

    /// Wait for exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gateway did not exit within {limit:?}: {}", self.printed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}
