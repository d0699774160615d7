//! Downloads written to disk as they arrive (local backend only): each image gets a staging file, written and
//! hashed on a blocking thread while the next chunk is still being received, which `ImageStore::put` then
//! renames to the image's content address. The download, its SHA-256 and the object write overlap instead of
//! running one after another, and no image is held whole in memory (docs/performance.md).
//!
//! A staging file is removed when its `StagedFile` is dropped without having been moved into place (a download
//! that failed, timed out, was too large or belonged to an answer that failed), and staging files a crashed
//! process left behind are removed when the store next opens.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::StoreError;

/// How much of the start of an image is kept in memory: enough for its signature and its dimensions (a JPEG's
/// frame header may follow up to 64 KiB of metadata per segment).
pub const HEAD_BYTES: usize = 256 * 1024;

/// Chunks received and not yet on disk, at most: receiving waits beyond this, so a slow disk holds back the
/// download instead of filling memory.
const QUEUED_CHUNKS: usize = 8;

/// Staging files older than this when the store opens were left by a process that stopped mid-download (every
/// download's deadline is far shorter).
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Where staging files are made; cheap to clone.
#[derive(Debug, Clone)]
pub struct Stager {
    dir: Arc<PathBuf>,
}

impl Stager {
    /// Use `dir` (created if missing), removing staging files left there by a stopped process.
    pub(super) fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut stale = 0;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if old.is_some_and(|age| age > STALE_AFTER) && std::fs::remove_file(entry.path()).is_ok() {
                stale += 1;
            }
        }
        if stale > 0 {
            tracing::info!(files = stale, dir = %dir.display(), "removed staging files of unfinished downloads");
        }
        Ok(Self { dir: Arc::new(dir) })
    }

    /// A new staging file, written from a blocking thread as chunks are handed to it. The file is made here
    /// (one `open`), so that dropping the [`Staging`] removes it at once, whatever its writer is doing.
    pub fn start(&self) -> Result<Staging, StoreError> {
        let (mut file, staged) = create(&self.dir).map_err(StoreError::Staging)?;
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                file.write_all(&chunk)?;
                len += chunk.len() as u64;
            }
            Ok((len, hasher.finalize().into()))
        });
        Ok(Staging { tx: Some(tx), task, head: BytesMut::new(), file: staged })
    }

    #[cfg(test)]
    pub(crate) fn files(&self) -> usize {
        std::fs::read_dir(&*self.dir).map_or(0, Iterator::count)
    }
}

/// A new file with a random name in `dir` (made again if it was removed meanwhile).
fn create(dir: &Path) -> std::io::Result<(std::fs::File, StagedFile)> {
    let path = dir.join(crate::wire::hex(&rand::random::<[u8; 16]>()));
    let open = || std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
    let file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir).and_then(|()| open())?,
        other => other?,
    };
    Ok((file, StagedFile { path: Some(path) }))
}

/// One image being written to its staging file; dropped before [`Staging::finish`], the file is removed.
pub struct Staging {
    tx: Option<mpsc::Sender<Bytes>>,
    /// The writer: the bytes written and their SHA-256.
    task: JoinHandle<std::io::Result<(u64, [u8; 32])>>,
    head: BytesMut,
    file: StagedFile,
}

impl Staging {
    /// Hand `chunk`, the image's next bytes, to the writer; waits while it is [`QUEUED_CHUNKS`] behind.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if self.head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped early: its error says why.
        self.tx = None;
        match self.wait().await {
            Ok(_) => Err(StoreError::Task("the staging writer stopped early".to_owned())),
            Err(e) => Err(e),
        }
    }

    /// Every chunk is on disk: the staged image.
    pub async fn finish(mut self) -> Result<Staged, StoreError> {
        self.tx = None;
        let (len, sha256) = self.wait().await?;
        Ok(Staged { file: self.file, len, sha256, head: self.head.freeze() })
    }

    async fn wait(&mut self) -> Result<(u64, [u8; 32]), StoreError> {
        match (&mut self.task).await {
            Ok(written) => written.map_err(StoreError::Staging),
            Err(e) => Err(StoreError::Task(e.to_string())),
        }
    }
}

/// An image written to a staging file, ready for `ImageStore::put`.
#[derive(Debug)]
pub struct Staged {
    pub(super) file: StagedFile,
    /// Its size in bytes.
    pub len: u64,
    /// The SHA-256 of the whole file, computed as it was written.
    pub sha256: [u8; 32],
    /// Its first bytes (at most [`HEAD_BYTES`]): format and dimensions.
    pub head: Bytes,
}

/// A staging file, removed when dropped unless it was moved into place.
#[derive(Debug)]
pub(super) struct StagedFile {
    path: Option<PathBuf>,
}

impl StagedFile {
    /// Rename to `to`, creating its directory if needed; the file is then no longer this one's to remove.
    /// Blocking: call from a blocking thread.
    pub(super) fn move_to(mut self, to: &Path) -> std::io::Result<()> {
        let Some(from) = self.path.take() else { return Ok(()) };
        let moved = match std::fs::rename(&from, to) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.parent().is_some_and(|p| !p.exists()) => {
                to.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::rename(&from, to))
            }
            other => other,
        };
        if moved.is_err() {
            self.path = Some(from);
        }
        moved
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
