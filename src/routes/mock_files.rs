//! `GET /_mock/files/{name}?se=<unix expiry>&sig=<signature>`: serves the images behind the mock upstream's
//! expiring DALL·E-style URLs by re-rendering them from the name, answering unsigned, expired and unknown links
//! like Azure Blob Storage (which hosts OpenAI's real ones) does. Only links the mock signed are rendered, so
//! nobody can make the gateway render arbitrary sizes on demand.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::{Path, Query};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::upstream::mock::{MockLinks, parse_file_name};
use crate::upstream::render;

/// Serve one mock image: 200 with the image, 403 for a missing or wrong signature and once `se` has passed,
/// 404 for anything malformed.
pub async fn get_mock_file(
    Extension(links): Extension<MockLinks>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some((seed, width, height, format)) = parse_file_name(&name) else {
        return blob_not_found();
    };
    let Some((se, expires)) = q.get("se").and_then(|s| Some((s, s.parse::<u64>().ok()?))) else {
        return blob_not_found();
    };
    if !q.get("sig").is_some_and(|sig| links.verify(&name, se, sig)) {
        return signature_mismatch();
    }
    let now = crate::time::now_secs();
    if now >= expires {
        return authentication_failed(expires, now);
    }
    let rendered = tokio::task::spawn_blocking(move || render::render(seed, width, height, format)).await;
    match rendered {
        Ok(Ok(bytes)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(format.mime())),
                (header::CONTENT_LENGTH, HeaderValue::from(bytes.len())),
                (header::CACHE_CONTROL, HeaderValue::from_static("private")),
            ],
            bytes,
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), %name, "mock file failed to render");
            internal_error()
        }
        Err(e) => {
            tracing::error!(error = %e, %name, "mock file render task failed");
            internal_error()
        }
    }
}

fn xml(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"))], body).into_response()
}

fn blob_not_found() -> Response {
    xml(
        StatusCode::NOT_FOUND,
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>BlobNotFound</Code><Message>The specified blob \
         does not exist.</Message></Error>"
            .to_owned(),
    )
}

fn signature_mismatch() -> Response {
    xml(
        StatusCode::FORBIDDEN,
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code><Message>Server \
         failed to authenticate the request. Make sure the value of Authorization header is formed correctly \
         including the signature.</Message><AuthenticationErrorDetail>Signature did not match.\
         </AuthenticationErrorDetail></Error>"
            .to_owned(),
    )
}

fn authentication_failed(expires: u64, now: u64) -> Response {
    xml(
        StatusCode::FORBIDDEN,
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code><Message>Server \
             failed to authenticate the request. Make sure the value of Authorization header is formed correctly \
             including the signature.</Message><AuthenticationErrorDetail>Signed expiry time [{expires}] has to be \
             after current time [{now}]</AuthenticationErrorDetail></Error>"
        ),
    )
}

