//! Streams metered as they pass: each `*.completed` event of an SSE answer counts one image and carries its
//! token usage; the record is finished when the stream ends or the caller goes away. Before that, a stream is
//! held to what its request may carry ([`held_to_request`]): a size derived from `n`, `partial_images` and the
//! model, and nothing after its `n`th completed image.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;
use serde::Deserialize;

use crate::ledger::record::UsageRecord;
use crate::pricing::Prices;

#[derive(Deserialize)]
struct CompletedEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    usage: Option<serde_json::Value>,
}

/// Pass an SSE stream through unchanged while metering its `*.completed` events; the record is written when
/// the stream ends or the caller goes away.
pub fn meter_stream(
    inner: BoxStream<'static, Bytes>,
    record: UsageRecord,
    prices: Arc<Prices>,
    done: Box<dyn FnOnce(UsageRecord) + Send>,
    hold: Option<crate::limits::SlotGuard>,
    started: Instant,
) -> BoxStream<'static, Bytes> {
    Box::pin(MeteredStream {
        inner,
        events: SseEvents::default(),
        record: Some(record),
        prices,
        done: Some(done),
        hold,
        started,
    })
}

struct MeteredStream {
    inner: BoxStream<'static, Bytes>,
    events: SseEvents,
    record: Option<UsageRecord>,
    prices: Arc<Prices>,
    /// Receives the finished record (ledger and budgets).
    done: Option<Box<dyn FnOnce(UsageRecord) + Send>>,
    /// Resources held while the stream runs (the tenant's concurrency slot), released at the end.
    hold: Option<crate::limits::SlotGuard>,
    started: Instant,
}

impl MeteredStream {
    fn scan(&mut self, chunk: &[u8]) {
        let Self { events, record, prices, .. } = self;
        let Some(record) = record.as_mut() else { return };
        events.feed(chunk, &mut |event| meter_event(record, prices, event));
    }

    fn close(&mut self) {
        if let (Some(record), Some(done)) = (self.record.take(), self.done.take()) {
            done(record.finish(200, self.started));
        }
        self.hold = None;
    }
}

