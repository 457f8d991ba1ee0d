//! What the gateway needs from the storage service, over its gRPC API: one
//! connection shared by every session (any pod serves any user; storage is the only
//! state).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use mailmesh_proto::v1;
use mailmesh_proto::v1::directory_client::DirectoryClient;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use tonic::codegen::{Service, http};
use tonic::transport::Channel;

/// The default of `storage_write_patience`: a storage takeover (a replica killed,
/// its partitions moved) takes 5–12 s; clients wait a minute or more.
pub const WRITE_PATIENCE: Duration = Duration::from_secs(30);

/// The first pause before a write is sent again; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Whether a failed write may have been applied all the same: storage, or the way
/// to it, failed without saying (the replica died, the connection broke, the call
/// timed out). Any other status is storage's own answer: nothing changed.
pub(crate) fn unknown_outcome(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// A new request id, as sent in `mailmesh-request-id`.
fn new_request_id() -> tonic::metadata::AsciiMetadataValue {
    uuid::Uuid::new_v4()
        .to_string()
        .parse()
        .expect("a UUID is valid metadata")
}

/// Makes `call` with `message` under request id `id`, and again (same id) while its
/// outcome is unknown, until `patience` from the first attempt has passed. Storage
/// applies a request once and answers a repeat with the first outcome, so what
/// comes back is what happened; an unknown outcome comes back only when storage
/// stayed unreachable for the whole patience.
async fn resend<C, M, T, F, Fut>(
    client: &C,
    id: &tonic::metadata::AsciiMetadataValue,
    patience: Duration,
    message: M,
    call: F,
) -> Result<tonic::Response<T>, tonic::Status>
where
    C: Clone,
    M: Clone,
    F: Fn(C, tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = tokio::time::Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        let mut request = tonic::Request::new(message.clone());
        request
            .metadata_mut()
            .insert(mailmesh_proto::REQUEST_ID_METADATA, id.clone());
        match call(client.clone(), request).await {
            Err(status) if unknown_outcome(&status) && started.elapsed() + pause < patience => {
                tracing::info!(%status, "a storage write's outcome is unknown: sending it again");
                crate::metrics::event("storage", "write_resent");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(status) if unknown_outcome(&status) => {
                tracing::warn!(%status, ?patience, "a storage write's outcome stayed unknown");
                crate::metrics::event("storage", "write_unknown");
                return Err(status);
            }
            outcome => return outcome,
        }
    }
}

/// Users whose log positions a gateway keeps: those used within the last two
/// generations of this many (a user with a session here is used on every call).
const POSITIONS_PER_GENERATION: usize = 50_000;

/// How far storage had applied each user's log in the latest reply this gateway got
/// for them (a reply's `mailmesh-position`, a change's `position`). Every call for
/// the user carries it back (`UserRef.position`), so whichever storage replica
/// answers has applied at least that much: a session sees its own writes and never
/// an older state than it has shown its client, and no read writes to the log.
#[derive(Clone, Default)]
pub(crate) struct Positions(Arc<Mutex<Generations>>);

#[derive(Default)]
struct Generations {
    current: HashMap<String, u64>,
    previous: HashMap<String, u64>,
}

impl Positions {
    pub(crate) fn advance(&self, user_id: &str, position: u64) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let known = g.previous.remove(user_id).unwrap_or(0);
        let slot = g.current.entry(user_id.to_owned()).or_insert(known);
        *slot = (*slot).max(position);
        if g.current.len() >= POSITIONS_PER_GENERATION {
            g.previous = std::mem::take(&mut g.current);
        }
    }

    fn of(&self, user_id: &str) -> u64 {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.current
            .get(user_id)
            .or_else(|| g.previous.get(user_id))
            .copied()
            .unwrap_or(0)
    }

    /// Takes the position a storage reply carries (`<user id> <position>`).
    fn note(&self, headers: &http::HeaderMap) {
        let seen = headers
            .get(mailmesh_proto::POSITION_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .and_then(|(user, at)| Some((user, at.parse().ok()?)));
        if let Some((user, at)) = seen {
            self.advance(user, at);
        }
    }
}

/// The storage channel, noting the position every reply carries.
#[derive(Clone)]
pub(crate) struct Tracked {
    inner: Channel,
    positions: Positions,
}

impl Service<http::Request<tonic::body::Body>> for Tracked {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let positions = self.positions.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            positions.note(response.headers());
            Ok(response)
        })
    }
}

