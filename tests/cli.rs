#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]
//! The management commands (`tenants …`, `keys …`, `usage`), run as the compiled binary against a fresh
//! SQLite database, with no upstream key anywhere: what they print, what they refuse, and that a key's secret
//! never reaches the database file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use imagegate::config::DatabaseSettings;
use imagegate::db::Db;
use imagegate::tenants::repo::TenantRepo;

/// A temporary data directory and a config file pointing at it.
struct Cli {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Cli {
    fn new() -> Self {
        Self::with_config("")
    }

    /// `extra` is appended to the config file (e.g. an `[upstream]` section).
    fn with_config(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("imagegate.toml");
        let data = dir.path().join("data");
        std::fs::write(&config, format!("[storage]\ndata_dir = {:?}\n{extra}\n", data.to_string_lossy())).unwrap();
        Self { dir, config }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Run `imagegate ARGS --config FILE` with no upstream key and none of the caller's IMAGEGATE settings.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imagegate"));
        cmd.args(args).arg("--config").arg(&self.config).current_dir(self.dir.path()).env_remove("OPENAI_API_KEY");
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("IMAGEGATE")) {
            cmd.env_remove(name);
        }
        cmd.output().unwrap()
    }

    /// Run, expect success, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.is_ascii(), "{args:?} printed non-ASCII output:\n{stdout}");
        stdout
    }

    /// Run, expect exit code 1 and one `imagegate: …` line on stderr; return that line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout on failure");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: expected one line, got:\n{stderr}");
        assert!(stderr.starts_with("imagegate: "), "{stderr}");
        stderr
    }
}

/// The trimmed cells of the table row whose first cell is `first`.
fn row(table: &str, first: &str) -> Vec<String> {
    table
        .lines()
        .map(|line| line.split('|').map(|c| c.trim().to_owned()).collect::<Vec<_>>())
        .find(|cells| cells.get(1).is_some_and(|c| c == first))
        .map(|cells| cells[1..cells.len() - 1].to_vec())
        .unwrap_or_else(|| panic!("no row starting with {first:?} in:\n{table}"))
}

