//! Password checks with failure limits counted in the cache, shared by every pod and
//! protocol (IMAP, POP3, submission): a client address (an IPv6 /64) over the limit
//! is refused for a while; an account over it is only slowed down (a stranger must
//! not be able to lock a user out). The answer never tells whether the user exists.

use std::fmt::Display;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::Cache;

#[derive(Debug, Clone)]
pub struct LoginLimits {
    pub max_failures: u32,
    pub window: Duration,
    /// Every failed login costs the client this long before the answer; a login to
    /// an account with many recent failures waits five times as long first.
    pub failure_delay: Duration,
    /// Logins being checked at once for one client address (a webmail server or a
    /// NAT logs many users in together); more are told to come back later.
    pub max_parallel: u32,
    /// Once an account has `max_failures` failures in the window, at most one of
    /// its passwords is checked per this long, whoever asks and from whatever
    /// address: for storage, whose callers name the client address themselves (a
    /// compromised front door could name a new one per guess). The owner may be
    /// told to come back a few seconds later, never locked out. `None` at the front
    /// doors, which slow such logins down instead.
    pub account_pace: Option<Duration>,
}

#[derive(Debug)]
pub enum Login<U> {
    Ok(U),
    Invalid,
    /// Too many failures from this client address.
    Throttled,
    /// Too many logins from this client address being checked at once.
    Busy,
    /// The password could not be checked.
    Unavailable,
}

/// Checks `name`'s password with `verify` (given the lower-cased name) within the
/// limits, counted under the front doors' keys (IMAP, POP3 and submission share
/// them). See [`check_in`].
pub async fn check<U, E, F, Fut>(
    cache: &Arc<dyn Cache>,
    client: IpAddr,
    name: &str,
    limits: &LoginLimits,
    verify: F,
) -> Login<U>
where
    E: Display,
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<Option<U>, E>>,
{
    check_in(cache, "", client, name, limits, verify).await
}

