//! The storage service as its callers see it (STYLE: a service is a trait; its client
//! wraps the engine in this process, as in `mailctl dev`, or a gRPC channel).

use std::sync::Arc;

use crate::directory::{DkimAlgorithm, Lookup, Resolution, TenantLimits, UserId};
use crate::engine::{Delivery, StorageEngine, UserRef};
use crate::{EngineError, StorageError};
use async_trait::async_trait;
use mailmesh_proto::v1;
use mailmesh_proto::v1::directory_client::DirectoryClient;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_types::{Domain, EmailAddress};
use tonic::transport::Channel;

/// Why a delivery did not happen, as the sender must hear it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying: a backend did not answer, a mailbox is full for now.
    #[error("{status} {reason}")]
    Temporary {
        status: &'static str,
        reason: String,
    },
    /// Never going to work: reported to the sender in a DSN.
    #[error("{status} {reason}")]
    Permanent {
        status: &'static str,
        reason: String,
    },
}

impl DeliveryError {
    pub fn temporary(reason: impl Into<String>) -> Self {
        Self::Temporary {
            status: "4.3.0",
            reason: reason.into(),
        }
    }
}

impl From<EngineError> for DeliveryError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Refused(StorageError::NotFound(reason)) => Self::Permanent {
                status: "5.1.1",
                reason,
            },
            EngineError::Refused(StorageError::OverQuota {
                reason,
                permanent: true,
            }) => Self::Permanent {
                status: "5.2.2",
                reason,
            },
            EngineError::Refused(StorageError::OverQuota { reason, .. }) => Self::Temporary {
                status: "4.2.2",
                reason,
            },
            EngineError::Refused(StorageError::InvalidArgument(reason)) => Self::Permanent {
                status: "5.6.0",
                reason,
            },
            other => Self::temporary(other.to_string()),
        }
    }
}

impl From<tonic::Status> for DeliveryError {
    fn from(s: tonic::Status) -> Self {
        let reason = s.message().to_owned();
        match s.code() {
            tonic::Code::NotFound => Self::Permanent {
                status: "5.1.1",
                reason,
            },
            tonic::Code::InvalidArgument => Self::Permanent {
                status: "5.6.0",
                reason,
            },
            // The message is larger than the storage service takes.
            tonic::Code::OutOfRange => Self::Permanent {
                status: "5.3.4",
                reason,
            },
            tonic::Code::ResourceExhausted
                if s.metadata().get(crate::grpc::PERMANENT_METADATA).is_some() =>
            {
                Self::Permanent {
                    status: "5.2.2",
                    reason,
                }
            }
            tonic::Code::ResourceExhausted => Self::Temporary {
                status: "4.2.2",
                reason,
            },
            _ => Self::temporary(format!("storage: {reason}")),
        }
    }
}

/// A user who proved their password (submission), with their tenant's limits.
#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    pub user: UserRef,
    pub address: EmailAddress,
    pub limits: TenantLimits,
    /// The tenant wants the client left out of Received headers.
    pub hide_client: bool,
    /// The session token storage gave for this login (empty in process), for the
    /// calls made for this user; and when it expires (ms since the epoch).
    pub session: String,
    pub session_expires_ms: i64,
    /// Half way to the expiry, as seen when the token came: renew from then on.
    pub session_renew_at_ms: i64,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("user", &self.user)
            .field("address", &self.address)
            .field("limits", &self.limits)
            .field("hide_client", &self.hide_client)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// When a token expiring at `expires_ms` should be renewed: half way there.
pub fn renew_at(expires_ms: i64) -> i64 {
    let now = now_ms();
    now + expires_ms.saturating_sub(now) / 2
}

impl Account {
    /// Whether the session token should be renewed now (half its life is gone).
    pub fn session_renewal_due(&self) -> bool {
        !self.session.is_empty() && now_ms() >= self.session_renew_at_ms
    }

    fn proto_user(&self) -> v1::UserRef {
        v1::UserRef {
            tenant: self.user.tenant.to_string(),
            user_id: self.user.user.to_string(),
            session: self.session.clone(),
            position: 0,
        }
    }
}

/// The key that signs a domain's outgoing mail.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub domain: Domain,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 DER.
    pub pkcs8: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