/// Storage did not answer, or answered something unusable; the client hears a
/// temporary error.
#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StoreError(pub String);

impl From<tonic::Status> for StoreError {
    fn from(s: tonic::Status) -> Self {
        Self(format!("{:?}: {}", s.code(), s.message()))
    }
}

/// A message in a mailbox listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub uid: u32,
    pub size: u64,
    pub flags: Vec<String>,
}

/// A user logged in through this gateway: their reference carries the session
/// token storage gave (every mailbox call needs it, ADR 0006), renewed from
/// `renew_at_ms` on.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub user: v1::UserRef,
    pub renew_at_ms: i64,
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn renew_at(expires_ms: i64) -> i64 {
    let now = now_ms();
    now + expires_ms.saturating_sub(now) / 2
}

#[derive(Clone)]
pub struct Store {
    directory: DirectoryClient<Channel>,
    mailboxes: MailboxesClient<Tracked>,
    /// For uploads that take as long as the client takes (no call timeout).
    uploads: MailboxesClient<Tracked>,
    positions: Positions,
    write_patience: Duration,
}

/// A streamed APPEND under way ([`Store::append_stream`]).
pub(crate) struct Upload {
    /// Answers once storage has stored the message (or refused).
    pub call: tokio::task::JoinHandle<Result<tonic::Response<v1::AppendResponse>, tonic::Status>>,
    /// What started it and its request id, to finish it if the answer is lost.
    start: v1::AppendStart,
    id: tonic::metadata::AsciiMetadataValue,
}

impl Store {
    /// Connects lazily (mutual TLS, as the `gateway` role): the first call reaches
    /// the service.
    pub fn new(
        endpoint: &str,
        max_message_bytes: usize,
        tls: &mailmesh_kit::internal::InternalTls,
    ) -> anyhow::Result<Self> {
        // A call that takes longer fails (the client hears [SYS/TEMP]); for Fetch the
        // limit covers the start of the stream.
        let base = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect_timeout(Duration::from_secs(5));
        let channel = tls.channel(
            base.clone().timeout(Duration::from_secs(30)),
            mailmesh_kit::internal::Role::Storage,
        );
        let positions = Positions::default();
        let tracked = |inner| Tracked {
            inner,
            positions: positions.clone(),
        };
        let uploads = MailboxesClient::new(tracked(
            tls.channel(base, mailmesh_kit::internal::Role::Storage),
        ));
        Ok(Self {
            directory: DirectoryClient::new(channel.clone()),
            mailboxes: MailboxesClient::new(tracked(channel))
                .max_decoding_message_size(max_message_bytes.saturating_add(64 << 10)),
            uploads,
            positions,
            write_patience: WRITE_PATIENCE,
        })
    }

    /// How long a write with an unknown outcome is sent again (`storage_write_patience`).
    pub fn with_write_patience(mut self, patience: Duration) -> Self {
        self.write_patience = patience;
        self
    }

    /// A mailbox write: `call` makes it on the mailbox API with the request given,
    /// which carries a request id; while its outcome is unknown it is made again
    /// with the same id (storage applies it once), for up to the write patience.
    pub(crate) async fn write<M, T, F, Fut>(
        &self,
        message: M,
        call: F,
    ) -> Result<tonic::Response<T>, tonic::Status>
    where
        M: Clone,
        F: Fn(MailboxesClient<Tracked>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        resend(
            &self.mailboxes,
            &new_request_id(),
            self.write_patience,
            message,
            call,
        )
        .await
    }

    /// The mailbox API, for the IMAP session's many calls. Give each the user
    /// through [`Self::at`].
    pub(crate) fn mailboxes(&self) -> MailboxesClient<Tracked> {
        self.mailboxes.clone()
    }

