//! The web console over plain HTTP (no browser), on SQLite and on PostgreSQL: what its cookies carry and how
//! they are flagged, forged and expired sessions, CSRF tokens on every form, sign-in back-off, sessions that
//! end with their key or tenant, a team seeing only its own tenant, the admin API's validation messages, and
//! turning the console off or moving it.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;

use crate::support::app::{ADMIN_TOKEN, TestApp};
use crate::support::fake_openai::FakeOpenAi;

/// A client that follows no redirects, so each answer of the console is seen as sent.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The `Set-Cookie` header for cookie `name`.
fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

/// The value of the hidden `csrf` input of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_owned()
}

/// A browser-like visitor: the cookies the console set, sent back.
struct Visitor {
    http: reqwest::Client,
    base: String,
    cookies: Vec<String>,
}

impl Visitor {
    fn new(app: &TestApp) -> Self {
        Self { http: client(), base: format!("{}/console", app.root), cookies: Vec::new() }
    }

    fn keep(&mut self, res: &reqwest::Response) {
        for value in res.headers().get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()) {
            let pair = cookie_pair(value);
            let name = pair.split('=').next().unwrap().to_owned();
            self.cookies.retain(|c| !c.starts_with(&format!("{name}=")));
            if !pair.ends_with('=') {
                self.cookies.push(pair);
            }
        }
    }

    async fn get(&mut self, path: &str) -> reqwest::Response {
        let res =
            self.http.get(format!("{}{path}", self.base)).header(COOKIE, self.cookies.join("; ")).send().await.unwrap();
        self.keep(&res);
        res
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let res = self
            .http
            .request(Method::POST, format!("{}{path}", self.base))
            .header(COOKIE, self.cookies.join("; "))
            .form(form)
            .send()
            .await
            .unwrap();
        self.keep(&res);
        res
    }

    /// Sign in with `token`; returns the answer to the form.
    async fn sign_in(&mut self, token: &str) -> reqwest::Response {
        let page = self.get("/sign-in").await.text().await.unwrap();
        let csrf = csrf_of(&page);
        self.post("/sign-in", &[("csrf", &csrf), ("token", token)]).await
    }

    /// The CSRF token of the signed-in session (read from a page's forms).
    async fn csrf(&mut self) -> String {
        let res = self.get("/overview").await;
        assert_eq!(res.status(), 200);
        csrf_of(&res.text().await.unwrap())
    }
}

fn location(res: &reqwest::Response) -> String {
    res.headers().get(LOCATION).map(|l| l.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn the_session_cookie_is_http_only_strict_scoped_and_holds_no_secret() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut v = Visitor::new(&app);
    assert!(location(&v.get("/overview").await).ends_with("/console/sign-in"), "signed out: to the sign-in page");
    let res = v.sign_in(ADMIN_TOKEN).await;
    assert_eq!(res.status(), 303);
    assert!(location(&res).ends_with("/console/overview"));
    let cookie = set_cookie(&res, "imagegate_console").expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "served over plain HTTP: {cookie}");
    assert!(!cookie.contains(ADMIN_TOKEN) && !cookie.contains(&app.key), "{cookie}");
    let page = v.get("/overview").await;
    assert_eq!(page.status(), 200);
    for header in ["content-security-policy", "x-frame-options"] {
        assert!(page.headers().contains_key(header), "{header}");
    }
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(page.text().await.unwrap().contains("platform team"));

    let https =
        TestApp::spawn_with(&fake.url, |s| s.server.public_url = Some("https://images.example.com".parse().unwrap()))
            .await;
    let cookie = set_cookie(&Visitor::new(&https).sign_in(ADMIN_TOKEN).await, "imagegate_console").unwrap();
    assert!(cookie.contains("Secure"), "behind HTTPS: {cookie}");
}

#[tokio::test]
async fn forged_altered_and_expired_sessions_are_sent_to_sign_in() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.console.session_ttl = Duration::from_secs(1)).await;
    let mut v = Visitor::new(&app);
    assert_eq!(v.sign_in(ADMIN_TOKEN).await.status(), 303);
    assert_eq!(v.get("/overview").await.status(), 200);
    let real = v.cookies.iter().find(|c| c.starts_with("imagegate_console=")).unwrap().clone();
    let (id, sig) = real.trim_start_matches("imagegate_console=").rsplit_once('.').unwrap();
    let swapped = if id.starts_with('A') { "B" } else { "A" };
    let flipped = format!("{swapped}{}", &id[1..]);
    for forged in [
        format!("imagegate_console={flipped}.{sig}"),
        format!("imagegate_console={id}.AAAA{}", &sig[4..]),
        "imagegate_console=admin".to_owned(),
        format!("imagegate_console={}", URL_SAFE_RANDOM),
    ] {
        let res = client().get(format!("{}/console/overview", app.root)).header(COOKIE, &forged).send().await.unwrap();
        assert_eq!(res.status(), 303, "{forged}");
        assert!(location(&res).ends_with("/console/sign-in"));
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = v.get("/overview").await;
    assert_eq!(res.status(), 303, "the session expired");
    assert!(location(&res).ends_with("/console/sign-in"));
}

