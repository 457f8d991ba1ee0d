//! Mailbox calls go to the replica that owns the user's partition (ADR 0005 §1).
//!
//! Callers reach any replica through the Kubernetes Service. [`Routed`] serves a
//! call itself when this replica owns the partition, and otherwise forwards it,
//! once, to the owner over the internal mutual-TLS channel, naming the role it acts
//! for (`mailmesh-forwarded-for`; believed only from a storage peer, which has
//! already checked that role's policy). The owner answers a call for a partition it
//! no longer owns with `NotOwner`, and the forwarder routes it again once the
//! owners map has moved. A write is sent again only after such a refusal (it was
//! not made); reads, deliveries (idempotent by their key) and writes carrying a
//! request id (applied once however often sent, `crate::request`) are also sent
//! again when the owner could not be reached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mailmesh_kit::internal::{InternalTls, Peer, Role, caller};
use mailmesh_proto::v1;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_proto::v1::mailboxes_server::{Mailboxes as MailboxesApi, MailboxesServer};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::EngineError;
use crate::engine::{Peers, StorageEngine};
use crate::grpc::{BoxStream, NOT_OWNER_METADATA, Reply, StorageService, user_ref};
use crate::owners::{Owner, Route};
use futures::future::BoxFuture;
use mailmesh_types::TenantId;

/// The role a forwarded call acts for.
pub const FORWARDED_FOR_METADATA: &str = "mailmesh-forwarded-for";

/// Times a call is routed again after its target refused it.
const ROUTES: usize = 3;

/// How long connecting to another replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The `Mailboxes` service of a replica, routed to partition owners.
#[derive(Clone)]
pub struct Routed {
    local: StorageService,
    engine: Arc<StorageEngine>,
    peers: Arc<PeerChannels>,
    max_message: usize,
}

/// Channels to the other replicas, by address.
struct PeerChannels {
    tls: InternalTls,
    channels: Mutex<HashMap<String, Channel>>,
    max_message: usize,
}

impl PeerChannels {
    fn client(&self, addr: &str) -> Result<MailboxesClient<Channel>, Status> {
        let channel = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            match channels.get(addr) {
                Some(c) => c.clone(),
                None => {
                    let endpoint =
                        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                            .map_err(|e| Status::internal(format!("owner address {addr}: {e}")))?
                            .connect_timeout(CONNECT_TIMEOUT);
                    let channel = self.tls.channel(endpoint, Role::Storage);
                    channels.insert(addr.to_owned(), channel.clone());
                    channel
                }
            }
        };
        Ok(MailboxesClient::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message))
    }
}

impl Peers for PeerChannels {
    fn tenant_usage(
        &self,
        owner: Owner,
        tenant: TenantId,
    ) -> BoxFuture<'static, Result<(u64, Vec<i32>), EngineError>> {
        let client = self.client(&owner.addr);
        Box::pin(async move {
            let answer = client
                .map_err(|s| EngineError::Unavailable(s.to_string()))?
                .tenant_usage(v1::TenantUsageRequest {
                    tenant: tenant.to_string(),
                })
                .await
                .map_err(|s| EngineError::Unavailable(s.to_string()))?
                .into_inner();
            Ok((answer.bytes, answer.partitions))
        })
    }
}

