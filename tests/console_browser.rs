//! The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which `.ci/run`
//! installs), driven over WebDriver with `fantoccini`, in one browser session for the whole flow: the
//! platform team signs in, creates a tenant, issues a key; calls made with that key (plain HTTP, as the SDKs
//! send them) show in the overview, the usage table (and its CSV) and the gallery; an image is deleted and
//! its link stops working; the key is revoked; the team signs in and sees only its own data; a forged
//! session, an expired one and a form without its CSRF token are refused.
//!
//! `IMAGEGATE_CONSOLE_SCREENSHOTS=docs/console` saves a PNG of each page there (for `docs/console.md`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests fail by panicking")]

#[path = "support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use support::app::{ADMIN_TOKEN, TestApp};
use support::fake_openai::FakeOpenAi;

/// chromedriver, ended when the test ends.
struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_browser() -> (Driver, Client) {
    let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned());
    let port = free_port();
    let child = Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{driver_bin} is needed (apt-get install chromium chromium-driver; .ci/run does): {e}")
        });
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}"), _profile: profile };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{}/status", driver.url)).send().await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        &format!("--user-data-dir={}", driver._profile.path().display()),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), json!({ "binary": binary, "args": args }));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client =
        ClientBuilder::new(connector).capabilities(caps).connect(&driver.url).await.expect("a Chromium session");
    (driver, client)
}

/// Save a screenshot of the current page when asked to.
async fn shot(browser: &Client, name: &str) {
    let Ok(dir) = std::env::var("IMAGEGATE_CONSOLE_SCREENSHOTS") else { return };
    let png = browser.screenshot().await.unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(format!("{dir}/{name}.png"), png).unwrap();
}

async fn text(browser: &Client, css: &str) -> String {
    browser.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.unwrap()
}

async fn count(browser: &Client, css: &str) -> usize {
    browser.find_all(Locator::Css(css)).await.unwrap().len()
}

async fn fill(browser: &Client, css: &str, value: &str) {
    let input = browser.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    input.clear().await.unwrap();
    input.send_keys(value).await.unwrap();
}

async fn click(browser: &Client, css: &str) {
    browser.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap();
}

async fn sign_in(browser: &Client, root: &str, token: &str) {
    browser.goto(&format!("{root}/console/sign-in")).await.unwrap();
    fill(browser, "#token", token).await;
    click(browser, "form button[type=submit]").await;
    browser.wait().for_element(Locator::Css("#who")).await.unwrap();
}

async fn sign_out(browser: &Client) {
    click(browser, "form.signout button").await;
    browser.wait().for_element(Locator::Css("#token")).await.unwrap();
}