const URL_SAFE_RANDOM: &str = "dGhpcyBpcyBub3QgYSBzZXNzaW9u.c2lnbmF0dXJl";

#[tokio::test]
async fn every_form_without_the_sessions_csrf_token_is_refused_and_changes_nothing() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut v = Visitor::new(&app);

    // The sign-in form itself: without its token cookie and field, no session.
    let res =
        client().post(format!("{}/console/sign-in", app.root)).form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
    assert_eq!(res.status(), 403);
    assert!(set_cookie(&res, "imagegate_console").is_none());

    assert_eq!(v.sign_in(ADMIN_TOKEN).await.status(), 303);
    let csrf = v.csrf().await;
    for token in [None, Some("wrong"), Some(&csrf[1..])] {
        let mut form = vec![("name", "sneaky"), ("log_prompts", "true")];
        if let Some(t) = token {
            form.push(("csrf", t));
        }
        assert_eq!(v.post("/tenants", &form).await.status(), 403, "{token:?}");
        assert_eq!(v.post("/tenants/team-a/suspend", &form).await.status(), 403);
        assert_eq!(v.post("/sign-out", &form).await.status(), 403);
    }
    let tenants: serde_json::Value = app
        .client
        .get(format!("{}/admin/v1/tenants", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = tenants["data"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["team-a", "team-b"], "nothing was created");
    assert!(tenants["data"].as_array().unwrap().iter().all(|t| t["status"] == "active"), "nothing was suspended");

    // With the token, the same forms work; sign-out ends the session.
    assert_eq!(v.post("/tenants", &[("csrf", &csrf), ("name", "made-here")]).await.status(), 303);
    assert_eq!(v.post("/sign-out", &[("csrf", &csrf)]).await.status(), 303);
    assert_eq!(v.get("/overview").await.status(), 303);
}

#[tokio::test]
async fn repeated_failed_sign_ins_back_off_even_for_the_right_token() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.console.max_failed_sign_ins = 3).await;
    let mut v = Visitor::new(&app);
    assert_eq!(v.sign_in("not-the-token").await.status(), 401);
    assert_eq!(v.sign_in("ig_abcdefgh_0123456789abcdef0123456789abcdef").await.status(), 401);
    let third = v.sign_in("still-wrong").await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let res = v.sign_in(ADMIN_TOKEN).await;
    assert_eq!(res.status(), 429, "locked out: not even the right token is tried");
    assert!(set_cookie(&res, "imagegate_console").is_none());
}

#[tokio::test]
async fn a_revoked_key_or_a_suspended_tenant_ends_its_console_sessions() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let admin = |method: Method, path: &str| {
        app.client.request(method, format!("{}/admin/v1{path}", app.root)).bearer_auth(ADMIN_TOKEN)
    };
    let key: serde_json::Value =
        admin(Method::POST, "/tenants/team-b/keys").json(&json!({})).send().await.unwrap().json().await.unwrap();
    let (secret, id) = (key["key"].as_str().unwrap(), key["id"].as_str().unwrap());

    let mut by_key = Visitor::new(&app);
    assert_eq!(by_key.sign_in(secret).await.status(), 303);
    assert_eq!(by_key.get("/overview").await.status(), 200);
    let mut by_other_key = Visitor::new(&app);
    assert_eq!(by_other_key.sign_in(&app.other_key).await.status(), 303);

    assert_eq!(admin(Method::DELETE, &format!("/keys/{id}")).send().await.unwrap().status(), 200);
    assert_eq!(by_key.get("/overview").await.status(), 303, "revoked: signed out");
    assert_eq!(by_key.sign_in(secret).await.status(), 401, "and cannot sign in again");
    assert_eq!(by_other_key.get("/overview").await.status(), 200, "the tenant's other key still works");

    assert_eq!(admin(Method::POST, "/tenants/team-b/suspend").send().await.unwrap().status(), 200);
    assert_eq!(by_other_key.get("/overview").await.status(), 303, "suspended: signed out");
    let refused = by_other_key.sign_in(&app.other_key).await;
    assert_eq!(refused.status(), 401);
    assert!(refused.text().await.unwrap().contains("suspended"));
}