    /// `user` for a mailbox call: with the position of their log the latest reply
    /// gave, which the answering replica must have applied.
    pub(crate) fn at(&self, user: &v1::UserRef) -> v1::UserRef {
        v1::UserRef {
            position: self.positions.of(&user.user_id).max(user.position),
            ..user.clone()
        }
    }

    /// A change storage announced: calls for the user wait until it is applied.
    pub(crate) fn advance(&self, user: &v1::UserRef, position: u64) {
        self.positions.advance(&user.user_id, position);
    }

    /// An APPEND streamed to storage under a request id: chunks go into the
    /// sender (after `start`, which is sent here), the last one marked `end`;
    /// `Upload::call` answers once storage has stored it (or refused). Dropping the
    /// sender without `end` stores nothing.
    pub(crate) fn append_stream(
        &self,
        start: v1::AppendStart,
    ) -> (tokio::sync::mpsc::Sender<v1::AppendChunk>, Upload) {
        // A few chunks in flight: the client's speed and storage's pace the copy.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = v1::AppendChunk {
            start: Some(start.clone()),
            ..Default::default()
        };
        let chunks = futures::stream::once(async move { first })
            .chain(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|c| (c, rx))
            }));
        let id = new_request_id();
        let mut request = tonic::Request::new(chunks);
        request
            .metadata_mut()
            .insert(mailmesh_proto::REQUEST_ID_METADATA, id.clone());
        let mut client = self.uploads.clone();
        let call = tokio::spawn(async move { client.append_stream(request).await });
        (tx, Upload { call, start, id })
    }

    /// Finishes a streamed APPEND whose whole body was sent but whose answer was
    /// lost: storage indexes what that attempt stored, or answers its outcome, or
    /// gives the request up (`FailedPrecondition`: certainly not stored). Sent
    /// again while the outcome is unknown, as any write.
    pub(crate) async fn resume_append(
        &self,
        upload: &Upload,
    ) -> Result<tonic::Response<v1::AppendResponse>, tonic::Status> {
        let start = v1::AppendStart {
            resume: true,
            ..upload.start.clone()
        };
        resend(
            &self.mailboxes,
            &upload.id,
            self.write_patience,
            start,
            |mut client, request| async move {
                let (metadata, extensions, start) = request.into_parts();
                let only = v1::AppendChunk {
                    start: Some(start),
                    end: true,
                    ..Default::default()
                };
                client
                    .append_stream(tonic::Request::from_parts(
                        metadata,
                        extensions,
                        futures::stream::iter([only]),
                    ))
                    .await
            },
        )
        .await
    }

    /// The user behind `address` and `password`, `None` when either is wrong (which
    /// one is never said). Disabled users cannot log in. `client` is the address
    /// the user connects from (storage counts failures by it too).
    pub async fn authenticate(
        &self,
        address: &str,
        password: &str,
        client: std::net::IpAddr,
    ) -> Result<Option<LoggedIn>, StoreError> {
        let r = self
            .directory
            .clone()
            .authenticate(v1::AuthenticateRequest {
                address: address.to_owned(),
                password: password.to_owned(),
                client_ip: client.to_string(),
            })
            .await?
            .into_inner();
        Ok(match (r.ok, r.user) {
            (true, Some(info)) if info.enabled => info.user.map(|user| LoggedIn {
                user,
                renew_at_ms: renew_at(r.session_expires_ms),
            }),
            _ => None,
        })
    }

    /// A new session token for `user`; `None` when storage has ended the session
    /// (the account was disabled or removed, or the token expired).
    pub async fn refresh(&self, user: &v1::UserRef) -> Result<Option<LoggedIn>, StoreError> {
        match self.directory.clone().refresh_session(user.clone()).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok(r.user.map(|user| LoggedIn {
                    user,
                    renew_at_ms: renew_at(r.expires_ms),
                }))
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// The messages of `mailbox`, by UID, with its UIDVALIDITY.
    pub async fn list(
        &self,
        user: &v1::UserRef,
        mailbox: &str,
    ) -> Result<(u32, Vec<Listed>), StoreError> {
        let r = self
            .mailboxes
            .clone()
            .list_messages(v1::MailboxRequest {
                user: Some(self.at(user)),
                mailbox: mailbox.to_owned(),
            })
            .await?
            .into_inner();
        let mut messages: Vec<Listed> = r
            .messages
            .into_iter()
            .map(|m| Listed {
                uid: m.uid,
                size: m.size,
                flags: m.flags,
            })
            .collect();
        messages.sort_by_key(|m| m.uid);
        Ok((r.uid_validity, messages))
    }

    /// The whole message (NotFound when it was expunged meanwhile).
    pub async fn fetch(
        &self,
        user: &v1::UserRef,
        mailbox: &str,
        uid: u32,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .mailboxes
            .clone()
            .fetch(v1::FetchRequest {
                user: Some(self.at(user)),
                mailbox: mailbox.to_owned(),
                uid,
                start: 0,
                end: 0,
            })
            .await?
            .into_inner();
        let mut message = Vec::new();
        while let Some(chunk) = stream.next().await {
            message.extend_from_slice(&chunk?.data);
        }
        Ok(message)
    }

    /// Flags `uids` `\Deleted` and expunges exactly those.
    pub async fn remove(
        &self,
        user: &v1::UserRef,
        mailbox: &str,
        uids: &[u32],
    ) -> Result<(), StoreError> {
        if uids.is_empty() {
            return Ok(());
        }
        let ranges: Vec<v1::UidRange> = uids
            .iter()
            .map(|&uid| v1::UidRange {
                first: uid,
                last: uid,
            })
            .collect();
        self.write(
            v1::StoreFlagsRequest {
                user: Some(self.at(user)),
                mailbox: mailbox.to_owned(),
                uids: ranges.clone(),
                action: v1::store_flags_request::Action::Add.into(),
                flags: vec!["\\Deleted".into()],
                unchanged_since: None,
            },
            |mut c, r| async move { c.store_flags(r).await },
        )
        .await?;
        self.write(
            v1::ExpungeRequest {
                user: Some(self.at(user)),
                mailbox: mailbox.to_owned(),
                uids: ranges,
            },
            |mut c, r| async move { c.expunge(r).await },
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A call that fails with `failures` (in order) and then answers, noting the
    /// request id of every attempt.
    fn flaky(
        failures: Vec<tonic::Code>,
        seen: Arc<Mutex<Vec<String>>>,
    ) -> impl Fn(
        (),
        tonic::Request<u32>,
    ) -> futures::future::Ready<Result<tonic::Response<u32>, tonic::Status>> {
        let attempt = Arc::new(AtomicUsize::new(0));
        move |(), request| {
            let id = request
                .metadata()
                .get(mailmesh_proto::REQUEST_ID_METADATA)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            seen.lock().unwrap().push(id);
            let n = attempt.fetch_add(1, Ordering::SeqCst);
            futures::future::ready(match failures.get(n) {
                Some(code) => Err(tonic::Status::new(*code, "failed")),
                None => Ok(tonic::Response::new(*request.get_ref())),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_outcome_is_sent_again_under_the_same_id() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let call = flaky(
            vec![
                tonic::Code::Unavailable,
                tonic::Code::DeadlineExceeded,
                tonic::Code::Unknown,
            ],
            seen.clone(),
        );
        let id = new_request_id();
        let answer = resend(&(), &id, WRITE_PATIENCE, 7, call).await.unwrap();
        assert_eq!(answer.into_inner(), 7);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4);
        assert!(seen.iter().all(|s| s == id.to_str().unwrap()), "{seen:?}");
        assert!(uuid::Uuid::try_parse(&seen[0]).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn storage_s_own_answer_is_final() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let call = flaky(vec![tonic::Code::AlreadyExists], seen.clone());
        let e = resend(&(), &new_request_id(), WRITE_PATIENCE, 7, call)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_unknown_for_the_whole_patience_is_given_back() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let call = flaky(vec![tonic::Code::Unavailable; 1000], seen.clone());
        let patience = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let e = resend(&(), &new_request_id(), patience, 7, call)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let attempts = seen.lock().unwrap().len();
        // Sent at 0, 0.1, 0.3, 0.7, 1.5, 3.1, 5.1, 7.1 and 9.1 s; the next would
        // come after the patience.
        assert_eq!(attempts, 9);
        assert!(started.elapsed() <= patience);
    }
}
