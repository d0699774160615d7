//! The crate's modules form layers: each top-level module of `src/` imports only modules of its own layer or
//! of layers below it, as `src/lib.rs` lists them (the one place the order is written). Together with
//! `../shared/tools/module-cycles` in `.ci/run` (no cycles inside a layer either), this keeps the dependency
//! graph a ladder that can be read from the bottom up.

#![allow(clippy::unwrap_used, clippy::panic, reason = "tests fail by panicking")]

use std::collections::BTreeMap;
use std::path::Path;

/// The layers as `src/lib.rs` states them: doc lines `//! N. name, name: what they are`, lowest first.
fn layers() -> BTreeMap<String, usize> {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let mut layer_of = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("//! ") else { continue };
        let Some((number, rest)) = rest.split_once(". ") else { continue };
        let Ok(layer) = number.trim().parse::<usize>() else { continue };
        let names = rest.split_once(':').map_or(rest, |(names, _)| names);
        for name in names.split(',') {
            let name = name.trim().trim_matches('`');
            assert!(layer_of.insert(name.to_owned(), layer).is_none(), "{name} is listed twice in src/lib.rs");
        }
    }
    assert!(layer_of.len() > 10, "src/lib.rs lists no layers: {layer_of:?}");
    layer_of
}

/// Top-level modules a file of `src/` names as `crate::<module>` (also inside `use crate::{…}` lists), outside
/// its `#[cfg(test)]` modules and comments.
fn imports(file: &str) -> Vec<String> {
    let code: String = file.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    let code = without_test_modules(&code);
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            // The names at depth 0 of the braced list.
            let (mut depth, mut name, mut start) = (0, String::new(), true);
            for c in list.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(std::mem::take(&mut name));
                        start = true;
                    }
                    c if depth == 0 && start && (c.is_alphanumeric() || c == '_') => name.push(c),
                    c if depth == 0 && !name.is_empty() && !(c.is_alphanumeric() || c == '_') => start = false,
                    _ => {}
                }
            }
            found.push(name);
        } else {
            found.push(rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or_default().to_owned());
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

/// `code` without its `#[cfg(test)] mod … { … }` blocks (brace-matched, so code after them still counts).
fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find('{').filter(|&o| after[..o].contains("mod ")) else {
            out.push_str("#[cfg(test)]");
            rest = &after["#[cfg(test)]".len()..];
            continue;
        };
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_its_own_layer_and_those_below() {
    let layer_of = layers();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut faults = Vec::new();
    for path in files {
        let relative = path.strip_prefix(&src).unwrap();
        let top = relative.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(&own) = layer_of.get(&top) else {
            faults.push(format!("src/lib.rs puts module `{top}` in no layer"));
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        for used in imports(&text) {
            match layer_of.get(&used) {
                Some(&layer) if layer > own => faults.push(format!(
                    "{} (layer {own}) imports crate::{used} (layer {layer}): a module may only use its own layer \
                     and those below",
                    relative.display()
                )),
                _ => {}
            }
        }
    }
    faults.sort();
    faults.dedup();
    assert!(faults.is_empty(), "layering broken:\n{}", faults.join("\n"));
}
