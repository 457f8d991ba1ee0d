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
        })
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

    /// An APPEND streamed to storage: chunks go into the sender (after `start`,
    /// which is sent here), the last one marked `end`; the task answers once storage
    /// has stored it (or refused). Dropping the sender without `end` stores nothing.
    pub(crate) fn append_stream(
        &self,
        start: v1::AppendStart,
    ) -> (
        tokio::sync::mpsc::Sender<v1::AppendChunk>,
        tokio::task::JoinHandle<Result<tonic::Response<v1::AppendResponse>, tonic::Status>>,
    ) {
        // A few chunks in flight: the client's speed and storage's pace the copy.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = v1::AppendChunk {
            start: Some(start),
            ..Default::default()
        };
        let chunks = futures::stream::once(async move { first })
            .chain(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|c| (c, rx))
            }));
        let mut client = self.uploads.clone();
        let call = tokio::spawn(async move { client.append_stream(chunks).await });
        (tx, call)
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
        self.mailboxes
            .clone()
            .store_flags(v1::StoreFlagsRequest {
                user: Some(self.at(user)),
                mailbox: mailbox.to_owned(),
                uids: ranges.clone(),
                action: v1::store_flags_request::Action::Add.into(),
                flags: vec!["\\Deleted".into()],
                unchanged_since: None,
            })
            .await?;
        self.mailboxes
            .clone()
            .expunge(v1::ExpungeRequest {
                user: Some(self.at(user)),
                mailbox: mailbox.to_owned(),
                uids: ranges,
            })
            .await?;
        Ok(())
    }
}
