//! What the web console's gallery needs from the image store: a tenant's stored images newest first, a
//! thumbnail of each (made once, on first view, and stored beside the image as `thumbs/ab/<sha256>.jpg`), and
//! deleting an image so that its link stops working and its bytes go once no other link uses them.

use bytes::Bytes;
use object_store::PutPayload;
use object_store::path::Path as ObjectPath;

use super::{ImageStore, StoreError, StoredImage};
use crate::time::now_ms;

/// The longest side of a thumbnail, in pixels.
pub const THUMB_SIDE: u32 = 256;

impl ImageStore {
    /// Where the thumbnail of the object `sha256` lives.
    pub(super) fn thumb_path(&self, sha256: &str) -> ObjectPath {
        let shard = sha256.get(..2).unwrap_or("00");
        if self.prefix.is_empty() {
            ObjectPath::from(format!("thumbs/{shard}/{sha256}.jpg"))
        } else {
            ObjectPath::from(format!("{}/thumbs/{shard}/{sha256}.jpg", self.prefix))
        }
    }

    /// Live images, newest first, of one tenant (by id) or of all; `limit` after skipping `offset`.
    pub async fn list_recent(
        &self,
        tenant_id: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<StoredImage>, StoreError> {
        let db = self.repo.db();
        let mut sql = String::from(
            "SELECT id, tenant_id, sha256, content_type, bytes, width, height, model, request_id, created_at, \
             expires_at FROM images WHERE expires_at > $1",
        );
        if tenant_id.is_some() {
            sql.push_str(" AND tenant_id = $4");
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3");
        let mut query = sqlx::query(&sql).bind(now_ms()).bind(limit).bind(offset);
        if let Some(t) = tenant_id {
            query = query.bind(t.to_owned());
        }
        let rows = query.fetch_all(db.pool()).await?;
        rows.iter().map(|r| super::repo::image_from_row(r).map_err(StoreError::from)).collect()
    }

    /// The JPEG thumbnail of `image`: read from the store, or made from the image and stored the first time.
    pub async fn thumbnail(&self, image: &StoredImage) -> Result<Bytes, StoreError> {
        let path = self.thumb_path(&image.sha256);
        match self.objects.get(&path).await {
            Ok(found) => return Ok(found.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let original = self.read_all(image).await?;
        let thumb = tokio::task::spawn_blocking(move || make_thumbnail(&original))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        self.objects.put(&path, PutPayload::from_bytes(thumb.clone())).await?;
        Ok(thumb)
    }

    /// Whether every image of `ids` still exists and has not expired, asked of the database itself (not of
    /// this replica's metadata cache, which another replica's delete does not reach): what a cached answer
    /// linking to them is checked against before it is handed out again.
    pub async fn all_live(&self, ids: &[&str]) -> Result<bool, StoreError> {
        let mut ids: Vec<&str> = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for chunk in ids.chunks(100) {
            let marks: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
            let sql = format!("SELECT COUNT(*) FROM images WHERE expires_at > $1 AND id IN ({})", marks.join(", "));
            let mut query = sqlx::query_scalar::<_, i64>(&sql).bind(now_ms());
            for id in chunk {
                query = query.bind((*id).to_owned());
            }
            let live = query.fetch_one(self.repo.db().pool()).await?;
            if usize::try_from(live).unwrap_or(0) < chunk.len() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Delete image `id`: its link stops working at once on this replica (other replicas keep metadata for
    /// at most a minute, and then find nothing), and its bytes and thumbnail are deleted unless another live
    /// link uses the same bytes. Returns the deleted image, or `None` if there was none.
    pub async fn delete_image(&self, id: &str) -> Result<Option<StoredImage>, StoreError> {
        let Some(image) = self.repo.get_image(id).await? else { return Ok(None) };
        self.repo.delete_images(&[id]).await?;
        self.meta.invalidate(id).await;
        let now = now_ms();
        // Let the blob expire now if no other link uses it and no newer link extended it meanwhile (a
        // concurrent store of the same bytes sets a later expiry, and then the blob stays).
        sqlx::query(
            "UPDATE image_blobs SET expires_at = $1 WHERE sha256 = $2 AND expires_at <= $3 \
             AND NOT EXISTS (SELECT 1 FROM images WHERE sha256 = $2)",
        )
        .bind(now)
        .bind(image.sha256.clone())
        .bind(image.expires_at)
        .execute(self.repo.db().pool())
        .await?;
        self.delete_blob(&image.sha256, now).await?;
        Ok(Some(image))
    }
}

/// Decode `original` and encode a JPEG no larger than [`THUMB_SIDE`] on either side.
fn make_thumbnail(original: &[u8]) -> Result<Bytes, StoreError> {
    let decoded = image::load_from_memory(original).map_err(|_| StoreError::NotAnImage)?;
    let small = decoded.thumbnail(THUMB_SIDE, THUMB_SIDE).into_rgb8();
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode_image(&small)
        .map_err(|e| StoreError::Task(format!("thumbnail encoding failed: {e}")))?;
    Ok(Bytes::from(out.into_inner()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{DatabaseSettings, StorageBackend};
    use crate::db::Db;
    use crate::storage::NewImage;

    async fn store() -> (ImageStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let objects = Arc::new(object_store::memory::InMemory::new());
        (ImageStore::with_objects(objects, String::new(), StorageBackend::Local, db), dir)
    }

    fn png(seed: u64) -> Bytes {
        crate::upstream::render::render(seed, 600, 300, crate::upstream::render::OutputFormat::Png).unwrap()
    }

    fn new(tenant: &str, bytes: Bytes) -> NewImage<'_> {
        NewImage {
            tenant_id: tenant,
            model: "gpt-image-1",
            request_id: "req",
            content: crate::storage::Content::bytes(bytes),
            retention: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_thumbnail_is_made_once_and_kept_beside_the_image() {
        let (store, _dir) = store().await;
        let image = store.put(new("t1", png(1))).await.unwrap();
        let thumb = store.thumbnail(&image).await.unwrap();
        let decoded = image::load_from_memory(&thumb).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (256, 128));
        assert!(store.objects.head(&store.thumb_path(&image.sha256)).await.is_ok(), "stored");
        assert_eq!(store.thumbnail(&image).await.unwrap(), thumb, "read back, not made again");
    }

    #[tokio::test]
    async fn images_are_listed_newest_first_per_tenant() {
        let (store, _dir) = store().await;
        let a = store.put(new("t1", png(1))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        let b = store.put(new("t2", png(2))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        let c = store.put(new("t1", png(3))).await.unwrap();
        let ids = |v: Vec<StoredImage>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(store.list_recent(Some("t1"), 10, 0).await.unwrap()), [c.id.clone(), a.id.clone()]);
        assert_eq!(ids(store.list_recent(None, 2, 0).await.unwrap()), [c.id, b.id]);
        assert_eq!(ids(store.list_recent(None, 2, 2).await.unwrap()), [a.id]);
    }

    #[tokio::test]
    async fn deleting_an_image_ends_its_link_and_its_bytes_unless_shared() {
        let (store, _dir) = store().await;
        let shared_a = store.put(new("t1", png(1))).await.unwrap();
        let shared_b = store.put(new("t1", png(1))).await.unwrap();
        store.thumbnail(&shared_a).await.unwrap();
        assert!(store.find(&shared_a.id).await.unwrap().is_some());
        assert!(store.delete_image(&shared_a.id).await.unwrap().is_some());
        assert!(store.find(&shared_a.id).await.unwrap().is_none(), "the link no longer resolves");
        assert_eq!(store.read_all(&shared_b).await.unwrap(), png(1), "the other link's bytes stay");
        assert!(store.delete_image(&shared_b.id).await.unwrap().is_some());
        assert!(matches!(store.read_all(&shared_b).await, Err(StoreError::Missing)), "the last link takes the bytes");
        assert!(store.objects.head(&store.thumb_path(&shared_b.sha256)).await.is_err(), "and the thumbnail");
        assert!(store.delete_image(&shared_b.id).await.unwrap().is_none());
    }
}
