//! Fuzz target `request_json`: any bytes as a JSON request body, parsed for every endpoint and, when parsed,
//! validated with the default policy. Parsing and validation must answer `Ok` or `Err`, never panic.
//!
//! `run` is the whole harness; `tests/fuzz_corpus.rs` includes this file and replays the corpus through it on
//! stable, so the libFuzzer entry point only exists under `cfg(fuzzing)` (set by `cargo fuzz`).

#![no_main]

use bytes::Bytes;
use imagegate::images::request::{Endpoint, ImageRequest};
use imagegate::images::validate::{ValidationPolicy, validate};

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));

/// Feed `data` to the JSON parser and the validator as each endpoint's body.
pub fn run(data: &[u8]) {
    let policy = ValidationPolicy::default();
    let raw = Bytes::copy_from_slice(data);
    for endpoint in [Endpoint::Generations, Endpoint::Edits, Endpoint::Variations] {
        let Ok(request) = ImageRequest::from_json(endpoint, raw.clone()) else { continue };
        // The body is forwarded byte for byte: parsing must never alter it.
        assert_eq!(request.outgoing(None).to_bytes(), raw, "from_json changed the raw body");
        // The accessors the pipeline reads before and after validation.
        let _ = (request.model(), request.n(), request.stream(), request.field_str("size"));
        let _ = validate(&request, &policy);
    }
}
