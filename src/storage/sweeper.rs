//! The background task that deletes expired images: every `images.sweep_interval`, one [`ImageStore::sweep`].
//! A sweep in progress stops between two objects once its token is cancelled (each object goes with its row in
//! one transaction), so stopping never leaves a row without its object.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ImageStore;

/// A running sweeper; [`Sweeper::stop`] ends it.
pub struct Sweeper {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Sweeper {
    /// Start sweeping `store` every `every` (the first sweep runs at once, catching up after downtime).
    pub fn start(store: ImageStore, every: Duration) -> Self {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // Not raced against the token: a sweep stops between objects on its own.
                match store.sweep(&token).await {
                    Ok((0, 0)) => {}
                    Ok((links, objects)) => tracing::info!(links, objects, "deleted expired images"),
                    Err(e) => tracing::warn!(error = %e, "image sweep failed; retrying at the next interval"),
                }
            }
            tracing::debug!("image sweeper stopped");
        });
        Self { cancel, task }
    }

    /// Stop and wait for the task to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "image sweeper ended abnormally");
        }
    }
}