/// True for `ig_[a-z0-9]{8}_[A-Za-z0-9]{32}`.
fn is_key(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("ig_") else { return false };
    let Some((id, secret)) = rest.split_once('_') else { return false };
    id.len() == 8
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && secret.len() == 32
        && secret.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[test]
fn tenants_are_created_listed_shown_updated_suspended_and_resumed() {
    let cli = Cli::new();
    assert!(cli.ok(&["tenants", "list"]).contains("no tenants yet"));

    let created = cli.ok(&[
        "tenants",
        "create",
        "team-a",
        "--org",
        "org-a",
        "--project",
        "proj_a",
        "--allowed-models",
        "gpt-image-1,dall-e-3",
        "--log-prompts",
    ]);
    assert!(created.contains("created tenant 'team-a'") && created.contains("keys create --tenant team-a"));
    cli.ok(&["tenants", "create", "team-b"]);

    let list = cli.ok(&["tenants", "list"]);
    let header = row(&list, "name");
    assert_eq!(header, ["name", "status", "allowed models", "org", "project", "upstream", "source", "created"]);
    let a = row(&list, "team-a");
    assert_eq!(a[..7], ["team-a", "active", "gpt-image-1,dall-e-3", "org-a", "proj_a", "default", "api"]);
    assert!(a[7].ends_with('Z') && a[7].contains('T'), "created is RFC 3339 UTC: {}", a[7]);
    assert_eq!(row(&list, "team-b")[..7], ["team-b", "active", "all", "-", "-", "default", "api"]);

    let show = cli.ok(&["tenants", "show", "team-a"]);
    assert_eq!(row(&show, "log prompts")[1], "yes");
    assert_eq!(row(&show, "limits")[1], "{}");

    let updated = cli.ok(&[
        "tenants",
        "update",
        "team-a",
        "--clear-org",
        "--project",
        "proj_new",
        "--all-models",
        "--limits",
        r#"{"requests_per_minute": 60, "usd_per_month": 500}"#,
        "--no-log-prompts",
    ]);
    assert!(updated.contains("updated tenant 'team-a'"));
    let show = cli.ok(&["tenants", "show", "team-a"]);
    assert_eq!(row(&show, "organization")[1], "-");
    assert_eq!(row(&show, "project")[1], "proj_new");
    assert_eq!(row(&show, "allowed models")[1], "all");
    assert_eq!(row(&show, "log prompts")[1], "no");
    let limits: serde_json::Value = serde_json::from_str(&row(&show, "limits")[1]).unwrap();
    assert_eq!(limits, serde_json::json!({"requests_per_minute": 60, "usd_per_month": 500.0}));

    assert!(cli.ok(&["tenants", "suspend", "team-a"]).contains("suspended tenant 'team-a'"));
    assert_eq!(row(&cli.ok(&["tenants", "list"]), "team-a")[1], "suspended");
    assert!(cli.ok(&["tenants", "suspend", "team-a"]).contains("already suspended"));
    assert!(cli.ok(&["tenants", "resume", "team-a"]).contains("resumed tenant 'team-a'"));
    assert_eq!(row(&cli.ok(&["tenants", "show", "team-a"]), "status")[1], "active");
}

#[test]
fn a_created_key_is_printed_once_listed_by_id_only_and_revoked() {
    let cli = Cli::new();
    cli.ok(&["tenants", "create", "team-a"]);

    let out = cli.ok(&["keys", "create", "--tenant", "team-a", "--name", "ci", "--expires-in", "30d"]);
    let key = out.split_whitespace().find(|w| w.starts_with("ig_")).unwrap_or_else(|| panic!("no key in:\n{out}"));
    assert!(is_key(key), "{key}");
    assert!(out.contains("cannot be shown again"), "{out}");
    let id = &key[3..11];
    let secret = &key[12..];

    let list = cli.ok(&["keys", "list", "--tenant", "team-a"]);
    assert_eq!(row(&list, "id"), ["id", "name", "created", "expires", "revoked", "last used"]);
    let listed = row(&list, id);
    assert_eq!(listed[1], "ci");
    assert!(listed[3].ends_with('Z') && listed[3] > listed[2], "expires after created: {listed:?}");
    assert_eq!(listed[4..], ["-", "-"]);
    assert!(!list.contains(secret), "keys list printed the secret:\n{list}");

    assert!(cli.ok(&["keys", "revoke", id]).contains(&format!("revoked key {id} of tenant 'team-a'")));
    let revoked = row(&cli.ok(&["keys", "list", "--tenant", "team-a"]), id);
    assert!(revoked[4].ends_with('Z'), "revoked time shown: {revoked:?}");
    assert!(cli.ok(&["keys", "revoke", id]).contains("already revoked"));

    // The whole key is refused as an id, so it is never needed on a command line again.
    assert!(cli.fails(&["keys", "revoke", key]).contains("not the whole key"));

    // Only the hash is stored: the secret appears nowhere in the database files.
    let mut scanned = 0;
    for name in ["imagegate.db", "imagegate.db-wal"] {
        let path = cli.data_dir().join(name);
        if path.exists() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{name} holds the key's secret");
            scanned += 1;
        }
    }
    assert!(scanned >= 1, "no database file under {}", cli.data_dir().display());
}

#[test]
fn usage_without_rows_prints_an_empty_table_a_csv_header_and_empty_json() {
    let cli = Cli::new();
    cli.ok(&["tenants", "create", "team-a"]);

    let table = cli.ok(&["usage"]);
    assert!(table.starts_with("usage from "), "{table}");
    let header = row(&table, "tenant");
    assert_eq!(header[..3], ["tenant", "model", "requests"]);
    assert!(!table.contains("TOTAL"));

    let csv = cli.ok(&["usage", "--format", "csv", "--tenant", "team-a"]);
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        [
            "tenant,model,requests,succeeded,images_requested,images_returned,input_tokens,output_tokens,cost_usd,cache_hits,refused,upstream_rate_limited"
        ]
    );

    // The admin API's shape exactly: {"object": "list", "from": ms, "to": ms, "data": [...]}.
    let json: serde_json::Value =
        serde_json::from_str(&cli.ok(&["usage", "--format", "json", "--from", "2020-01-01", "--to", "2020-02-01"]))
            .unwrap();
    assert_eq!(
        json,
        serde_json::json!({"object": "list", "from": 1_577_836_800_000_i64, "to": 1_580_515_200_000_i64, "data": []})
    );
}