/// Count a `*.completed` event's image and its token usage.
/// Hold an upstream event stream to what its request may carry: at most `max_bytes` in all (at the chunk that
/// would pass it, an error event ends the stream and the upstream connection is dropped), and nothing after
/// its `max_images`th completed image (the stream ends with that event). What is cut is never forwarded, so
/// never metered: a tenant is charged for at most the `n` images it asked for.
pub fn held_to_request(inner: BoxStream<'static, Bytes>, max_bytes: u64, max_images: u32) -> BoxStream<'static, Bytes> {
    struct Held {
        inner: BoxStream<'static, Bytes>,
        events: SseEvents,
        sent: u64,
        completed: u32,
    }
    let start = Held { inner, events: SseEvents::default(), sent: 0, completed: 0 };
    let max_images = max_images.max(1);
    let held = futures::stream::unfold(Some(start), move |state| async move {
        let mut held = state?;
        let chunk = futures::StreamExt::next(&mut held.inner).await?;
        let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
        if held.sent.saturating_add(len) > max_bytes {
            tracing::warn!(
                kind = "upstream.stream_too_large",
                limit = max_bytes,
                "cut a stream larger than its request may be"
            );
            let event = crate::upstream::sse_error_event(
                "The upstream's answer was larger than this request allows; the rest of it was not forwarded.",
                "server_error",
                Some("upstream_bad_answer"),
            );
            // Leading line breaks end any half-sent event before the error.
            let mut out = Vec::with_capacity(event.len() + 2);
            out.extend_from_slice(b"\n\n");
            out.extend_from_slice(&event);
            return Some((Bytes::from(out), None));
        }
        held.sent += len;
        let mut completed = held.completed;
        let stop = held.events.feed_until(&chunk, &mut |event| {
            if completes_an_image(&event) {
                completed += 1;
            }
            completed < max_images
        });
        held.completed = completed;
        match stop {
            Some(end) => {
                if end < chunk.len() {
                    tracing::warn!(
                        kind = "upstream.too_many_images",
                        asked = max_images,
                        "ended a stream after its nth completed image"
                    );
                }
                Some((chunk.slice(..end), None))
            }
            None => Some((chunk, Some(held))),
        }
    });
    Box::pin(held)
}

/// Whether an event is a `*.completed` image event (one too large to read whole: whether it says so).
fn completes_an_image(event: &Event<'_>) -> bool {
    if !event.whole {
        return find(event.data, b".completed\"").is_some();
    }
    serde_json::from_slice::<CompletedEvent>(event.data).is_ok_and(|e| e.kind.ends_with(".completed"))
}

fn meter_event(record: &mut UsageRecord, prices: &Prices, event: Event<'_>) {
    if !event.whole {
        // Too large to read whole (never an image: base64 is skimmed). Count the image it announces, if any.
        if find(event.data, b".completed\"").is_some() {
            tracing::warn!(model = %record.model, "a stream event was too large to meter; its usage is not recorded");
            record.add_output(1, None, prices);
        }
        return;
    }
    if let Ok(e) = serde_json::from_slice::<CompletedEvent>(event.data)
        && e.kind.ends_with(".completed")
    {
        record.add_output(1, e.usage.as_ref(), prices);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The bytes of an event's data kept at most (after skimming, see [`Skim`]); a larger event is metered from
/// its start only.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Bytes of each JSON string kept; the rest of a longer string (an image's base64) is not copied.
const KEEP_STRING_BYTES: usize = 256;

/// The data of one event, as the meter sees it.
#[derive(Debug)]
struct Event<'a> {
    /// The event's data lines joined by LF, with long JSON strings cut short.
    data: &'a [u8],
    /// False when the data outgrew [`MAX_EVENT_BYTES`] and only its start is here.
    whole: bool,
}

/// An incremental parser of `text/event-stream` (WHATWG HTML §9.2.6) that yields each event's data: lines end
/// in LF, CRLF or CR (a CR ending one chunk and an LF starting the next are one line break); `data:` with or
/// without a space; several `data` lines joined by LF; comments and other fields ignored; an event is
/// dispatched at a blank line, and only if it had data. Memory is bounded: only the data of the event in
/// progress is kept, skimmed of long strings, up to [`MAX_EVENT_BYTES`].
#[derive(Debug, Default)]
struct SseEvents {
    /// The start of the current line while its field name is not known yet (a few bytes).
    field: Vec<u8>,
    line: Line,
    /// The previous chunk ended in CR: an LF starting this one ends nothing.
    after_cr: bool,
    data: Vec<u8>,
    has_data: bool,
    overflow: bool,
    skim: Skim,
}

/// What the current line is, once its field name is known.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line, or still reading its field name into `field`.
    #[default]
    Name,
    /// Just after `data:`: a space here is not part of the value.
    DataStart,
    /// A `data` line: the rest of its bytes are the value.
    Data,
    /// Any other field or a comment: the rest of the line is ignored.
    Ignored,
}

/// Field names longer than this are not `data`, so their lines are ignored without being kept.
const MAX_FIELD_NAME: usize = 8;

impl SseEvents {
    /// Feed one chunk; `on_event` gets every event completed by it.
    fn feed(&mut self, chunk: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        self.feed_until(chunk, &mut |event| {
            on_event(event);
            true
        });
    }

    /// [`Self::feed`], stopping after the event for which `on_event` returns false: `Some(bytes of the chunk up
    /// to the end of that event)`, or `None` when the whole chunk was fed.
    fn feed_until(&mut self, chunk: &[u8], on_event: &mut impl FnMut(Event<'_>) -> bool) -> Option<usize> {
        let mut rest = chunk;
        if std::mem::take(&mut self.after_cr) && rest.first() == Some(&b'\n') {
            rest = &rest[1..];
        }
        while let Some(i) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.push(&rest[..i]);
            let go_on = self.end_line(on_event);
            let crlf = rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n');
            self.after_cr = rest[i] == b'\r' && i + 1 == rest.len();
            rest = &rest[i + 1 + usize::from(crlf)..];
            if !go_on {
                return Some(chunk.len() - rest.len());
            }
        }
        self.push(rest);
        None
    }

    /// Bytes of the current line (no line break among them).
    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.line {
                Line::Ignored => return,
                Line::Data => {
                    self.append_data(bytes);
                    return;
                }
                Line::Name => {
                    let Some(colon) = bytes.iter().position(|b| *b == b':') else {
                        self.field.extend_from_slice(bytes);
                        if self.field.len() > MAX_FIELD_NAME {
                            self.line = Line::Ignored;
                        }
                        return;
                    };
                    self.field.extend_from_slice(&bytes[..colon]);
                    bytes = &bytes[colon + 1..];
                    if self.field != b"data" {
                        // Another field, or a comment (an empty name).
                        self.line = Line::Ignored;
                        return;
                    }
                    self.start_data_line();
                }
                Line::DataStart => {
                    // One space after the colon is not part of the value (it may start the next chunk).
                    if bytes[0] == b' ' {
                        bytes = &bytes[1..];
                    }
                    self.line = Line::Data;
                }
            }
        }
    }

    fn start_data_line(&mut self) {
        if self.has_data {
            self.append_data(b"\n");
        }
        self.has_data = true;
        self.line = Line::DataStart;
    }

    fn append_data(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        self.skim.push(&mut self.data, bytes);
        if self.data.len() > MAX_EVENT_BYTES {
            self.data.truncate(MAX_EVENT_BYTES);
            self.overflow = true;
        }
    }

    /// End the current line; false when it ended an event for which `on_event` returned false.
    fn end_line(&mut self, on_event: &mut impl FnMut(Event<'_>) -> bool) -> bool {
        let mut go_on = true;
        match self.line {
            // "data" alone on its line is a data line with an empty value.
            Line::Name if self.field == b"data" => self.start_data_line(),
            Line::Name if self.field.is_empty() => {
                if self.has_data {
                    go_on = on_event(Event { data: &self.data, whole: !self.overflow });
                }
                self.data.clear();
                self.has_data = false;
                self.overflow = false;
                self.skim = Skim::default();
            }
            _ => {}
        }
        self.field.clear();
        self.line = Line::Name;
        go_on
    }
}