#[async_trait]
pub trait Mailstore: Send + Sync {
    async fn lookup(&self, address: &EmailAddress) -> Result<Lookup, DeliveryError>;
    async fn deliver(&self, user: &UserRef, delivery: Delivery<'_>) -> Result<(), DeliveryError>;
    /// Whether `user`'s quota has room for `bytes` more now (advice: the delivery
    /// decides).
    async fn has_room(&self, user: &UserRef, bytes: u64) -> Result<bool, DeliveryError>;
    /// The enabled user behind `address` and `password`; `None` when either is wrong
    /// (which one is never said).
    async fn authenticate(
        &self,
        address: &str,
        password: &str,
        client: std::net::IpAddr,
    ) -> Result<Option<Account>, DeliveryError>;
    /// The key that signs mail from `domain` (of `account`'s tenant), if it has one.
    async fn signing_key(
        &self,
        account: &Account,
        domain: &Domain,
    ) -> Result<Option<SigningKey>, DeliveryError>;
    /// Renews the account's session token; `false` when the session has ended (the
    /// account was disabled or removed, or the token expired).
    async fn refresh(&self, account: &mut Account) -> Result<bool, DeliveryError>;
    /// The tenant owning `domain` and its inbound policy; `None` when not local.
    async fn local_domain(
        &self,
        domain: &Domain,
    ) -> Result<Option<(mailmesh_types::TenantId, mailmesh_types::InboundPolicy)>, DeliveryError>;
}

#[async_trait]
impl Mailstore for Arc<StorageEngine> {
    async fn authenticate(
        &self,
        address: &str,
        password: &str,
        _client: std::net::IpAddr,
    ) -> Result<Option<Account>, DeliveryError> {
        let Ok(address) = address.parse::<EmailAddress>() else {
            return Ok(None);
        };
        let secret = mailmesh_kit::Secret::new(password.to_owned());
        let Some(user) = StorageEngine::authenticate(self, &address, secret).await? else {
            return Ok(None);
        };
        let (limits, hide_client) = self
            .directory(|d| {
                d.tenant(&user.tenant)
                    .map(|t| (t.limits.clone(), t.hide_client))
            })?
            .unwrap_or_default();
        Ok(Some(Account {
            user: UserRef {
                tenant: user.tenant,
                user: user.id,
            },
            address: user.address,
            limits,
            hide_client,
            session: String::new(),
            session_expires_ms: 0,
            session_renew_at_ms: 0,
        }))
    }

    async fn signing_key(
        &self,
        account: &Account,
        domain: &Domain,
    ) -> Result<Option<SigningKey>, DeliveryError> {
        let owner = self.directory(|d| d.domain_owner(domain).cloned())?;
        if owner.as_ref() != Some(&account.user.tenant) {
            return Ok(None);
        }
        let Some((key, pkcs8)) = StorageEngine::signing_key(self, domain)? else {
            return Ok(None);
        };
        Ok(Some(SigningKey {
            domain: key.domain,
            selector: key.selector,
            algorithm: key.algorithm,
            pkcs8,
        }))
    }

    async fn refresh(&self, account: &mut Account) -> Result<bool, DeliveryError> {
        // As over gRPC: the same user, still in the tenant it logged in to.
        let enabled = self.directory(|d| {
            d.user(&account.user.user)
                .filter(|u| u.tenant == account.user.tenant)
                .map(|u| u.enabled)
        })?;
        Ok(enabled == Some(true))
    }

    async fn lookup(&self, address: &EmailAddress) -> Result<Lookup, DeliveryError> {
        Ok(StorageEngine::lookup(self, address)?)
    }

    async fn local_domain(
        &self,
        domain: &Domain,
    ) -> Result<Option<(mailmesh_types::TenantId, mailmesh_types::InboundPolicy)>, DeliveryError>
    {
        Ok(self.directory(|d| {
            let tenant = d.domain_owner(domain)?.clone();
            let inbound = d.tenant(&tenant).map(|t| t.inbound).unwrap_or_default();
            Some((tenant, inbound))
        })?)
    }