#[tokio::test]
async fn usage_sums_per_tenant_and_model_with_a_total_row() {
    let cli = Cli::new();
    cli.ok(&["tenants", "create", "team-a"]);
    {
        let db = Db::connect(&DatabaseSettings::default(), &cli.data_dir()).await.unwrap();
        let tenant = TenantRepo::new(db.clone()).get_tenant("team-a").await.unwrap();
        let now = imagegate::time::now_ms();
        let rows = [
            ("gpt-image-1", 200, 0.25, None),
            ("gpt-image-1", 429, 0.0, Some("upstream")),
            ("dall-e-3", 200, 0.04, None),
            ("gpt-image-1", 429, 0.0, Some("gateway")),
        ];
        for (i, (model, status, cost, refused_by)) in rows.into_iter().enumerate() {
            sqlx::query(
                "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
                 images_requested, images_returned, input_tokens, output_tokens, cost_usd, status, latency_ms, \
                 stream, cache_hit, refused_by) VALUES ($1, $2, $3, 'abcd1234', 'generations', $4, 2, $5, 10, 100, \
                 $6, $7, 5, 0, 0, $8)",
            )
            .bind(format!("req-{i}"))
            .bind(now - 1_000)
            .bind(tenant.id.clone())
            .bind(model)
            .bind(if status == 200 { 2_i64 } else { 0 })
            .bind(cost)
            .bind(i64::from(status))
            .bind(refused_by)
            .execute(db.pool())
            .await
            .unwrap();
        }
        db.close().await;
    }

    let table = cli.ok(&["usage"]);
    assert_eq!(row(&table, "team-a"), ["team-a", "dall-e-3", "1", "1", "2/2", "10", "100", "0.0400", "0", "0", "0"]);
    // Columns: requests, ok, images, tokens in/out, cost, cache hits, refused by imagegate, refused upstream.
    assert_eq!(row(&table, "TOTAL"), ["TOTAL", "", "4", "2", "4/8", "40", "400", "0.2900", "0", "1", "1"]);
    let gpt = table.lines().find(|l| l.contains("gpt-image-1")).unwrap();
    assert!(gpt.contains("0.2500") && gpt.contains("2/6"), "{gpt}");

    let csv = cli.ok(&["usage", "--format", "csv"]);
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let json: serde_json::Value = serde_json::from_str(&cli.ok(&["usage", "--format", "json"])).unwrap();
    assert_eq!(json["object"], "list");
    let rows = json["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["model"], "dall-e-3");
    assert_eq!((rows[1]["requests"].as_i64(), rows[1]["succeeded"].as_i64()), (Some(3), Some(1)));
    assert_eq!((rows[1]["refused"].as_i64(), rows[1]["upstream_rate_limited"].as_i64()), (Some(1), Some(1)));
    // A range before the rows finds nothing.
    assert!(!cli.ok(&["usage", "--from", "2020-01-01", "--to", "2020-02-01"]).contains("team-a"));
}