/// What the page shows, for assertions.
async fn page(browser: &Client) -> String {
    browser.source().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_teams_usage_and_images_and_only_its_own_to_the_team() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let root = app.root.clone();
    let (_driver, browser) = start_browser().await;

    // Signed out: every page leads to the sign-in form.
    browser.goto(&format!("{root}/console/overview")).await.unwrap();
    assert!(browser.current_url().await.unwrap().path().ends_with("/console/sign-in"));
    shot(&browser, "sign-in").await;

    // The platform team creates a tenant that keeps prompts, with a daily budget.
    sign_in(&browser, &root, ADMIN_TOKEN).await;
    assert_eq!(text(&browser, "#who").await, "platform team");
    browser.goto(&format!("{root}/console/tenants")).await.unwrap();
    fill(&browser, "#create-tenant input[name=name]", "design").await;
    click(&browser, "#create-tenant input[name=log_prompts]").await;
    fill(&browser, "#create-tenant input[name='limits.images_per_day']", "3").await;
    click(&browser, "#create-tenant button[type=submit]").await;
    browser.wait().for_element(Locator::Css("#issue-key")).await.unwrap();
    assert!(browser.current_url().await.unwrap().path().ends_with("/console/tenants/design"));

    // A key, shown once with the SDK snippet.
    fill(&browser, "#issue-key input[name=name]", "laptop").await;
    click(&browser, "#issue-key button[type=submit]").await;
    let key = browser.wait().for_element(Locator::Css("#new-key")).await.unwrap().text().await.unwrap();
    assert!(key.starts_with("ig_"), "{key}");
    assert!(page(&browser).await.contains(&format!("{root}/v1")), "the snippet names this gateway");
    shot(&browser, "key-issued").await;

    // Calls with the key, as the SDKs send them.
    let calls = [("a red kite over dunes", 200), ("a blue heron at dusk", 200), ("a green lantern", 200)];
    for (prompt, status) in calls {
        let res = app
            .client
            .post(format!("{root}/v1/images/generations"))
            .bearer_auth(&key)
            .json(&json!({"model": "dall-e-2", "prompt": prompt, "size": "256x256"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status);
    }
    let b_images = app
        .client
        .post(format!("{root}/v1/images/generations"))
        .bearer_auth(&app.key)
        .json(&json!({"model": "dall-e-2", "prompt": "team a's only picture"}))
        .send()
        .await
        .unwrap();
    assert_eq!(b_images.status(), 200);
    assert_eq!(fake.calls_to("/v1/images/generations").len(), 4, "one upstream call per request");
    app.usage_rows(4).await;

    // Overview: the three images of `design`, its budget, and both tenants in the charts.
    browser.goto(&format!("{root}/console/overview?days=7")).await.unwrap();
    assert_eq!(text(&browser, "#total-images").await, "4");
    assert_eq!(text(&browser, "#total-requests").await, "4");
    let source = page(&browser).await;
    assert!(source.contains("design") && source.contains("team-a"));
    assert_eq!(text(&browser, "#top-models tbody tr td").await, "dall-e-2");
    let budget = browser.find(Locator::Css("#budgets .budget")).await.unwrap();
    assert_eq!(
        budget.attr("data-level").await.unwrap().as_deref(),
        Some("red"),
        "3 of 3 images today: the budget is spent"
    );
    shot(&browser, "overview").await;

    // Usage: the design rows, filtered; the CSV holds exactly those rows.
    browser.goto(&format!("{root}/console/usage?tenant=design")).await.unwrap();
    assert_eq!(count(&browser, "#usage-table tbody tr").await, 3);
    shot(&browser, "usage").await;
    let csv_href = browser.find(Locator::Css("#export-csv")).await.unwrap().attr("href").await.unwrap().unwrap();
    let session = browser.get_named_cookie("imagegate_console").await.unwrap();
    let csv = app
        .client
        .get(format!("{root}{csv_href}"))
        .header("cookie", format!("imagegate_console={}", session.value()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count(), 4, "a header and the three rows shown: {csv}");
    assert!(csv.lines().skip(1).all(|l| l.contains(",design,")), "{csv}");

    // Gallery: thumbnails with their prompts (the tenant opted in); delete one and its link stops working.
    browser.goto(&format!("{root}/console/gallery?tenant=design")).await.unwrap();
    assert_eq!(count(&browser, "#gallery li.tile").await, 3);
    assert!(page(&browser).await.contains("a green lantern"), "the newest first, with its prompt");
    let all_loaded =
        "return [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)";
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.execute(all_loaded, vec![]).await.unwrap() != json!(true) {
        assert!(Instant::now() < deadline, "every thumbnail loads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shot(&browser, "gallery").await;
    let first = browser.find(Locator::Css("#gallery li.tile")).await.unwrap();
    let link = first.find(Locator::Css("a")).await.unwrap().attr("href").await.unwrap().unwrap();
    assert_eq!(app.client.get(&link).send().await.unwrap().status(), 200);
    first.find(Locator::Css("form button")).await.unwrap().click().await.unwrap();
    browser.accept_alert().await.unwrap();
    browser.wait().for_url(&url::Url::parse(&format!("{root}/console/gallery")).unwrap()).await.unwrap();
    browser.goto(&format!("{root}/console/gallery?tenant=design")).await.unwrap();
    assert_eq!(count(&browser, "#gallery li.tile").await, 2);
    assert_eq!(app.client.get(&link).send().await.unwrap().status(), 404, "the deleted image's link is dead");

    // Revoke the key: the API refuses it at once.
    browser.goto(&format!("{root}/console/tenants/design")).await.unwrap();
    shot(&browser, "tenant").await;
    click(&browser, "#keys tr[data-key] form button").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !page(&browser).await.contains(">revoked<") {
        assert!(Instant::now() < deadline, "the key shows as revoked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = app
        .client
        .post(format!("{root}/v1/images/generations"))
        .bearer_auth(&key)
        .json(&json!({"model": "dall-e-2", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    browser.goto(&format!("{root}/console/tenants")).await.unwrap();
    shot(&browser, "tenants").await;

    // A form without its CSRF token is refused.
    browser.execute("document.querySelector('#create-tenant input[name=csrf]').remove()", vec![]).await.unwrap();
    fill(&browser, "#create-tenant input[name=name]", "forged").await;
    click(&browser, "#create-tenant button[type=submit]").await;
    browser.wait().for_element(Locator::Css("p.error")).await.unwrap();
    assert!(page(&browser).await.contains("403"), "refused without the token");
    browser.goto(&format!("{root}/console/tenants")).await.unwrap();
    assert!(!page(&browser).await.contains("forged"), "and nothing was created");
    sign_out(&browser).await;

    // The team: only its own tenant, everywhere.
    sign_in(&browser, &root, &app.key).await;
    assert_eq!(text(&browser, "#who").await, "team-a");
    assert_eq!(text(&browser, "#total-images").await, "1");
    let source = page(&browser).await;
    assert!(!source.contains("design") && !source.contains("team-b") && !source.contains("Tenants</a>"));
    shot(&browser, "overview-team").await;
    browser.goto(&format!("{root}/console/usage?tenant=design")).await.unwrap();
    assert_eq!(count(&browser, "#usage-table tbody tr").await, 1, "its own row, whatever the query asks");
    assert!(!page(&browser).await.contains("design"));
    browser.goto(&format!("{root}/console/gallery")).await.unwrap();
    assert_eq!(count(&browser, "#gallery li.tile").await, 1);
    assert!(!page(&browser).await.contains("team a's only picture"), "team-a did not opt into storing prompts");
    browser.goto(&format!("{root}/console/tenants")).await.unwrap();
    assert!(page(&browser).await.contains("403"));

    // An expired session (its row aged in the database) and a forged one lead back to sign-in.
    let pool = app.pool().await;
    sqlx::query("UPDATE console_sessions SET expires_at = 1").execute(&pool).await.unwrap();
    browser.goto(&format!("{root}/console/overview")).await.unwrap();
    assert!(browser.current_url().await.unwrap().path().ends_with("/console/sign-in"), "expired");
    sign_in(&browser, &root, &app.key).await;
    let mut cookie = browser.get_named_cookie("imagegate_console").await.unwrap();
    let real = cookie.value().to_owned();
    // One character of the signature changed (its first: every bit of it counts).
    let at = real.rfind('.').unwrap() + 1;
    let swapped = if real[at..].starts_with('A') { "B" } else { "A" };
    cookie.set_value(format!("{}{swapped}{}", &real[..at], &real[at + 1..]));
    browser.delete_cookie("imagegate_console").await.unwrap();
    browser.add_cookie(cookie).await.unwrap();
    browser.goto(&format!("{root}/console/overview")).await.unwrap();
    assert!(browser.current_url().await.unwrap().path().ends_with("/console/sign-in"), "forged");

    browser.close().await.unwrap();
}
