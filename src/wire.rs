//! Names on the wire: header names, route paths and OpenAI's event and object spellings, each written once.
//!
//! Request and response bodies are deliberately *not* mirrored as closed structs: imagegate forwards fields it
//! does not know, so bodies travel as JSON maps or multipart parts (see `images::request`).

/// Header names imagegate reads or writes.
pub mod headers {
    /// imagegate's own request id, on every response and in every log line of the request.
    pub const X_REQUEST_ID: &str = "x-request-id";
    /// The upstream's `x-request-id`, passed on so callers can quote it to OpenAI.
    pub const X_UPSTREAM_REQUEST_ID: &str = "x-upstream-request-id";
    /// OpenAI's processing time, passed through.
    pub const OPENAI_PROCESSING_MS: &str = "openai-processing-ms";
    /// OpenAI's API version, passed through.
    pub const OPENAI_VERSION: &str = "openai-version";
    /// Attribution headers, set from the tenant (or upstream) configuration.
    pub const OPENAI_ORGANIZATION: &str = "openai-organization";
    pub const OPENAI_PROJECT: &str = "openai-project";
    /// Tells OpenAI's SDKs whether to retry.
    pub const X_SHOULD_RETRY: &str = "x-should-retry";
    pub const RETRY_AFTER_MS: &str = "retry-after-ms";
    /// Azure's key header, used when `upstream.auth = "api-key"`.
    pub const API_KEY: &str = "api-key";
    /// How many times an OpenAI SDK has retried this request (absent or `0` on the first try).
    pub const X_STAINLESS_RETRY_COUNT: &str = "x-stainless-retry-count";
    /// Caller-supplied idempotency key, forwarded unchanged.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// `hit`, `miss` or `bypass`: how the response cache answered.
    pub const X_IMAGEGATE_CACHE: &str = "x-imagegate-cache";
    /// `true` on an answer an earlier identical request's call made (the replay window).
    pub const X_IMAGEGATE_REPLAYED: &str = "x-imagegate-replayed";
    /// The pool deployment (`[upstreams.<name>]`, or `upstream`) that answered.
    pub const X_IMAGEGATE_DEPLOYMENT: &str = "x-imagegate-deployment";

    /// Upstream response headers passed to the caller unchanged (besides `content-type`).
    /// `x-request-id` is renamed to [`X_UPSTREAM_REQUEST_ID`]. The upstream's `x-ratelimit-*` headers stay
    /// behind: they describe the deployment's shared OpenAI quota, not the caller's; imagegate sets its own
    /// from the tenant's limits. Cookies, server and hop-by-hop headers stay behind too.
    pub const PASSED_THROUGH: &[&str] =
        &[OPENAI_PROCESSING_MS, OPENAI_VERSION, "retry-after", RETRY_AFTER_MS, X_SHOULD_RETRY];
}

/// Route paths, relative to the `/v1` prefix where they sit under it.
pub mod paths {
    /// A link handed to callers: `path` (one of the paths below plus a file name) under the gateway's public
    /// base URL, which may itself carry a path prefix, with `query`.
    pub fn public_link(base: &url::Url, path: &str, query: &str) -> String {
        let mut url = base.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{prefix}{path}"));
        url.set_query(Some(query));
        url.set_fragment(None);
        url.to_string()
    }

    pub const GENERATIONS: &str = "/images/generations";
    pub const EDITS: &str = "/images/edits";
    pub const VARIATIONS: &str = "/images/variations";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    /// Where re-hosted images are served: `{IMAGE_FILES}/{id}.{ext}?expires=…&signature=…`.
    pub const IMAGE_FILES: &str = "/images/files";
    /// Where the built-in mock upstream serves the images behind its expiring DALL·E-style URLs.
    pub const MOCK_FILES: &str = "/_mock/files";
}

/// SSE event types of the streaming image endpoints.
pub mod events {
    pub const GENERATION_PARTIAL: &str = "image_generation.partial_image";
    pub const GENERATION_COMPLETED: &str = "image_generation.completed";
    pub const EDIT_PARTIAL: &str = "image_edit.partial_image";
    pub const EDIT_COMPLETED: &str = "image_edit.completed";
}

/// The parts of an images answer the gateway counts: its `data[]` items (not read) and its `usage`.
#[derive(serde::Deserialize)]
pub struct ResponseCounts {
    #[serde(default)]
    pub data: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    pub usage: Option<serde_json::Value>,
}

/// The number of images (`data[]` items) in an answer body, if it is one.
pub fn count_images(body: &[u8]) -> Option<u32> {
    let counts = serde_json::from_slice::<ResponseCounts>(body).ok()?;
    Some(u32::try_from(counts.data.len()).unwrap_or(u32::MAX))
}
