//! Fuzz target `request_multipart`: a `multipart/form-data` body parsed with `images::multipart::parse`,
//! written as the gateway forwards it (`Form::outgoing`, which must parse back to the same parts), turned
//! into an `ImageRequest` and validated with the default policy. Nothing may panic.
//!
//! Input layout: the first byte picks the endpoint (low 2 bits: 0 and 3 edits, 1 variations, 2 generations)
//! and the `Content-Type` header (bits 2..: index into [`CONTENT_TYPES`], modulo its length); the rest is
//! the body. Seeds are built for that layout, see `docs/fuzzing.md`.
//!
//! `run` is the whole harness; `tests/fuzz_corpus.rs` includes this file and replays the corpus through it on
//! stable, so the libFuzzer entry point only exists under `cfg(fuzzing)` (set by `cargo fuzz`).

#![no_main]

use bytes::Bytes;
use imagegate::images::multipart;
use imagegate::images::request::{Endpoint, ImageRequest};
use imagegate::images::validate::{ValidationPolicy, validate};

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));

/// Content types the first input byte chooses from: what SDKs and browsers send, plus malformed ones.
pub const CONTENT_TYPES: [&str; 8] = [
    // 0: the boundary the hand-written seeds use.
    "multipart/form-data; boundary=XBOUNDARYX",
    // 1: openai-python (httpx): 32 hex digits.
    "multipart/form-data; boundary=0123456789abcdef0123456789abcdef",
    // 2: openai-node (undici FormData).
    "multipart/form-data; boundary=----formdata-undici-012345678901",
    // 3: browsers, quoted.
    "multipart/form-data; boundary=\"----WebKitFormBoundary7MA4YWxkTrZu0gW\"",
    // 4: extra parameters and odd case.
    "Multipart/Form-Data; charset=utf-8; boundary=b",
    // 5: no boundary at all.
    "multipart/form-data",
    // 6: empty boundary.
    "multipart/form-data; boundary=",
    // 7: a boundary with spaces and punctuation, quoted (RFC 2046 allows them).
    "multipart/form-data; boundary=\"a b'()+_,-./:=?\"",
];

/// Parse, build and validate one multipart request from `data` (selector byte + body).
pub fn run(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let endpoint = match selector & 0b11 {
        1 => Endpoint::Variations,
        2 => Endpoint::Generations,
        _ => Endpoint::Edits,
    };
    let content_type = CONTENT_TYPES[usize::from(selector >> 2) % CONTENT_TYPES.len()];
    let raw = Bytes::copy_from_slice(body);
    let Ok(form) = futures::executor::block_on(multipart::parse(content_type, raw.clone())) else { return };
    // The accessors validation and the upstream client use.
    let _ = (form.images().count(), form.mask().map(|m| m.data.len()), form.text("prompt"));
    // What goes upstream is the form written under a fresh boundary: it must parse back to the same parts.
    let outgoing = form.outgoing(None);
    let again = futures::executor::block_on(multipart::parse(&outgoing.content_type, outgoing.to_bytes()))
        .unwrap_or_else(|e| panic!("a re-encoded form does not parse: {e}"));
    // Names and file names are written as HTML forms write them: `"`, CR and LF percent-encoded (as the SDKs'
    // own encoders do); everything else, the data above all, must come back as it was.
    let escaped = |s: &str| s.replace('"', "%22").replace('\r', "%0D").replace('\n', "%0A");
    type Summary = Vec<(String, Option<String>, Option<String>, Bytes)>;
    let summary = |f: &imagegate::images::request::Form, escape: bool| -> Summary {
        let name = |s: &str| if escape { escaped(s) } else { s.to_owned() };
        f.parts
            .iter()
            .map(|p| (name(&p.name), p.file_name.as_deref().map(name), p.content_type.clone(), p.data.to_bytes()))
            .collect()
    };
    assert_eq!(summary(&again, false), summary(&form, true), "re-encoding changed the form");
    // Parsed in the chunks a connection might deliver, the body is the same form.
    let chunks: Vec<Bytes> = raw.chunks(997).map(Bytes::copy_from_slice).collect();
    let chunked = futures::executor::block_on(multipart::parse_chunks(content_type, chunks))
        .unwrap_or_else(|e| panic!("the body in chunks does not parse: {e}"));
    assert_eq!(summary(&chunked, false), summary(&form, false), "chunks changed the form");
    let request = ImageRequest::from_form(endpoint, form);
    let _ = (request.model(), request.n(), request.stream(), request.field("n"));
    let _ = validate(&request, &ValidationPolicy::default());
}
