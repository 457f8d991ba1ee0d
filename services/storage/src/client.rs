//! The storage service as its callers see it (STYLE: a service is a trait; its client
//! wraps the engine in this process, as in `mailctl dev`, or a gRPC channel).

use std::sync::Arc;

use crate::directory::{Lookup, Resolution, UserId};
use crate::engine::{Delivery, StorageEngine, UserRef};
use crate::{EngineError, StorageError};
use async_trait::async_trait;
use mailmesh_proto::v1;
use mailmesh_proto::v1::directory_client::DirectoryClient;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_types::EmailAddress;
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

#[async_trait]
pub trait Mailstore: Send + Sync {
    async fn lookup(&self, address: &EmailAddress) -> Result<Lookup, DeliveryError>;
    async fn deliver(&self, user: &UserRef, delivery: Delivery<'_>) -> Result<(), DeliveryError>;
}

#[async_trait]
impl Mailstore for Arc<StorageEngine> {
    async fn lookup(&self, address: &EmailAddress) -> Result<Lookup, DeliveryError> {
        Ok(StorageEngine::lookup(self, address)?)
    }

    async fn deliver(&self, user: &UserRef, delivery: Delivery<'_>) -> Result<(), DeliveryError> {
        StorageEngine::deliver(self, user, delivery).await?;
        Ok(())
    }
}

/// The storage service over gRPC.
#[derive(Clone)]
pub struct GrpcMailstore {
    directory: DirectoryClient<Channel>,
    mailboxes: MailboxesClient<Channel>,
}

impl GrpcMailstore {
    /// Connects lazily: the first call reaches the service.
    pub fn new(endpoint: &str, max_message_bytes: usize) -> anyhow::Result<Self> {
        // A call that takes longer fails as a temporary error (451 / retried).
        let channel = Channel::from_shared(endpoint.to_owned())?
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(120))
            .connect_lazy();
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
                remote: r.remote.iter().filter_map(|a| a.parse().ok()).collect(),
                inbound: r.inbound_policy.unwrap_or_default().into(),
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
}