/// Whether `status` was made by this side's client (the owner was not reached,
/// or the connection broke mid-call: `UNAVAILABLE`, `UNKNOWN` "transport error",
/// …): it carries its cause; a status the owner sent does not.
fn unreached(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// May a call that failed with `status` at `owner` be sent again elsewhere?
fn refused(status: &Status, resend_if_unreached: bool) -> bool {
    status.metadata().get(NOT_OWNER_METADATA).is_some()
        || (resend_if_unreached && unreached(status))
}

/// What the caller is told when the owner gave no answer: a temporary failure
/// (the outcome of a write is unknown), never the transport's own code.
fn answered<T>(outcome: Result<T, Status>) -> Result<T, Status> {
    outcome.map_err(|status| {
        if unreached(&status) {
            Status::unavailable(format!(
                "the owner of the mailbox partition did not answer: {}",
                status.message()
            ))
        } else {
            status
        }
    })
}

impl Routed {
    pub fn new(local: StorageService, engine: Arc<StorageEngine>, tls: InternalTls) -> Self {
        let max_message = usize::try_from(engine.config().max_message_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(64 << 10);
        let peers = Arc::new(PeerChannels {
            tls,
            channels: Mutex::new(HashMap::new()),
            max_message,
        });
        engine.set_peers(peers.clone());
        Self {
            local,
            engine,
            peers,
            max_message,
        }
    }

    pub fn server(self) -> MailboxesServer<Self> {
        let max = self.max_message;
        MailboxesServer::new(self).max_decoding_message_size(max)
    }

    /// A call forwarded by another replica is served here as the role it names
    /// (and refused with `NotOwner` if this replica does not own the partition).
    fn forwarded<T>(r: &mut Request<T>) -> Result<bool, Status> {
        let peer = caller(r)?;
        if peer.role != Role::Storage {
            return Ok(false);
        }
        let Some(role) = r.metadata().get(FORWARDED_FOR_METADATA) else {
            return Ok(false);
        };
        let role: Role = role
            .to_str()
            .ok()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| Status::invalid_argument("mailmesh-forwarded-for: unknown role"))?;
        r.extensions_mut().insert(Peer {
            addr: peer.addr,
            role,
        });
        Ok(true)
    }

    /// A forwarded call is served only by the owner: another replica refuses it
    /// at once (the forwarder routes it again), never forwards it on.
    fn here(&self, user: &crate::engine::UserRef) -> Result<(), Status> {
        if self.engine.owns(user) {
            Ok(())
        } else {
            Err(crate::EngineError::NotOwner(self.engine.partition(user)).into())
        }
    }

    fn client(&self, addr: &str) -> Result<MailboxesClient<Channel>, Status> {
        self.peers.client(addr)
    }

    /// The request to send to the owner: the caller's metadata (trace context)
    /// and the role it acts for.
    fn onward<T, U>(r: &Request<T>, message: U) -> Result<Request<U>, Status> {
        Ok(Request::from_parts(
            Self::onward_metadata(r)?,
            tonic::Extensions::default(),
            message,
        ))
    }

    /// The caller's metadata with the role it acts for (replacing any the caller
    /// sent: only this replica says whom it forwards for).
    fn onward_metadata<T>(r: &Request<T>) -> Result<tonic::metadata::MetadataMap, Status> {
        let role = caller(r)?.role;
        let mut metadata = r.metadata().clone();
        metadata.insert(
            FORWARDED_FOR_METADATA,
            role.name()
                .parse()
                .map_err(|_| Status::internal("role name as metadata"))?,
        );
        Ok(metadata)
    }
}

/// The routing of one unary call: served here, or sent to the owner and routed
/// again (at most [`ROUTES`] times) when refused.
macro_rules! routed {
    ($this:ident, $r:ident, $method:ident, $user:expr, resend_if_unreached = $resend:expr) => {
        routed!($this, $r, $method, $user, resend_if_unreached = $resend, then = |answer| answer)
    };
    ($this:ident, $r:ident, $method:ident, $user:expr, resend_if_unreached = $resend:expr, then = $then:expr) => {{
        let mut r = $r;
        let forwarded = Self::forwarded(&mut r)?;
        let user: Option<v1::UserRef> = ($user)(r.get_ref());
        let Ok(user) = user_ref(user) else {
            // Refused here with the field named.
            return $this.local.$method(r).await;
        };
        if forwarded {
            $this.here(&user)?;
            return $this.local.$method(r).await;
        }
        let resend = $resend
            || r.metadata().get(mailmesh_proto::REQUEST_ID_METADATA).is_some();
        let mut not_there: Option<Owner> = None;
        for _ in 0..ROUTES {
            match $this.engine.route(&user, not_there.as_ref()).await? {
                Route::Here => return $this.local.$method(r).await,
                Route::There(owner) => {
                    let onward = Self::onward(&r, r.get_ref().clone())?;
                    match $this.client(&owner.addr)?.$method(onward).await {
                        Err(status) if refused(&status, resend) => {
                            tracing::debug!(replica = %owner.replica, addr = %owner.addr, %status, "routing a call again");
                            crate::metrics::forwarded("rerouted");
                            not_there = Some(owner);
                        }
                        outcome => {
                            crate::metrics::forwarded("answered");
                            return answered(outcome.map($then));
                        }
                    }
                }
            }
        }
        Err(Status::unavailable(
            "the mailbox partition's owner is moving; try again",
        ))
    }};
}

#[tonic::async_trait]
impl MailboxesApi for Routed {
    async fn list_mailboxes(&self, r: Request<v1::UserRef>) -> Reply<v1::ListMailboxesResponse> {
        routed!(
            self,
            r,
            list_mailboxes,
            |r: &v1::UserRef| Some(r.clone()),
            resend_if_unreached = true
        )
    }
    async fn create_mailbox(&self, r: Request<v1::MailboxRequest>) -> Reply<v1::Empty> {
        routed!(
            self,
            r,
            create_mailbox,
            |r: &v1::MailboxRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn rename_mailbox(&self, r: Request<v1::RenameMailboxRequest>) -> Reply<v1::Empty> {
        routed!(
            self,
            r,
            rename_mailbox,
            |r: &v1::RenameMailboxRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn delete_mailbox(&self, r: Request<v1::MailboxRequest>) -> Reply<v1::Empty> {
        routed!(
            self,
            r,
            delete_mailbox,
            |r: &v1::MailboxRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn subscribe(&self, r: Request<v1::SubscribeRequest>) -> Reply<v1::Empty> {
        routed!(
            self,
            r,
            subscribe,
            |r: &v1::SubscribeRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn status(&self, r: Request<v1::MailboxRequest>) -> Reply<v1::MailboxInfo> {
        routed!(
            self,
            r,
            status,
            |r: &v1::MailboxRequest| r.user.clone(),
            resend_if_unreached = true
        )
    }
    async fn list_messages(
        &self,
        r: Request<v1::MailboxRequest>,
    ) -> Reply<v1::ListMessagesResponse> {
        routed!(
            self,
            r,
            list_messages,
            |r: &v1::MailboxRequest| r.user.clone(),
            resend_if_unreached = true
        )
    }
    // Deliveries carry their key: a second copy stores nothing.
    async fn deliver(&self, r: Request<v1::DeliverRequest>) -> Reply<v1::AppendResponse> {
        routed!(
            self,
            r,
            deliver,
            |r: &v1::DeliverRequest| r.user.clone(),
            resend_if_unreached = true
        )
    }
    async fn append(&self, r: Request<v1::AppendRequest>) -> Reply<v1::AppendResponse> {
        routed!(
            self,
            r,
            append,
            |r: &v1::AppendRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn store_flags(
        &self,
        r: Request<v1::StoreFlagsRequest>,
    ) -> Reply<v1::StoreFlagsResponse> {
        routed!(
            self,
            r,
            store_flags,
            |r: &v1::StoreFlagsRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn copy(&self, r: Request<v1::CopyRequest>) -> Reply<v1::CopyResponse> {
        routed!(
            self,
            r,
            copy,
            |r: &v1::CopyRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn expunge(&self, r: Request<v1::ExpungeRequest>) -> Reply<v1::ExpungeResponse> {
        routed!(
            self,
            r,
            expunge,
            |r: &v1::ExpungeRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn search(&self, r: Request<v1::SearchRequest>) -> Reply<v1::SearchResponse> {
        routed!(
            self,
            r,
            search,
            |r: &v1::SearchRequest| r.user.clone(),
            resend_if_unreached = true
        )
    }
    async fn quota(&self, r: Request<v1::UserRef>) -> Reply<v1::QuotaResponse> {
        routed!(
            self,
            r,
            quota,
            |r: &v1::UserRef| Some(r.clone()),
            resend_if_unreached = true
        )
    }
    async fn has_room(&self, r: Request<v1::RoomRequest>) -> Reply<v1::RoomResponse> {
        routed!(
            self,
            r,
            has_room,
            |r: &v1::RoomRequest| r.user.clone(),
            resend_if_unreached = true
        )
    }
    async fn vanished(&self, r: Request<v1::VanishedRequest>) -> Reply<v1::VanishedResponse> {
        routed!(
            self,
            r,
            vanished,
            |r: &v1::VanishedRequest| r.user.clone(),
            resend_if_unreached = true
        )
    }
    async fn claim_recent(
        &self,
        r: Request<v1::ClaimRecentRequest>,
    ) -> Reply<v1::ClaimRecentResponse> {
        routed!(
            self,
            r,
            claim_recent,
            |r: &v1::ClaimRecentRequest| r.user.clone(),
            resend_if_unreached = false
        )
    }
    async fn list_changes(&self, r: Request<v1::ChangesRequest>) -> Reply<v1::ChangesResponse> {
        routed!(
            self,
            r,
            list_changes,
            |r: &v1::ChangesRequest| r.user.clone(),
            resend_if_unreached = true
        )
    }

    /// The first chunk names the user; the rest follows it to wherever that
    /// leads. Never sent twice (the stream is consumed on the way).
    async fn append_stream(
        &self,
        mut r: Request<tonic::Streaming<v1::AppendChunk>>,
    ) -> Reply<v1::AppendResponse> {
        let forwarded = Self::forwarded(&mut r)?;
        let peer = caller(&r)?;
        let metadata = Self::onward_metadata(&r)?;
        let mut chunks = r.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no chunk"))?;
        let user = first
            .start
            .as_ref()
            .and_then(|s| user_ref(s.user.clone()).ok());
        let route = match (&user, forwarded) {
            (Some(user), false) => self.engine.route(user, None).await?,
            (Some(user), true) => {
                self.here(user)?;
                Route::Here
            }
            (None, _) => Route::Here,
        };
        match route {
            Route::Here => {
                self.local
                    .append_chunks(&peer, first, Box::pin(chunks))
                    .await
            }
            Route::There(owner) => {
                // A broken incoming stream ends the outgoing one early: the owner
                // then refuses the unfinished APPEND and keeps nothing.
                let rest = chunks.take_while(|c| futures::future::ready(c.is_ok()));
                let body = futures::stream::once(futures::future::ready(first))
                    .chain(rest.filter_map(|c| futures::future::ready(c.ok())));
                let onward = Request::from_parts(metadata, tonic::Extensions::default(), body);
                crate::metrics::forwarded("answered");
                answered(self.client(&owner.addr)?.append_stream(onward).await)
            }
        }
    }

    type FetchStream = BoxStream<v1::FetchChunk>;

    async fn fetch(&self, r: Request<v1::FetchRequest>) -> Reply<Self::FetchStream> {
        routed!(
            self,
            r,
            fetch,
            |r: &v1::FetchRequest| r.user.clone(),
            resend_if_unreached = true,
            then = boxed
        )
    }

    async fn tenant_usage(
        &self,
        r: Request<v1::TenantUsageRequest>,
    ) -> Reply<v1::TenantUsageResponse> {
        self.local.tenant_usage(r).await
    }

    type WatchStream = BoxStream<v1::MailboxChange>;

    /// Follows the owner's changes; when the partition moves the stream ends and
    /// the caller watches again (as after any lost stream).
    async fn watch(&self, r: Request<v1::UserRef>) -> Reply<Self::WatchStream> {
        routed!(
            self,
            r,
            watch,
            |r: &v1::UserRef| Some(r.clone()),
            resend_if_unreached = true,
            then = boxed
        )
    }
}

/// An owner's streamed answer as this service's stream type.
fn boxed<T: Send + 'static>(response: Response<tonic::Streaming<T>>) -> Response<BoxStream<T>> {
    let (metadata, stream, extensions) = response.into_parts();
    // A broken connection mid-stream reaches the caller as a temporary failure.
    Response::from_parts(metadata, Box::pin(stream.map(answered)), extensions)
}
