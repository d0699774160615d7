//! Turning an HTTP request into an [`ImageRequest`]: content-type dispatch, body limits and parsing. Every
//! rejection is an [`ApiError`], so malformed input gets OpenAI's error shape like everything else.

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http_body_util::BodyExt;

use crate::error::ApiError;
use crate::images::multipart;
use crate::images::request::{Endpoint, ImageRequest};
use crate::state::AppState;
use crate::wire::headers;

/// What a handler needs from the request besides the tenant.
pub struct Extracted {
    pub request: ImageRequest,
    pub idempotency_key: Option<String>,
    /// The caller's `Cache-Control` for this request.
    pub cache: crate::cache::Directive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Multipart,
}

/// Read and parse the body for `endpoint`: JSON for generations, multipart for variations, either for edits.
pub async fn image_request(state: &AppState, endpoint: Endpoint, request: Request) -> Result<Extracted, ApiError> {
    let (parts, body) = request.into_parts();
    let content_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let kind = body_kind(endpoint, content_type.as_deref())?;
    let limit = match (endpoint, kind) {
        (Endpoint::Generations, _) => state.settings.server.max_json_body.as_u64(),
        _ => state.settings.server.max_multipart_body.as_u64(),
    };
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let raw = read_limited(body, limit, declared).await?;
    let idempotency_key = parts.headers.get(headers::IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cache = crate::cache::Directive::from_headers(
        parts.headers.get_all(http::header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()),
    );
    let request = match kind {
        BodyKind::Json => ImageRequest::from_json(endpoint, raw)?,
        BodyKind::Multipart => {
            let content_type = content_type.unwrap_or_default();
            let form = multipart::parse(&content_type, raw.clone()).await?;
            ImageRequest::from_form(endpoint, raw, content_type, form)
        }
    };
    Ok(Extracted { request, idempotency_key, cache })
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

/// How much of an oversized body is read and thrown away before answering 413, and for how long. Answering
/// while the client is still sending makes many HTTP clients (Node's fetch among them) report a connection
/// error instead of the 413; past these bounds the connection is closed instead.
const DISCARD_CAP: u64 = 1 << 30;
const DISCARD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Read the whole body, refusing more than `limit` bytes with a 413 that states the limit.
async fn read_limited(body: Body, limit: u64, declared: Option<u64>) -> Result<Bytes, ApiError> {
    let mut body = body;
    if declared.is_some_and(|len| len > limit) {
        discard(&mut body).await;
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(declared.unwrap_or(0).min(limit)).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(format!("Could not read the request body: {e}"), None))?;
        let Ok(data) = frame.into_data() else { continue };
        if (buf.len() + data.len()) as u64 > limit {
            discard(&mut body).await;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// Read and drop the rest of a body, within [`DISCARD_CAP`] and [`DISCARD_DEADLINE`].
async fn discard(body: &mut Body) {
    discard_at_most(body, DISCARD_CAP).await;
}

/// Read and drop at most `cap` bytes of a body (within [`DISCARD_DEADLINE`]), so an early error answer
/// reaches a client that is still uploading.
pub async fn discard_at_most(body: &mut Body, cap: u64) {
    let drain = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > cap {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_DEADLINE, drain).await;
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
