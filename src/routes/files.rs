//! `GET /images/files/{id}.{ext}?expires=…&signature=…`: re-hosted images, served to whoever holds a valid
//! signed link (no key header, like OpenAI's own links), with a strong ETag (the SHA-256), long-lived cache
//! headers, conditional requests (`If-None-Match`, `If-Modified-Since`) and single byte ranges (`If-Range`
//! honoured). The bytes are streamed from the object store, never buffered whole; `HEAD` is answered from the
//! metadata row alone, without opening the object (a real GET on S3).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use serde::Deserialize;

use crate::error::ApiError;
use crate::rehost::links::LinkError;
use crate::state::AppState;
use crate::storage::{StoreError, StoredImage};

/// A year: the longest `max-age` worth sending.
const MAX_AGE_CAP: i64 = 365 * 24 * 3600;

/// The link's query string.
#[derive(Debug, Deserialize)]
pub struct LinkQuery {
    expires: Option<String>,
    signature: Option<String>,
}

pub async fn get_image_file(
    State(state): State<AppState>,
    method: Method,
    Path(name): Path<String>,
    Query(query): Query<LinkQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rehoster = state.images.rehoster();
    let now = i64::try_from(crate::time::now_secs()).unwrap_or(i64::MAX);
    rehoster.links().verify(&name, query.expires.as_deref(), query.signature.as_deref(), now).map_err(|e| {
        ApiError::PermissionDenied {
            message: match e {
                LinkError::BadSignature => "This image link is not valid: its signature is missing or wrong.",
                LinkError::Expired => "This image link has expired.",
            }
            .to_owned(),
        }
    })?;
    let gone = || ApiError::NotFoundResource { message: "This image no longer exists.".to_owned() };
    let id = name.split_once('.').map_or(name.as_str(), |(id, _)| id);
    let image = rehoster.store().find(id).await.map_err(store_error)?.ok_or_else(gone)?;
    let validators = Validators::of(&image, now);
    if validators.not_modified(&headers) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        validators.apply(response.headers_mut());
        return Ok(response);
    }
    let range = requested_range(&headers, &validators.etag, image.bytes)?;
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        match rehoster.store().read(&image, range.clone().map(|r| r.start..r.end)).await {
            Ok(stream) => Body::from_stream(stream.map(|chunk| chunk.map_err(std::io::Error::other))),
            Err(StoreError::Missing) => return Err(gone()),
            Err(e) => return Err(store_error(e)),
        }
    };
    let mut response = Response::new(body);
    let h = response.headers_mut();
    validators.apply(h);
    h.insert(header::CONTENT_TYPE, header_value(&image.content_type));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    match range {
        Some(r) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = response.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            h.insert(header::CONTENT_RANGE, header_value(&format!("bytes {}-{}/{}", r.start, r.end - 1, image.bytes)));
        }
        None => {
            response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(image.bytes));
        }
    }
    Ok(response)
}

/// ETag, Last-Modified and caching headers of one image.
struct Validators {
    etag: String,
    modified: SystemTime,
    max_age: i64,
}

impl Validators {
    fn of(image: &StoredImage, now: i64) -> Self {
        let created = UNIX_EPOCH + Duration::from_millis(u64::try_from(image.created_at).unwrap_or(0));
        let max_age = (image.expires_at / 1000 - now).clamp(0, MAX_AGE_CAP);
        Self { etag: format!("\"{}\"", image.sha256), modified: created, max_age }
    }

    fn apply(&self, h: &mut HeaderMap) {
        h.insert(header::ETAG, header_value(&self.etag));
        h.insert(header::LAST_MODIFIED, header_value(&httpdate::fmt_http_date(self.modified)));
        h.insert(header::CACHE_CONTROL, header_value(&format!("public, max-age={}, immutable", self.max_age)));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }

    /// RFC 9110 §13.2.2: `If-None-Match` decides when present; otherwise `If-Modified-Since`.
    fn not_modified(&self, headers: &HeaderMap) -> bool {
        if let Some(value) = headers.get(header::IF_NONE_MATCH) {
            let value = value.to_str().unwrap_or_default();
            return value.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == self.etag);
        }
        let since = headers.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok());
        since.and_then(|s| httpdate::parse_http_date(s).ok()).is_some_and(|since| {
            // HTTP dates have whole seconds.
            let modified = self.modified.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let since = since.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            modified <= since
        })
    }
}

/// The one byte range to serve (half-open), `None` for the whole image. Several ranges are answered with
/// the whole image (RFC 9110 lets a server ignore `Range`), as is a `Range` whose `If-Range` no longer
/// matches or that does not parse; a well-formed range past the end is a 416.
fn requested_range(headers: &HeaderMap, etag: &str, len: u64) -> Result<Option<std::ops::Range<u64>>, ApiError> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    if let Some(if_range) = headers.get(header::IF_RANGE)
        && if_range.to_str().unwrap_or_default().trim() != etag
    {
        return Ok(None);
    }
    let Ok(parsed) = http_range_header::parse_range_header(value) else { return Ok(None) };
    match parsed.validate(len) {
        Ok(ranges) => match ranges.as_slice() {
            [only] => Ok(Some(*only.start()..only.end() + 1)),
            _ => Ok(None),
        },
        Err(http_range_header::RangeUnsatisfiableError::Unsatisfiable) => {
            Err(ApiError::RangeNotSatisfiable { length: len })
        }
        Err(_) => Ok(None),
    }
}

fn store_error(e: StoreError) -> ApiError {
    ApiError::Internal(anyhow::anyhow!("reading a stored image failed: {e}"))
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