/// Checks a password within the limits, with the counters under `scope` (the
/// storage service counts its own, apart from the front doors'):
///
/// - a client address (IPv6: its /64) with `max_failures` failures in the window is
///   refused; logins being checked count against what is left of that budget, so
///   parallel connections cannot guess more than `max_failures` passwords in a
///   window either (the ones over it are told to come back: `Busy`);
/// - at most `max_parallel` logins from one address are checked at once;
/// - an account with `max_failures` failures is slowed down (never locked: a
///   stranger must not lock a user out), but only for addresses that have failed
///   themselves: the owner's right password from a clean address goes through at
///   once;
/// - only failures count; right passwords never lock anyone out, and an unreachable
///   cache lifts the limits rather than stopping logins.
pub async fn check_in<U, E, F, Fut>(
    cache: &Arc<dyn Cache>,
    scope: &str,
    client: IpAddr,
    name: &str,
    limits: &LoginLimits,
    verify: F,
) -> Login<U>
where
    E: Display,
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<Option<U>, E>>,
{
    let name = name.trim().to_ascii_lowercase();
    let window = limits.window;
    let limit = i64::from(limits.max_failures);
    let address = address_key(client);
    let by_ip = format!("{scope}authfail:ip:{address}");
    let in_flight_key = format!("{scope}authtry:ip:{address}");
    let by_name = (!name.is_empty()
        && name.len() <= 320
        && !name.chars().any(|c| c.is_control() || c.is_whitespace()))
    .then(|| format!("{scope}authfail:user:{name}"));
    // Only a name fit for a key goes into the log (no control characters).
    let account = if by_name.is_some() {
        name.clone()
    } else {
        "-".to_owned()
    };
    // A login in flight is counted before the address's failures are read, and a
    // failure is counted before its login leaves the flight: whatever the
    // interleaving, failures plus logins in flight never pass the limit unseen.
    let mut waited = 0;
    let (in_flight, failures) = loop {
        let counted = count(&**cache, &in_flight_key, 1, IN_FLIGHT_TTL).await;
        // Given back when the check ends, even if the caller drops it midway (a
        // session deadline, a closed connection, shutdown).
        let in_flight = InFlight {
            cache: Some(cache.clone()),
            key: in_flight_key.clone(),
            window: IN_FLIGHT_TTL,
        };
        let failures = count(&**cache, &by_ip, 0, window).await;
        if failures >= limit {
            in_flight.release().await;
            tracing::warn!(%client, %account, "login refused: too many failures from this address");
            tokio::time::sleep(limits.failure_delay).await;
            return Login::Throttled;
        }
        if counted > i64::from(limits.max_parallel) {
            in_flight.release().await;
            return Login::Busy;
        }
        if failures + counted <= limit {
            break (in_flight, failures);
        }
        // More logins in flight than failures left: wait a little for them.
        in_flight.release().await;
        waited += 1;
        if waited > 3 {
            tracing::info!(%client, %account, "login deferred: the address's remaining failures are in flight");
            return Login::Busy;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The account's failures, read once: only when they can matter (this address
    // failed too, or the account is paced).
    let account_over = match &by_name {
        Some(key) if failures > 0 || limits.account_pace.is_some() => {
            count(&**cache, key, 0, window).await >= limit
        }
        _ => false,
    };
    // Too many failures on the account: slowed down, never locked out, the same
    // whether the account exists or not — and only for addresses that failed too.
    if failures > 0 && account_over {
        tracing::info!(%client, %account, "slowing down logins to an account with many failures");
        tokio::time::sleep(limits.failure_delay * 5).await;
    }
    if let (Some(pace), Some(key)) = (limits.account_pace, &by_name)
        && account_over
        && count(&**cache, &format!("{key}:pace"), 1, pace).await > 1
    {
        in_flight.release().await;
        tracing::info!(%client, %account, "login deferred: the account's many failures are paced");
        return Login::Busy;
    }
    let verified = match by_name {
        Some(_) => verify(name).await,
        None => Ok(None),
    };
    match verified {
        Ok(Some(user)) => {
            in_flight.release().await;
            Login::Ok(user)
        }
        Ok(None) => {
            tracing::info!(%client, %account, "login failed");
            for key in std::iter::once(&by_ip).chain(by_name.as_ref()) {
                count(&**cache, key, 1, window).await;
            }
            in_flight.release().await;
            tokio::time::sleep(limits.failure_delay).await;
            Login::Invalid
        }
        Err(e) => {
            in_flight.release().await;
            // Not the client's failure: nothing is counted.
            tracing::warn!(error = %e, "authentication unavailable");
            Login::Unavailable
        }
    }
}

/// One login being checked, counted under `key` until released or dropped.
struct InFlight {
    cache: Option<Arc<dyn Cache>>,
    key: String,
    window: Duration,
}

impl InFlight {
    async fn release(mut self) {
        if let Some(cache) = self.cache.take() {
            count(&*cache, &self.key, -1, self.window).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(cache) = self.cache.take() else {
            return;
        };
        let (key, window) = (std::mem::take(&mut self.key), self.window);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                count(&*cache, &key, -1, window).await;
            });
        }
    }
}

/// How long the count of an address's logins in flight outlives its last change
/// began: a check takes seconds, so counts a crashed process never gave back are
/// gone within a minute (they held the address's parallel logins and failure
/// budget for the whole failure window before).
const IN_FLIGHT_TTL: Duration = Duration::from_secs(60);

/// A counter's value after adding `by` (0 when the cache cannot be reached).
async fn count(cache: &dyn Cache, key: &str, by: i64, window: Duration) -> i64 {
    cache.incr(key, by, window).await.unwrap_or(0)
}