    async fn deliver(&self, user: &UserRef, delivery: Delivery<'_>) -> Result<(), DeliveryError> {
        StorageEngine::deliver(self, user, delivery).await?;
        Ok(())
    }

    async fn has_room(&self, user: &UserRef, bytes: u64) -> Result<bool, DeliveryError> {
        Ok(StorageEngine::has_room(self, user, bytes).await?)
    }
}

/// The cache channel storage announces a domain's DKIM key changes on (its name as
/// the message): submission forgets what it cached for the domain at once instead of
/// after `key_cache_ttl`. Pub/sub is best effort; the TTL bounds a missed message.
pub const DKIM_KEYS_CHANNEL: &str = "dkim-keys";

/// The storage service over gRPC.
#[derive(Clone)]
pub struct GrpcMailstore {
    directory: DirectoryClient<Channel>,
    mailboxes: MailboxesClient<Channel>,
}

impl GrpcMailstore {
    /// Connects lazily (mutual TLS, as `tls`'s role): the first call reaches the
    /// service.
    pub fn new(
        endpoint: &str,
        max_message_bytes: usize,
        tls: &mailmesh_kit::internal::InternalTls,
    ) -> anyhow::Result<Self> {
        // A call that takes longer fails as a temporary error (451 / retried).
        let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(120));
        let channel = tls.channel(endpoint, mailmesh_kit::internal::Role::Storage);
        Ok(Self {
            directory: DirectoryClient::new(channel.clone()),
            mailboxes: MailboxesClient::new(channel)
                .max_encoding_message_size(max_message_bytes.saturating_add(64 << 10)),
        })
    }
}

fn user_ref(u: &v1::UserRef) -> Result<UserRef, DeliveryError> {
    let tenant = u
        .tenant
        .parse()
        .map_err(|e| DeliveryError::temporary(format!("storage answered a bad tenant: {e}")))?;
    let id = uuid::Uuid::try_parse(&u.user_id)
        .map_err(|_| DeliveryError::temporary("storage answered a bad user id"))?;
    Ok(UserRef {
        tenant,
        user: UserId(id),
    })
}

#[async_trait]
impl Mailstore for GrpcMailstore {
    async fn authenticate(
        &self,
        address: &str,
        password: &str,
        client: std::net::IpAddr,
    ) -> Result<Option<Account>, DeliveryError> {
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
        let (true, Some(info)) = (r.ok, r.user) else {
            return Ok(None);
        };
        if !info.enabled {
            return Ok(None);
        }
        let user = info
            .user
            .as_ref()
            .ok_or_else(|| DeliveryError::temporary("storage answered no user"))?;
        let l = r.limits.unwrap_or_default();
        Ok(Some(Account {
            user: user_ref(user)?,
            address: info
                .address
                .parse()
                .map_err(|_| DeliveryError::temporary("storage answered a bad address"))?,
            limits: TenantLimits {
                max_users: (l.max_users != 0).then_some(l.max_users),
                max_storage_bytes: (l.max_storage_bytes != 0).then_some(l.max_storage_bytes),
                max_message_bytes: (l.max_message_bytes != 0).then_some(l.max_message_bytes),
                send_rate_per_hour: (l.send_rate_per_hour != 0).then_some(l.send_rate_per_hour),
            },
            hide_client: r.hide_client,
            session: user.session.clone(),
            session_expires_ms: r.session_expires_ms,
            session_renew_at_ms: renew_at(r.session_expires_ms),
        }))
    }

    async fn signing_key(
        &self,
        account: &Account,
        domain: &Domain,
    ) -> Result<Option<SigningKey>, DeliveryError> {
        let r = self
            .directory
            .clone()
            .get_signing_key(v1::DomainRequest {
                tenant: String::new(),
                domain: domain.to_string(),
                user: Some(account.proto_user()),
            })
            .await?
            .into_inner();
        let Some(info) = r.key else {
            return Ok(None);
        };
        let algorithm = match v1::DkimAlgorithm::try_from(info.algorithm) {
            Ok(v1::DkimAlgorithm::Rsa2048) => DkimAlgorithm::Rsa2048,
            _ => DkimAlgorithm::Ed25519,
        };
        Ok(Some(SigningKey {
            domain: domain.clone(),
            selector: info.selector,
            algorithm,
            pkcs8: r.private_key,
        }))
    }

