//! Turning an HTTP request into an [`ImageRequest`]: content-type dispatch, body limits and parsing. Every
//! rejection is an [`ApiError`] (in a [`Failure`], with `Connection: close` when the body is left unread), so
//! malformed input gets OpenAI's error shape like everything else, and an oversized body is answered at once.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use http::{HeaderMap, HeaderValue};
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::domain::Tenant;
use crate::error::{ApiError, Failure};
use crate::images::multipart;
use crate::images::request::{Endpoint, ImageRequest};
use crate::state::AppState;
use crate::wire::headers;

/// What a handler needs from the request besides the tenant.
pub struct Extracted {
    pub request: ImageRequest,
    pub idempotency_key: Option<String>,
    /// An OpenAI SDK's automatic retry (`x-stainless-retry-count` above 0).
    pub sdk_retry: bool,
    /// The caller's `Cache-Control` for this request.
    pub cache: crate::cache::Directive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Multipart,
}

/// Read and parse the body for `endpoint`: JSON for generations, multipart for variations, either for edits.
/// A refusal may carry headers (`Connection: close` when the body was left unread).
pub async fn image_request(
    state: &AppState,
    tenant: &Tenant,
    endpoint: Endpoint,
    request: Request,
) -> Result<Extracted, Failure> {
    let (parts, body) = request.into_parts();
    let content_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let kind = match body_kind(endpoint, content_type.as_deref()) {
        Ok(kind) => kind,
        Err(e) => return Err(refuse_unread(e, body, &parts.headers)),
    };
    // JSON edits are for GPT image models only: a tenant that may use none of them is refused before its
    // (possibly large) body is read.
    if (endpoint, kind) == (Endpoint::Edits, BodyKind::Json) && !may_use_json_edits(tenant) {
        let e = ApiError::PermissionDenied {
            message: format!(
                "Tenant '{}' may not use any model that takes JSON edits (GPT image models); send a multipart \
                 form for the models it may use.",
                tenant.name
            ),
        };
        return Err(refuse_unread(e, body, &parts.headers));
    }
    let server = &state.settings.server;
    let limit = match (endpoint, kind) {
        (Endpoint::Generations, _) => server.max_json_body.as_u64(),
        (_, BodyKind::Json) => server.max_json_edit_body.as_u64(),
        (_, BodyKind::Multipart) => server.max_multipart_body.as_u64(),
    };
    let request = match kind {
        BodyKind::Json => ImageRequest::from_json(endpoint, joined(read_limited(body, limit, &parts.headers).await?))?,
        BodyKind::Multipart => {
            let form = parse_form(content_type.as_deref().unwrap_or_default(), body, limit, &parts.headers).await?;
            ImageRequest::from_form(endpoint, form)
        }
    };
    let idempotency_key = parts.headers.get(headers::IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let sdk_retry = parts
        .headers
        .get(headers::X_STAINLESS_RETRY_COUNT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .is_some_and(|n| n > 0);
    let cache = crate::cache::Directive::from_headers(
        parts.headers.get_all(http::header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()),
    );
    Ok(Extracted { request, idempotency_key, sdk_retry, cache })
}

/// Whether any model the tenant may use could take a JSON edit: one the built-in catalog says takes them, or a
/// model it does not know (an operator's model, or one forwarded when `validation.unknown_models` allows it).
fn may_use_json_edits(tenant: &Tenant) -> bool {
    tenant.allowed_models.as_ref().is_none_or(|models| {
        let catalog = crate::images::models::Catalog::builtin();
        models.iter().any(|m| catalog.get(m).is_none_or(|known| known.json_edits))
    })
}

fn body_kind(endpoint: Endpoint, content_type: Option<&str>) -> Result<BodyKind, ApiError> {
    let parsed = content_type.and_then(|ct| ct.parse::<mime::Mime>().ok());
    let kind = match &parsed {
        Some(m) if m.type_() == mime::APPLICATION && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON)) => {
            Some(BodyKind::Json)
        }
        Some(m) if m.type_() == mime::MULTIPART && m.subtype() == mime::FORM_DATA => Some(BodyKind::Multipart),
        // No content type at all: curl users sometimes forget it on JSON; try JSON where JSON is allowed.
        None if content_type.is_none() && endpoint != Endpoint::Variations => Some(BodyKind::Json),
        _ => None,
    };
    let allowed: &[BodyKind] = match endpoint {
        Endpoint::Generations => &[BodyKind::Json],
        Endpoint::Edits => &[BodyKind::Multipart, BodyKind::Json],
        Endpoint::Variations => &[BodyKind::Multipart],
    };
    match kind {
        Some(k) if allowed.contains(&k) => Ok(k),
        _ => {
            let expected = match endpoint {
                Endpoint::Generations => "application/json",
                Endpoint::Edits => "multipart/form-data or application/json",
                Endpoint::Variations => "multipart/form-data",
            };
            Err(ApiError::invalid(
                format!("Invalid Content-Type header ({}), expected {expected}.", content_type.unwrap_or("none")),
                None,
            ))
        }
    }
}

