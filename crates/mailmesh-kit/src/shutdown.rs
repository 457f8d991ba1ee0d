//! Graceful shutdown in three phases, driven by one [`Shutdown`] handle that accept
//! loops and sessions `select!` on:
//!
//! 1. **draining**: readiness fails; everything else keeps working for
//!    `readiness_grace`, so Kubernetes removes the pod from its Services first;
//! 2. **closing**: accept loops stop taking sessions (front doors answer `421`), open
//!    sessions finish their current transaction and end; they get `drain_timeout`;
//! 3. **stopped**: whatever is left is cut, the admin port closes, the process exits.

use std::future::Future;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use crate::config::ShutdownConfig;
use crate::health::Health;

#[derive(Clone, Default)]
pub struct Shutdown {
    closing: CancellationToken,
    stopped: CancellationToken,
    sessions: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves when accept loops must stop taking new sessions.
    pub fn closing(&self) -> WaitForCancellationFuture<'_> {
        self.closing.cancelled()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.is_cancelled()
    }

    /// Resolves when everything must stop now.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stopped.cancelled()
    }

    /// An owned token for tasks that outlive a borrow of this handle.
    pub fn stopped_token(&self) -> CancellationToken {
        self.stopped.clone()
    }

    /// Spawns a session or background task that drain waits for.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.sessions.spawn(task)
    }

    /// How many tracked tasks are still running.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Runs the three phases. Returns `true` when every session ended by itself.
    pub async fn drain(&self, health: &Health, config: &ShutdownConfig) -> bool {
        health.set_draining();
        tracing::info!(grace = ?config.readiness_grace, "draining: readiness is now failing");
        tokio::time::sleep(config.readiness_grace).await;

        self.closing.cancel();
        self.sessions.close();
        tracing::info!(
            sessions = self.sessions.len(),
            timeout = ?config.drain_timeout,
            "closing: no new sessions, waiting for open ones"
        );
        let clean = tokio::time::timeout(config.drain_timeout, self.sessions.wait())
            .await
            .is_ok();
        if !clean {
            tracing::warn!(
                sessions = self.sessions.len(),
                "drain timeout reached, cutting the remaining sessions"
            );
        }
        self.stopped.cancel();
        clean
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config(grace_ms: u64, drain_ms: u64) -> ShutdownConfig {
        ShutdownConfig {
            readiness_grace: Duration::from_millis(grace_ms),
            drain_timeout: Duration::from_millis(drain_ms),
        }
    }

    #[tokio::test]
    async fn sessions_that_finish_drain_cleanly() {
        let shutdown = Shutdown::new();
        let health = Health::new();
        let s = shutdown.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        shutdown.spawn(async move {
            // A session ends its transaction once closing starts.
            s.closing().await;
            tx.send(()).unwrap();
        });
        assert!(shutdown.drain(&health, &config(10, 5_000)).await);
        assert!(health.is_draining());
        rx.await.unwrap();
        assert_eq!(shutdown.open_sessions(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_sessions_are_cut_at_the_timeout() {
        let shutdown = Shutdown::new();
        let s = shutdown.clone();
        shutdown.spawn(async move {
            // Ignores closing; only `stopped` ends it.
            s.stopped().await;
        });
        let clean = shutdown.drain(&Health::new(), &config(0, 1_000)).await;
        assert!(!clean);
        assert!(shutdown.stopped_token().is_cancelled());
    }
}
