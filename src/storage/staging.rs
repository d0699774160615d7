//! Downloads written to disk as they arrive (local backend only): each image gets a staging file, written and
//! hashed on a blocking thread while the next chunks are still being received, which `ImageStore::put` then
//! renames to the image's content address. The download, its SHA-256 and the object write overlap instead of
//! running one after another, and no image is held whole in memory (docs/performance.md).
//!
//! A blocking thread is taken only to write what has arrived (one batch at a time per file), never to wait for
//! the network: a slow image host cannot tie up the blocking pool that serving links and other writes share.
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
use tokio::task::JoinHandle;

use super::StoreError;

/// How much of the start of an image is kept in memory: enough for its signature and its dimensions (a JPEG's
/// frame header may follow up to 64 KiB of metadata per segment).
pub const HEAD_BYTES: usize = 256 * 1024;

/// Bytes received and not yet handed to the writer, at most, while it writes the previous batch: beyond this,
/// receiving waits, so a slow disk holds back the download instead of filling memory.
const MAX_WAITING: usize = 1024 * 1024;

/// The least a batch holds (but the last): each batch costs a hand-over to a blocking thread, and a download
/// arrives in chunks of a few KiB when the network is slower than the reader.
const MIN_BATCH: usize = 256 * 1024;

/// Chunks smaller than this are copied together into one buffer rather than queued one by one: a host that
/// sends its image a few bytes at a time costs a copy, not a queue entry (and a `writev` slice) per chunk.
const SMALL_CHUNK: usize = 64 * 1024;

/// Staging files not written for this long when the store opens were left by a process that stopped
/// mid-download: a live download writes at least every 256 KiB, and `images.download.timeout` defaults to 60 s.
/// (Another replica sharing the directory may be writing the newer ones: they are left alone.)
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Where staging files are made; cheap to clone.
#[derive(Debug, Clone)]
pub struct Stager {
    dir: Arc<PathBuf>,
    /// The local backend's objects, where a staged image is moved once stored.
    files: Arc<object_store::local::LocalFileSystem>,
}

impl Stager {
    /// Stage in `dir` (created if missing; on the file system of `files`, so a staged image is moved by a
    /// rename), removing staging files left there by a stopped process.
    pub(super) fn open(dir: PathBuf, files: Arc<object_store::local::LocalFileSystem>) -> std::io::Result<Self> {
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
        Ok(Self { dir: Arc::new(dir), files })
    }

    /// A new staging file, written on blocking threads as chunks are handed to it. The file is made here (one
    /// `open`), so that dropping the [`Staging`] removes it at once, whatever its writer is doing.
    pub fn start(&self) -> Result<Staging, StoreError> {
        self.begin(Some(Sha256::new()))
    }

    /// A new staging file for bytes whose SHA-256 the caller computes as it produces them (a decoder that has
    /// them in its cache): the writer only writes, and [`Staging::finish_hashed`] takes the hash.
    pub fn start_unhashed(&self) -> Result<Staging, StoreError> {
        self.begin(None)
    }

    fn begin(&self, hasher: Option<Sha256>) -> Result<Staging, StoreError> {
        let (file, staged) = create(&self.dir).map_err(StoreError::Staging)?;
        Ok(Staging {
            writer: Writer::Idle(Box::new((file, hasher))),
            waiting: Vec::new(),
            small: BytesMut::new(),
            waiting_bytes: 0,
            len: 0,
            head: BytesMut::new(),
            file: staged,
        })
    }

    /// Move `staged` to `location` among the objects, over an object of the same bytes if there is one
    /// (readers see one or the other, whole).
    pub(super) async fn place(&self, staged: Staged, location: &object_store::path::Path) -> Result<(), StoreError> {
        let to = self.files.path_to_filesystem(location)?;
        tokio::task::spawn_blocking(move || staged.file.move_to(&to))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(StoreError::Staging)
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
    writer: Writer,
    /// Chunks received while the writer was busy, for its next batch (small ones gathered in `small` first).
    waiting: Vec<Bytes>,
    small: BytesMut,
    /// The bytes in `waiting` and `small`.
    waiting_bytes: usize,
    len: u64,
    head: BytesMut,
    file: StagedFile,
}

/// The open file and the hash of what was written to it (unless the caller hashes): here between batches, on a
/// blocking thread during one.
type Sink = Box<(std::fs::File, Option<Sha256>)>;

enum Writer {
    Idle(Sink),
    Writing(JoinHandle<std::io::Result<Sink>>),
    /// A batch failed (its error was returned) or the writer was lost.
    Failed,
}

impl Staging {
    /// Hand `chunk`, the image's next bytes, to the writer: written with what else has arrived once
    /// [`MIN_BATCH`] bytes are waiting and the previous batch is on disk; waits for that batch when
    /// [`MAX_WAITING`] bytes have piled up behind it.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if self.head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.len += chunk.len() as u64;
        self.waiting_bytes += chunk.len();
        if chunk.len() < SMALL_CHUNK {
            self.small.extend_from_slice(&chunk);
            if self.small.len() >= SMALL_CHUNK {
                self.waiting.push(self.small.split().freeze());
            }
        } else {
            self.queue_small();
            self.waiting.push(chunk);
        }
        let done = matches!(&self.writer, Writer::Writing(task) if task.is_finished());
        if (done && self.waiting_bytes >= MIN_BATCH) || self.waiting_bytes > MAX_WAITING {
            self.settle().await?;
        }
        if matches!(self.writer, Writer::Idle(_)) && self.waiting_bytes >= MIN_BATCH {
            self.flush();
        }
        Ok(())
    }

