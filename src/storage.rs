//! Stored images: their bytes in an object store (a local directory by default, S3-compatible storage for
//! several replicas) under their SHA-256, so the same image is stored once; one metadata row per link handed
//! out (`repo`); and the sweeper that deletes what has outlived its retention (`sweeper`).
//!
//! Ordering keeps a blob from being deleted under a new link: `put` records the blob row (extending its
//! expiry) before writing the object, and the sweeper deletes an expired blob's row and object inside one
//! transaction, so a concurrent `put` of the same bytes waits for that transaction and writes the object anew.

pub mod gallery;
pub mod repo;
pub mod staging;
pub mod sweeper;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use sha2::{Digest as _, Sha256};

use self::repo::ImageRepo;
use self::staging::{Staged, Stager};
use crate::config::{StorageBackend, StorageSettings};
use crate::db::Db;
use crate::images::imageinfo;
use crate::time::now_ms;

/// An image about to be stored.
#[derive(Debug)]
pub struct NewImage<'a> {
    pub tenant_id: &'a str,
    pub model: &'a str,
    pub request_id: &'a str,
    pub content: Content,
    /// How long the image (and its link) lives.
    pub retention: Duration,
}

/// The bytes of an image about to be stored.
#[derive(Debug)]
pub enum Content {
    /// In memory, with their SHA-256 when the caller computed it on the way (re-hosting hashes while it
    /// decodes); computed here otherwise. Trusted: it names the object.
    Bytes { bytes: Bytes, sha256: Option<[u8; 32]> },
    /// Already on disk, in a staging file of this store's ([`ImageStore::stager`]).
    Staged(Staged),
}

impl Content {
    /// Bytes in memory whose SHA-256 is computed when stored.
    pub fn bytes(bytes: Bytes) -> Self {
        Self::Bytes { bytes, sha256: None }
    }
}

/// A stored image as its metadata row describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub id: String,
    pub tenant_id: String,
    pub sha256: String,
    pub content_type: String,
    pub bytes: u64,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub model: String,
    pub request_id: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds; the link stops working and the sweeper deletes the row after this.
    pub expires_at: i64,
}

impl StoredImage {
    /// The file extension of its format (`png`, `jpg`, `webp`).
    pub fn extension(&self) -> &'static str {
        imageinfo::ImageFormat::from_mime(&self.content_type).map_or("bin", imageinfo::ImageFormat::extension)
    }
}

/// What went wrong storing or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bytes are not a PNG, JPEG or WebP image.
    #[error("the bytes are not a PNG, JPEG or WebP image")]
    NotAnImage,
    /// The object is gone (deleted by the sweeper, or removed from the bucket by hand).
    #[error("the stored object is missing")]
    Missing,
    #[error("object store: {0}")]
    Objects(#[from] object_store::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The blocking task hashing or writing the bytes did not finish (the runtime is shutting down).
    #[error("storage task failed: {0}")]
    Task(String),
    /// A staging file could not be written or moved into place.
    #[error("staging file: {0}")]
    Staging(#[source] std::io::Error),
}

/// The local backend's staging directory, inside the image directory (see [`staging`]).
const STAGING_DIR: &str = ".staging";

/// The image store: objects plus metadata. Cheap to clone.
#[derive(Clone)]
pub struct ImageStore {
    objects: Arc<dyn ObjectStore>,
    prefix: String,
    repo: ImageRepo,
    backend: StorageBackend,
    /// id → metadata, so serving a popular link does not ask the database every time.
    meta: moka::future::Cache<String, Arc<StoredImage>>,
    /// Where downloads are staged and from where they are moved into place: the local backend only.
    stager: Option<Stager>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore").field("backend", &self.backend).field("prefix", &self.prefix).finish()
    }
}

