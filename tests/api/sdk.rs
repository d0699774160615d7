//! The official Python and Node `openai` SDKs driving the real gateway in front of the fake OpenAI.
//! `.ci/run` installs them (`tests/sdk/python/.venv`, `tests/sdk/node/node_modules`); the suites themselves
//! are in `tests/sdk/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::support::app::{ADMIN_TOKEN, TestApp, UPSTREAM_KEY};
use crate::support::fake_openai::FakeOpenAi;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run one SDK suite against a fresh gateway; `None` when its toolchain is not installed outside CI.
async fn run_suite(program: &Path, args: &[&str], installed: &Path) -> Option<(bool, String)> {
    run_suite_with(program, args, installed, |_| {}, &[]).await.map(|(ok, text, _)| (ok, text))
}

/// [`run_suite`] against a gateway whose settings `tweak` changes, with `env` added; also returns the app.
async fn run_suite_with(
    program: &Path,
    args: &[&str],
    installed: &Path,
    tweak: impl FnOnce(&mut imagegate::config::Settings),
    env: &[(&str, &str)],
) -> Option<(bool, String, TestApp)> {
    if !installed.exists() {
        assert!(std::env::var_os("CI").is_none(), "{} is missing: run `bash .ci/run`", installed.display());
        eprintln!("skipping: {} is missing (run `bash .ci/run` to install the SDKs)", installed.display());
        return None;
    }
    let fake = FakeOpenAi::start().await;
    // A small multipart limit so the suites can check the 413 without uploading 100 MiB.
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.server.max_multipart_body = bytesize::ByteSize::mib(2);
        tweak(s);
    })
    .await;
    let output = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo())
        .env("IMAGEGATE_BASE_URL", &app.base_url)
        .env("IMAGEGATE_KEY", &app.key)
        .env("IMAGEGATE_OTHER_KEY", &app.other_key)
        .env("IMAGEGATE_FAKE_URL", &fake.base)
        .env("IMAGEGATE_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("IMAGEGATE_ROOT_URL", &app.root)
        .env("IMAGEGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("IMAGEGATE_REHOST", app.settings.images.rehost.to_string())
        .env("IMAGEGATE_MAX_MULTIPART", app.settings.server.max_multipart_body.as_u64().to_string())
        .env("CI", "true")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // Show the suite's own tally in the test output (`--nocapture`), so a run that skipped everything shows.
    for line in text.lines().filter(|l| l.contains(" passed") || l.starts_with("# pass") || l.starts_with("# fail")) {
        eprintln!("{}: {line}", program.display());
    }
    Some((output.status.success(), text, app))
}

#[tokio::test]
async fn the_python_sdk_works_through_the_gateway() {
    let python = repo().join("tests/sdk/python/.venv/bin/python");
    let Some((ok, output)) =
        run_suite(&python, &["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sdk/python"], &python).await
    else {
        return;
    };
    assert!(ok, "Python SDK suite failed:\n{output}");
    assert!(output.contains(" passed"), "{output}");
}

/// A brand-new model, a snapshot past its shutdown and an alias, all in config only (`test_models_sdk.py`).
const NEW_MODEL: &str = r#"
[aliases]
"gpt-image-3-preview" = "gpt-image-3"

["gpt-image-3"]
endpoints = ["generations", "edits"]
json_edits = true
answers = "b64_json"
prompt_max = 1000
n_max = 4
sizes = ["auto", "1024x1024", "2048x2048"]
params = { quality = ["low", "high", "ultra", "auto"], output_format = ["png", "webp"], stream = true }
files = { formats = ["png", "jpeg", "webp"], max_bytes = 52428800, max_images = 4 }
defaults = { size = "auto", quality = "auto", output_format = "png" }
deprecated_on = "2026-11-01"
shutdown_on = "2099-06-30"
replacement = "gpt-image-2"
sure = { "params.quality" = "documented" }
price = { per_token = { text_input = 4.0, text_input_cached = 1.0, image_input = 6.0, image_input_cached = 1.5, image_output = 24.0, text_output = 8.0, output_tokens = "formula", quality_factors = { ultra = 192 } } }

["gpt-image-3-alpha"]
extends = "gpt-image-3"
shutdown_on = "2026-01-01"
"#;

#[tokio::test]
async fn the_python_sdk_drives_a_model_declared_in_config_only() {
    let python = repo().join("tests/sdk/python/.venv/bin/python");
    let args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sdk/python/test_models_sdk.py"];
    let tweak = |s: &mut imagegate::config::Settings| {
        s.models = toml::from_str(NEW_MODEL).unwrap();
        // The tenant has a USD budget: an unpriced model would be refused; this one is priced by its entry.
        s.tenants[0].limits.usd_per_month = Some(1000.0);
    };
    let env = [("IMAGEGATE_MODELS_SUITE", "1")];
    let Some((ok, output, app)) = run_suite_with(&python, &args, &python, tweak, &env).await else {
        return;
    };
    assert!(ok, "Python models suite failed:\n{output}");
    assert!(output.contains("13 passed"), "{output}");
    let rows = app.usage_rows(14).await;
    let of = |model: &str| rows.iter().filter(|r| r["model"] == model && r["status"] == 200).collect::<Vec<_>>();
    let new = of("gpt-image-3");
    assert_eq!(new.len(), 3, "generate, alias and edit: {rows:#?}");
    assert!(new.iter().all(|r| r["cost_usd"].as_f64().is_some_and(|c| c > 0.0)), "priced from its entry: {new:#?}");
    let pool = app.pool().await;
    let requested: Vec<(String,)> =
        sqlx::query_as("SELECT requested_model FROM usage_events WHERE requested_model IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(requested, [("gpt-image-3-preview".to_owned(),)]);
}

#[tokio::test]
async fn the_node_sdk_works_through_the_gateway() {
    let modules = repo().join("tests/sdk/node/node_modules/openai");
    let Some((ok, output)) = run_suite(Path::new("node"), &["--test", "tests/sdk/node/"], &modules).await else {
        return;
    };
    assert!(ok, "Node SDK suite failed:\n{output}");
    assert!(output.contains("# fail 0"), "{output}");
}
