//! The storage service over gRPC. Requests are validated into domain types at this
//! edge (invalid input is `INVALID_ARGUMENT` naming the field); the engine never sees
//! raw protobuf.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use mailmesh_kit::Secret;
use mailmesh_kit::internal::{Peer, Role, caller};
use mailmesh_proto::v1;
use mailmesh_proto::v1::directory_server::{Directory as DirectoryApi, DirectoryServer};
use mailmesh_proto::v1::mailboxes_server::Mailboxes as MailboxesApi;
use mailmesh_proto::v1::outbound_queue_server::{OutboundQueue, OutboundQueueServer};
use mailmesh_types::{Domain, EmailAddress, ReversePath, TenantId};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::directory::{DkimAlgorithm, DkimKey, Lookup, TenantLimits, User, UserId};
use crate::engine::{Delivery, StorageEngine, UserRef};
use crate::index::{Change, Flags, INBOX, Mailbox, Message, StoreAction, UidRange};
use crate::session::{SessionError, SessionKeys};
use crate::{EngineError, StorageError, retry_index};

/// Bytes per `FetchChunk`.
const FETCH_CHUNK: usize = 64 << 10;

/// The gRPC services of storage, over one engine.
#[derive(Clone)]
pub struct StorageService {
    engine: Arc<StorageEngine>,
    sessions: Arc<SessionKeys>,
    /// Login failure counters (`Authenticate`).
    cache: Arc<dyn mailmesh_cache::Cache>,
}

/// Who may call what (ADR 0006), by the role in the caller's certificate. Calls for
/// a user from a front door must also carry that user's session token, checked by
/// the handler ([`StorageService::user_for`]). Anything not listed is refused.
pub fn policy(service: &str, method: &str, role: Role) -> bool {
    use Role::*;
    match (service, method) {
        // Another replica forwards a mailbox call to the partition's owner, naming
        // the role it acts for, whose policy it has applied (`crate::forward`).
        ("Mailboxes", _) if role == Storage => true,
        ("Mailboxes", "TenantUsage") => false,
        // Recipients and domains: the front doors route mail and decode SRS bounces,
        // the delivery worker expands aliases and forwards.
        ("Directory", "Lookup" | "LookupDomain") => {
            matches!(role, Admin | SmtpIngress | Submission | DeliveryWorker)
        }
        ("Directory", "Authenticate" | "RefreshSession") => matches!(role, Submission | Gateway),
        // Private keys leave storage only to sign a logged-in user's mail.
        ("Directory", "GetSigningKey") => role == Submission,
        // Every other directory call changes or lists accounts, keys and limits.
        ("Directory", _) => role == Admin,
        ("OutboundQueue", _) => role == Admin,
        ("Mailboxes", "Deliver") => role == DeliveryWorker,
        // Operators see counts and quotas, never content.
        ("Mailboxes", "ListMailboxes" | "Status" | "Quota") => matches!(role, Admin | Gateway),
        // Full or not, for a recipient the MX is about to accept.
        ("Mailboxes", "HasRoom") => matches!(role, Admin | SmtpIngress),
        ("Mailboxes", _) => role == Gateway,
        _ => false,
    }
}

impl StorageService {
    pub fn new(
        engine: Arc<StorageEngine>,
        sessions: Arc<SessionKeys>,
        cache: Arc<dyn mailmesh_cache::Cache>,
    ) -> Self {
        Self {
            engine,
            sessions,
            cache,
        }
    }

    /// The user a call names, which `caller` may act for: the admin and the
    /// delivery worker for any user (the policy limits what they may call), a front
    /// door only with the user's session token.
    fn user_for(&self, caller: &Peer, user: Option<v1::UserRef>) -> Result<UserRef, Status> {
        self.user_session(caller, user).map(|(user, _)| user)
    }

    /// The user a call acts for, and when the caller's session for it expires
    /// (ms; `None` for the roles that need none).
    fn user_session(
        &self,
        caller: &Peer,
        user: Option<v1::UserRef>,
    ) -> Result<(UserRef, Option<i64>), Status> {
        let token = user.as_ref().map(|u| u.session.clone()).unwrap_or_default();
        let parsed = user_ref(user)?;
        match caller.role {
            Role::Admin | Role::DeliveryWorker => Ok((parsed, None)),
            role => {
                let expires_ms = self
                    .sessions
                    .verify(&token, &parsed, role)
                    .map_err(session_refused)?;
                Ok((parsed, Some(expires_ms)))
            }
        }
    }

    /// Tells the submission pods (through the cache) that `domain`'s signing key
    /// changed; they ask again at their next message.
    async fn dkim_keys_changed(&self, domain: &Domain) {
        let announced = self
            .cache
            .publish(
                crate::client::DKIM_KEYS_CHANNEL,
                bytes::Bytes::from(domain.to_string()),
            )
            .await;
        if let Err(e) = announced {
            tracing::warn!(%domain, error = %e, "a DKIM key change was not announced; submission pods see it within their key_cache_ttl");
        }
    }

    pub fn directory_server(&self) -> DirectoryServer<Self> {
        DirectoryServer::new(self.clone())
    }

    pub fn outbound_queue_server(&self) -> OutboundQueueServer<Self> {
        OutboundQueueServer::new(self.clone())
    }

    pub fn engine(&self) -> &Arc<StorageEngine> {
        &self.engine
    }
}

/// Marks an over-quota refusal that no retry can fix (SMTP `552`, not `452`).
pub const PERMANENT_METADATA: &str = "mailmesh-permanent";

/// Marks a refusal from a replica that does not own the call's mailbox partition
/// (the caller routes it again).
pub const NOT_OWNER_METADATA: &str = "mailmesh-not-owner";

fn e_not_owner(partition: i32) -> String {
    EngineError::NotOwner(partition).to_string()
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Refused(StorageError::InvalidArgument(m)) => Status::invalid_argument(m),
            EngineError::Refused(StorageError::NotFound(m)) => Status::not_found(m),
            EngineError::Refused(StorageError::AlreadyExists(m)) => Status::already_exists(m),
            EngineError::Refused(StorageError::FailedPrecondition(m)) => {
                Status::failed_precondition(m)
            }
            EngineError::Refused(StorageError::OverQuota { reason, permanent }) => {
                let mut status = Status::resource_exhausted(reason);
                if permanent {
                    status.metadata_mut().insert(
                        PERMANENT_METADATA,
                        tonic::metadata::MetadataValue::from_static("true"),
                    );
                }
                status
            }
            EngineError::Codec(m) => Status::internal(m),
            EngineError::NotOwner(partition) => {
                let mut status = Status::unavailable(e_not_owner(partition));
                if let Ok(value) = partition.to_string().parse() {
                    status.metadata_mut().insert(NOT_OWNER_METADATA, value);
                }
                status
            }
            // The index names an object the store does not have: not worth retrying.
            EngineError::Objects(mailmesh_objstore::object_store::Error::NotFound { .. }) => {
                Status::not_found("message content not found")
            }
            other @ (EngineError::Queue(_)
            | EngineError::Objects(_)
            | EngineError::Body(_)
            | EngineError::Unavailable(_)) => Status::unavailable(other.to_string()),
        }
    }
}