/// What failure counts are kept under: the address, or its /64 for IPv6 (one
/// subscriber's whole network).
pub fn address_key(ip: IpAddr) -> String {
    // An IPv4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::memory::MemoryCache;

    const LIMITS: LoginLimits = LoginLimits {
        max_failures: 3,
        window: Duration::from_secs(60),
        failure_delay: Duration::ZERO,
        max_parallel: 4,
        account_pace: None,
    };

    async fn login(cache: &Arc<dyn Cache>, ip: &str, name: &str, right: bool) -> Login<()> {
        check(cache, ip.parse().unwrap(), name, &LIMITS, |_| async move {
            Ok::<_, String>(right.then_some(()))
        })
        .await
    }

    #[tokio::test]
    async fn right_passwords_never_count_and_wrong_ones_refuse_the_address() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        for _ in 0..20 {
            assert!(matches!(
                login(&cache, "192.0.2.1", "a@x", true).await,
                Login::Ok(())
            ));
        }
        for _ in 0..3 {
            assert!(matches!(
                login(&cache, "192.0.2.1", "a@x", false).await,
                Login::Invalid
            ));
        }
        // Refused now, even with the right password; another address is not.
        assert!(matches!(
            login(&cache, "192.0.2.1", "a@x", true).await,
            Login::Throttled
        ));
        assert!(matches!(
            login(&cache, "192.0.2.2", "a@x", true).await,
            Login::Ok(())
        ));
        // The IPv4-mapped form is the same client.
        assert!(matches!(
            login(&cache, "::ffff:192.0.2.1", "b@x", true).await,
            Login::Throttled
        ));
    }

    /// Many right logins at once from one address (a webmail server) all succeed up
    /// to max_parallel; the one over it is told to come back, and nothing is left
    /// counted against the address afterwards.
    #[tokio::test]
    async fn parallel_logins_are_bounded_but_never_counted_as_failures() {
        const LIMITS: LoginLimits = LoginLimits {
            max_failures: 10,
            ..super::tests::LIMITS
        };
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        // Held while the logins are checked: they all wait inside `verify`.
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let held = gate.clone().write_owned().await;
        let entered = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..LIMITS.max_parallel {
            let (cache, gate, entered) = (cache.clone(), gate.clone(), entered.clone());
            tasks.push(tokio::spawn(async move {
                check(
                    &cache,
                    "192.0.2.9".parse().unwrap(),
                    &format!("u{i}@x"),
                    &LIMITS,
                    |_| async move {
                        entered.fetch_add(1, Ordering::SeqCst);
                        drop(gate.read().await);
                        Ok::<_, String>(Some(()))
                    },
                )
                .await
            }));
        }
        while entered.load(Ordering::SeqCst) < LIMITS.max_parallel {
            tokio::task::yield_now().await;
        }
        let late = check(
            &cache,
            "192.0.2.9".parse().unwrap(),
            "late@x",
            &LIMITS,
            |_| async { Ok::<_, String>(Some(())) },
        )
        .await;
        assert!(matches!(late, Login::Busy));
        drop(held);
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Login::Ok(())));
        }
        assert_eq!(
            cache
                .incr("authtry:ip:192.0.2.9", 0, LIMITS.window)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            cache
                .incr("authfail:ip:192.0.2.9", 0, LIMITS.window)
                .await
                .unwrap(),
            0
        );
        assert!(matches!(
            login(&cache, "192.0.2.9", "late@x", true).await,
            Login::Ok(())
        ));
    }

    /// A burst of parallel connections from one address guesses at most
    /// `max_failures` passwords in a window: the attempts in flight count against
    /// what is left (73 guesses got through before).
    #[tokio::test(start_paused = true)]
    async fn parallel_guesses_stay_within_the_failure_limit() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let limits = LoginLimits {
            max_failures: 3,
            window: Duration::from_secs(600),
            failure_delay: Duration::from_secs(1),
            max_parallel: 64,
            account_pace: None,
        };
        let guessed = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..60 {
            let (cache, limits, guessed) = (cache.clone(), limits.clone(), guessed.clone());
            tasks.push(tokio::spawn(async move {
                check(
                    &cache,
                    "192.0.2.66".parse().unwrap(),
                    &format!("victim{}@x", i % 3),
                    &limits,
                    |_| async move {
                        guessed.fetch_add(1, Ordering::SeqCst);
                        // An Argon2 check takes a while: every connection is in flight.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<Option<()>, String>(None)
                    },
                )
                .await
            }));
        }
        let mut invalid = 0;
        for t in tasks {
            match t.await.unwrap() {
                Login::Invalid => invalid += 1,
                Login::Busy | Login::Throttled => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(guessed.load(Ordering::SeqCst), 3, "passwords checked");
        assert_eq!(invalid, 3);
        // And the address is refused for the rest of the window.
        let after = check(
            &cache,
            "192.0.2.66".parse().unwrap(),
            "victim0@x",
            &limits,
            |_| async { Ok::<_, String>(Some(())) },
        )
        .await;
        assert!(matches!(after, Login::Throttled));
    }

    /// Strangers who fail on an account slow down their own further attempts on it,
    /// but the owner's right password from an address with no failures goes through
    /// without the penalty (an attacker could add 5 s to every login before).
    #[tokio::test(start_paused = true)]
    async fn the_account_penalty_spares_clean_addresses() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let limits = LoginLimits {
            max_failures: 3,
            window: Duration::from_secs(600),
            failure_delay: Duration::from_secs(1),
            max_parallel: 4,
            account_pace: None,
        };
        let attempt = |ip: &'static str, right: bool| {
            let (cache, limits) = (cache.clone(), limits.clone());
            async move {
                let started = tokio::time::Instant::now();
                let login = check(
                    &cache,
                    ip.parse().unwrap(),
                    "victim@x",
                    &limits,
                    |_| async move { Ok::<_, String>(right.then_some(())) },
                )
                .await;
                (login, started.elapsed())
            }
        };
        for ip in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
            assert!(matches!(attempt(ip, false).await.0, Login::Invalid));
        }
        // The account is over the limit now. An address that failed before waits
        // 5 s before its password is even checked, plus the 1 s of a failure.
        let (login, took) = attempt("198.51.100.1", false).await;
        assert!(matches!(login, Login::Invalid));
        assert_eq!(took, Duration::from_secs(6));
        // The owner, from a clean address: at once.
        let (login, took) = attempt("203.0.113.7", true).await;
        assert!(matches!(login, Login::Ok(())));
        assert_eq!(took, Duration::ZERO);
    }

    /// An account with many failures is slowed down, not locked: its owner still
    /// gets in from another address.
    #[tokio::test]
    async fn an_account_is_never_locked_out_by_strangers() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        for i in 0..5 {
            let ip = format!("198.51.100.{i}");
            assert!(matches!(
                login(&cache, &ip, "victim@x", false).await,
                Login::Invalid
            ));
        }
        assert!(matches!(
            login(&cache, "203.0.113.1", "victim@x", true).await,
            Login::Ok(())
        ));
    }

    /// Storage's callers name the client address: one naming a new address per
    /// guess escapes every address limit, so an account past its failures gets one
    /// check per pace, whatever the address; the owner gets in once the pace
    /// allows.
    #[tokio::test]
    async fn an_account_past_its_failures_is_paced_across_addresses() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let limits = LoginLimits {
            account_pace: Some(Duration::from_secs(2)),
            ..LIMITS
        };
        let checked = Arc::new(AtomicU32::new(0));
        let attempt = |i: u32, right: bool| {
            let (cache, limits, checked) = (cache.clone(), limits.clone(), checked.clone());
            async move {
                check(
                    &cache,
                    format!("198.51.100.{i}").parse().unwrap(),
                    "victim@x",
                    &limits,
                    |_| async move {
                        checked.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, String>(right.then_some(()))
                    },
                )
                .await
            }
        };
        for i in 0..3 {
            assert!(matches!(attempt(i, false).await, Login::Invalid));
        }
        // 100 guesses from 100 new addresses: one is checked.
        let mut busy = 0;
        for i in 10..110 {
            match attempt(i, false).await {
                Login::Busy => busy += 1,
                Login::Invalid => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((busy, checked.load(Ordering::SeqCst)), (99, 4));
        // The owner: told to come back, then in.
        assert!(matches!(attempt(200, true).await, Login::Busy));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(matches!(attempt(200, true).await, Login::Ok(())));
    }

    #[tokio::test]
    async fn an_unavailable_directory_counts_nothing() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        for _ in 0..5 {
            let r = check(
                &cache,
                "192.0.2.3".parse().unwrap(),
                "a@x",
                &LIMITS,
                |_| async { Err::<Option<()>, _>("down") },
            )
            .await;
            assert!(matches!(r, Login::Unavailable));
        }
        assert!(matches!(
            login(&cache, "192.0.2.3", "a@x", true).await,
            Login::Ok(())
        ));
    }

    /// A login dropped while its password is checked (the session's deadline, a
    /// closed connection) gives its in-flight count back.
    #[tokio::test]
    async fn a_dropped_login_is_not_left_in_flight() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let key = "authtry:ip:192.0.2.7";
        let stuck = check(&cache, "192.0.2.7".parse().unwrap(), "a@x", &LIMITS, |_| {
            std::future::pending::<Result<Option<()>, String>>()
        });
        let cut = tokio::time::timeout(Duration::from_millis(50), stuck).await;
        assert!(cut.is_err(), "the check cannot end on its own");
        // The drop hands the decrement to a task.
        for _ in 0..100 {
            if cache.incr(key, 0, LIMITS.window).await.unwrap() == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the dropped login is still counted in flight");
    }
}
