//! Re-hosting: callers get imagegate's own durable, signed links instead of upstream links that expire in an
//! hour, and small responses instead of megabytes of base64 when they ask for `url`.
//!
//! [`Rehoster::plan`] decides, before the upstream call, which format the caller gets (the request's
//! `response_format`, else the tenant's default, else the deployment's, else the model's own) and how the
//! upstream request must change for it (GPT image models refuse `response_format`, so it is removed;
//! DALL·E is asked for `b64_json` when a default says so). [`Rehoster::apply`] then rewrites a successful
//! answer: upstream URLs are downloaded under `fetch`'s guards and stored, base64 is stored when links are
//! wanted, and every stored image gets a link signed by `links`. An answer is re-hosted whole or not at all:
//! every image is obtained before any is stored, and a failed store removes the others' links.

mod answer;
mod chain;
pub mod fetch;
pub mod links;
mod spill;

use std::sync::Arc;
use std::time::Duration;

/// SIMD base64 (AVX2 / SSE4.1 / NEON, chosen at run time), for the rare image inlined as base64.
use base64_simd::STANDARD as BASE64;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::Value;

use self::answer::{Answer, Field, Item};
use self::fetch::{FetchError, Fetcher};
use self::links::LinkSigner;
pub use self::spill::Spill;
use crate::config::ImagesSettings;
use crate::domain::{DownloadFallback, ResponseFormat, Tenant};
use crate::images::answer::split::{Decoded, Image, ImageDecoder, Split};
use crate::images::models::Model;
use crate::images::request::ImageRequest;
use crate::metrics::Metrics;
use crate::storage::staging::Staged;
use crate::storage::{Content, ImageStore, NewImage, StoreError, StoredImage};
use crate::upstream::Reading;

/// Why an answer could not be re-hosted.
#[derive(Debug, thiserror::Error)]
pub enum RehostError {
    #[error("image {index}: {source}")]
    Download { index: usize, source: FetchError },
    #[error("image {index}: the upstream's base64 does not decode")]
    BadBase64 { index: usize },
    #[error("image {index}: the upstream returned bytes that are not a PNG, JPEG or WebP image")]
    NotAnImage { index: usize },
    #[error("storing an image failed: {0}")]
    Store(StoreError),
    #[error("the rewritten answer could not be encoded: {0}")]
    Encode(String),
    /// Images were decoded as the answer arrived, and what was left of it is not an answer with `data[]`.
    #[error("the upstream's answer is not JSON with a data array")]
    Unreadable,
}

impl RehostError {
    /// The reason as the caller may read it: the same words without the image host's name or address, which
    /// can be internal (the full error goes to the log).
    pub fn public_reason(&self) -> String {
        match self {
            Self::Download { index, source: FetchError::HostNotAllowed(_) } => {
                format!("image {index}: its host is not in images.download.allowed_hosts")
            }
            Self::Download { index, source: FetchError::PrivateAddress(_) } => {
                format!("image {index}: its host points at a private or loopback address")
            }
            other => other.to_string(),
        }
    }
}

/// What [`Rehoster::apply`] made of an answer.
#[derive(Debug)]
pub enum Rehosted {
    /// Nothing to do: the body as it came.
    Unchanged(Bytes),
    /// The answer with links (or base64) where the upstream's images were.
    Rewritten(Bytes),
}

/// What to do with one request's images, decided before the upstream call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The format the caller gets; `None` = as the upstream answers, with upstream URLs re-hosted.
    pub want: Option<ResponseFormat>,
    /// Whether the answer needs reading at all (GPT base64 the caller wants as base64 passes untouched).
    pub rewrite: bool,
    pub retention: Duration,
    pub fallback: DownloadFallback,
}

impl Plan {
    /// Whether the answer is read with its base64 decoded as it arrives: when its images become links, so
    /// that an answer holds its images and not their text besides (docs/performance.md).
    pub fn decodes_images(&self) -> bool {
        self.rewrite && self.want == Some(ResponseFormat::Url)
    }
}

/// Who asked, for the metadata of stored images.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub tenant_id: &'a str,
    pub model: &'a str,
    pub request_id: &'a str,
}