    /// Every chunk is on disk: the staged image.
    pub async fn finish(self) -> Result<Staged, StoreError> {
        self.finish_as(None).await
    }

    /// [`Staging::finish`] for a file of [`Stager::start_unhashed`], whose bytes' SHA-256 is `sha256`.
    pub async fn finish_hashed(self, sha256: [u8; 32]) -> Result<Staged, StoreError> {
        self.finish_as(Some(sha256)).await
    }

    async fn finish_as(mut self, sha256: Option<[u8; 32]>) -> Result<Staged, StoreError> {
        self.settle().await?;
        if self.waiting_bytes > 0 {
            self.flush();
            self.settle().await?;
        }
        let Writer::Idle(sink) = std::mem::replace(&mut self.writer, Writer::Failed) else {
            return Err(StoreError::Task("the staging writer was lost".to_owned()));
        };
        let (_, hasher) = *sink;
        let Some(sha256) = sha256.or_else(|| hasher.map(|h| h.finalize().into())) else {
            return Err(StoreError::Task("a staged image without its SHA-256".to_owned()));
        };
        Ok(Staged { file: self.file, len: self.len, sha256, head: self.head.freeze() })
    }

    /// Queue what is gathered in `small`.
    fn queue_small(&mut self) {
        if !self.small.is_empty() {
            self.waiting.push(self.small.split().freeze());
        }
    }

    /// Start writing the waiting chunks (the writer is idle).
    fn flush(&mut self) {
        let Writer::Idle(sink) = std::mem::replace(&mut self.writer, Writer::Failed) else { return };
        self.queue_small();
        let batch = std::mem::take(&mut self.waiting);
        self.waiting_bytes = 0;
        self.writer = Writer::Writing(tokio::task::spawn_blocking(move || {
            let mut sink = sink;
            let (file, hasher) = &mut *sink;
            if let Some(hasher) = hasher {
                batch.iter().for_each(|chunk| hasher.update(chunk));
            }
            write_all_vectored(file, &batch)?;
            Ok(sink)
        }));
    }

    /// Wait for the batch being written, if any.
    async fn settle(&mut self) -> Result<(), StoreError> {
        let Writer::Writing(task) = &mut self.writer else {
            return match self.writer {
                Writer::Failed => Err(StoreError::Task("the staging writer failed earlier".to_owned())),
                _ => Ok(()),
            };
        };
        let written = task.await;
        self.writer = Writer::Failed;
        let sink = written.map_err(|e| StoreError::Task(e.to_string()))?.map_err(StoreError::Staging)?;
        self.writer = Writer::Idle(sink);
        Ok(())
    }
}

/// Write every chunk of `batch` to `file`, as few `writev` calls as the kernel takes.
fn write_all_vectored(file: &mut std::fs::File, batch: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = batch.iter().map(|c| std::io::IoSlice::new(c)).collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        match file.write_vectored(left) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
        // The directory is made when missing, and the move retried whatever the check would say now: another
        // image of the same shard may have made it meanwhile, between this rename and any look at it.
        let moved = match std::fs::rename(&from, to) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two files moved at the same moment into the same directory that does not exist yet (two answers with the
    /// same new image): both moves succeed, whichever of them makes the directory.
    #[test]
    fn two_moves_into_one_new_directory_both_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        for round in 0..300 {
            let to = dir.path().join(format!("images/{round:03}/object"));
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let movers: Vec<_> = (0..2)
                .map(|_| {
                    let (_, file) = create(&staging).unwrap();
                    let (to, barrier) = (to.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        file.move_to(&to)
                    })
                })
                .collect();
            for mover in movers {
                mover.join().unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
            assert!(to.exists());
        }
    }

    /// A host that sends its image three bytes at a time: the bytes on disk are exact, and what waits for the
    /// writer is a few buffers, not one entry per chunk.
    #[tokio::test]
    async fn tiny_chunks_are_gathered_not_queued_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let stager = Stager::open(dir.path().join("staging"), files).unwrap();
        let image: Vec<u8> = (0..700_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let mut staging = stager.start().unwrap();
        let mut most_waiting = 0;
        for piece in image.chunks(3) {
            staging.write(Bytes::copy_from_slice(piece)).await.unwrap();
            most_waiting = most_waiting.max(staging.waiting.len());
        }
        // At most 1 MiB waits, gathered 64 KiB to a buffer.
        assert!(most_waiting <= 17, "{most_waiting} entries waited");
        let staged = staging.finish().await.unwrap();
        let on_disk = std::fs::read(staged.file.path.as_ref().unwrap()).unwrap();
        assert_eq!(on_disk, image);
        assert_eq!(staged.sha256, <[u8; 32]>::from(Sha256::digest(&image)));
        assert_eq!((staged.len, staged.head.len()), (image.len() as u64, HEAD_BYTES));
    }
}
