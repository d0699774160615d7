//! Replays every file of the fuzz corpora (`fuzz/corpus/<target>/`) through the fuzz targets' own harnesses,
//! on stable, in the ordinary `cargo test`. A crash input copied into a corpus directory is thereby a
//! regression test. See `docs/fuzzing.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "a test reports failures by panicking")]

use std::path::{Path, PathBuf};

// The fuzz targets themselves: their `run` functions are the harnesses; the libFuzzer entry points are
// compiled only under `cfg(fuzzing)`, which `cargo fuzz` sets and `cargo test` does not.
#[allow(unexpected_cfgs, unused_attributes, reason = "`#![no_main]` and `cfg(fuzzing)` only matter to cargo-fuzz")]
#[path = "../fuzz/fuzz_targets/image_header.rs"]
mod image_header;
#[allow(unexpected_cfgs, unused_attributes, reason = "`#![no_main]` and `cfg(fuzzing)` only matter to cargo-fuzz")]
#[path = "../fuzz/fuzz_targets/request_json.rs"]
mod request_json;
#[allow(unexpected_cfgs, unused_attributes, reason = "`#![no_main]` and `cfg(fuzzing)` only matter to cargo-fuzz")]
#[path = "../fuzz/fuzz_targets/request_multipart.rs"]
mod request_multipart;

/// Every fuzz target, each replayed by its own test below. A corpus directory not listed here fails a test.
const TARGETS: &[&str] = &["image_header", "request_json", "request_multipart"];

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus")
}

/// The files of one corpus directory (recursively), sorted so failures name the same file every run.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Run every file of `fuzz/corpus/<target>/` through `harness`, naming the file that panics.
fn replay(target: &str, harness: fn(&[u8])) {
    let dir = corpus_root().join(target);
    let files = files(&dir);
    assert!(!files.is_empty(), "the corpus {} is empty: seeds are kept in the repository", dir.display());
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if std::panic::catch_unwind(|| harness(&data)).is_err() {
            panic!("fuzz target {target} panics on {} (see docs/fuzzing.md)", path.display());
        }
    }
}

#[test]
fn image_header_corpus() {
    replay("image_header", image_header::run);
}

#[test]
fn request_json_corpus() {
    replay("request_json", request_json::run);
}

#[test]
fn request_multipart_corpus() {
    replay("request_multipart", request_multipart::run);
}

/// Every corpus directory belongs to a target replayed above, so a new target cannot be forgotten here.
#[test]
fn every_corpus_directory_is_replayed() {
    for entry in std::fs::read_dir(corpus_root()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                TARGETS.contains(&name.as_str()),
                "fuzz/corpus/{name} has no harness in tests/fuzz_corpus.rs: add the target to TARGETS and a test"
            );
        }
    }
    for target in TARGETS {
        assert!(corpus_root().join(target).is_dir(), "fuzz/corpus/{target} is missing");
    }
}