/// Re-hosts answers; one per process, cheap to share.
pub struct Rehoster {
    store: ImageStore,
    fetcher: Fetcher,
    links: LinkSigner,
    settings: Arc<ImagesSettings>,
    metrics: Option<Arc<Metrics>>,
    /// Base64 decodes (and their hashes) running at once: one per CPU. Each holds a decoded image on top of
    /// its answer; more at once would not finish sooner, only hold more memory.
    decodes: Arc<tokio::sync::Semaphore>,
}

impl Rehoster {
    pub fn new(store: ImageStore, fetcher: Fetcher, links: LinkSigner, settings: Arc<ImagesSettings>) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        let decodes = Arc::new(tokio::sync::Semaphore::new(cpus));
        Self { store, fetcher, links, settings, metrics: None, decodes }
    }

    /// How the upstream should read the answer for `plan`, and the sink its images go to as they are decoded
    /// (staging files) when they are stored on local disk; it is handed to [`Rehoster::apply`] with the answer.
    pub fn reading(&self, plan: &Plan) -> (Reading, Option<Arc<Spill>>) {
        if !plan.decodes_images() {
            return (Reading::Whole, None);
        }
        match self.store.stager() {
            Some(stager) => {
                let spill = Arc::new(Spill::new(stager.clone()));
                (Reading::DecodingImages(Some(spill.clone())), Some(spill))
            }
            // S3: an object is written whole, so the image is decoded into memory.
            None => (Reading::DecodingImages(None), None),
        }
    }

    /// Count re-hosted images, their bytes and the time each answer took in `metrics`.
    #[must_use]
    pub fn observed(self, metrics: Arc<Metrics>) -> Self {
        Self { metrics: Some(metrics), ..self }
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    pub fn links(&self) -> &LinkSigner {
        &self.links
    }

    /// When `link` is one of imagegate's own signed image links, exactly as [`Rehoster::apply`] writes them,
    /// its expiry (Unix seconds); `None` for any other link (the response cache stores only answers whose
    /// links are imagegate's).
    pub fn own_link_expiry(&self, link: &str) -> Option<i64> {
        let parsed = url::Url::parse(link).ok()?;
        let name = parsed.path_segments()?.next_back()?;
        let expires: i64 = parsed.query_pairs().find(|(k, _)| k == "expires")?.1.parse().ok()?;
        (self.links.url(name, expires) == link).then_some(expires)
    }

    /// Whether every one of imagegate's own links among `links` still names a live image (one deleted from
    /// the console, or expired, does not). Other links are not imagegate's to judge and count as live.
    pub async fn own_links_live(&self, links: &[String]) -> Result<bool, StoreError> {
        let names: Vec<String> = links.iter().filter_map(|l| self.links.parse_own(l)).map(|(name, ..)| name).collect();
        if names.is_empty() {
            return Ok(true);
        }
        let ids: Vec<&str> = names.iter().map(|n| n.split_once('.').map_or(n.as_str(), |(id, _)| id)).collect();
        self.store.all_live(&ids).await
    }

    /// Decide the caller's format and return the request to send upstream (changed only where the format
    /// needs it). `None` when re-hosting is off or the request streams: the answer passes as it comes.
    pub fn plan(&self, request: ImageRequest, known: Option<&Model>, tenant: &Tenant) -> (ImageRequest, Option<Plan>) {
        if !self.settings.rehost {
            return (request, None);
        }
        let asked = request.field_str("response_format");
        let policy = &tenant.image_policy;
        let want = asked
            .as_deref()
            .and_then(ResponseFormat::parse)
            .or(policy.response_format)
            .or(self.settings.response_format);
        let (request, want) = match known {
            // GPT image models refuse the parameter and always answer base64.
            Some(m) if m.answers_base64_only() => {
                let request = if asked.is_some() { request.with_field("response_format", None) } else { request };
                (request, Some(want.unwrap_or(ResponseFormat::B64Json)))
            }
            Some(_) => {
                let request = match (asked.as_deref(), want) {
                    (None, Some(ResponseFormat::B64Json)) => request.with_field("response_format", Some("b64_json")),
                    _ => request,
                };
                (request, Some(want.unwrap_or(ResponseFormat::Url)))
            }
            // Models imagegate has no rules for go out unchanged; their answers are re-hosted as they come.
            None => (request, want),
        };
        if request.stream() {
            return (request, None);
        }
        // Base64 asked of a known model is what it answers (GPT) or was asked to answer (DALL·E).
        let rewrite = !matches!((known, want), (Some(_), Some(ResponseFormat::B64Json)));
        let plan = Plan {
            want,
            rewrite,
            retention: policy.retention.unwrap_or(self.settings.retention),
            fallback: policy.on_download_error.unwrap_or(self.settings.on_download_error),
        };
        (request, Some(plan))
    }

    /// Rewrite a successful JSON answer according to `plan`. Answers that are not an object with `data`, or
    /// that need nothing done, come back unchanged.
    ///
    /// `answer` is the body with the images already decoded from it as it arrived
    /// ([`Rehoster::reading`]: their text is `""` in the body), or the whole body with none ([`Split::whole`]),
    /// whose base64 is then decoded here. `spill` is the sink of [`Rehoster::reading`], which holds the images
    /// decoded to staging files.
    ///
    /// The body is taken by value: once the images' jobs are taken out of it, this function holds it only
    /// through their base64 text (slices of it), so a GPT answer's megabytes are freed as soon as its image is
    /// decoded, not after the image has been stored. Under load, answers wait their turn to be stored, and
    /// each would otherwise hold its base64 and its decoded image together (docs/performance.md).
    #[tracing::instrument(name = "rehost", level = "debug", skip_all)]
    pub async fn apply(
        &self,
        plan: &Plan,
        answer: Split,
        spill: Option<&Spill>,
        origin: Origin<'_>,
    ) -> Result<Rehosted, RehostError> {
        let Split { skeleton: body, images: mut decoded } = answer;
        // A body whose images' text was left out must not go on as it is.
        let split = !decoded.is_empty();
        let unchanged = move |body| if split { Err(RehostError::Unreadable) } else { Ok(Rehosted::Unchanged(body)) };
        if !plan.rewrite {
            return unchanged(body);
        }
        // Read with the base64 strings borrowed from `body`, not copied into a tree: a GPT answer's base64 is
        // megabytes, decoded straight from the body.
        let Some(mut answer) = Answer::parse(&body) else { return unchanged(body) };
        let Some(data) = answer.data_mut() else { return unchanged(body) };
        let jobs: Vec<(usize, Job)> = data
            .iter_mut()
            .enumerate()
            .filter_map(|(i, item)| Job::take_from(item, i, plan.want, &body, &mut decoded).map(|job| (i, job)))
            .collect();
        if jobs.is_empty() {
            return unchanged(body);
        }
        let mut answer = answer.into_owned();
        drop(body);
        let started = std::time::Instant::now();
        let result = self.rewrite(jobs, &mut answer, plan, spill, origin).await;
        if let Some(m) = &self.metrics {
            let (images, bytes) = match &result {
                Ok(stored) => (stored.len() as u64, stored.iter().map(|i| i.bytes).sum()),
                Err(_) => (0, 0),
            };
            m.rehosted(result.is_ok(), images, bytes, started.elapsed());
        }
        result?;
        answer.to_vec().map(|v| Rehosted::Rewritten(Bytes::from(v))).map_err(|e| RehostError::Encode(e.to_string()))
    }

    /// Obtain and store every image of `jobs` and put their links (or base64) into `answer`; the images stored.
    async fn rewrite(
        &self,
        jobs: Vec<(usize, Job)>,
        answer: &mut Answer<'_>,
        plan: &Plan,
        spill: Option<&Spill>,
        origin: Origin<'_>,
    ) -> Result<Vec<StoredImage>, RehostError> {
        let concurrency = self.settings.download.concurrency;
        // Every image is fetched (or decoded) before any is stored: one that fails fails the answer, which must
        // then leave nothing behind, and nothing was written yet.
        let obtained: Vec<(usize, Obtained)> = futures::stream::iter(jobs)
            .map(|(i, job)| async move { self.obtain(i, job, plan, spill).await.map(|o| (i, o)) })
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        let done: Vec<(usize, Result<Finished, RehostError>)> = futures::stream::iter(obtained)
            .map(|(i, o)| async move { (i, self.finish(i, o, plan, origin).await) })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut stored = Vec::new();
        let mut replacements = Vec::new();
        let mut failure = None;
        for (i, result) in done {
            match result {
                Ok((fields, image)) => {
                    stored.extend(image);
                    replacements.push((i, fields));
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            // Storing one image failed after others were stored: their links are never handed out, so remove them.
            if let Err(discard) = self.store.discard(&stored).await {
                tracing::warn!(error = %discard, images = stored.len(), "could not remove the images of a failed answer");
            }
            return Err(e);
        }
        let Some(data) = answer.data_mut() else { return Ok(stored) };
        for (i, replacement) in replacements {
            if let (Some(item), Value::Object(fields)) = (data.get_mut(i), replacement) {
                item.replace_image(fields);
            }
        }
        Ok(stored)
    }

    /// One image's bytes: downloaded or decoded. A failed download with the pass-through fallback gives the
    /// fields to answer with instead.
    async fn obtain(
        &self,
        index: usize,
        job: Job,
        plan: &Plan,
        spill: Option<&Spill>,
    ) -> Result<Obtained, RehostError> {
        match job {
            Job::Download(url) => match self.download(&url, plan).await {
                Ok(obtained) => Ok(obtained),
                Err(Downloading::Fetch(source)) if plan.fallback == DownloadFallback::PassThrough => {
                    tracing::warn!(image = index, reason = %source, "could not re-host an upstream image; passing its URL on");
                    Ok(Obtained::Fields(serde_json::json!({ "url": url })))
                }
                Err(Downloading::Fetch(source)) => Err(RehostError::Download { index, source }),
                Err(Downloading::Store(e)) => Err(RehostError::Store(e)),
            },
            Job::Decode(b64) => {
                // Megabytes of base64 read whole (an upstream that did not split it as it arrived): decoded
                // off the async workers, no more at once than there are CPUs, and hashed block by block as
                // it is decoded (the store needs the SHA-256 anyway).
                let permit = self.decodes.clone().acquire_owned().await;
                let decoded = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    decode_and_hash(&b64)
                })
                .await
                .map_err(|e| RehostError::Encode(e.to_string()))?;
                Self::decoded(index, decoded)
            }
            Job::Decoded(None) => Err(RehostError::BadBase64 { index }),
            Job::Decoded(Some(Image::Decoded(decoded))) => Self::decoded(index, Some(decoded)),
            Job::Decoded(Some(Image::Spilled { slot, sha256 })) => {
                // Only a splitter given `spill` spills; without it there is nothing to finish.
                let Some(spill) = spill else { return Err(RehostError::Unreadable) };
                let staged = spill.finish(slot, sha256).await.map_err(RehostError::Store)?;
                match staged {
                    Some(staged) if crate::images::imageinfo::sniff(&staged.head).is_some() => {
                        Ok(Obtained::Staged(staged))
                    }
                    _ => Err(RehostError::NotAnImage { index }),
                }
            }
        }
    }

    /// The image at `url`: written to a staging file as it arrives when it is to be stored on local disk, so
    /// that receiving, hashing and writing overlap and it is never whole in memory; in memory otherwise.
    async fn download(&self, url: &str, plan: &Plan) -> Result<Obtained, Downloading> {
        let stager = match self.store.stager() {
            Some(stager) if plan.want != Some(ResponseFormat::B64Json) => stager,
            // Base64 is wanted (the bytes go into the answer), or the store is S3 (an object is written whole).
            _ => {
                let fetched = self.fetcher.fetch(url).await.map_err(Downloading::Fetch)?;
                return Ok(Obtained::Bytes(fetched.bytes, Some(fetched.sha256)));
            }
        };
        let mut download = self.fetcher.open(url).await.map_err(Downloading::Fetch)?;
        // Dropped on any early return: the writer stops and its file is removed.
        let mut staging = stager.start().map_err(Downloading::Store)?;
        while let Some(chunk) = download.chunk().await.map_err(Downloading::Fetch)? {
            staging.write(chunk).await.map_err(Downloading::Store)?;
        }
        let staged = staging.finish().await.map_err(Downloading::Store)?;
        if crate::images::imageinfo::sniff(&staged.head).is_none() {
            return Err(Downloading::Fetch(FetchError::BadSignature));
        }
        Ok(Obtained::Staged(staged))
    }

    /// A decoded image, checked here and not when storing, so a bad one fails the answer before anything is
    /// stored; `None`: its text was not base64.
    fn decoded(index: usize, decoded: Option<Decoded>) -> Result<Obtained, RehostError> {
        let Decoded { bytes, sha256 } = decoded.ok_or(RehostError::BadBase64 { index })?;
        if crate::images::imageinfo::sniff(&bytes).is_none() {
            return Err(RehostError::NotAnImage { index });
        }
        Ok(Obtained::Bytes(bytes, Some(sha256)))
    }

    /// The fields that replace one item's `url` / `b64_json`, and the image stored for them, if any.
    async fn finish(
        &self,
        index: usize,
        obtained: Obtained,
        plan: &Plan,
        origin: Origin<'_>,
    ) -> Result<Finished, RehostError> {
        let content = match obtained {
            Obtained::Fields(fields) => return Ok((fields, None)),
            Obtained::Bytes(bytes, _) if plan.want == Some(ResponseFormat::B64Json) => {
                // A URL model answered with a link although base64 was wanted: inline it.
                return Ok((serde_json::json!({ "b64_json": BASE64.encode_to_string(&bytes) }), None));
            }
            Obtained::Bytes(bytes, sha256) => Content::Bytes { bytes, sha256 },
            Obtained::Staged(staged) => Content::Staged(staged),
        };
        let new = NewImage {
            tenant_id: origin.tenant_id,
            model: origin.model,
            request_id: origin.request_id,
            content,
            retention: plan.retention,
        };
        let image = match self.store.put(new).await {
            Ok(image) => image,
            Err(StoreError::NotAnImage) => return Err(RehostError::NotAnImage { index }),
            Err(e) => return Err(RehostError::Store(e)),
        };
        let name = format!("{}.{}", image.id, image.extension());
        Ok((serde_json::json!({ "url": self.links.url(&name, image.expires_at / 1000) }), Some(image)))
    }
}

