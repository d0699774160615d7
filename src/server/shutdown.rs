//! The shutdown signal: SIGINT (Ctrl-C) or SIGTERM (container stop).

use std::future::Future;

/// Resolves when the process is asked to stop. The handlers are installed when this is *called*, not when the
/// future is first polled, so a signal that arrives right after startup is never the default action (an
/// immediate kill) but a graceful shutdown.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let (mut interrupt, mut terminate) = match (interrupt, terminate) {
                (Ok(i), Ok(t)) => (i, t),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot listen for SIGINT/SIGTERM");
                    return std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
                _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!(signal = "Ctrl-C", "shutdown requested");
    }
}
