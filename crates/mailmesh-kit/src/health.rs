//! Liveness and readiness. Liveness is the process answering; readiness is "send me
//! traffic": false while starting (until the service's listeners are open), while
//! draining and while any dependency check fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

/// A dependency a service needs to do its work (broker, object store, cache, …).
#[async_trait]
pub trait ReadinessCheck: Send + Sync {
    /// A short, low-cardinality name such as `queue` or `object-store`.
    fn name(&self) -> &str;
    /// `Ok` when the dependency answers.
    async fn check(&self) -> Result<(), String>;
}

/// A fault that only a restart mends (`/livez` fails while it lasts).
pub trait LivenessCheck: Send + Sync {
    fn name(&self) -> &str;
    /// `Some(why)` when the process is stuck.
    fn stuck(&self) -> Option<String>;
}

/// A service's health as the admin port reports it.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    starting: AtomicBool,
    draining: AtomicBool,
    checks: std::sync::RwLock<Vec<Arc<dyn ReadinessCheck>>>,
    liveness: std::sync::RwLock<Vec<Arc<dyn LivenessCheck>>>,
}

/// The outcome of a readiness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Not serving yet (storage replays its logs before it listens, for example).
    Starting,
    Draining,
    /// Names and errors of the failing dependencies.
    Unavailable(Vec<(String, String)>),
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_check(&self, check: Arc<dyn ReadinessCheck>) {
        self.inner
            .checks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(check);
    }

    pub fn add_liveness(&self, check: Arc<dyn LivenessCheck>) {
        self.inner
            .liveness
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(check);
    }

    /// Names and descriptions of the faults only a restart mends; empty when live.
    pub fn stuck(&self) -> Vec<(String, String)> {
        self.inner
            .liveness
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|c| c.stuck().map(|why| (c.name().to_owned(), why)))
            .collect()
    }

    /// Not ready until [`Self::set_started`]: `Service::start` sets this, and the
    /// service's `wait_and_drain` ends it once the listeners are open.
    pub fn set_starting(&self) {
        self.inner.starting.store(true, Ordering::SeqCst);
    }

    pub fn set_started(&self) {
        self.inner.starting.store(false, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Runs every dependency check concurrently, each bounded by `timeout`.
    pub async fn readiness(&self, timeout: Duration) -> Readiness {
        if self.is_draining() {
            return Readiness::Draining;
        }
        if self.inner.starting.load(Ordering::SeqCst) {
            return Readiness::Starting;
        }
        let checks = self
            .inner
            .checks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let results = futures::future::join_all(checks.iter().map(|c| async move {
            let outcome = match tokio::time::timeout(timeout, c.check()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            (c.name().to_owned(), outcome)
        }))
        .await;
        let failing: Vec<(String, String)> = results
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|e| (name, e)))
            .collect();
        if failing.is_empty() {
            Readiness::Ready
        } else {
            Readiness::Unavailable(failing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Result<(), String>);

    #[async_trait]
    impl ReadinessCheck for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        async fn check(&self) -> Result<(), String> {
            self.1.clone()
        }
    }

    struct Hangs;

    #[async_trait]
    impl ReadinessCheck for Hangs {
        fn name(&self) -> &str {
            "hangs"
        }
        async fn check(&self) -> Result<(), String> {
            futures::future::pending().await
        }
    }

    #[tokio::test]
    async fn readiness_reports_failing_checks_and_draining() {
        let health = Health::new();
        health.add_check(Arc::new(Fixed("queue", Ok(()))));
        assert_eq!(
            health.readiness(Duration::from_secs(1)).await,
            Readiness::Ready
        );

        health.add_check(Arc::new(Fixed("cache", Err("refused".into()))));
        health.add_check(Arc::new(Hangs));
        match health.readiness(Duration::from_millis(50)).await {
            Readiness::Unavailable(failing) => {
                let names: Vec<_> = failing.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, ["cache", "hangs"]);
            }
            other => panic!("unexpected {other:?}"),
        }

        health.set_draining();
        assert_eq!(
            health.readiness(Duration::from_secs(1)).await,
            Readiness::Draining
        );
    }

    #[tokio::test]
    async fn not_ready_while_starting() {
        let health = Health::new();
        health.add_check(Arc::new(Fixed("queue", Ok(()))));
        health.set_starting();
        assert_eq!(
            health.readiness(Duration::from_secs(1)).await,
            Readiness::Starting
        );
        health.set_started();
        assert_eq!(
            health.readiness(Duration::from_secs(1)).await,
            Readiness::Ready
        );
    }
}