impl ImageStore {
    /// Open the configured object store (creating the local directory if needed).
    pub fn open(settings: &StorageSettings, db: Db) -> anyhow::Result<Self> {
        let mut stager = None;
        let objects: Arc<dyn ObjectStore> = match settings.backend {
            StorageBackend::Local => {
                let dir = settings.images_dir();
                std::fs::create_dir_all(&dir)
                    .map_err(|e| anyhow::anyhow!("cannot create image directory {}: {e}", dir.display()))?;
                let files = Arc::new(
                    LocalFileSystem::new_with_prefix(&dir)
                        .map_err(|e| anyhow::anyhow!("cannot open image directory {}: {e}", dir.display()))?,
                );
                // Inside the image directory: on its file system, so a staged file is moved by a rename.
                let staging = dir.join(STAGING_DIR);
                stager = Some(
                    Stager::open(staging.clone(), files.clone())
                        .map_err(|e| anyhow::anyhow!("cannot use staging directory {}: {e}", staging.display()))?,
                );
                files
            }
            StorageBackend::S3 => {
                let s3 = &settings.s3;
                let bucket = s3.bucket.as_deref().unwrap_or_default();
                // AWS_* variables (and instance credentials) fill in whatever the configuration leaves out.
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(&s3.region)
                    .with_allow_http(s3.allow_http);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/'));
                }
                if let Some(id) = &s3.access_key_id {
                    builder = builder.with_access_key_id(id.expose());
                }
                if let Some(secret) = &s3.secret_access_key {
                    builder = builder.with_secret_access_key(secret.expose());
                }
                Arc::new(builder.build().map_err(|e| anyhow::anyhow!("cannot configure S3 storage: {e}"))?)
            }
        };
        Ok(Self { stager, ..Self::with_objects(objects, settings.s3.prefix.clone(), settings.backend, db) })
    }

    /// A store over any object store (tests use this with an in-memory one).
    pub fn with_objects(objects: Arc<dyn ObjectStore>, prefix: String, backend: StorageBackend, db: Db) -> Self {
        let meta = moka::future::Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(60)).build();
        Self {
            objects,
            prefix: prefix.trim_matches('/').to_owned(),
            repo: ImageRepo::new(db),
            backend,
            meta,
            stager: None,
        }
    }

    /// Where downloads can be written as they arrive, for [`Content::Staged`]: the local backend only (an S3
    /// object is written whole).
    pub fn stager(&self) -> Option<&Stager> {
        self.stager.as_ref()
    }

    /// `local` or `s3`, for logs.
    pub fn backend(&self) -> StorageBackend {
        self.backend
    }

    /// Where the bytes of `sha256` live: `[prefix/]images/ab/abcdef…`.
    fn object_path(&self, sha256: &str) -> ObjectPath {
        let shard = sha256.get(..2).unwrap_or("00");
        if self.prefix.is_empty() {
            ObjectPath::from(format!("images/{shard}/{sha256}"))
        } else {
            ObjectPath::from(format!("{}/images/{shard}/{sha256}", self.prefix))
        }
    }

    /// Store an image and record a new link to it. The bytes must be a PNG, JPEG or WebP image; identical
    /// bytes share one object.
    pub async fn put(&self, new: NewImage<'_>) -> Result<StoredImage, StoreError> {
        let (format, info, sha256, len) = match &new.content {
            Content::Bytes { bytes, sha256 } => {
                let format = imageinfo::sniff(bytes).ok_or(StoreError::NotAnImage)?;
                let sha256 = match sha256 {
                    Some(sha256) => *sha256,
                    // Hashing megabytes takes milliseconds: off the async workers.
                    None => {
                        let bytes = bytes.clone();
                        tokio::task::spawn_blocking(move || Sha256::digest(&bytes).into())
                            .await
                            .map_err(|e| StoreError::Task(e.to_string()))?
                    }
                };
                (format, imageinfo::inspect(bytes).ok(), sha256, bytes.len() as u64)
            }
            Content::Staged(staged) => {
                let format = imageinfo::sniff(&staged.head).ok_or(StoreError::NotAnImage)?;
                (format, imageinfo::inspect(&staged.head).ok(), staged.sha256, staged.len)
            }
        };
        let now = now_ms();
        let retention_ms = i64::try_from(new.retention.as_millis()).unwrap_or(i64::MAX);
        let image = StoredImage {
            id: hex::encode(rand::random::<[u8; 16]>()),
            tenant_id: new.tenant_id.to_owned(),
            sha256: hex::encode(sha256),
            content_type: format.mime().to_owned(),
            bytes: len,
            width: info.as_ref().map(|i| i.width),
            height: info.as_ref().map(|i| i.height),
            model: new.model.to_owned(),
            request_id: new.request_id.to_owned(),
            created_at: now,
            expires_at: now.saturating_add(retention_ms),
        };
        // Blob row first (waits for a sweep of the same bytes in progress), then the object, then the link.
        self.repo.upsert_blob(&image).await?;
        let location = self.object_path(&image.sha256);
        match new.content {
            Content::Bytes { bytes, .. } => {
                self.objects.put(&location, PutPayload::from_bytes(bytes)).await?;
            }
            Content::Staged(staged) => {
                let Some(stager) = &self.stager else {
                    return Err(StoreError::Task(
                        "a staged image given to a store without a local directory".to_owned(),
                    ));
                };
                stager.place(staged, &location).await?;
            }
        }
        self.repo.insert_image(&image).await?;
        Ok(image)
    }

    /// The metadata of image `id`, if it exists and has not expired.
    pub async fn find(&self, id: &str) -> Result<Option<Arc<StoredImage>>, StoreError> {
        let found = match self.meta.get(id).await {
            Some(image) => Some(image),
            None => match self.repo.get_image(id).await? {
                Some(image) => {
                    let image = Arc::new(image);
                    self.meta.insert(id.to_owned(), image.clone()).await;
                    Some(image)
                }
                None => None,
            },
        };
        Ok(found.filter(|image| image.expires_at > now_ms()))
    }

    /// The bytes of `image`, or of `range` of them, as a stream.
    pub async fn read(
        &self,
        image: &StoredImage,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let options = GetOptions { range: range.map(GetRange::Bounded), ..GetOptions::default() };
        match self.objects.get_opts(&self.object_path(&image.sha256), options).await {
            Ok(result) => Ok(result.into_stream().map(|chunk| chunk.map_err(StoreError::from)).boxed()),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::Missing),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole of `image` in memory (tests and small reads).
    pub async fn read_all(&self, image: &StoredImage) -> Result<Bytes, StoreError> {
        match self.objects.get(&self.object_path(&image.sha256)).await {
            Ok(result) => Ok(result.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::Missing),
            Err(e) => Err(e.into()),
        }
    }

    /// Remove the links of `images` (stored for an answer that then failed), so they are never served.
    pub async fn discard(&self, images: &[StoredImage]) -> Result<(), StoreError> {
        if images.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = images.iter().map(|i| i.id.as_str()).collect();
        self.repo.delete_images(&ids).await?;
        for id in ids {
            self.meta.invalidate(id).await;
        }
        Ok(())
    }

    /// Delete expired links, then every object no live link uses, a batch at a time until none is left,
    /// checking `stop` between objects (each is deleted whole or not at all). An object that cannot be deleted
    /// is logged and skipped (its row stays, so the next sweep tries again); after
    /// [`MAX_CONSECUTIVE_FAILURES`] in a row the store is taken to be down and the sweep ends. Returns
    /// (links, objects) deleted.
    pub async fn sweep(&self, stop: &tokio_util::sync::CancellationToken) -> Result<(u64, u64), StoreError> {
        let now = now_ms();
        let links = self.repo.delete_expired_images(now).await?;
        let (mut objects, mut failures_in_a_row) = (0, 0);
        let mut after = None;
        'batches: loop {
            let batch = self.repo.expired_blobs(now, after.as_ref(), SWEEP_BATCH).await?;
            let Some(last) = batch.last().cloned() else { break };
            for (_, sha256) in &batch {
                if stop.is_cancelled() {
                    break 'batches;
                }
                match self.delete_blob(sha256, now).await {
                    Ok(deleted) => {
                        objects += u64::from(deleted);
                        failures_in_a_row = 0;
                    }
                    Err(e) => {
                        tracing::warn!(sha256 = %sha256, error = %e, "could not delete an expired image; skipping it");
                        failures_in_a_row += 1;
                        if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES {
                            tracing::warn!(failures_in_a_row, "image storage keeps failing; sweeping again later");
                            break 'batches;
                        }
                    }
                }
            }
            after = Some(last);
        }
        if links > 0 || objects > 0 {
            self.meta.invalidate_all();
        }
        Ok((links, objects))
    }

    /// Delete the expired blob `sha256` with its object, in one transaction.
    async fn delete_blob(&self, sha256: &str, now: i64) -> Result<bool, StoreError> {
        let path = self.object_path(sha256);
        // The gallery's thumbnail of the object (if one was made) goes with it.
        let thumb = self.thumb_path(sha256);
        let objects = self.objects.clone();
        self.repo
            .delete_blob_with(sha256, now, move || async move {
                for path in [thumb, path] {
                    match objects.delete(&path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(StoreError::from(e)),
                    }
                }
                Ok(())
            })
            .await
    }
}