fn parse<T: std::str::FromStr>(field: &str, value: &str) -> Result<T, Status>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

pub(crate) fn user_ref(user: Option<v1::UserRef>) -> Result<UserRef, Status> {
    let user = user.ok_or_else(|| Status::invalid_argument("user: missing"))?;
    let id = uuid::Uuid::try_parse(&user.user_id)
        .map_err(|_| Status::invalid_argument("user.user_id: expected 32 hex digits"))?;
    Ok(UserRef {
        tenant: parse("user.tenant", &user.tenant)?,
        user: UserId(id),
    })
}

fn append_response(appended: &crate::engine::Appended) -> v1::AppendResponse {
    v1::AppendResponse {
        uid_validity: appended.uidvalidity,
        uid: appended.uid,
        duplicate: appended.duplicate,
    }
}

fn proto_user(user: &UserRef) -> v1::UserRef {
    v1::UserRef {
        tenant: user.tenant.to_string(),
        user_id: user.user.to_string(),
        session: String::new(),
        position: 0,
    }
}

fn session_refused(e: SessionError) -> Status {
    Status::unauthenticated(e.to_string())
}

fn user_info(user: &User) -> v1::UserInfo {
    v1::UserInfo {
        user: Some(proto_user(&UserRef {
            tenant: user.tenant.clone(),
            user: user.id,
        })),
        address: user.address.to_string(),
        quota_bytes: user.quota_bytes.unwrap_or(0),
        enabled: user.enabled,
    }
}

fn limits(l: Option<v1::TenantLimits>) -> TenantLimits {
    let l = l.unwrap_or_default();
    let nz32 = |v: u32| (v != 0).then_some(v);
    let nz64 = |v: u64| (v != 0).then_some(v);
    TenantLimits {
        max_users: nz32(l.max_users),
        max_storage_bytes: nz64(l.max_storage_bytes),
        max_message_bytes: nz64(l.max_message_bytes),
        send_rate_per_hour: nz32(l.send_rate_per_hour),
    }
}

fn proto_limits(l: &TenantLimits) -> v1::TenantLimits {
    v1::TenantLimits {
        max_users: l.max_users.unwrap_or(0),
        max_storage_bytes: l.max_storage_bytes.unwrap_or(0),
        max_message_bytes: l.max_message_bytes.unwrap_or(0),
        send_rate_per_hour: l.send_rate_per_hour.unwrap_or(0),
    }
}

fn dkim_info(key: &DkimKey, signing: bool) -> v1::DkimKeyInfo {
    v1::DkimKeyInfo {
        domain: key.domain.to_string(),
        selector: key.selector.clone(),
        algorithm: match key.algorithm {
            DkimAlgorithm::Ed25519 => v1::DkimAlgorithm::Ed25519,
            DkimAlgorithm::Rsa2048 => v1::DkimAlgorithm::Rsa2048,
        } as i32,
        dns_name: key.dns_name(),
        dns_record: key.dns_record(),
        created_ms: key.created_ms,
        signing,
    }
}

fn flags(engine: &StorageEngine, names: &[String]) -> Result<Flags, Status> {
    Flags::parse(
        names.iter().map(String::as_str),
        &engine.config().index_limits,
    )
    .map_err(|e| Status::invalid_argument(format!("flags: {e}")))
}

/// Most UID ranges one request may carry.
const MAX_RANGES: usize = 1000;
/// Longest password considered (Argon2 cost grows with input length).
const MAX_PASSWORD: usize = 1024;

fn ranges(r: &[v1::UidRange]) -> Result<Vec<UidRange>, Status> {
    if r.len() > MAX_RANGES {
        return Err(Status::invalid_argument(format!(
            "uids: at most {MAX_RANGES} ranges"
        )));
    }
    Ok(r.iter()
        .map(|r| UidRange {
            first: r.first,
            last: r.last,
        })
        .collect())
}

fn mailbox_info(m: &Mailbox, subscribed: bool) -> v1::MailboxInfo {
    let status = m.status();
    v1::MailboxInfo {
        name: m.name.clone(),
        special_use: m.role.map(|r| r.attribute().to_owned()).unwrap_or_default(),
        subscribed,
        messages: status.messages,
        unseen: status.unseen,
        deleted: status.deleted,
        recent: status.recent,
        uid_next: status.uidnext,
        uid_validity: status.uidvalidity,
        highest_modseq: status.highest_modseq,
        size: status.size,
    }
}

fn message_info(m: &Message) -> v1::MessageInfo {
    v1::MessageInfo {
        uid: m.uid,
        flags: m.flags.names(),
        size: m.size,
        internal_date_ms: m.internal_date_ms,
        modseq: m.modseq,
    }
}

use crate::client::now_ms;

