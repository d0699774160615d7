//! The SQL of stored images: `image_blobs` (one row per stored object) and `images` (one row per link),
//! portable between SQLite and PostgreSQL like the rest of the schema.

use std::future::Future;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{StoreError, StoredImage};
use crate::db::Db;

const IMAGE_COLUMNS: &str =
    "id, tenant_id, sha256, content_type, bytes, width, height, model, request_id, created_at, expires_at";

/// Image metadata in the database.
#[derive(Debug, Clone)]
pub struct ImageRepo {
    db: Db,
}

impl ImageRepo {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub(super) fn db(&self) -> &Db {
        &self.db
    }

    /// Record the blob of `image`, or extend its expiry to cover `image`.
    pub async fn upsert_blob(&self, image: &StoredImage) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO image_blobs (sha256, content_type, bytes, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (sha256) DO UPDATE SET expires_at = CASE \
               WHEN excluded.expires_at > image_blobs.expires_at THEN excluded.expires_at \
               ELSE image_blobs.expires_at END",
        )
        .bind(image.sha256.clone())
        .bind(image.content_type.clone())
        .bind(i64::try_from(image.bytes).unwrap_or(i64::MAX))
        .bind(image.created_at)
        .bind(image.expires_at)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    pub async fn insert_image(&self, image: &StoredImage) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO images ({IMAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(image.id.clone())
        .bind(image.tenant_id.clone())
        .bind(image.sha256.clone())
        .bind(image.content_type.clone())
        .bind(i64::try_from(image.bytes).unwrap_or(i64::MAX))
        .bind(image.width.map(i64::from))
        .bind(image.height.map(i64::from))
        .bind(image.model.clone())
        .bind(image.request_id.clone())
        .bind(image.created_at)
        .bind(image.expires_at)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    pub async fn get_image(&self, id: &str) -> Result<Option<StoredImage>, sqlx::Error> {
        let row = sqlx::query(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE id = $1"))
            .bind(id.to_owned())
            .fetch_optional(self.db.pool())
            .await?;
        row.map(|r| image_from_row(&r)).transpose()
    }

    /// Delete every link expired at `now`; returns how many.
    pub async fn delete_expired_images(&self, now: i64) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM images WHERE expires_at <= $1").bind(now).execute(self.db.pool()).await?;
        Ok(done.rows_affected())
    }

    /// Up to `limit` blobs no live link uses any more, in (expiry, sha256) order, starting after `after`: a
    /// sweep pages through them with the last one it saw, so blobs it had to skip are not fetched again.
    pub async fn expired_blobs(
        &self,
        now: i64,
        after: Option<&(i64, String)>,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, sqlx::Error> {
        let (after_expiry, after_sha) = after.cloned().unwrap_or((i64::MIN, String::new()));
        let rows = sqlx::query(
            "SELECT expires_at, sha256 FROM image_blobs WHERE expires_at <= $1 \
             AND (expires_at > $2 OR (expires_at = $2 AND sha256 > $3)) ORDER BY expires_at, sha256 LIMIT $4",
        )
        .bind(now)
        .bind(after_expiry)
        .bind(after_sha)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(|r| Ok((r.try_get::<i64, _>("expires_at")?, r.try_get::<String, _>("sha256")?))).collect()
    }

    /// Delete the links `ids` (of an answer that failed after they were stored). Their blobs keep their expiry:
    /// another link may be about to use the same bytes, and the sweeper deletes them when they expire.
    pub async fn delete_images(&self, ids: &[&str]) -> Result<u64, sqlx::Error> {
        let mut deleted = 0;
        for id in ids {
            let done =
                sqlx::query("DELETE FROM images WHERE id = $1").bind((*id).to_owned()).execute(self.db.pool()).await?;
            deleted += done.rows_affected();
        }
        Ok(deleted)
    }

    /// Delete blob `sha256` if it is still expired, running `delete_object` inside the same transaction: a
    /// concurrent `upsert_blob` of the same bytes waits, then finds no row and its `put` writes the object
    /// again. Returns whether the blob was deleted.
    pub async fn delete_blob_with<F, Fut>(&self, sha256: &str, now: i64, delete_object: F) -> Result<bool, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        let mut tx = self.db.pool().begin().await?;
        let done = sqlx::query("DELETE FROM image_blobs WHERE sha256 = $1 AND expires_at <= $2")
            .bind(sha256.to_owned())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        match delete_object().await {
            Ok(()) => {
                tx.commit().await?;
                Ok(true)
            }
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }
}

pub(super) fn image_from_row(row: &AnyRow) -> Result<StoredImage, sqlx::Error> {
    let bytes: i64 = row.try_get("bytes")?;
    let width: Option<i64> = row.try_get("width")?;
    let height: Option<i64> = row.try_get("height")?;
    Ok(StoredImage {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        sha256: row.try_get("sha256")?,
        content_type: row.try_get("content_type")?,
        bytes: u64::try_from(bytes).unwrap_or(0),
        width: width.and_then(|w| u32::try_from(w).ok()),
        height: height.and_then(|h| u32::try_from(h).ok()),
        model: row.try_get("model")?,
        request_id: row.try_get("request_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}
