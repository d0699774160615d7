//! Handlers for the three image operations: authenticate, extract, call the pipeline, write the reply. Nothing
//! else.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use http::HeaderValue;

use crate::catalog::Date;

use crate::error::Failure;
use crate::extract;
use crate::images::request::Endpoint;
use crate::limits::Usage;
use crate::pipeline::RequestMeta;
use crate::server::auth;
use crate::server::layers::RequestId;
use crate::state::AppState;
use crate::upstream::{ReplyBody, UpstreamReply};

/// `POST /v1/images/generations`
pub async fn create_image(State(state): State<AppState>, request: Request) -> Result<Response, Failure> {
    handle(state, Endpoint::Generations, request).await
}

/// `POST /v1/images/edits`
pub async fn create_image_edit(State(state): State<AppState>, request: Request) -> Result<Response, Failure> {
    handle(state, Endpoint::Edits, request).await
}

/// `POST /v1/images/variations`
pub async fn create_image_variation(State(state): State<AppState>, request: Request) -> Result<Response, Failure> {
    handle(state, Endpoint::Variations, request).await
}

async fn handle(state: AppState, endpoint: Endpoint, request: Request) -> Result<Response, Failure> {
    // Without a tenant, nothing else of the request runs (401, or 403 for a suspended tenant).
    let ctx = match auth::tenant(&state, request.headers()).await {
        Ok(ctx) => ctx,
        Err(e) => return Ok(auth::refuse(e, request)),
    };
    let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    // A tenant with a concurrency limit takes its slot before its body is read; none free: 429, body unread.
    let admitted = match state.images.admit(&ctx, endpoint, &request_id).await {
        Ok(admitted) => admitted,
        Err(e) => {
            let (parts, body) = request.into_parts();
            return Err(extract::refuse_unread(e, body, &parts.headers));
        }
    };
    let extracted = match Box::pin(extract::image_request(&state, &ctx.tenant, endpoint, request)).await {
        Ok(extracted) => extracted,
        Err(e) => {
            if let Some(permit) = &admitted {
                permit.finish(Usage::REFUNDED);
            }
            state.images.record_refusal(&ctx, endpoint, &request_id, e.error.status().as_u16());
            return Err(Box::pin(state.images.unreserved(&ctx, e)).await);
        }
    };
    let meta = RequestMeta {
        request_id,
        idempotency_key: extracted.idempotency_key,
        sdk_retry: extracted.sdk_retry,
        cache: extracted.cache,
    };
    // A deprecated model's callers are told, on every answer, before it goes away.
    let notice = state.images.policy().notice(&extracted.request, Some(&ctx.tenant.name), Date::today());
    // Boxed: the pipeline's future is several kilobytes, and every layer around this handler would otherwise
    // move it by value (memcpy was a fifth of a cache hit's instructions, docs/performance.md).
    let mut response = match Box::pin(state.images.handle(&ctx, extracted.request, meta, admitted)).await {
        Ok(reply) => into_response(reply),
        Err(failure) => failure.into_response(),
    };
    for (name, value) in notice {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    Ok(response)
}

/// The upstream's status, filtered headers and body (whole, or streamed chunk by chunk).
fn into_response(reply: UpstreamReply) -> Response {
    let body = match reply.body {
        ReplyBody::Full(bytes) => Body::from(bytes),
        ReplyBody::Stream(chunks) => {
            Body::from_stream(futures::StreamExt::map(chunks, Ok::<_, std::convert::Infallible>))
        }
        // Re-hosting makes every split answer whole; one that is not has lost its images' text.
        ReplyBody::Split(_) => {
            let e = anyhow::anyhow!("an answer split for re-hosting reached the caller without being re-hosted");
            return crate::error::ApiError::Internal(e).into_response();
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    *response.headers_mut() = reply.headers;
    response
}
