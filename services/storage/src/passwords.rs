//! Password hashing and checking (Argon2id, 19 MiB and two passes each) on a few
//! dedicated threads. Run on the shared blocking pool, a burst of logins ran one
//! hash per login at once: 32 parallel logins held 5 GB, kept afterwards by the
//! allocator's per-thread arenas. Here at most `threads` run at a time, always on
//! the same threads (so the same arenas), and a bounded queue refuses the excess:
//! a login flood gets "try later", not the memory of the process.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

pub struct PasswordPool {
    jobs: SyncSender<Job>,
}

/// The queue was full: too many checks waiting.
#[derive(Debug, thiserror::Error)]
#[error("too many password checks waiting")]
pub struct Busy;

impl PasswordPool {
    /// `threads` workers (at least one) and up to `queue` jobs waiting.
    pub fn new(threads: usize, queue: usize) -> Self {
        let (jobs, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            std::thread::Builder::new()
                .name(format!("passwords-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only to take the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(),
                            // The pool was dropped.
                            Err(_) => return,
                        }
                    }
                })
                .expect("starting a password thread");
        }
        Self { jobs }
    }

    /// Runs `f` on a pool thread and returns its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, Busy> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => return Err(Busy),
        }
        rx.await.map_err(|_| Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_a_full_queue_refuses() {
        let pool = Arc::new(PasswordPool::new(1, 1));
        assert_eq!(pool.run(|| 2 + 2).await.unwrap(), 4);
        // Block the only thread, fill the queue: the next job is refused.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let p = pool.clone();
        let blocked = tokio::spawn(async move { p.run(move || wait.recv().is_ok()).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let p = pool.clone();
        let queued = tokio::spawn(async move { p.run(|| 1).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(matches!(pool.run(|| 0).await, Err(Busy)));
        release.send(()).unwrap();
        assert!(blocked.await.unwrap().unwrap());
        assert_eq!(queued.await.unwrap().unwrap(), 1);
    }
}