/// Copies JSON text but keeps only the first [`KEEP_STRING_BYTES`] of each string, so what is kept stays valid
/// JSON (strings are cut before an ASCII byte, never inside an escape or a UTF-8 sequence) and small.
#[derive(Debug, Default)]
struct Skim {
    in_string: bool,
    escaped: bool,
    /// Hex digits of a `\uXXXX` escape still to come (never cut inside one).
    hex_left: u8,
    kept: usize,
    dropping: bool,
}

impl Skim {
    fn push(&mut self, out: &mut Vec<u8>, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.dropping {
                // Skip to the closing quote, minding escapes.
                let mut end = None;
                for (i, &b) in bytes.iter().enumerate() {
                    if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                    } else if b == b'"' {
                        end = Some(i);
                        break;
                    }
                }
                let Some(i) = end else { return };
                out.push(b'"');
                (self.dropping, self.in_string) = (false, false);
                bytes = &bytes[i + 1..];
                continue;
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            if !self.in_string {
                if b == b'"' {
                    (self.in_string, self.kept, self.escaped) = (true, 0, false);
                }
                out.push(b);
            } else if self.escaped {
                self.escaped = false;
                self.hex_left = if b == b'u' { 4 } else { 0 };
                out.push(b);
                self.kept += 1;
            } else if self.hex_left > 0 {
                self.hex_left -= 1;
                out.push(b);
                self.kept += 1;
            } else if b == b'"' {
                self.in_string = false;
                out.push(b);
            } else if self.kept >= KEEP_STRING_BYTES && b < 0x80 && b != b'\\' {
                self.dropping = true;
            } else {
                self.escaped = b == b'\\';
                out.push(b);
                self.kept += 1;
            }
        }
    }
}