    async fn refresh(&self, account: &mut Account) -> Result<bool, DeliveryError> {
        match self
            .directory
            .clone()
            .refresh_session(account.proto_user())
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                account.session = r.user.map(|u| u.session).unwrap_or_default();
                account.session_expires_ms = r.expires_ms;
                account.session_renew_at_ms = renew_at(r.expires_ms);
                Ok(true)
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => Ok(false),
            Err(s) => Err(s.into()),
        }
    }

    async fn local_domain(
        &self,
        domain: &Domain,
    ) -> Result<Option<(mailmesh_types::TenantId, mailmesh_types::InboundPolicy)>, DeliveryError>
    {
        use v1::lookup_response::Result as R;
        let r = self
            .directory
            .clone()
            .lookup_domain(v1::DomainRequest {
                tenant: String::new(),
                domain: domain.to_string(),
                user: None,
            })
            .await?
            .into_inner();
        match R::try_from(r.result) {
            Ok(R::Deliver) => Ok(Some((
                r.tenant.parse().map_err(|e| {
                    DeliveryError::temporary(format!("storage answered a bad tenant: {e}"))
                })?,
                r.inbound_policy.unwrap_or_default().into(),
            ))),
            Ok(R::NotLocal) => Ok(None),
            _ => Err(DeliveryError::temporary(
                "storage answered an unknown lookup result",
            )),
        }
    }

    async fn lookup(&self, address: &EmailAddress) -> Result<Lookup, DeliveryError> {
        use v1::lookup_response::Result as R;
        let r = self
            .directory
            .clone()
            .lookup(v1::AddressRequest {
                address: address.to_string(),
            })
            .await?
            .into_inner();
        match R::try_from(r.result) {
            Ok(R::NotLocal) => Ok(Lookup::NotLocal),
            Ok(R::Unknown) => Ok(Lookup::Unknown),
            Ok(R::Deliver) => Ok(Lookup::Deliver(Resolution {
                tenant: r.tenant.parse().map_err(|e| {
                    DeliveryError::temporary(format!("storage answered a bad tenant: {e}"))
                })?,
                users: r
                    .users
                    .iter()
                    .map(|u| user_ref(u).map(|u| (u.tenant, u.user)))
                    .collect::<Result<_, _>>()?,
                with_quota: r
                    .users
                    .iter()
                    .zip(&r.has_quota)
                    .filter(|(_, limited)| **limited)
                    .filter_map(|(u, _)| user_ref(u).ok().map(|u| u.user))
                    .collect(),
                remote: r.remote.iter().filter_map(|a| a.parse().ok()).collect(),
                inbound: r.inbound_policy.unwrap_or_default().into(),
                max_message_bytes: (r.max_message_bytes != 0).then_some(r.max_message_bytes),
            })),
            _ => Err(DeliveryError::temporary(
                "storage answered an unknown lookup result",
            )),
        }
    }

    async fn deliver(&self, user: &UserRef, d: Delivery<'_>) -> Result<(), DeliveryError> {
        self.mailboxes
            .clone()
            .deliver(mailmesh_kit::grpc::traced(v1::DeliverRequest {
                user: Some(v1::UserRef {
                    tenant: user.tenant.to_string(),
                    user_id: user.user.to_string(),
                    session: String::new(),
                    position: 0,
                }),
                mailbox: d.mailbox.to_owned(),
                return_path: d.return_path.to_string(),
                delivered_to: d.delivered_to.to_string(),
                message: d.message.to_vec(),
                delivery_key: d.key.to_owned(),
                internal_date_ms: d.internal_date_ms,
            }))
            .await?;
        Ok(())
    }

    async fn has_room(&self, user: &UserRef, bytes: u64) -> Result<bool, DeliveryError> {
        Ok(self
            .mailboxes
            .clone()
            .has_room(mailmesh_kit::grpc::traced(v1::RoomRequest {
                user: Some(v1::UserRef {
                    tenant: user.tenant.to_string(),
                    user_id: user.user.to_string(),
                    session: String::new(),
                    position: 0,
                }),
                bytes,
            }))
            .await?
            .into_inner()
            .room)
    }
}