/// The fields that replace one item's `url` / `b64_json`, and the image stored for them, if any.
type Finished = (Value, Option<StoredImage>);

/// One image, ready to store, with its SHA-256 when it was computed on the way (or, after a passed-on
/// failure, the fields to answer with).
enum Obtained {
    Bytes(Bytes, Option<[u8; 32]>),
    /// Downloaded into a staging file (removed if the answer fails before it is stored).
    Staged(Staged),
    Fields(Value),
}

/// Why a download was not obtained: the image host's fault (a link may be passed on instead), or the disk's.
enum Downloading {
    Fetch(FetchError),
    Store(StoreError),
}

/// The work one `data[]` item needs.
enum Job {
    Download(String),
    /// The base64 text: a slice of the answer's body (no copy), or the unescaped text when the JSON string had
    /// escapes.
    Decode(Bytes),
    /// The image, decoded as the answer arrived (`None`: its text was not base64).
    Decoded(Option<Image>),
}

impl Job {
    /// The work `item`, the `index`th of `data[]`, needs, taking its `url` or `b64_json` string out of it (the
    /// item's fields are replaced by the job's result; an answer whose re-hosting fails is not sent). `body` is
    /// what `item` was read from; `decoded`, the images decoded from it as it arrived, by item.
    fn take_from(
        item: &mut Item<'_>,
        index: usize,
        want: Option<ResponseFormat>,
        body: &Bytes,
        decoded: &mut Vec<(usize, Option<Image>)>,
    ) -> Option<Self> {
        if let Some(Field::Text(url)) = item.get_mut("url") {
            return Some(Self::Download(std::mem::take(url).into_owned()));
        }
        match (item.get_mut("b64_json"), want) {
            (Some(Field::Text(b64)), Some(ResponseFormat::Url)) => {
                // Its text was left out as its image was decoded.
                if b64.is_empty()
                    && let Some(at) = decoded.iter().position(|(i, _)| *i == index)
                {
                    return Some(Self::Decoded(decoded.swap_remove(at).1));
                }
                Some(Self::Decode(match std::mem::take(b64) {
                    std::borrow::Cow::Borrowed(text) => body.slice_ref(text.as_bytes()),
                    std::borrow::Cow::Owned(text) => Bytes::from(text),
                }))
            }
            _ => None,
        }
    }
}