/// After an early answer (413, 401, a wrong content type), what a client still sending may send on: it is read
/// and dropped in the background, after the answer has gone out, up to these bounds, then the connection is
/// closed. Some HTTP clients (Node's fetch among them) read the answer only once they have written the body,
/// and closing under them surfaces as a connection error instead of the answer (decision 0007). A request that sent
/// `Expect: 100-continue` gets no linger at all: its client sends nothing until told to, and is never told.
pub const LINGER_BYTES: u64 = 8 * 1024 * 1024;
/// How long the background read of [`LINGER_BYTES`] may take.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// Read the whole body as the chunks it arrives in (kept as they are, not copied into one buffer), refusing
/// more than `limit` bytes with a 413 that states the limit. A declared `Content-Length` over the limit is
/// refused before a byte is read (no `100 Continue`); memory grows with what arrives, it is never reserved
/// from the declared length.
async fn read_limited(body: Body, limit: u64, headers: &HeaderMap) -> Result<Vec<Bytes>, Failure> {
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(refuse_unread(ApiError::PayloadTooLarge { limit }, body, headers));
    }
    let mut body = body;
    let (mut chunks, mut len) = (Vec::new(), 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(format!("Could not read the request body: {e}"), None))?;
        let Ok(data) = frame.into_data() else { continue };
        len = len.saturating_add(data.len() as u64);
        if len > limit {
            return Err(refuse_unread(ApiError::PayloadTooLarge { limit }, body, headers));
        }
        if !data.is_empty() {
            chunks.push(data);
        }
    }
    Ok(chunks)
}

/// Read a multipart body and parse it as it arrives (`multipart::parse_stream`): each chunk is parsed, and
/// freed, before the next is read, so the body is not held as received chunks beside the parsed form (and
/// the connection reuses its read buffer). More than `limit` bytes is refused with a 413 as in
/// [`read_limited`]; a form found malformed before the body's end is refused at once, its rest left unread
/// (as [`refuse_unread`]).
async fn parse_form(
    content_type: &str,
    body: Body,
    limit: u64,
    headers: &HeaderMap,
) -> Result<crate::images::request::Form, Failure> {
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(refuse_unread(ApiError::PayloadTooLarge { limit }, body, headers));
    }
    /// Why the body stopped before its end.
    enum Stop {
        TooLarge,
        Unreadable(String),
    }
    let mut body = body;
    let (mut len, mut stop) = (0u64, None);
    let parsed = {
        let chunks = futures::stream::poll_fn(|cx| {
            loop {
                let frame = match std::task::ready!(std::pin::Pin::new(&mut body).poll_frame(cx)) {
                    None => return std::task::Poll::Ready(None),
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        stop = Some(Stop::Unreadable(e.to_string()));
                        return std::task::Poll::Ready(Some(Err(std::io::Error::other("the body stopped"))));
                    }
                };
                let Ok(data) = frame.into_data() else { continue };
                len = len.saturating_add(data.len() as u64);
                if len > limit {
                    stop = Some(Stop::TooLarge);
                    return std::task::Poll::Ready(Some(Err(std::io::Error::other("the body is too large"))));
                }
                if !data.is_empty() {
                    return std::task::Poll::Ready(Some(Ok(data)));
                }
            }
        });
        multipart::parse_arriving(content_type, chunks).await
    };
    match (parsed, stop) {
        (_, Some(Stop::TooLarge)) => Err(refuse_unread(ApiError::PayloadTooLarge { limit }, body, headers)),
        (_, Some(Stop::Unreadable(e))) => {
            Err(ApiError::invalid(format!("Could not read the request body: {e}"), None).into())
        }
        (Ok(form), None) => {
            // What follows the closing boundary (an epilogue, which parsers ignore) is read and dropped as
            // before, within the same limit.
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| ApiError::invalid(format!("Could not read the request body: {e}"), None))?;
                len = len.saturating_add(frame.data_ref().map_or(0, |d| d.len() as u64));
                if len > limit {
                    return Err(refuse_unread(ApiError::PayloadTooLarge { limit }, body, headers));
                }
            }
            Ok(form)
        }
        // Refused before the body's end: the rest is not read.
        (Err(e), None) if !body.is_end_stream() => Err(refuse_unread(e, body, headers)),
        (Err(e), None) => Err(e.into()),
    }
}