#[tokio::test]
async fn a_team_sees_only_its_own_tenant() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    for key in [&app.key, &app.other_key] {
        let res = app
            .client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(key)
            .json(&json!({"model": "dall-e-2", "prompt": "a harbour"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    app.usage_rows(2).await;
    let mut team = Visitor::new(&app);
    assert_eq!(team.sign_in(&app.key).await.status(), 303);
    let csrf = team.csrf().await;
    assert_eq!(team.get("/tenants").await.status(), 403);
    assert_eq!(team.post("/tenants", &[("csrf", &csrf), ("name", "mine")]).await.status(), 403);
    assert_eq!(team.post("/tenants/team-b/suspend", &[("csrf", &csrf)]).await.status(), 403);

    // Asking for the other tenant still shows only its own rows.
    let csv = team.get("/usage.csv?tenant=team-b").await.text().await.unwrap();
    let tenants: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap()).collect();
    assert_eq!(tenants, ["team-a"], "{csv}");
    let overview = team.get("/overview?tenant=team-b").await.text().await.unwrap();
    assert!(overview.contains("team-a") && !overview.contains("team-b"));

    // The other tenant's image: not in the gallery, its thumbnail and delete are not found.
    let mut admin = Visitor::new(&app);
    assert_eq!(admin.sign_in(ADMIN_TOKEN).await.status(), 303);
    let gallery = admin.get("/gallery?tenant=team-b").await.text().await.unwrap();
    let at = gallery.find("data-image=\"").unwrap() + "data-image=\"".len();
    let other_image = gallery[at..].split('"').next().unwrap().to_owned();
    assert!(!team.get("/gallery").await.text().await.unwrap().contains(&other_image));
    assert_eq!(team.get(&format!("/gallery/{other_image}/thumb")).await.status(), 404);
    assert_eq!(team.post(&format!("/gallery/{other_image}/delete"), &[("csrf", &csrf)]).await.status(), 404);
    assert_eq!(admin.get(&format!("/gallery/{other_image}/thumb")).await.status(), 200, "still there");
}

#[tokio::test]
async fn tenant_forms_refuse_what_the_admin_api_refuses_with_its_message() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut v = Visitor::new(&app);
    assert_eq!(v.sign_in(ADMIN_TOKEN).await.status(), 303);
    let csrf = v.csrf().await;
    for (form, api_body) in [
        (vec![("name", "bad name!")], json!({"name": "bad name!"})),
        (
            vec![("name", "ok"), ("limits.images_per_day", "lots")],
            json!({"name": "ok", "limits": {"images_per_day": "lots"}}),
        ),
        (vec![("name", "team-a")], json!({"name": "team-a"})),
    ] {
        let api = app
            .client
            .post(format!("{}/admin/v1/tenants", app.root))
            .bearer_auth(ADMIN_TOKEN)
            .json(&api_body)
            .send()
            .await
            .unwrap();
        let api_status = api.status().as_u16();
        let api_error: serde_json::Value = api.json().await.unwrap();
        let message = api_error["error"]["message"].as_str().unwrap();
        // Positions in the JSON body mean nothing on a form; the rest of the message is the same.
        let message = match message.find(" at line ") {
            Some(at) => &message[..at],
            None => message,
        };
        let mut fields = vec![("csrf", csrf.as_str())];
        fields.extend(form.iter().copied());
        let res = v.post("/tenants", &fields).await;
        assert_eq!(res.status().as_u16(), api_status, "{message}");
        let page = res.text().await.unwrap().replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&");
        assert!(page.contains(message), "the admin API's message '{message}' on the page");
    }
}

#[tokio::test]
async fn the_console_can_be_moved_or_turned_off() {
    let fake = FakeOpenAi::start().await;
    let off = TestApp::spawn_with(&fake.url, |s| s.console.enabled = false).await;
    assert_eq!(client().get(format!("{}/console/sign-in", off.root)).send().await.unwrap().status(), 404);
    let moved = TestApp::spawn_with(&fake.url, |s| s.console.path = "/ops/console".into()).await;
    assert_eq!(client().get(format!("{}/console/sign-in", moved.root)).send().await.unwrap().status(), 404);
    let res = client().get(format!("{}/ops/console/sign-in", moved.root)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(set_cookie(&res, "imagegate_console_signin").unwrap().contains("Path=/ops/console"));
}