pub(crate) type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl DirectoryApi for StorageService {
    async fn add_tenant(&self, r: Request<v1::AddTenantRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        self.engine
            .add_tenant(parse("tenant", &r.tenant)?, limits(r.limits))
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn set_tenant_limits(&self, r: Request<v1::AddTenantRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        self.engine
            .set_tenant_limits(parse("tenant", &r.tenant)?, limits(r.limits))
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn set_inbound_policy(
        &self,
        r: Request<v1::SetInboundPolicyRequest>,
    ) -> Reply<v1::Empty> {
        let r = r.into_inner();
        self.engine
            .set_inbound_policy(
                parse("tenant", &r.tenant)?,
                r.policy.unwrap_or_default().into(),
            )
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn set_hide_client(&self, r: Request<v1::SetHideClientRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        self.engine
            .set_hide_client(parse("tenant", &r.tenant)?, r.hide_client)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn remove_tenant(&self, r: Request<v1::TenantRequest>) -> Reply<v1::Empty> {
        self.engine
            .remove_tenant(parse("tenant", &r.into_inner().tenant)?)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn list_tenants(&self, _: Request<v1::Empty>) -> Reply<v1::ListTenantsResponse> {
        self.engine.sync_directory().await?;
        let tenants = self.engine.directory(|d| {
            d.tenants()
                .map(|t| v1::TenantInfo {
                    tenant: t.id.to_string(),
                    limits: Some(proto_limits(&t.limits)),
                    domains: d.domains_of(&t.id).map(ToString::to_string).collect(),
                    users: d.users_of(&t.id).count() as u32,
                    inbound_policy: Some(t.inbound.into()),
                    hide_client: t.hide_client,
                })
                .collect()
        })?;
        Ok(Response::new(v1::ListTenantsResponse { tenants }))
    }

    async fn add_domain(&self, r: Request<v1::DomainRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        self.engine
            .add_domain(
                parse("tenant", &r.tenant)?,
                parse::<Domain>("domain", &r.domain)?,
            )
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn remove_domain(&self, r: Request<v1::DomainRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        let domain: Domain = parse("domain", &r.domain)?;
        let tenant: TenantId = parse("tenant", &r.tenant)?;
        self.engine.remove_domain(tenant, domain).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn add_user(&self, r: Request<v1::AddUserRequest>) -> Reply<v1::UserInfo> {
        let r = r.into_inner();
        if r.password.len() > MAX_PASSWORD {
            return Err(Status::invalid_argument(format!(
                "password: at most {MAX_PASSWORD} bytes"
            )));
        }
        let address: EmailAddress = parse("address", &r.address)?;
        let quota = (r.quota_bytes != 0).then_some(r.quota_bytes);
        let user = self
            .engine
            .add_user(address, Secret::new(r.password), quota)
            .await?;
        let info = self
            .engine
            .directory(|d| d.user(&user.user).map(user_info))?
            .ok_or_else(|| Status::unavailable("user not visible yet"))?;
        Ok(Response::new(info))
    }

    async fn set_password(&self, r: Request<v1::SetPasswordRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        if r.password.len() > MAX_PASSWORD {
            return Err(Status::invalid_argument(format!(
                "password: at most {MAX_PASSWORD} bytes"
            )));
        }
        self.engine
            .set_password(parse("address", &r.address)?, Secret::new(r.password))
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn set_enabled(&self, r: Request<v1::SetEnabledRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        self.engine
            .set_enabled(parse("address", &r.address)?, r.enabled)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn set_quota(&self, r: Request<v1::SetQuotaRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        let quota = (r.quota_bytes != 0).then_some(r.quota_bytes);
        self.engine
            .set_quota(parse("address", &r.address)?, quota)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn remove_user(&self, r: Request<v1::AddressRequest>) -> Reply<v1::Empty> {
        self.engine
            .remove_user(parse("address", &r.into_inner().address)?)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn get_user(&self, r: Request<v1::AddressRequest>) -> Reply<v1::UserInfo> {
        let address: EmailAddress = parse("address", &r.into_inner().address)?;
        self.engine.sync_directory().await?;
        self.engine
            .directory(|d| d.user_by_address(&address).map(user_info))?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("user {address}")))
    }

    async fn list_users(&self, r: Request<v1::TenantRequest>) -> Reply<v1::ListUsersResponse> {
        let tenant: TenantId = parse("tenant", &r.into_inner().tenant)?;
        self.engine.sync_directory().await?;
        let users = self
            .engine
            .directory(|d| d.users_of(&tenant).map(user_info).collect())?;
        Ok(Response::new(v1::ListUsersResponse { users }))
    }

    async fn add_alias(&self, r: Request<v1::AddAliasRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        let targets = r
            .targets
            .iter()
            .map(|t| parse("targets", t))
            .collect::<Result<Vec<EmailAddress>, Status>>()?;
        self.engine
            .add_alias(parse("address", &r.address)?, targets)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn remove_alias(&self, r: Request<v1::AddressRequest>) -> Reply<v1::Empty> {
        self.engine
            .remove_alias(parse("address", &r.into_inner().address)?)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn list_aliases(&self, r: Request<v1::TenantRequest>) -> Reply<v1::ListAliasesResponse> {
        let tenant: TenantId = parse("tenant", &r.into_inner().tenant)?;
        self.engine.sync_directory().await?;
        let aliases = self.engine.directory(|d| {
            d.aliases_of(&tenant)
                .map(|a| v1::AliasInfo {
                    address: a.address.to_string(),
                    targets: a.targets.iter().map(ToString::to_string).collect(),
                })
                .collect()
        })?;
        Ok(Response::new(v1::ListAliasesResponse { aliases }))
    }

    async fn set_catch_all(&self, r: Request<v1::SetCatchAllRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        let target = match r.target.as_str() {
            "" => None,
            t => Some(parse("target", t)?),
        };
        self.engine
            .set_catch_all(parse("domain", &r.domain)?, target)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn lookup(&self, r: Request<v1::AddressRequest>) -> Reply<v1::LookupResponse> {
        let address: EmailAddress = parse("address", &r.into_inner().address)?;
        use v1::lookup_response::Result as R;
        let response = match self.engine.lookup(&address)? {
            Lookup::NotLocal => v1::LookupResponse {
                result: R::NotLocal as i32,
                ..Default::default()
            },
            Lookup::Unknown => v1::LookupResponse {
                result: R::Unknown as i32,
                ..Default::default()
            },
            Lookup::Deliver(res) => v1::LookupResponse {
                result: R::Deliver as i32,
                tenant: res.tenant.to_string(),
                users: res
                    .users
                    .iter()
                    .map(|(tenant, user)| {
                        proto_user(&UserRef {
                            tenant: tenant.clone(),
                            user: *user,
                        })
                    })
                    .collect(),
                has_quota: res
                    .users
                    .iter()
                    .map(|(_, user)| res.with_quota.contains(user))
                    .collect(),
                remote: res.remote.iter().map(ToString::to_string).collect(),
                inbound_policy: Some(res.inbound.into()),
                max_message_bytes: res.max_message_bytes.unwrap_or(0),
            },
        };
        Ok(Response::new(response))
    }

    async fn lookup_domain(&self, r: Request<v1::DomainRequest>) -> Reply<v1::LookupResponse> {
        let domain: Domain = parse("domain", &r.into_inner().domain)?;
        use v1::lookup_response::Result as R;
        let found = self.engine.directory(|d| {
            let tenant = d.domain_owner(&domain)?.clone();
            let inbound = d.tenant(&tenant).map(|t| t.inbound).unwrap_or_default();
            Some((tenant, inbound))
        })?;
        Ok(Response::new(match found {
            Some((tenant, inbound)) => v1::LookupResponse {
                result: R::Deliver as i32,
                tenant: tenant.to_string(),
                inbound_policy: Some(inbound.into()),
                ..Default::default()
            },
            None => v1::LookupResponse {
                result: R::NotLocal as i32,
                ..Default::default()
            },
        }))
    }

    async fn authenticate(
        &self,
        r: Request<v1::AuthenticateRequest>,
    ) -> Reply<v1::AuthenticateResponse> {
        use mailmesh_cache::login::{Login, LoginLimits, check_in};
        let caller = caller(&r)?;
        let r = r.into_inner();
        // The front door's client; a caller that does not say is counted itself.
        let client = r
            .client_ip
            .parse::<std::net::IpAddr>()
            .unwrap_or(caller.addr.ip());
        let config = self.engine.config();
        let limits = LoginLimits {
            max_failures: config.login_max_failures,
            window: config.login_failure_window,
            // The front door makes its client wait; storage only counts.
            failure_delay: std::time::Duration::ZERO,
            max_parallel: config.login_max_parallel,
            account_pace: Some(config.login_account_pace),
        };
        let engine = &self.engine;
        let password = r.password;
        let login = check_in(
            &self.cache,
            "storage:",
            client,
            &r.address,
            &limits,
            |name| async move {
                // A malformed address or an oversized password fails like a wrong
                // password: nothing to learn.
                match name.parse::<EmailAddress>() {
                    Ok(address) if password.len() <= MAX_PASSWORD => engine
                        .authenticate(&address, Secret::new(password))
                        .await
                        .map(|u| u.filter(|u| u.enabled)),
                    _ => Ok(None),
                }
            },
        )
        .await;
        let user = match login {
            Login::Ok(user) => user,
            Login::Invalid => return Ok(Response::new(v1::AuthenticateResponse::default())),
            Login::Throttled => {
                return Err(Status::resource_exhausted(
                    "too many failed logins from this client address",
                ));
            }
            Login::Busy => {
                return Err(Status::unavailable(
                    "too many logins for this client address or account right now",
                ));
            }
            Login::Unavailable => {
                return Err(Status::unavailable("passwords cannot be checked now"));
            }
        };
        let (limits, hide_client) = self
            .engine
            .directory(|d| {
                d.tenant(&user.tenant)
                    .map(|t| (proto_limits(&t.limits), t.hide_client))
            })?
            .unwrap_or_default();
        let user_ref = UserRef {
            tenant: user.tenant.clone(),
            user: user.id,
        };
        let (token, expires_ms) = self.sessions.issue(&user_ref, caller.role);
        let mut info = user_info(&user);
        if let Some(u) = info.user.as_mut() {
            u.session = token;
        }
        Ok(Response::new(v1::AuthenticateResponse {
            ok: true,
            user: Some(info),
            limits: Some(limits),
            hide_client,
            session_expires_ms: expires_ms,
        }))
    }

    async fn refresh_session(&self, r: Request<v1::UserRef>) -> Reply<v1::SessionResponse> {
        let caller = caller(&r)?;
        let user = self.user_for(&caller, Some(r.into_inner()))?;
        let enabled = self.engine.directory(|d| {
            d.user(&user.user)
                .filter(|u| u.tenant == user.tenant)
                .map(|u| u.enabled)
        })?;
        if enabled != Some(true) {
            return Err(Status::unauthenticated(
                "the account is disabled or no longer exists",
            ));
        }
        let (token, expires_ms) = self.sessions.issue(&user, caller.role);
        let mut refreshed = proto_user(&user);
        refreshed.session = token;
        Ok(Response::new(v1::SessionResponse {
            user: Some(refreshed),
            expires_ms,
        }))
    }

    async fn add_dkim_key(&self, r: Request<v1::AddDkimKeyRequest>) -> Reply<v1::DkimKeyInfo> {
        let r = r.into_inner();
        let algorithm = match v1::DkimAlgorithm::try_from(r.algorithm) {
            Ok(v1::DkimAlgorithm::Rsa2048) => DkimAlgorithm::Rsa2048,
            Ok(v1::DkimAlgorithm::Ed25519 | v1::DkimAlgorithm::Unspecified) => {
                DkimAlgorithm::Ed25519
            }
            Err(_) => return Err(Status::invalid_argument("algorithm: unknown")),
        };
        let selector = (!r.selector.is_empty()).then_some(r.selector);
        let domain: Domain = parse("domain", &r.domain)?;
        let key = self
            .engine
            .add_dkim_key(domain.clone(), selector, algorithm, r.activate)
            .await?;
        let signing = self
            .engine
            .dkim_keys(&domain)?
            .last()
            .is_some_and(|k| k.selector == key.selector);
        self.dkim_keys_changed(&domain).await;
        Ok(Response::new(dkim_info(&key, signing)))
    }

    async fn activate_dkim_key(&self, r: Request<v1::DkimKeyRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        let domain: Domain = parse("domain", &r.domain)?;
        self.engine
            .activate_dkim_key(domain.clone(), r.selector)
            .await?;
        self.dkim_keys_changed(&domain).await;
        Ok(Response::new(v1::Empty {}))
    }

    async fn remove_dkim_key(&self, r: Request<v1::DkimKeyRequest>) -> Reply<v1::Empty> {
        let r = r.into_inner();
        let domain: Domain = parse("domain", &r.domain)?;
        self.engine
            .remove_dkim_key(domain.clone(), r.selector)
            .await?;
        self.dkim_keys_changed(&domain).await;
        Ok(Response::new(v1::Empty {}))
    }

    async fn list_dkim_keys(
        &self,
        r: Request<v1::DomainRequest>,
    ) -> Reply<v1::ListDkimKeysResponse> {
        let domain: Domain = parse("domain", &r.into_inner().domain)?;
        let keys = self.engine.dkim_keys(&domain)?;
        let last = keys.len().saturating_sub(1);
        Ok(Response::new(v1::ListDkimKeysResponse {
            keys: keys
                .iter()
                .enumerate()
                .map(|(i, k)| dkim_info(k, i == last))
                .collect(),
        }))
    }

    async fn get_signing_key(
        &self,
        r: Request<v1::DomainRequest>,
    ) -> Reply<v1::SigningKeyResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_for(&caller, r.user)?;
        let domain: Domain = parse("domain", &r.domain)?;
        let owner = self
            .engine
            .directory(|d| d.domain_owner(&domain).cloned())?;
        if owner.as_ref() != Some(&user.tenant) {
            tracing::warn!(%domain, tenant = %user.tenant, role = %caller.role, "signing key asked for another tenant's domain");
            return Err(Status::permission_denied(
                "the domain does not belong to the user's tenant",
            ));
        }
        let Some((key, private_key)) = self.engine.signing_key(&domain)? else {
            return Ok(Response::new(v1::SigningKeyResponse::default()));
        };
        Ok(Response::new(v1::SigningKeyResponse {
            key: Some(dkim_info(&key, true)),
            private_key,
        }))
    }
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which index a waiting message is in: `local` (for a mailbox here) or `outbound`.
type Stage = &'static str;

impl StorageService {
    /// The two due-time indexes the delivery workers keep, with their stage names.
    fn retry_indexes(&self) -> [(Stage, &str); 2] {
        let config = self.engine.config();
        [
            ("local", config.local_retry_prefix.as_str()),
            ("outbound", config.outbound_retry_prefix.as_str()),
        ]
    }

    /// The waiting entries of `queue_id` (the first `limit` of all when empty),
    /// local and outbound together, in due order; each with its index's prefix.
    async fn waiting(
        &self,
        queue_id: &str,
        limit: usize,
    ) -> Result<Vec<(Stage, &str, retry_index::Waiting)>, Status> {
        let objects = &**self.engine.objects();
        let id = if queue_id.is_empty() {
            None
        } else {
            Some(
                queue_id
                    .to_ascii_lowercase()
                    .parse()
                    .map_err(|_| Status::invalid_argument("queue_id: 32 hex digits"))?,
            )
        };
        let mut all = Vec::new();
        for (stage, prefix) in self.retry_indexes() {
            let found = match id {
                None => retry_index::list(objects, prefix, limit).await,
                Some(id) => retry_index::find(objects, prefix, id).await,
            };
            let found = found.map_err(|e| Status::unavailable(format!("object store: {e}")))?;
            all.extend(found.into_iter().map(|w| (stage, prefix, w)));
        }
        all.sort_by_key(|(_, _, w)| w.due);
        all.truncate(limit);
        Ok(all)
    }

    async fn one_waiting(
        &self,
        queue_id: &str,
    ) -> Result<Vec<(Stage, &str, retry_index::Waiting)>, Status> {
        if queue_id.is_empty() {
            return Err(Status::invalid_argument("queue_id: 32 hex digits"));
        }
        let found = self.waiting(queue_id, usize::MAX).await?;
        if found.is_empty() {
            return Err(Status::not_found(format!("no waiting message {queue_id}")));
        }
        Ok(found)
    }
}

#[tonic::async_trait]
impl OutboundQueue for StorageService {
    async fn list_waiting(
        &self,
        r: Request<v1::ListWaitingRequest>,
    ) -> Reply<v1::ListWaitingResponse> {
        let r = r.into_inner();
        let limit = if r.limit == 0 { 1000 } else { r.limit as usize };
        let mut messages = Vec::new();
        for (stage, _, w) in self.waiting(&r.queue_id, limit).await? {
            let headers = if r.headers {
                match &w.envelope.body {
                    mailmesh_types::BodyRef::Inline(b) => header_section(b),
                    mailmesh_types::BodyRef::Object { key, .. } => {
                        use mailmesh_objstore::object_store::ObjectStoreExt;
                        let path = mailmesh_objstore::object_store::path::Path::from(key.as_str());
                        match self.engine.objects().get(&path).await {
                            Ok(got) => got
                                .bytes()
                                .await
                                .map(|b| header_section(&b))
                                .unwrap_or_default(),
                            Err(e) => format!("(body unavailable: {e})"),
                        }
                    }
                }
            } else {
                String::new()
            };
            messages.push(v1::WaitingMessage {
                queue_id: w.queue_id.to_string(),
                tenant: w.envelope.tenant.to_string(),
                sender: w.envelope.mail_from.to_string(),
                recipients: w
                    .envelope
                    .recipients
                    .iter()
                    .map(|r| r.address.to_string())
                    .collect(),
                attempts: w.attempts,
                due_ms: ms(w.due),
                received_at_ms: ms(w.envelope.received_at),
                last_error: w.last_error.clone(),
                size: w.envelope.body.size(),
                delay_notified: w.delay_notified,
                headers,
                stage: stage.into(),
            });
        }
        Ok(Response::new(v1::ListWaitingResponse { messages }))
    }

    async fn retry_waiting(&self, r: Request<v1::QueueIdRequest>) -> Reply<v1::Empty> {
        for (_, prefix, w) in self.one_waiting(&r.into_inner().queue_id).await? {
            retry_index::due_now(&**self.engine.objects(), prefix, &w)
                .await
                .map_err(|e| Status::unavailable(format!("object store: {e}")))?;
        }
        Ok(Response::new(v1::Empty {}))
    }

    async fn delete_waiting(&self, r: Request<v1::QueueIdRequest>) -> Reply<v1::Empty> {
        for (stage, _, w) in self.one_waiting(&r.into_inner().queue_id).await? {
            tracing::warn!(queue_id = %w.queue_id, recipients = w.envelope.recipients.len(), stage, "deleting waiting mail on request");
            retry_index::remove(&**self.engine.objects(), &w.key)
                .await
                .map_err(|e| Status::unavailable(format!("object store: {e}")))?;
        }
        Ok(Response::new(v1::Empty {}))
    }
}

/// The header section of a message (at most 16 KiB), as text.
fn header_section(message: &[u8]) -> String {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2)
        .min(16 << 10);
    String::from_utf8_lossy(&message[..end]).into_owned()
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl StorageService {
    async fn deliver_traced(
        &self,
        caller: Peer,
        r: v1::DeliverRequest,
    ) -> Reply<v1::AppendResponse> {
        let user = self.user_for(&caller, r.user)?;
        let return_path: ReversePath = parse("return_path", &r.return_path)?;
        let delivered_to: EmailAddress = parse("delivered_to", &r.delivered_to)?;
        if r.delivery_key.is_empty() || r.delivery_key.len() > 512 {
            return Err(Status::invalid_argument("delivery_key: 1 to 512 bytes"));
        }
        let mailbox = if r.mailbox.is_empty() {
            INBOX
        } else {
            &r.mailbox
        };
        let appended = self
            .engine
            .deliver(
                &user,
                Delivery {
                    mailbox,
                    return_path: &return_path,
                    delivered_to: &delivered_to,
                    message: &r.message,
                    key: &r.delivery_key,
                    internal_date_ms: if r.internal_date_ms == 0 {
                        now_ms()
                    } else {
                        r.internal_date_ms
                    },
                },
            )
            .await?;
        Ok(Response::new(append_response(&appended)))
    }

    async fn mailbox_view<R>(
        &self,
        user: &UserRef,
        name: &str,
        f: impl FnOnce(&Mailbox) -> R,
    ) -> Result<R, Status> {
        self.user_mailbox_view(user, name, |_, m| f(m)).await
    }

    /// As [`Self::mailbox_view`], with the user's whole index at hand.
    async fn user_mailbox_view<R>(
        &self,
        user: &UserRef,
        name: &str,
        f: impl FnOnce(&crate::index::UserIndex, &Mailbox) -> R,
    ) -> Result<R, Status> {
        let canonical = crate::index::canonical_name(name, &self.engine.config().index_limits)
            .map_err(EngineError::from)?;
        self.engine
            .read_index(user, |i| {
                i.and_then(|i| i.mailbox(&canonical).map(|m| f(i, m)))
            })
            .await?
            .ok_or_else(|| Status::not_found(format!("mailbox {canonical}")))
    }

    /// The user a mailbox call acts for, once this replica has applied their log up
    /// to the position the call carries (read-your-writes without writing to the
    /// log; `UNAVAILABLE` if it does not get there within the write timeout).
    async fn user_at(&self, caller: &Peer, user: Option<v1::UserRef>) -> Result<UserRef, Status> {
        let position = user.as_ref().map_or(0, |u| u.position);
        let user = self.user_for(caller, user)?;
        self.engine.reach_user(&user, position).await?;
        Ok(user)
    }

    /// A mailbox call's answer, with how far this replica had applied the user's log
    /// when it was made (`POSITION_METADATA`), for the caller to carry on.
    async fn answer<T>(&self, user: &UserRef, body: T) -> Reply<T> {
        let mut response = Response::new(body);
        if let Ok(position) = self.engine.position(user).await
            && let Ok(value) = format!("{} {position}", user.user).parse()
        {
            response
                .metadata_mut()
                .insert(mailmesh_proto::POSITION_METADATA, value);
        }
        Ok(response)
    }
}

impl StorageService {
    /// An APPEND from its first chunk and the rest of the stream (the router reads
    /// the first to find the user's partition).
    pub(crate) async fn append_chunks(
        &self,
        caller: &Peer,
        first: v1::AppendChunk,
        chunks: BoxStream<v1::AppendChunk>,
    ) -> Reply<v1::AppendResponse> {
        let start = first
            .start
            .ok_or_else(|| Status::invalid_argument("start: missing from the first chunk"))?;
        let user = self.user_at(caller, start.user).await?;
        let flags = flags(&self.engine, &start.flags)?;
        let date = if start.internal_date_ms == 0 {
            now_ms()
        } else {
            start.internal_date_ms
        };
        if start.resume {
            // No body follows: the first attempt stored it (or it never arrived).
            let appended = self
                .engine
                .append_resume(&user, &start.mailbox, start.size, flags, date)
                .await?;
            return self.answer(&user, append_response(&appended)).await;
        }
        // The message bytes, chunk by chunk, until the one marked `end`; a stream
        // that stops before it is an abandoned APPEND (an error, so nothing is kept).
        enum State {
            First(Bytes, bool),
            More,
            Done,
        }
        let body = futures::stream::unfold(
            (State::First(Bytes::from(first.data), first.end), chunks),
            |(state, mut chunks)| async move {
                match state {
                    State::Done => None,
                    State::First(data, end) => Some((
                        Ok(data),
                        (if end { State::Done } else { State::More }, chunks),
                    )),
                    State::More => match chunks.next().await.transpose() {
                        Ok(Some(c)) => {
                            let next = if c.end { State::Done } else { State::More };
                            Some((Ok(Bytes::from(c.data)), (next, chunks)))
                        }
                        Ok(None) => Some((
                            Err(std::io::Error::other(
                                "the APPEND stream ended before its end",
                            )),
                            (State::Done, chunks),
                        )),
                        Err(e) => Some((Err(std::io::Error::other(e)), (State::Done, chunks))),
                    },
                }
            },
        );
        let appended = self
            .engine
            .append_stream(
                &user,
                &start.mailbox,
                start.size,
                Box::pin(body),
                flags,
                date,
            )
            .await?;
        self.answer(&user, append_response(&appended)).await
    }
}

#[tonic::async_trait]
impl MailboxesApi for StorageService {
    async fn list_mailboxes(&self, r: Request<v1::UserRef>) -> Reply<v1::ListMailboxesResponse> {
        let caller = caller(&r)?;
        let user = self.user_at(&caller, Some(r.into_inner())).await?;
        let (mailboxes, subscribed_without_mailbox) = self
            .engine
            .read_index(&user, |i| {
                i.map(|i| {
                    let mailboxes = i
                        .mailboxes()
                        .map(|m| mailbox_info(m, i.is_subscribed(&m.name)))
                        .collect();
                    let missing = i.subscribed_without_mailbox().map(str::to_owned).collect();
                    (mailboxes, missing)
                })
            })
            .await?
            .unwrap_or_default();
        self.answer(
            &user,
            v1::ListMailboxesResponse {
                mailboxes,
                subscribed_without_mailbox,
            },
        )
        .await
    }

    async fn create_mailbox(&self, r: Request<v1::MailboxRequest>) -> Reply<v1::Empty> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        self.engine
            .index_request(
                &user,
                crate::index::IndexCommand::CreateMailbox {
                    name: r.mailbox,
                    role: None,
                },
            )
            .await?;
        self.answer(&user, v1::Empty {}).await
    }

    async fn rename_mailbox(&self, r: Request<v1::RenameMailboxRequest>) -> Reply<v1::Empty> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        self.engine
            .index_request(
                &user,
                crate::index::IndexCommand::RenameMailbox {
                    from: r.from,
                    to: r.to,
                },
            )
            .await?;
        self.answer(&user, v1::Empty {}).await
    }

    async fn delete_mailbox(&self, r: Request<v1::MailboxRequest>) -> Reply<v1::Empty> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        self.engine.delete_mailbox(&user, &r.mailbox).await?;
        self.answer(&user, v1::Empty {}).await
    }

    async fn subscribe(&self, r: Request<v1::SubscribeRequest>) -> Reply<v1::Empty> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        self.engine
            .index_request(
                &user,
                crate::index::IndexCommand::Subscribe {
                    name: r.mailbox,
                    subscribed: r.subscribed,
                },
            )
            .await?;
        self.answer(&user, v1::Empty {}).await
    }

    async fn status(&self, r: Request<v1::MailboxRequest>) -> Reply<v1::MailboxInfo> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        self.answer(
            &user,
            self.user_mailbox_view(&user, &r.mailbox, |i, m| {
                mailbox_info(m, i.is_subscribed(&m.name))
            })
            .await?,
        )
        .await
    }

    async fn list_messages(
        &self,
        r: Request<v1::MailboxRequest>,
    ) -> Reply<v1::ListMessagesResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let response = self
            .mailbox_view(&user, &r.mailbox, |m| v1::ListMessagesResponse {
                uid_validity: m.uidvalidity,
                messages: m.messages.values().map(message_info).collect(),
                uid_next: m.uidnext,
                highest_modseq: m.highest_modseq,
                first_recent_uid: m.first_recent_uid,
            })
            .await?;
        self.answer(&user, response).await
    }

    async fn deliver(&self, r: Request<v1::DeliverRequest>) -> Reply<v1::AppendResponse> {
        // The message's trace continues here from the delivery worker.
        let span = tracing::info_span!("storage.deliver");
        mailmesh_kit::grpc::follow(&r, &span);
        let caller = caller(&r)?;
        self.deliver_traced(caller, r.into_inner())
            .instrument(span)
            .await
    }

    async fn append(&self, r: Request<v1::AppendRequest>) -> Reply<v1::AppendResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let flags = flags(&self.engine, &r.flags)?;
        let date = if r.internal_date_ms == 0 {
            now_ms()
        } else {
            r.internal_date_ms
        };
        let appended = self
            .engine
            .append(&user, &r.mailbox, Bytes::from(r.message), flags, date)
            .await?;
        self.answer(&user, append_response(&appended)).await
    }

    async fn append_stream(
        &self,
        r: Request<tonic::Streaming<v1::AppendChunk>>,
    ) -> Reply<v1::AppendResponse> {
        let caller = caller(&r)?;
        let mut chunks = r.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no chunk"))?;
        self.append_chunks(&caller, first, Box::pin(chunks)).await
    }

    type FetchStream = BoxStream<v1::FetchChunk>;

    async fn fetch(&self, r: Request<v1::FetchRequest>) -> Reply<Self::FetchStream> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let range = match (r.start, r.end) {
            (0, 0) => None,
            (start, 0) => Some(start..u64::MAX),
            (start, end) if start < end => Some(start..end),
            _ => {
                return Err(Status::invalid_argument(
                    "fetch range: start must be below end",
                ));
            }
        };
        let body = self
            .engine
            .fetch_stream(&user, &r.mailbox, r.uid, range)
            .await?;
        // Object-store chunks are re-cut to at most FETCH_CHUNK bytes per message.
        let chunks = body.flat_map(|chunk| {
            let out: Vec<Result<v1::FetchChunk, Status>> = match chunk {
                Ok(data) => (0..data.len())
                    .step_by(FETCH_CHUNK)
                    .map(|at| {
                        Ok(v1::FetchChunk {
                            data: data.slice(at..(at + FETCH_CHUNK).min(data.len())).to_vec(),
                        })
                    })
                    .collect(),
                Err(e) => vec![Err(Status::from(e))],
            };
            futures::stream::iter(out)
        });
        let chunks: Self::FetchStream = Box::pin(chunks);
        self.answer(&user, chunks).await
    }

    async fn store_flags(
        &self,
        r: Request<v1::StoreFlagsRequest>,
    ) -> Reply<v1::StoreFlagsResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        use v1::store_flags_request::Action;
        let action = match Action::try_from(r.action) {
            Ok(Action::Add) => StoreAction::Add,
            Ok(Action::Remove) => StoreAction::Remove,
            Ok(Action::Replace) => StoreAction::Replace,
            _ => return Err(Status::invalid_argument("action: add, remove or replace")),
        };
        let flags = flags(&self.engine, &r.flags)?;
        let outcome = self
            .engine
            .store_flags(
                &user,
                &r.mailbox,
                ranges(&r.uids)?,
                action,
                flags,
                r.unchanged_since,
            )
            .await?;
        let crate::index::IndexOutcome::Stored { changed, modified } = outcome else {
            return Err(Status::internal("unexpected outcome"));
        };
        self.answer(
            &user,
            v1::StoreFlagsResponse {
                changed: changed
                    .into_iter()
                    .map(|(uid, flags, modseq)| v1::MessageInfo {
                        uid,
                        flags: flags.names(),
                        modseq,
                        ..Default::default()
                    })
                    .collect(),
                modified,
            },
        )
        .await
    }

    async fn copy(&self, r: Request<v1::CopyRequest>) -> Reply<v1::CopyResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let (uidvalidity, mapping) = self
            .engine
            .copy(&user, &r.from, &r.to, ranges(&r.uids)?, r.remove_source)
            .await?;
        self.answer(
            &user,
            v1::CopyResponse {
                uid_validity: uidvalidity,
                source_uids: mapping.iter().map(|m| m.0).collect(),
                destination_uids: mapping.iter().map(|m| m.1).collect(),
            },
        )
        .await
    }

    async fn expunge(&self, r: Request<v1::ExpungeRequest>) -> Reply<v1::ExpungeResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let uids = if r.uids.is_empty() {
            None
        } else {
            Some(ranges(&r.uids)?)
        };
        let uids = self.engine.expunge(&user, &r.mailbox, uids).await?;
        self.answer(&user, v1::ExpungeResponse { uids }).await
    }

    async fn list_changes(&self, r: Request<v1::ChangesRequest>) -> Reply<v1::ChangesResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let since = r.since_modseq;
        let limit = self.engine.config().index_limits.max_expunge_log;
        let response = self
            .mailbox_view(&user, &r.mailbox, |m| {
                let mut response = v1::ChangesResponse {
                    uid_validity: m.uidvalidity,
                    complete: m.expunges_complete_since(since, limit),
                    uid_next: m.uidnext,
                    highest_modseq: m.highest_modseq,
                    first_recent_uid: m.first_recent_uid,
                    ..Default::default()
                };
                // Nothing else is sent when it could not be used.
                if response.complete {
                    response.changed = m
                        .messages
                        .values()
                        .filter(|msg| msg.modseq > since)
                        .map(message_info)
                        .collect();
                    response.vanished = m.expunged_since(since);
                }
                response
            })
            .await?;
        self.answer(&user, response).await
    }

    async fn claim_recent(
        &self,
        r: Request<v1::ClaimRecentRequest>,
    ) -> Reply<v1::ClaimRecentResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let outcome = self
            .engine
            .index_request(
                &user,
                crate::index::IndexCommand::ClaimRecent {
                    mailbox: r.mailbox,
                    uidvalidity: r.uid_validity,
                    up_to: r.up_to,
                },
            )
            .await?
            .0;
        let crate::index::IndexOutcome::RecentClaimed { from, to } = outcome else {
            return Err(Status::internal("unexpected outcome of a recent claim"));
        };
        self.answer(&user, v1::ClaimRecentResponse { from, to })
            .await
    }

    async fn vanished(&self, r: Request<v1::VanishedRequest>) -> Reply<v1::VanishedResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user).await?;
        let since = r.since_modseq;
        let limit = self.engine.config().index_limits.max_expunge_log;
        let response = self
            .mailbox_view(&user, &r.mailbox, |m| v1::VanishedResponse {
                uid_validity: m.uidvalidity,
                uids: m.expunged_since(since),
                complete: m.expunges_complete_since(since, limit),
            })
            .await?;
        self.answer(&user, response).await
    }

    async fn search(&self, r: Request<v1::SearchRequest>) -> Reply<v1::SearchResponse> {
        let caller = caller(&r)?;
        let r = r.into_inner();
        let user = self.user_at(&caller, r.user.clone()).await?;
        let has = flags(&self.engine, &r.has_flags)?;
        let lacks = flags(&self.engine, &r.lacks_flags)?;
        let uid_ranges = ranges(&r.uids)?;
        let response = self
            .mailbox_view(&user, &r.mailbox, |m| {
                let matches = |msg: &Message| {
                    let f = &msg.flags;
                    let has_ok = (!has.seen || f.seen)
                        && (!has.answered || f.answered)
                        && (!has.flagged || f.flagged)
                        && (!has.deleted || f.deleted)
                        && (!has.draft || f.draft)
                        && has.keywords.is_subset(&f.keywords);
                    let lacks_ok = !(lacks.seen && f.seen
                        || lacks.answered && f.answered
                        || lacks.flagged && f.flagged
                        || lacks.deleted && f.deleted
                        || lacks.draft && f.draft)
                        && lacks.keywords.is_disjoint(&f.keywords);
                    let in_uids = uid_ranges.is_empty()
                        || uid_ranges.iter().any(|u| {
                            (u.first.min(u.last)..=u.first.max(u.last)).contains(&msg.uid)
                        });
                    has_ok
                        && lacks_ok
                        && in_uids
                        && (r.larger_than == 0 || msg.size > r.larger_than)
                        && (r.smaller_than == 0 || msg.size < r.smaller_than)
                        && (r.since_ms == 0 || msg.internal_date_ms >= r.since_ms)
                        && (r.before_ms == 0 || msg.internal_date_ms < r.before_ms)
                        && (r.changed_since == 0 || msg.modseq > r.changed_since)
                };
                v1::SearchResponse {
                    uids: m
                        .messages
                        .values()
                        .filter(|msg| matches(msg))
                        .map(|msg| msg.uid)
                        .collect(),
                    highest_modseq: m.highest_modseq,
                }
            })
            .await?;
        self.answer(&user, response).await
    }

    async fn quota(&self, r: Request<v1::UserRef>) -> Reply<v1::QuotaResponse> {
        let caller = caller(&r)?;
        let user = self.user_at(&caller, Some(r.into_inner())).await?;
        let (used, limit) = self.engine.quota(&user).await?;
        self.answer(
            &user,
            v1::QuotaResponse {
                used_bytes: used,
                limit_bytes: limit.unwrap_or(0),
            },
        )
        .await
    }

    async fn has_room(&self, r: Request<v1::RoomRequest>) -> Reply<v1::RoomResponse> {
        // Any user, without a session: the answer is what the MX's RCPT reply
        // tells its client anyway (the policy limits who may ask).
        let r = r.into_inner();
        let user = user_ref(r.user)?;
        let room = self.engine.has_room(&user, r.bytes).await?;
        Ok(Response::new(v1::RoomResponse { room }))
    }

    type WatchStream = BoxStream<v1::MailboxChange>;

    async fn tenant_usage(
        &self,
        r: Request<v1::TenantUsageRequest>,
    ) -> Reply<v1::TenantUsageResponse> {
        let tenant: TenantId = parse("tenant", &r.into_inner().tenant)?;
        let (bytes, partitions) = self.engine.owned_tenant_usage(&tenant);
        Ok(Response::new(v1::TenantUsageResponse { bytes, partitions }))
    }

    async fn watch(&self, r: Request<v1::UserRef>) -> Reply<Self::WatchStream> {
        let caller = caller(&r)?;
        let (user, expires_ms) = self.user_session(&caller, Some(r.into_inner()))?;
        let events = self.engine.subscribe(&user).await?;
        let engine = self.engine.clone();
        // The stream lasts as long as the session it was opened with: the caller
        // watches again with a renewed token (refused once the account is
        // disabled), so a revoked session does not follow the mailbox for ever.
        let left = expires_ms
            .map(|ms| std::time::Duration::from_millis(u64::try_from(ms - now_ms()).unwrap_or(0)));
        let ends = async move {
            match left {
                Some(left) => tokio::time::sleep(left).await,
                None => futures::future::pending().await,
            }
        };
        let stream = futures::stream::unfold(
            (events, engine, user),
            |(mut events, engine, user)| async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match events.recv().await {
                        Ok(event) if event.user == user => {
                            let mut change = to_proto_change(&engine, &user, &event.change).await;
                            // Flags are read as they are now, maybe past the event.
                            let now = engine.position(&user).await.unwrap_or(0);
                            change.position = u64::try_from(event.position).unwrap_or(0).max(now);
                            return Some((Ok(change), (events, engine, user)));
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(missed)) => {
                            // The client resynchronises (IMAP: a new SELECT) on this.
                            let status = Status::data_loss(format!(
                                "{missed} changes missed; resynchronise"
                            ));
                            return Some((Err(status), (events, engine, user)));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        )
        .take_until(ends);
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn to_proto_change(
    engine: &StorageEngine,
    user: &UserRef,
    change: &Change,
) -> v1::MailboxChange {
    use v1::mailbox_change::Kind;
    let name = |id| async move {
        engine
            .read_index(user, |i| {
                i.and_then(|i| i.mailbox_by_id(id)).map(|m| m.name.clone())
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    match change {
        Change::MailboxesChanged => v1::MailboxChange {
            kind: Kind::Mailboxes as i32,
            ..Default::default()
        },
        Change::Exists { mailbox, uid } => v1::MailboxChange {
            kind: Kind::Exists as i32,
            mailbox: name(*mailbox).await,
            uid: *uid,
            ..Default::default()
        },
        Change::Flags {
            mailbox,
            uid,
            modseq,
        } => {
            // The message as it is now (its latest flags and MODSEQ, which may be
            // past this change's: a later change event follows then anyway).
            let now = engine
                .read_index(user, |i| {
                    i.and_then(|i| i.mailbox_by_id(*mailbox))
                        .and_then(|m| m.messages.get(uid))
                        .map(|msg| (msg.flags.names(), msg.modseq))
                })
                .await
                .ok()
                .flatten();
            let (flags, has_flags, modseq) = match now {
                Some((flags, current)) => (flags, true, current.max(*modseq)),
                None => (Vec::new(), false, *modseq),
            };
            v1::MailboxChange {
                kind: Kind::Flags as i32,
                mailbox: name(*mailbox).await,
                uid: *uid,
                modseq,
                flags,
                has_flags,
                position: 0,
            }
        }
        Change::Expunge { mailbox, uid } => v1::MailboxChange {
            kind: Kind::Expunge as i32,
            mailbox: name(*mailbox).await,
            uid: *uid,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::policy;
    use mailmesh_kit::internal::Role::{self, *};

    /// Every call a workload's client code makes (`client.rs` for the front doors
    /// and the worker, the gateway's `store.rs`, mailctl's `admin.rs`) is allowed to
    /// it, and the calls that would let a compromised pod walk accounts, keys or mail
    /// are not.
    #[test]
    fn each_role_reaches_the_calls_it_makes_and_no_others() {
        let made: &[(&str, &str, &[Role])] = &[
            (
                "Directory",
                "Lookup",
                &[Admin, SmtpIngress, Submission, DeliveryWorker],
            ),
            (
                "Directory",
                "LookupDomain",
                &[Admin, SmtpIngress, Submission, DeliveryWorker],
            ),
            ("Directory", "Authenticate", &[Submission, Gateway]),
            ("Directory", "RefreshSession", &[Submission, Gateway]),
            ("Directory", "GetSigningKey", &[Submission]),
            ("Directory", "SetPassword", &[Admin]),
            ("Directory", "AddAlias", &[Admin]),
            ("Directory", "ListUsers", &[Admin]),
            ("OutboundQueue", "ListWaiting", &[Admin]),
            ("Mailboxes", "Deliver", &[DeliveryWorker, Storage]),
            ("Mailboxes", "ListMailboxes", &[Admin, Gateway, Storage]),
            ("Mailboxes", "Status", &[Admin, Gateway, Storage]),
            ("Mailboxes", "Fetch", &[Gateway, Storage]),
            ("Mailboxes", "AppendStream", &[Gateway, Storage]),
            ("Mailboxes", "Watch", &[Gateway, Storage]),
            ("Mailboxes", "ListChanges", &[Gateway, Storage]),
            ("Mailboxes", "ClaimRecent", &[Gateway, Storage]),
            ("Mailboxes", "TenantUsage", &[Storage]),
        ];
        for (service, method, allowed) in made {
            for role in Role::ALL {
                assert_eq!(
                    policy(service, method, role),
                    allowed.contains(&role),
                    "{service}/{method} for {role}"
                );
            }
        }
        assert!(!policy("Unknown", "Lookup", Admin));
    }
}
