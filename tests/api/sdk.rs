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
    if !installed.exists() {
        assert!(std::env::var_os("CI").is_none(), "{} is missing: run `bash .ci/run`", installed.display());
        eprintln!("skipping: {} is missing (run `bash .ci/run` to install the SDKs)", installed.display());
        return None;
    }
    let fake = FakeOpenAi::start().await;
    // A small multipart limit so the suites can check the 413 without uploading 100 MiB.
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_multipart_body = bytesize::ByteSize::mib(2)).await;
    let output = tokio::process::Command::new(program)
        .args(args)
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
    Some((output.status.success(), text))
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

#[tokio::test]
async fn the_node_sdk_works_through_the_gateway() {
    let modules = repo().join("tests/sdk/node/node_modules/openai");
    let Some((ok, output)) = run_suite(Path::new("node"), &["--test", "tests/sdk/node/"], &modules).await else {
        return;
    };
    assert!(ok, "Node SDK suite failed:\n{output}");
    assert!(output.contains("# fail 0"), "{output}");
}