#[test]
fn failures_are_one_clear_line_and_exit_code_1() {
    let cli = Cli::new();
    cli.ok(&["tenants", "create", "team-a"]);

    assert!(cli.fails(&["tenants", "show", "nope"]).contains("no tenant named 'nope'"));
    assert!(cli.fails(&["tenants", "suspend", "nope"]).contains("no tenant named 'nope'"));
    assert!(cli.fails(&["tenants", "update", "nope", "--org", "x"]).contains("no tenant named 'nope'"));
    assert!(cli.fails(&["keys", "create", "--tenant", "nope"]).contains("no tenant named 'nope'"));
    assert!(cli.fails(&["keys", "list", "--tenant", "nope"]).contains("no tenant named 'nope'"));
    assert!(cli.fails(&["usage", "--tenant", "nope"]).contains("no tenant named 'nope'"));
    assert!(cli.fails(&["keys", "revoke", "zzzzzzzz"]).contains("no key with id 'zzzzzzzz'"));
    assert!(cli.fails(&["tenants", "create", "team-a"]).contains("a tenant named 'team-a' already exists"));
    assert!(cli.fails(&["tenants", "create", "bad name"]).contains("invalid tenant name"));
    assert!(cli.fails(&["tenants", "update", "team-a"]).contains("nothing to change"));
    assert!(cli.fails(&["tenants", "update", "team-a", "--limits", r#"{"rpm":1}"#]).contains("invalid --limits"));
    assert!(cli.fails(&["tenants", "update", "team-a", "--limits", "[1]"]).contains("invalid --limits"));
    assert!(cli.fails(&["keys", "create", "--tenant", "team-a", "--expires-in", "soon"]).contains("--expires-in"));
    assert!(cli.fails(&["usage", "--from", "yesterday"]).contains("invalid --from"));
    assert!(cli.fails(&["usage", "--from", "2030-01-01", "--to", "2029-01-01"]).contains("must be before"));
    assert!(cli.fails(&["usage", "--to=-5"]).contains("invalid --to"));
    assert!(cli.fails(&["tenants", "create", "x", "--metadata", "[1]"]).contains("metadata must be a JSON object"));
    assert!(cli.fails(&["tenants", "update", "team-a", "--metadata", "{bad"]).contains("invalid --metadata"));
    assert!(cli.fails(&["keys", "create", "--tenant", "team-a", "--expires-at", "2001-01-01"]).contains("future"));
    assert!(cli.fails(&["tenants", "create", "x", "--upstream", "nowhere"]).contains("'nowhere' is not a configured"));
}

#[test]
fn tenant_settings_are_checked_like_the_admin_api_checks_them() {
    let cli = Cli::new();
    cli.ok(&["tenants", "create", "team-a"]);
    for (args, field) in [
        (vec!["tenants", "create", "x", "--limits", r#"{"requests_per_minute":0}"#], "limits.requests_per_minute"),
        (vec!["tenants", "create", "x", "--limits", r#"{"usd_per_day":-1}"#], "limits.usd_per_day"),
        (
            vec!["tenants", "create", "x", "--limits", r#"{"requests_per_minute":5,"requests_burst":6}"#],
            "limits.requests_burst",
        ),
        (vec!["tenants", "create", "x", "--image-policy", r#"{"retention":"0s"}"#], "image_policy.retention"),
        (vec!["tenants", "update", "team-a", "--cache-policy", r#"{"ttl":"0s"}"#], "cache_policy.ttl"),
        (vec!["tenants", "update", "team-a", "--limits", r#"{"images_burst":0}"#], "limits.images_burst"),
    ] {
        let line = cli.fails(&args);
        assert!(line.contains(field), "{args:?}: {line}");
    }
    assert!(cli.fails(&["tenants", "show", "x"]).contains("no tenant named 'x'"), "nothing refused was created");
}

#[test]
fn metadata_key_expiry_and_upstreams_are_set_from_the_command_line() {
    let cli = Cli::with_config("[upstreams.second]\nkind = \"mock\"\n");
    cli.ok(&["tenants", "create", "team-a", "--metadata", r#"{"cost_center":"4711"}"#, "--upstream", "second"]);
    let show = cli.ok(&["tenants", "show", "team-a"]);
    assert_eq!(row(&show, "metadata")[1], r#"{"cost_center":"4711"}"#);
    assert_eq!(row(&show, "upstream")[1], "second");
    cli.ok(&["tenants", "update", "team-a", "--default-upstream", "--metadata", "{}"]);
    let show = cli.ok(&["tenants", "show", "team-a"]);
    assert_eq!((row(&show, "upstream")[1].as_str(), row(&show, "metadata")[1].as_str()), ("default", "{}"));
    assert!(cli.fails(&["tenants", "update", "team-a", "--upstream", "third"]).contains("'third'"));

    let out = cli.ok(&["keys", "create", "--tenant", "team-a", "--expires-at", "2099-01-01T02:00:00+02:00"]);
    assert!(out.contains("expires 2099-01-01T00:00:00Z"), "{out}");
    let out = cli.run(&["keys", "create", "--tenant", "team-a", "--expires-at", "2099-01-01", "--expires-in", "1d"]);
    assert_eq!(out.status.code(), Some(2), "--expires-at and --expires-in exclude each other");
}

/// The ```text block under each `<!-- imagegate … --help -->` marker of docs/admin.md.
fn documented_help() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin.md")).unwrap();
    let mut blocks = Vec::new();
    let mut rest = doc.as_str();
    while let Some(start) = rest.find("<!-- imagegate ") {
        let after = &rest[start + "<!-- ".len()..];
        let (command, tail) = after.split_once(" -->").unwrap();
        let body = tail.trim_start().strip_prefix("```text\n").unwrap_or_else(|| panic!("no ```text after {command}"));
        let (text, next) = body.split_once("\n```").unwrap();
        blocks.push((command.to_owned(), format!("{text}\n")));
        rest = next;
    }
    blocks
}

#[test]
fn the_help_text_in_docs_admin_md_is_what_the_binary_prints() {
    let blocks = documented_help();
    let commands: Vec<&str> = blocks.iter().map(|(c, _)| c.as_str()).collect();
    for required in [
        "imagegate --help",
        "imagegate tenants --help",
        "imagegate tenants list --help",
        "imagegate tenants show --help",
        "imagegate tenants create --help",
        "imagegate tenants update --help",
        "imagegate tenants suspend --help",
        "imagegate tenants resume --help",
        "imagegate keys --help",
        "imagegate keys create --help",
        "imagegate keys list --help",
        "imagegate keys revoke --help",
        "imagegate keys new --help",
        "imagegate usage --help",
    ] {
        assert!(commands.contains(&required), "docs/admin.md lacks the help of `{required}`");
    }
    for (command, documented) in &blocks {
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_imagegate")).args(&args).env("COLUMNS", "100").output().unwrap();
        assert!(out.status.success(), "{command}");
        let printed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(&printed, documented, "docs/admin.md shows an outdated `{command}`: paste the output above");
    }
}

#[test]
fn database_commands_need_no_upstream_key_even_when_the_upstream_is_openai() {
    let cli = Cli::with_config("[upstream]\nkind = \"openai\"\n");
    // `serve` refuses this configuration without OPENAI_API_KEY; managing the database does not need one.
    cli.ok(&["tenants", "create", "team-a"]);
    assert!(cli.ok(&["tenants", "list"]).contains("team-a"));
    cli.ok(&["usage"]);
}

#[test]
fn keys_new_prints_a_configuration_snippet_and_touches_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["keys", "new", "--tenant", "ops"])
        .current_dir(dir.path())
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.split_whitespace().any(is_key), "{stdout}");
    assert!(stdout.contains("[[tenants]]\nname = \"ops\""), "{stdout}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "keys new created files");
}

#[test]
fn a_missing_config_file_is_reported_not_created() {
    let cli = Cli::new();
    let missing: &Path = &cli.dir.path().join("nope.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["tenants", "list", "--config"])
        .arg(missing)
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[tokio::test]
async fn models_lists_the_catalog_with_each_status_and_usage_shows_who_still_calls_what_is_going_away() {
    let cli = Cli::with_config(
        "[models.\"house-old\"]\nextends = \"gpt-image-2\"\nshutdown_on = \"2099-01-01\"\nreplacement = \"gpt-image-2\"\n\
         [models.aliases]\n\"house\" = \"gpt-image-2\"\n",
    );
    let table = cli.ok(&["models"]);
    assert_eq!(row(&table, "house-old")[1..4], ["deprecated", "yes", "-"]);
    assert_eq!(row(&table, "gpt-image-2")[1], "active");
    assert!(row(&table, "gpt-image-2").contains(&"house".to_owned()), "{table}");
    // OpenAI's own dates for its models: shown whatever the upstream (the column `enforced` says whether they act).
    assert_eq!(row(&table, "gpt-image-1")[1], "shut_down");
    let json: serde_json::Value = serde_json::from_str(&cli.ok(&["models", "--format", "json"])).unwrap();
    let house = json["data"].as_array().unwrap().iter().find(|m| m["id"] == "house-old").unwrap().clone();
    assert_eq!((house["status"].as_str(), house["source"].as_str()), (Some("deprecated"), Some("config")));
    let deprecated = cli.ok(&["models", "--status", "deprecated"]);
    assert!(deprecated.contains("house-old"), "{deprecated}");
    assert!(!deprecated.lines().any(|l| l.starts_with("| gpt-image-2 ")), "{deprecated}");

    cli.ok(&["tenants", "create", "team-a"]);
    {
        let db = Db::connect(&DatabaseSettings::default(), &cli.data_dir()).await.unwrap();
        let tenant = TenantRepo::new(db.clone()).get_tenant("team-a").await.unwrap();
        for (i, model) in ["house-old", "gpt-image-2", "house-old"].into_iter().enumerate() {
            sqlx::query(
                "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
                 images_requested, cost_usd, status, latency_ms, stream, cache_hit) \
                 VALUES ($1, $2, $3, 'abcd1234', 'generations', $4, 1, 0.01, 200, 5, 0, 0)",
            )
            .bind(format!("req-{i}"))
            .bind(imagegate::time::now_ms() - 1_000)
            .bind(tenant.id.clone())
            .bind(model)
            .execute(db.pool())
            .await
            .unwrap();
        }
        db.close().await;
    }
    let going = cli.ok(&["usage", "--model-status", "deprecated"]);
    assert_eq!(row(&going, "team-a")[1..3], ["house-old", "2"], "{going}");
    assert!(!going.contains("gpt-image-2"), "{going}");
    assert!(cli.ok(&["usage", "--model-status", "active"]).contains("gpt-image-2"));
}