/// Base64 read whole, decoded a block at a time into one buffer of the image's size, each block hashed while it
/// is still in the CPU's cache: the image and its SHA-256, or `None` when the text is not base64 (refused
/// exactly as decoding it whole would refuse it).
fn decode_and_hash(text: &[u8]) -> Option<Decoded> {
    let mut decoder = ImageDecoder::with_capacity(text.len() / 4 * 3);
    decoder.push(text);
    decoder.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests fail by panicking")]

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use base64::Engine as _;
    use futures::stream::BoxStream;
    use object_store::path::Path;
    use object_store::{
        GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
        PutPayload, PutResult, Result as OsResult,
    };
    use sha2::Digest as _;

    use super::*;
    use crate::config::{DatabaseSettings, DownloadSettings, StorageBackend};
    use crate::db::Db;

    #[test]
    fn decoding_block_by_block_gives_the_image_and_its_hash_and_refuses_what_decoding_whole_refuses() {
        let reference = base64::engine::general_purpose::STANDARD;
        for len in [0, 1, 2, 3, 48 * 1024 - 1, 48 * 1024, 48 * 1024 + 1, 200_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 131 + 7) as u8).collect();
            let Decoded { bytes: decoded, sha256: sha } =
                decode_and_hash(reference.encode(&bytes).as_bytes()).expect("decodes");
            assert_eq!(decoded, bytes, "{len} bytes");
            assert_eq!(sha, <[u8; 32]>::from(sha2::Sha256::digest(&bytes)));
        }
        // Padding where one block ends, in the middle of the text: valid block by block, refused whole.
        let mut text = reference.encode(vec![7u8; 48 * 1024 - 1]).into_bytes();
        assert!(text.ends_with(b"="));
        text.extend_from_slice(reference.encode(b"more").as_bytes());
        assert!(BASE64.decode_to_vec(&text).is_err());
        assert!(decode_and_hash(&text).is_none());
        for bad in ["abc", "ab=c", "Zm9v YmFy", "Zm9v\n", "Zm9vYg", "Zm9v*mFy", "===="] {
            assert!(decode_and_hash(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    /// An object store that notes, for each object written, whether the answer's body was already freed.
    #[derive(Debug)]
    struct Watched {
        inner: object_store::memory::InMemory,
        body_freed: Arc<AtomicBool>,
        freed_when_written: Mutex<Vec<bool>>,
    }

    impl std::fmt::Display for Watched {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Watched")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Watched {
        async fn put_opts(&self, path: &Path, payload: PutPayload, opts: PutOptions) -> OsResult<PutResult> {
            self.freed_when_written.lock().unwrap().push(self.body_freed.load(Ordering::SeqCst));
            self.inner.put_opts(path, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            path: &Path,
            opts: PutMultipartOptions,
        ) -> OsResult<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(path, opts).await
        }
        async fn get_opts(&self, path: &Path, options: GetOptions) -> OsResult<GetResult> {
            self.inner.get_opts(path, options).await
        }
        async fn delete(&self, path: &Path) -> OsResult<()> {
            self.inner.delete(path).await
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, OsResult<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> OsResult<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &Path, to: &Path) -> OsResult<()> {
            self.inner.copy(from, to).await
        }
        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> OsResult<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    /// A re-hoster storing into `objects` (metadata in SQLite under `dir`), and a plan that wants links.
    async fn rehoster_on(objects: Arc<dyn ObjectStore>, dir: &std::path::Path) -> (Rehoster, Plan) {
        let db = Db::connect(&DatabaseSettings::default(), dir).await.unwrap();
        let store = ImageStore::with_objects(objects, String::new(), StorageBackend::Local, db);
        let links = LinkSigner::new(b"test key".to_vec(), url::Url::parse("http://gateway.test/").unwrap());
        let fetcher = Fetcher::new(&DownloadSettings::default()).unwrap();
        let rehoster = Rehoster::new(store, fetcher, links, Arc::new(ImagesSettings::default()));
        let plan = Plan {
            want: Some(ResponseFormat::Url),
            rewrite: true,
            retention: Duration::from_secs(60),
            fallback: DownloadFallback::Fail,
        };
        (rehoster, plan)
    }

    /// An answer's bytes that say when they are freed.
    struct Tracked(Vec<u8>, Arc<AtomicBool>);

    impl AsRef<[u8]> for Tracked {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.1.store(true, Ordering::SeqCst);
        }
    }

    /// A GPT answer of megabytes is freed once its image is decoded: under load answers queue to be stored, and
    /// each would otherwise hold its base64 beside its decoded image until stored.
    #[tokio::test]
    async fn a_base64_answer_is_freed_before_its_image_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let body_freed = Arc::new(AtomicBool::new(false));
        let objects = Arc::new(Watched {
            inner: object_store::memory::InMemory::new(),
            body_freed: body_freed.clone(),
            freed_when_written: Mutex::new(Vec::new()),
        });
        let (rehoster, plan) = rehoster_on(objects.clone(), dir.path()).await;
        let png = crate::upstream::render::render(7, 64, 64, crate::upstream::render::OutputFormat::Png).unwrap();
        let answer = format!(
            r#"{{"created":1,"data":[{{"b64_json":"{}","revised_prompt":"p"}}],"usage":{{"total_tokens":3}}}}"#,
            base64::engine::general_purpose::STANDARD.encode(&png)
        );
        let body = Bytes::from_owner(Tracked(answer.into_bytes(), body_freed.clone()));
        let origin = Origin { tenant_id: "t1", model: "gpt-image-1", request_id: "req_1" };

        let Rehosted::Rewritten(rewritten) = rehoster.apply(&plan, Split::whole(body), None, origin).await.unwrap()
        else {
            panic!("a base64 answer asked as links is rewritten")
        };
        let rewritten: serde_json::Value = serde_json::from_slice(&rewritten).unwrap();
        assert!(rewritten["data"][0]["url"].as_str().unwrap().starts_with("http://gateway.test/"), "{rewritten}");
        assert_eq!(rewritten["data"][0]["revised_prompt"], "p");
        assert_eq!(rewritten["usage"]["total_tokens"], 3);
        assert_eq!(*objects.freed_when_written.lock().unwrap(), [true], "the answer was freed before the write");
    }

    /// An answer whose images were decoded as it arrived has lost their text: if what is left is not an answer
    /// after all, it fails re-hosting rather than going on without its images.
    #[tokio::test]
    async fn a_split_answer_that_is_not_an_answer_is_refused_not_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let (rehoster, plan) = rehoster_on(Arc::new(object_store::memory::InMemory::new()), dir.path()).await;
        let png = crate::upstream::render::render(7, 8, 8, crate::upstream::render::OutputFormat::Png).unwrap();
        let image = crate::images::answer::split::Decoded { sha256: sha2::Sha256::digest(&png).into(), bytes: png };
        let origin = Origin { tenant_id: "t1", model: "gpt-image-1", request_id: "req_1" };
        for skeleton in [&br#"{"data":[{"b64_json":""}"#[..], br#"{"data":{"b64_json":""}}"#, br#"[1]"#] {
            let split = Split {
                skeleton: Bytes::from_static(skeleton),
                images: vec![(0, Some(Image::Decoded(image.clone())))],
            };
            let result = rehoster.apply(&plan, split, None, origin).await;
            assert!(matches!(result, Err(RehostError::Unreadable)), "{result:?}");
        }
        // Read whole, the same bodies pass as they came (nothing was taken out of them).
        let whole = Split::whole(Bytes::from_static(br#"[1]"#));
        assert!(matches!(rehoster.apply(&plan, whole, None, origin).await, Ok(Rehosted::Unchanged(_))));
    }

    #[test]
    fn the_simd_decoder_reads_what_openai_writes_and_refuses_what_the_base64_crate_refuses() {
        let reference = base64::engine::general_purpose::STANDARD;
        for len in 0..200_usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let text = reference.encode(&bytes);
            assert_eq!(BASE64.decode_to_vec(text.as_bytes()).ok(), Some(bytes.clone()), "{len} bytes");
            assert_eq!(BASE64.encode_to_string(&bytes), text);
        }
        for bad in ["abc", "ab=c", "Zm9v YmFy", "Zm9v\n", "Zm9vYg", "Zm9vYg=", "Zm9v*mFy", "====", "Zh=="] {
            assert!(reference.decode(bad).is_err(), "the base64 crate refuses {bad:?}");
            assert!(BASE64.decode_to_vec(bad.as_bytes()).is_err(), "{bad:?} is refused");
        }
    }
}
