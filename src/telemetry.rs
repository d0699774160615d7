//! Logging: a `tracing` subscriber writing human or JSON lines, filtered by `log.level` or `RUST_LOG`.
//!
//! What must never be logged (keys, base64, image bytes) is kept out at the source: headers are marked
//! sensitive, bodies are never logged, and errors carry fixed messages.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Install the global subscriber. Safe to call once; later calls are ignored (tests build many apps).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let result = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
    // Already installed (e.g. a second app in one test process): keep the first.
    let _ = result;
}