/// Expired blobs read from the database at once by a sweep.
const SWEEP_BATCH: i64 = 500;
/// Failed deletes in a row after which a sweep stops until its next interval.
const MAX_CONSECUTIVE_FAILURES: u32 = 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatabaseSettings, StorageSettings};

    async fn store() -> (ImageStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let objects = Arc::new(object_store::memory::InMemory::new());
        (ImageStore::with_objects(objects, String::new(), StorageBackend::Local, db), dir)
    }

    fn png() -> Bytes {
        crate::upstream::render::render(7, 16, 16, crate::upstream::render::OutputFormat::Png).unwrap()
    }

    fn new(bytes: Bytes, retention: Duration) -> NewImage<'static> {
        NewImage { tenant_id: "t1", model: "gpt-image-1", request_id: "req", content: Content::bytes(bytes), retention }
    }

    #[tokio::test]
    async fn same_bytes_are_stored_once_under_two_links() {
        let (store, _dir) = store().await;
        let a = store.put(new(png(), Duration::from_secs(60))).await.unwrap();
        let b = store.put(new(png(), Duration::from_secs(60))).await.unwrap();
        assert_ne!(a.id, b.id, "each answer gets its own link");
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(store.objects.list(None).count().await, 1, "one object for identical bytes");
        assert_eq!(store.read_all(&a).await.unwrap(), png());
        assert_eq!((a.width, a.height, a.content_type.as_str()), (Some(16), Some(16), "image/png"));
    }

    #[tokio::test]
    async fn non_images_are_refused_and_nothing_is_stored() {
        let (store, _dir) = store().await;
        let err = store.put(new(Bytes::from_static(b"<html>not an image</html>"), Duration::from_secs(60))).await;
        assert!(matches!(err, Err(StoreError::NotAnImage)));
        assert_eq!(store.objects.list(None).count().await, 0);
    }

    #[tokio::test]
    async fn the_sweeper_keeps_a_blob_while_any_link_lives() {
        let (store, _dir) = store().await;
        let short = store.put(new(png(), Duration::from_millis(1))).await.unwrap();
        let long = store.put(new(png(), Duration::from_secs(3600))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store.sweep(&Default::default()).await.unwrap(),
            (1, 0),
            "the expired link goes, the shared object stays"
        );
        assert!(store.find(&short.id).await.unwrap().is_none());
        assert_eq!(store.read_all(&long).await.unwrap(), png());
    }

    #[tokio::test]
    async fn the_sweeper_deletes_expired_objects() {
        let (store, _dir) = store().await;
        let image = store.put(new(png(), Duration::from_millis(1))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.sweep(&Default::default()).await.unwrap(), (1, 1));
        assert!(matches!(store.read_all(&image).await, Err(StoreError::Missing)));
        assert_eq!(store.sweep(&Default::default()).await.unwrap(), (0, 0), "nothing left to do");
        // The same bytes stored again after the sweep are written anew.
        let again = store.put(new(png(), Duration::from_secs(60))).await.unwrap();
        assert_eq!(store.read_all(&again).await.unwrap(), png());
    }

    #[tokio::test]
    async fn a_sweep_deletes_every_expired_object_in_batches_and_skips_one_it_cannot_delete() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let objects = Arc::new(LocalFileSystem::new_with_prefix(&images).unwrap());
        let store = ImageStore::with_objects(objects, String::new(), StorageBackend::Local, db);
        let count = SWEEP_BATCH as u64 + 120;
        let mut shas = Vec::new();
        for seed in 0..count {
            let bytes =
                crate::upstream::render::render(seed, 4, 4, crate::upstream::render::OutputFormat::Png).unwrap();
            shas.push(store.put(new(bytes, Duration::from_millis(1))).await.unwrap().sha256);
        }
        shas.sort();
        shas.dedup();
        let distinct = shas.len() as u64;
        assert!(distinct > SWEEP_BATCH as u64, "more objects than one batch: {distinct}");
        let files = || walk(&images);
        assert_eq!(files(), distinct);
        // One object cannot be deleted: a directory stands where its file was.
        let stuck = images.join("images").join(&shas[3][..2]).join(&shas[3]);
        std::fs::remove_file(&stuck).unwrap();
        std::fs::create_dir(&stuck).unwrap();
        std::fs::write(stuck.join("keep"), b"x").unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;

        let (links, deleted) = store.sweep(&Default::default()).await.unwrap();
        assert_eq!(links, count, "every expired link");
        assert_eq!(deleted, distinct - 1, "every object but the stuck one, past the first batch");
        assert_eq!(files(), 1, "only the stuck one's stand-in is left");

        std::fs::remove_dir_all(&stuck).unwrap();
        assert_eq!(store.sweep(&Default::default()).await.unwrap(), (0, 1), "the next sweep retries it");
    }

    fn walk(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .map_or(0, |entries| entries.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
    }

    #[tokio::test]
    async fn discarded_images_are_never_served() {
        let (store, _dir) = store().await;
        let a = store.put(new(png(), Duration::from_secs(60))).await.unwrap();
        assert!(store.find(&a.id).await.unwrap().is_some(), "cached after a read");
        store.discard(std::slice::from_ref(&a)).await.unwrap();
        assert!(store.find(&a.id).await.unwrap().is_none());
    }

    /// A store on local disk, as configured by default, in a temporary directory.
    async fn on_disk() -> (ImageStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let settings = StorageSettings { data_dir: dir.path().to_path_buf(), ..StorageSettings::default() };
        (ImageStore::open(&settings, db).unwrap(), dir)
    }

    /// A PNG of `side`² random pixels: about 3 bytes per pixel, it does not compress.
    fn noise_png(side: u32) -> Bytes {
        let noise = image::RgbImage::from_fn(side, side, |_, _| image::Rgb(rand::random::<[u8; 3]>()));
        let mut png = Vec::new();
        noise.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        Bytes::from(png)
    }

    fn staged_image(staged: Staged) -> NewImage<'static> {
        NewImage {
            tenant_id: "t1",
            model: "dall-e-3",
            request_id: "req",
            content: Content::Staged(staged),
            retention: Duration::from_secs(60),
        }
    }

    async fn stage(store: &ImageStore, bytes: &Bytes, chunk: usize) -> Staged {
        let mut staging = store.stager().expect("a local store stages").start().unwrap();
        for piece in bytes.chunks(chunk) {
            staging.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        staging.finish().await.unwrap()
    }

    #[tokio::test]
    async fn a_staged_download_is_stored_under_its_content_address_as_if_put_whole() {
        let (store, dir) = on_disk().await;
        let stager = store.stager().unwrap().clone();
        // Big enough that its head is a prefix and it arrives in many chunks.
        let big = noise_png(700);
        assert!(big.len() > staging::HEAD_BYTES, "{} bytes", big.len());
        let staged = stage(&store, &big, 7_001).await;
        assert_eq!((staged.len, staged.head.len()), (big.len() as u64, staging::HEAD_BYTES));
        assert_eq!(staged.sha256, <[u8; 32]>::from(Sha256::digest(&big)));
        let image = store.put(staged_image(staged)).await.unwrap();
        assert_eq!((image.width, image.height, image.bytes), (Some(700), Some(700), big.len() as u64));
        assert_eq!(store.read_all(&image).await.unwrap(), big, "the exact bytes");
        assert_eq!(stager.files(), 0, "moved, not copied");
        // The same bytes put whole share the object.
        let whole = store.put(new(big.clone(), Duration::from_secs(60))).await.unwrap();
        assert_eq!(whole.sha256, image.sha256);
        assert_eq!(walk(&dir.path().join("images")), 1, "one object for both links");
    }

    #[tokio::test]
    async fn an_unfinished_or_unstored_staging_file_is_removed() {
        let (store, dir) = on_disk().await;
        let stager = store.stager().unwrap().clone();
        let mut staging = stager.start().unwrap();
        staging.write(png()).await.unwrap();
        assert_eq!(stager.files(), 1);
        drop(staging);
        assert_eq!(stager.files(), 0, "a download given up mid-way leaves nothing");

        let staged = stage(&store, &Bytes::from_static(b"<html>not an image</html>"), 4).await;
        let refused = store.put(staged_image(staged)).await;
        assert!(matches!(refused, Err(StoreError::NotAnImage)), "{refused:?}");
        assert_eq!(stager.files(), 0, "a refused image leaves nothing");
        assert_eq!(walk(&dir.path().join("images")), 0, "nothing stored");
    }

    /// Downloads wait on the network, not on a blocking thread: with one blocking thread for the whole
    /// process, two downloads arriving chunk by chunk, side by side, both complete.
    #[test]
    fn downloads_in_progress_do_not_hold_blocking_threads() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (store, _dir) = on_disk().await;
            // Several batches each, written while the next chunks arrive.
            let image = noise_png(600);
            let stager = store.stager().unwrap();
            let (mut a, mut b) = (stager.start().unwrap(), stager.start().unwrap());
            let both = async {
                for piece in image.chunks(16 * 1024) {
                    a.write(Bytes::copy_from_slice(piece)).await.unwrap();
                    b.write(Bytes::copy_from_slice(piece)).await.unwrap();
                    // A network's pace: the writers are idle between chunks.
                    tokio::task::yield_now().await;
                }
                (a.finish().await.unwrap(), b.finish().await.unwrap())
            };
            let (a, b) = tokio::time::timeout(Duration::from_secs(20), both).await.expect("both downloads finish");
            let sha = <[u8; 32]>::from(Sha256::digest(&image));
            assert_eq!((a.sha256, b.sha256, a.len), (sha, sha, image.len() as u64));
        });
    }

    #[tokio::test]
    async fn staging_files_left_by_a_stopped_process_are_removed_when_the_store_opens() {
        let (store, dir) = on_disk().await;
        let staging_dir = dir.path().join("images").join(STAGING_DIR);
        let old = staging_dir.join("left-by-a-crash");
        let recent = staging_dir.join("another-replica-writing-now");
        for path in [&old, &recent] {
            std::fs::write(path, b"partial").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_hours_ago).unwrap();
        drop(store);
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let settings = StorageSettings { data_dir: dir.path().to_path_buf(), ..StorageSettings::default() };
        ImageStore::open(&settings, db).unwrap();
        assert!(!old.exists(), "an old staging file is removed");
        assert!(recent.exists(), "a recent one may still be written: kept");
    }

    #[tokio::test]
    async fn ranges_read_part_of_the_object() {
        let (store, _dir) = store().await;
        let image = store.put(new(png(), Duration::from_secs(60))).await.unwrap();
        let chunks: Vec<Bytes> = store.read(&image, Some(0..8)).await.unwrap().map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks.concat(), png()[..8].to_vec());
    }
}
