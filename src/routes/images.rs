//! Handlers for the three image operations: authenticate, extract, call the pipeline, write the reply. Nothing
//! else.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use http::HeaderValue;

use crate::catalog::Date;
use crate::domain::TenantContext;
use crate::error::Failure;
use crate::extract::{self, Extracted};
use crate::images::request::{Endpoint, ImageRequest};
use crate::limits::{Permit, Usage};
use crate::pipeline::RequestMeta;
use crate::server::auth;
use crate::server::layers::RequestId;
use crate::state::AppState;
use crate::upstream::{ReplyBody, UpstreamReply};

/// `POST /v1/images/generations`
pub fn create_image(
    State(state): State<AppState>,
    request: Request,
) -> impl Future<Output = Result<Response, Failure>> + Send {
    handle(state, Endpoint::Generations, request)
}

/// `POST /v1/images/edits`
pub fn create_image_edit(
    State(state): State<AppState>,
    request: Request,
) -> impl Future<Output = Result<Response, Failure>> + Send {
    handle(state, Endpoint::Edits, request)
}

/// `POST /v1/images/variations`
pub fn create_image_variation(
    State(state): State<AppState>,
    request: Request,
) -> impl Future<Output = Result<Response, Failure>> + Send {
    handle(state, Endpoint::Variations, request)
}

/// One image request: [`admit`] it, then run it through the pipeline and write the reply.
///
/// Not an `async fn`, and the handlers above neither: a request waiting minutes for its images keeps this
/// future, and an `async fn` would keep its arguments and the steps before the pipeline in it (authentication's
/// future alone is 2 KiB). Those steps run in a box of their own, freed when they end; what stays is what the
/// answer needs (docs/performance.md).
fn handle(
    state: AppState,
    endpoint: Endpoint,
    request: Request,
) -> impl Future<Output = Result<Response, Failure>> + Send {
    let admitted = Box::pin(admit(state.clone(), endpoint, request));
    async move {
        let Admitted { ctx, permit, request, meta } = match admitted.await {
            Ok(admitted) => admitted,
            Err(answer) => return answer,
        };
        // A deprecated model's callers are told, on every answer, before it goes away.
        let notice = state.images.policy().notice(&request, Some(&ctx.tenant.name), Date::today());
        // Not boxed: the pipeline's own future is small; its steps are boxed inside it.
        let mut response = match state.images.handle(&ctx, request, meta, permit).await {
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
}

/// A request the pipeline may run: its tenant, its concurrency slot (if its tenant has a limit), its body and
/// what the edge and its headers say of it.
struct Admitted {
    ctx: TenantContext,
    permit: Option<Permit>,
    request: ImageRequest,
    meta: RequestMeta,
}

/// The steps before the pipeline. `Err` holds the answer when one of them refused the request.
async fn admit(state: AppState, endpoint: Endpoint, request: Request) -> Result<Admitted, Result<Response, Failure>> {
    // Without a tenant, nothing else of the request runs (401, or 403 for a suspended tenant).
    let ctx = match auth::tenant(&state, request.headers()).await {
        Ok(ctx) => ctx,
        Err(e) => return Err(Ok(auth::refuse(e, request))),
    };
    let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    // A tenant with a concurrency limit takes its slot before its body is read; none free: 429, body unread.
    let permit = match state.images.admit(&ctx, endpoint, &request_id).await {
        Ok(permit) => permit,
        Err(e) => {
            let (parts, body) = request.into_parts();
            return Err(Err(extract::refuse_unread(e, body, &parts.headers)));
        }
    };
    match Box::pin(extract::image_request(&state, &ctx.tenant, endpoint, request)).await {
        Ok(Extracted { request, idempotency_key, sdk_retry, cache }) => {
            let meta = RequestMeta { request_id, idempotency_key, sdk_retry, cache };
            Ok(Admitted { ctx, permit, request, meta })
        }
        Err(e) => {
            if let Some(permit) = &permit {
                permit.finish(Usage::REFUNDED);
            }
            state.images.record_refusal(&ctx, endpoint, &request_id, e.error.status().as_u16());
            Err(Err(Box::pin(state.images.unreserved(&ctx, e)).await))
        }
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::ImagesService;

    /// A request waiting minutes for its images keeps the handler's future and, inside it, the pipeline's:
    /// both stay small, their other steps boxed and freed before the wait (docs/performance.md, "Eleventh
    /// round"). They were 3,200 and 2,648 bytes; the sizes are the compiler's, whatever the machine.
    #[test]
    fn a_waiting_requests_futures_stay_small() {
        fn size<F: Future>(_: impl FnOnce() -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let handler = size(|| create_image(State(unreachable_state()), Request::default()));
        assert!(handler <= 1024, "the handler's future is {handler} bytes");
        let pipeline = size(|| {
            let (images, ctx): (&'static Arc<ImagesService>, &'static TenantContext) = unreachable_refs();
            images.handle(ctx, unreachable_request(), RequestMeta::default(), None)
        });
        assert!(pipeline <= 256, "the pipeline's future is {pipeline} bytes");
    }

    // Never called: the closures above only name the futures' types.
    fn unreachable_state() -> AppState {
        unreachable!()
    }
    fn unreachable_refs() -> (&'static Arc<ImagesService>, &'static TenantContext) {
        unreachable!()
    }
    fn unreachable_request() -> ImageRequest {
        unreachable!()
    }
}