/// Below this size a JSON body is copied out of the buffer it was read into ([`joined`]).
const SMALL_BODY: usize = 8 * 1024;

/// A body received in chunks, in one buffer: the chunk itself when there is one, else one copy into a buffer
/// of exactly the body's size. A lone chunk smaller than [`SMALL_BODY`] is copied too: it is a slice of the
/// connection's read buffer (the request head's, at least 8 KiB), which it would keep alive for as long as the
/// request waits on the upstream, minutes for an image (docs/performance.md, "Held requests").
fn joined(mut chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() <= 1 {
        let body = chunks.pop().unwrap_or_default();
        return if body.len() < SMALL_BODY { Bytes::copy_from_slice(&body) } else { body };
    }
    let mut out = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks.drain(..) {
        out.extend_from_slice(&chunk);
    }
    Bytes::from(out)
}

/// Refuse a request whose body is left (partly) unread: answer at once with `Connection: close`, and
/// [`linger`] on the rest of the body unless the client asked to be told before sending it.
pub fn refuse_unread(error: ApiError, body: Body, headers: &HeaderMap) -> Failure {
    refuse_unread_within(error, body, headers, LINGER_BYTES, LINGER_TIME)
}

/// [`refuse_unread`] with a linger of at most `cap` bytes within `time`.
pub fn refuse_unread_within(error: ApiError, body: Body, headers: &HeaderMap, cap: u64, time: Duration) -> Failure {
    linger(body, headers, cap, time);
    let mut close = HeaderMap::new();
    close.insert(CONNECTION, HeaderValue::from_static("close"));
    Failure::with_headers(error, close)
}

/// Read and drop at most `cap` more bytes of `body` within `time`, in the background, so the answer already
/// sent reaches a client that is still uploading; dropping the body then closes the connection. No linger
/// for `Expect: 100-continue` requests (reading would invite the upload with a `100 Continue`).
fn linger(body: Body, headers: &HeaderMap, cap: u64, time: Duration) {
    let expects_continue =
        headers.get(EXPECT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue || cap == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let drain = async {
            let mut seen = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                seen = seen.saturating_add(frame.data_ref().map_or(0, |d| d.len() as u64));
                if seen >= cap {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(time, drain).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_are_dispatched_per_endpoint() {
        assert_eq!(body_kind(Endpoint::Generations, Some("application/json; charset=utf-8")).unwrap(), BodyKind::Json);
        assert_eq!(body_kind(Endpoint::Generations, None).unwrap(), BodyKind::Json);
        assert!(body_kind(Endpoint::Generations, Some("multipart/form-data; boundary=x")).is_err());
        assert_eq!(body_kind(Endpoint::Edits, Some("multipart/form-data; boundary=x")).unwrap(), BodyKind::Multipart);
        assert_eq!(body_kind(Endpoint::Edits, Some("application/json")).unwrap(), BodyKind::Json);
        assert!(body_kind(Endpoint::Variations, Some("application/json")).is_err());
        assert!(body_kind(Endpoint::Variations, None).is_err());
        let err = body_kind(Endpoint::Generations, Some("text/plain")).unwrap_err();
        assert!(err.client_message().contains("text/plain"));
    }
}