fn internal_error() -> Response {
    xml(
        StatusCode::INTERNAL_SERVER_ERROR,
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>InternalError</Code><Message>The server \
         encountered an internal error. Please retry the request.</Message></Error>"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::mock::{MockUpstream, URL_LIFETIME_SECS, file_name};
    use crate::upstream::render::OutputFormat;
    use http_body_util::BodyExt as _;

    fn now() -> u64 {
        crate::time::now_secs()
    }

    fn links() -> MockLinks {
        MockLinks::new(b"mock file tests".to_vec())
    }

    /// GET `name` with `se` and a valid signature for it.
    async fn get(name: &str, se: Option<String>) -> (StatusCode, axum::http::HeaderMap, bytes::Bytes) {
        let sig = se.as_deref().and_then(|s| s.parse().ok()).map(|at| links().signature(name, at));
        get_signed(name, se, sig).await
    }

    async fn get_signed(
        name: &str,
        se: Option<String>,
        sig: Option<String>,
    ) -> (StatusCode, axum::http::HeaderMap, bytes::Bytes) {
        let q: HashMap<String, String> =
            se.map(|s| ("se".to_owned(), s)).into_iter().chain(sig.map(|s| ("sig".to_owned(), s))).collect();
        let response = get_mock_file(Extension(links()), Path(name.to_owned()), Query(q)).await;
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn unsigned_or_forged_links_are_refused_before_anything_is_rendered() {
        // A huge image nobody was handed: refused at once, never rendered.
        let name = file_name(7, 4096, 4096, OutputFormat::Png);
        let se = (now() + 60).to_string();
        let forged = MockLinks::new(b"guessed".to_vec()).signature(&name, now() + 60);
        let started = std::time::Instant::now();
        for sig in [None, Some(forged), Some("AAAA".to_owned())] {
            let (status, _, body) = get_signed(&name, Some(se.clone()), sig).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert!(std::str::from_utf8(&body).unwrap().contains("Signature did not match"));
        }
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "nothing was rendered");
        // A signature for another expiry does not carry over.
        let sig = links().signature(&name, now() + 60);
        assert_eq!(get_signed(&name, Some((now() + 61).to_string()), Some(sig)).await.0, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn serves_the_rendered_image_until_expiry() {
        let name = file_name(99, 320, 240, OutputFormat::Png);
        let (status, headers, body) = get(&name, Some((now() + 60).to_string())).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "image/png");
        assert_eq!(headers[header::CONTENT_LENGTH], body.len().to_string().as_str());
        assert_eq!(body, render::render(99, 320, 240, OutputFormat::Png).unwrap());
        let img = image::load_from_memory(&body).unwrap();
        assert_eq!((img.width(), img.height()), (320, 240));

        let webp = file_name(5, 16, 8, OutputFormat::Webp);
        let (status, headers, _) = get(&webp, Some((now() + 60).to_string())).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "image/webp");
    }

    #[tokio::test]
    async fn expired_links_are_forbidden() {
        let name = file_name(99, 32, 32, OutputFormat::Png);
        for se in [now(), now() - 1, 0] {
            let (status, headers, body) = get(&name, Some(se.to_string())).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(headers[header::CONTENT_TYPE], "application/xml");
            assert!(std::str::from_utf8(&body).unwrap().contains("<Code>AuthenticationFailed</Code>"));
        }
    }

    #[tokio::test]
    async fn missing_or_garbled_links_are_not_found() {
        let good = file_name(1, 32, 32, OutputFormat::Png);
        let later = Some((now() + 60).to_string());
        let cases: Vec<(&str, Option<String>)> = vec![
            (&good, None),
            (&good, Some("tomorrow".to_owned())),
            (&good, Some("-5".to_owned())),
            ("nonsense", later.clone()),
            ("0000000000000001-4097x32.png", later.clone()),
            ("0000000000000001-32x99999999999999999999.png", later.clone()),
            ("0000000000000001-0x0.png", later.clone()),
            ("0000000000000001-32x32.bmp", later.clone()),
            ("ZZZZZZZZZZZZZZZZ-32x32.png", later.clone()),
            ("", later),
        ];
        for (name, se) in cases {
            let (status, _, body) = get(name, se).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{name}");
            assert!(std::str::from_utf8(&body).unwrap().contains("<Code>BlobNotFound</Code>"));
        }
    }

    #[tokio::test]
    async fn urls_from_the_mock_resolve_here() {
        use crate::images::request::{Endpoint, ImageRequest};
        use crate::upstream::{Attribution, ReplyBody, Upstream};

        let mock = MockUpstream::new(url::Url::parse("http://localhost:8080").unwrap(), links());
        let req = ImageRequest::from_json(
            Endpoint::Generations,
            bytes::Bytes::from_static(br#"{"model":"dall-e-2","prompt":"a kite","size":"256x256"}"#),
        )
        .unwrap();
        let reply = mock.send(&req, &Attribution::default(), crate::upstream::Reading::Whole).await.unwrap();
        let ReplyBody::Full(body) = reply.body else { panic!("expected a full body") };
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let url = url::Url::parse(body["data"][0]["url"].as_str().unwrap()).unwrap();
        let name = url.path().strip_prefix(crate::wire::paths::MOCK_FILES).unwrap().trim_start_matches('/');
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        let se: u64 = q["se"].parse().unwrap();
        assert!(se > now() + URL_LIFETIME_SECS - 60);
        let (status, _, bytes) = get_signed(name, q.get("se").cloned(), q.get("sig").cloned()).await;
        assert_eq!(status, StatusCode::OK);
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (256, 256));
    }
}