impl Stream for MeteredStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(chunk)) => {
                self.scan(&chunk);
                Poll::Ready(Some(chunk))
            }
            Poll::Ready(None) => {
                self.close();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // The caller disconnected mid-stream: record what was delivered so far.
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events `chunks` make, as (data, whole).
    fn events(chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut parser = SseEvents::default();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut |e| out.push((String::from_utf8(e.data.to_vec()).unwrap(), e.whole)));
        }
        out
    }

    /// Every way of cutting `stream` in two chunks gives the same events.
    fn same_at_every_split(stream: &[u8]) -> Vec<(String, bool)> {
        let whole = events(&[stream]);
        for at in 0..=stream.len() {
            assert_eq!(events(&[&stream[..at], &stream[at..]]), whole, "split at {at} of {:?}", stream);
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes), whole, "byte by byte");
        whole
    }

    #[test]
    fn events_end_at_a_blank_line_whatever_the_line_breaks() {
        for stream in [
            &b"event: a\ndata: {\"x\":1}\n\nevent: b\ndata: {\"x\":2}\n\n"[..],
            b"event: a\r\ndata: {\"x\":1}\r\n\r\nevent: b\r\ndata: {\"x\":2}\r\n\r\n",
            b"event: a\rdata: {\"x\":1}\r\revent: b\rdata: {\"x\":2}\r\r",
            b"event: a\ndata:{\"x\":1}\r\n\nevent: b\rdata:{\"x\":2}\n\r\n",
        ] {
            let got = same_at_every_split(stream);
            assert_eq!(got, [("{\"x\":1}".to_owned(), true), ("{\"x\":2}".to_owned(), true)], "{stream:?}");
        }
    }

    #[test]
    fn data_lines_join_comments_and_other_fields_are_ignored() {
        let stream = b": keep-alive\nid: 7\nretry: 10\ndata: {\"a\":\ndata:  1}\ndata\nevent: x\n\ndata:x\n\n";
        let got = same_at_every_split(stream);
        assert_eq!(got, [("{\"a\":\n 1}\n".to_owned(), true), ("x".to_owned(), true)]);
        // No data, no event; a trailing event without its blank line is not dispatched.
        assert!(same_at_every_split(b"event: ping\n\n: comment\n\ndata: open").is_empty());
    }

    #[test]
    fn long_strings_are_skimmed_so_an_events_memory_stays_small() {
        let b64 = "QUJD".repeat(2_000_000); // 8 MB of base64
        let event = format!(
            "event: image_generation.completed\ndata: {{\"type\":\"image_generation.completed\",\"b64_json\":\"{b64}\",\
             \"note\":\"caf\u{e9} \\\"q\\\"\",\"usage\":{{\"input_tokens\":5,\"output_tokens\":7}}}}\n\n"
        );
        let chunks: Vec<&[u8]> = event.as_bytes().chunks(65_536).collect();
        let got = events(&chunks);
        assert_eq!(got.len(), 1);
        let (data, whole) = &got[0];
        assert!(*whole && data.len() < 1024, "{} bytes kept", data.len());
        let parsed: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(parsed["type"], "image_generation.completed");
        assert_eq!(parsed["note"], "caf\u{e9} \"q\"");
        assert_eq!(parsed["usage"]["output_tokens"], 7);
        assert_eq!(parsed["b64_json"].as_str().unwrap().len(), KEEP_STRING_BYTES);
    }

    #[test]
    fn a_long_string_is_never_cut_inside_an_escape_or_a_character() {
        // Escapes and multi-byte characters at every offset around the cut stay whole: the JSON still parses.
        for pad in 0..12 {
            let text =
                format!("{}{}", "a".repeat(KEEP_STRING_BYTES - 6 + pad), "\\u00e9\\ud83d\\ude00\\\"é😀".repeat(8));
            let data =
                format!("{{\"type\":\"x.completed\",\"revised_prompt\":\"{text}\",\"usage\":{{\"output_tokens\":3}}}}");
            let got = events(&[format!("data: {data}\n\n").as_bytes()]);
            let parsed: serde_json::Value = serde_json::from_str(&got[0].0).unwrap_or_else(|e| panic!("{pad}: {e}"));
            assert_eq!(parsed["usage"]["output_tokens"], 3, "{pad}");
        }
    }

    #[test]
    fn an_event_without_blank_lines_never_grows_past_the_bound() {
        let mut parser = SseEvents::default();
        let chunk = vec![b'1'; 1 << 20];
        parser.feed(b"data: [", &mut |_| {});
        for _ in 0..8 {
            parser.feed(&chunk, &mut |_| panic!("no event yet"));
            parser.feed(b",", &mut |_| {});
        }
        assert!(parser.data.len() <= MAX_EVENT_BYTES && parser.field.len() <= MAX_FIELD_NAME + 1);
        let mut seen = Vec::new();
        parser.feed(b"]\n\n", &mut |e| seen.push(e.whole));
        assert_eq!(seen, [false], "dispatched, marked as cut");
    }
}
