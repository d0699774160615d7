//! The Dockerfile, checked by construction (no Docker engine runs here): its build stage copies everything the
//! compiler reads — the manifest, the sources, the migrations `sqlx::migrate!` embeds and every file an
//! `include_str!` / `include_bytes!` names — before it builds, `.dockerignore` keeps none of it out, and what the
//! file cites (config, docs, the health route) exists.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests fail by panicking")]

use std::path::{Path, PathBuf};

/// The crate root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                out.push(Instruction { keyword: keyword.to_ascii_uppercase(), args: args.trim().to_owned() });
                current.clear();
            }
        }
    }
    out
}

/// The stages, in order: (name, instructions after its FROM).
fn stages(all: Vec<Instruction>) -> Vec<(String, Vec<Instruction>)> {
    let mut stages: Vec<(String, Vec<Instruction>)> = Vec::new();
    for i in all {
        if i.keyword == "FROM" {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            let name = match words.as_slice() {
                [.., as_, name] if as_.eq_ignore_ascii_case("as") => (*name).to_owned(),
                _ => format!("stage{}", stages.len()),
            };
            stages.push((name, Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push(i);
        }
    }
    stages
}

/// The sources of a `COPY` (not `COPY --from=…`), in shell or JSON form; `None` for other instructions.
fn copy_sources(i: &Instruction) -> Option<Vec<String>> {
    if i.keyword != "COPY" || i.args.contains("--from") {
        return None;
    }
    let words: Vec<String> = if i.args.starts_with('[') {
        serde_json::from_str(&i.args).unwrap()
    } else {
        i.args.split_whitespace().filter(|w| !w.starts_with("--")).map(str::to_owned).collect()
    };
    let (_, sources) = words.split_last().expect("COPY has a destination");
    Some(sources.iter().map(|s| normalize(s)).collect())
}

fn normalize(path: &str) -> String {
    let path = path.trim_start_matches("./").trim_end_matches('/');
    if path.is_empty() { ".".to_owned() } else { path.to_owned() }
}

fn covers(source: &str, path: &str) -> bool {
    source == "." || source == path || path.starts_with(&format!("{source}/"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literals passed to `macro!(` in `text`.
fn macro_args<'a>(text: &'a str, name: &str) -> Vec<Option<&'a str>> {
    text.match_indices(&format!("{name}!("))
        .map(|(at, m)| {
            let rest = text[at + m.len()..].trim_start();
            rest.strip_prefix('"').and_then(|r| r.split('"').next())
        })
        .collect()
}

/// Every path (relative to the crate root) the compiler reads to build the binary.
fn build_inputs() -> Vec<String> {
    let root = root();
    let relative = |p: &Path| p.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut inputs: Vec<String> = vec!["Cargo.toml".into(), "Cargo.lock".into()];
    for file in &files {
        inputs.push(relative(file));
        let text = std::fs::read_to_string(file).unwrap();
        for name in ["include_str", "include_bytes"] {
            for arg in macro_args(&text, name) {
                let arg = arg.unwrap_or_else(|| panic!("{name}! in {} takes a non-literal path", file.display()));
                let target = file.parent().unwrap().join(arg).canonicalize().unwrap();
                inputs.push(relative(&target));
            }
        }
        for arg in macro_args(&text, "sqlx::migrate") {
            inputs.push(normalize(arg.unwrap_or("migrations")));
        }
    }
    assert!(inputs.iter().any(|i| i == "migrations"), "the migrations are embedded: {inputs:?}");
    assert!(inputs.iter().any(|i| i.ends_with("reserve.lua")), "the Lua script is embedded: {inputs:?}");
    if root.join("build.rs").exists() {
        inputs.push("build.rs".into());
    }
    inputs
}

fn dockerfile() -> Vec<(String, Vec<Instruction>)> {
    stages(instructions(&std::fs::read_to_string(root().join("Dockerfile")).unwrap()))
}

#[test]
fn the_build_stage_copies_everything_the_build_embeds_before_building() {
    let stages = dockerfile();
    let (name, build) = stages
        .iter()
        .find(|(_, body)| body.iter().any(|i| i.keyword == "RUN" && i.args.contains("cargo build")))
        .expect("a stage runs cargo build");
    // Only what is copied before the last `cargo build` reaches it.
    let last_build = build.iter().rposition(|i| i.keyword == "RUN" && i.args.contains("cargo build")).unwrap();
    let copied: Vec<String> = build[..last_build].iter().filter_map(copy_sources).flatten().collect();
    for input in build_inputs() {
        assert!(
            copied.iter().any(|source| covers(source, &input)),
            "stage {name} builds without {input}: it copies only {copied:?}"
        );
    }
}

/// `.dockerignore` patterns (gitignore-like, without negation) matching `path`.
fn ignored(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(root().join(".dockerignore")).unwrap_or_default();
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(normalize).find(|pattern| {
        let matches = |candidate: &str| match pattern.split_once('*') {
            None => covers(pattern, candidate),
            Some((head, tail)) => candidate.starts_with(head) && candidate.ends_with(tail),
        };
        // A pattern matching any parent directory excludes the path too.
        let mut prefix = String::new();
        path.split('/').any(|part| {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            matches(&prefix)
        })
    })
}

#[test]
fn dockerignore_keeps_nothing_the_image_needs_out_of_the_context() {
    let stages = dockerfile();
    let copied: Vec<String> =
        stages.iter().flat_map(|(_, body)| body.iter().filter_map(copy_sources).flatten()).collect();
    for path in build_inputs().into_iter().chain(copied) {
        assert_eq!(ignored(&path), None, "{path} is excluded from the build context by .dockerignore");
    }
    assert!(ignored("target/release/imagegate").is_some(), "the local target directory stays out of the context");
}

#[test]
fn what_the_dockerfile_cites_exists() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for (_, body) in dockerfile() {
        for source in body.iter().filter_map(copy_sources).flatten() {
            assert!(root().join(&source).exists(), "COPY {source}: no such file");
        }
    }
    let cited: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| w.starts_with("docs/"))
        .collect();
    assert!(!cited.is_empty(), "the Dockerfile points at its deployment documentation");
    for doc in cited {
        let doc = doc.trim_end_matches(['.', ';', ':']);
        assert!(root().join(doc).is_file(), "the Dockerfile cites {doc}, which does not exist");
    }
    let stages = dockerfile();
    let (_, runtime) = stages.last().unwrap();
    let health = runtime.iter().find(|i| i.keyword == "HEALTHCHECK").expect("a HEALTHCHECK");
    assert!(health.args.contains(&format!("8080{}", imagegate::wire::paths::HEALTHZ)), "{health:?}");
    let user = runtime.iter().rev().find(|i| i.keyword == "USER").expect("a USER");
    assert!(!["root", "0", "0:0"].contains(&user.args.as_str()), "the runtime runs as root");
}
