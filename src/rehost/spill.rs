//! Images of a GPT answer written to staging files as the answer arrives: the [`ImageSink`] re-hosting hands
//! the upstream when its images become links and are stored on local disk.
//!
//! Read whole, each answer in flight held its decoded image (2 MB and more) until it was stored; through
//! this sink it holds a block of it, and each block is written on a blocking thread while the rest of the
//! answer arrives (the same staging files a DALL·E-style download goes to; the decoder hashes the blocks as
//! it makes them, so the writer only writes).

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::storage::StoreError;
use crate::storage::staging::{Staged, Stager, Staging};
use crate::upstream::ImageSink;

/// The staging files of one answer's images, by the splitter's slot. Dropped, the unfinished ones are removed.
pub struct Spill {
    stager: Stager,
    images: tokio::sync::Mutex<Vec<(usize, Result<Staging, StoreError>)>>,
}

impl Spill {
    pub fn new(stager: Stager) -> Self {
        Self { stager, images: tokio::sync::Mutex::new(Vec::new()) }
    }

    /// Image `slot`, whose bytes' SHA-256 is `sha256` (the decoder hashed them), is complete: its staged file
    /// (`None`: it had no bytes), or why it could not be written.
    pub async fn finish(&self, slot: usize, sha256: [u8; 32]) -> Result<Option<Staged>, StoreError> {
        let taken = {
            let mut images = self.images.lock().await;
            images.iter().position(|(s, _)| *s == slot).map(|at| images.swap_remove(at).1)
        };
        match taken {
            Some(staging) => staging?.finish_hashed(sha256).await.map(Some),
            None => Ok(None),
        }
    }
}

impl ImageSink for Spill {
    fn write(&self, slot: usize, block: Bytes) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // One writer (the answer's reader), so the lock is never waited for.
            let mut images = self.images.lock().await;
            let at = match images.iter().position(|(s, _)| *s == slot) {
                Some(at) => at,
                None => {
                    images.push((slot, self.stager.start_unhashed()));
                    images.len() - 1
                }
            };
            let entry = &mut images[at].1;
            if let Ok(staging) = entry
                && let Err(e) = staging.write(block).await
            {
                // Kept for `finish`: the answer is read on (it is paid for), this image fails to store.
                *entry = Err(e);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use crate::config::{DatabaseSettings, StorageSettings};
    use crate::db::Db;
    use crate::storage::ImageStore;

    /// A staging file that cannot be written fails its image when it is finished, and nothing else: the
    /// answer's reading went on, and the other images are whole.
    #[tokio::test]
    async fn a_failed_staging_file_fails_only_its_image_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        let settings = StorageSettings { data_dir: dir.path().to_path_buf(), ..StorageSettings::default() };
        let store = ImageStore::open(&settings, db).unwrap();
        let spill = Spill::new(store.stager().unwrap().clone());
        spill.write(0, Bytes::from(vec![1u8; 300_000])).await;
        // A file where the staging directory was: the next image's file cannot be made.
        let staging = settings.images_dir().join(".staging");
        std::fs::remove_dir_all(&staging).unwrap();
        std::fs::write(&staging, b"in the way").unwrap();
        spill.write(1, Bytes::from_static(b"more")).await;
        spill.write(1, Bytes::from_static(b"more")).await;

        let sha256 = [7u8; 32];
        let first = spill.finish(0, sha256).await.unwrap().unwrap();
        assert_eq!((first.len, first.sha256), (300_000, sha256), "the decoder's hash is the staged image's");
        let failed = spill.finish(1, sha256).await;
        assert!(matches!(failed, Err(StoreError::Staging(_))), "{failed:?}");
        assert!(spill.finish(2, sha256).await.unwrap().is_none(), "an image never written has no file");
    }
}
