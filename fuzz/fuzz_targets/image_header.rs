//! Fuzz target `image_header`: any bytes given to `images::imageinfo::inspect`, the header reader that checks
//! uploaded PNG/JPEG/WebP files without decoding them, and to `check_complete`, the end-of-file check. They
//! must answer `Ok` or `Err`, never panic, and agree with the signature sniffer.
//!
//! `run` is the whole harness; `tests/fuzz_corpus.rs` includes this file and replays the corpus through it on
//! stable, so the libFuzzer entry point only exists under `cfg(fuzzing)` (set by `cargo fuzz`).

#![no_main]

use imagegate::images::imageinfo::{self, ImageFormat, InspectError};

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));

/// Inspect `data` as an uploaded image file.
pub fn run(data: &[u8]) {
    let sniffed = imageinfo::sniff(data);
    match imageinfo::inspect(data) {
        Ok(info) => {
            assert_eq!(sniffed, Some(info.format), "inspect read a format the signature does not name");
            assert_eq!(ImageFormat::from_mime(info.format.mime()), Some(info.format));
        }
        Err(InspectError::Unrecognized) => assert_eq!(sniffed, None, "a known signature reported as unrecognized"),
        Err(InspectError::Corrupt(_)) => assert!(sniffed.is_some(), "an unknown signature reported as corrupt"),
        Err(e @ InspectError::Truncated(..)) => panic!("inspect reads headers only, yet said {e}"),
    }
    // The end checks of an upload: constant work on any bytes, and they name the format the signature names.
    if let Some(format) = sniffed
        && let Err(InspectError::Truncated(name, _)) = imageinfo::check_complete(data, format)
    {
        assert_eq!(name, format.name(), "the end check named another format");
    }
}
