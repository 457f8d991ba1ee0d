//! auth-check over gRPC: the server around a [`Checker`], and the client the front
//! doors use.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mailmesh_kit::Shutdown;
use mailmesh_kit::internal::{AuthorizeLayer, InternalTls, Role};
use mailmesh_proto::v1;
use mailmesh_proto::v1::auth_check_client::AuthCheckClient;
use mailmesh_proto::v1::auth_check_server::{AuthCheck as AuthCheckRpc, AuthCheckServer};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::verdict::{ClientVerdict, MessageVerdict};
use crate::{AuthCheck, Checker, MessageFacts, Unavailable};

/// The longest a front door waits for a verdict (DNS timeouts included).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Room for the request's other fields around the message.
const ENVELOPE_SLACK: usize = 64 << 10;

struct Service(Arc<Checker>);

fn ip(raw: &str) -> Result<IpAddr, Status> {
    raw.parse()
        .map_err(|_| Status::invalid_argument(format!("{raw:?} is not an IP address")))
}

#[tonic::async_trait]
impl AuthCheckRpc for Service {
    async fn check_client(
        &self,
        request: Request<v1::CheckClientRequest>,
    ) -> Result<Response<v1::ClientVerdict>, Status> {
        let span = tracing::info_span!("auth.check_client");
        mailmesh_kit::grpc::follow(&request, &span);
        let ip = ip(&request.get_ref().ip)?;
        let verdict = self
            .0
            .check_client(ip)
            .instrument(span)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(verdict.into()))
    }

    async fn check_message(
        &self,
        request: Request<v1::CheckMessageRequest>,
    ) -> Result<Response<v1::MessageVerdict>, Status> {
        let span = tracing::info_span!("auth.check_message");
        mailmesh_kit::grpc::follow(&request, &span);
        let r = request.into_inner();
        let facts = MessageFacts {
            ip: ip(&r.ip)?,
            helo: &r.helo,
            mail_from: &r.mail_from,
            message: &r.message,
            arc_seal: r.arc_seal,
        };
        let verdict = self
            .0
            .check_message(facts)
            .instrument(span)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(verdict.into()))
    }
}

/// Who may call auth-check (ADR 0006): the MX front door, for its clients and
/// messages.
pub fn policy(service: &str, method: &str, role: Role) -> bool {
    matches!(
        (service, method, role),
        (
            "AuthCheck",
            "CheckClient" | "CheckMessage",
            Role::SmtpIngress
        )
    )
}

/// Serves auth-check on `listener` (mutual TLS, callers authorised by
/// [`policy`]) until the shutdown stops.
pub async fn serve(
    checker: Arc<Checker>,
    listener: TcpListener,
    tls: InternalTls,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let limit = checker
        .config()
        .max_message_bytes
        .saturating_add(ENVELOPE_SLACK);
    let stopped = shutdown.stopped_token();
    tonic::transport::Server::builder()
        .max_connection_age(mailmesh_kit::internal::CONNECTION_AGE)
        .max_connection_age_grace(mailmesh_kit::internal::CONNECTION_GRACE)
        .layer(AuthorizeLayer::new(policy))
        .add_service(AuthCheckServer::new(Service(checker)).max_decoding_message_size(limit))
        .serve_with_incoming_shutdown(tls.incoming(listener, &shutdown), async move {
            stopped.cancelled().await
        })
        .await
}

/// auth-check over gRPC.
#[derive(Clone)]
pub struct GrpcAuthCheck(AuthCheckClient<Channel>);

impl GrpcAuthCheck {
    /// Connects lazily (mutual TLS as `tls`'s role): the first call reaches the
    /// service.
    pub fn new(
        endpoint: &str,
        max_message_bytes: usize,
        tls: &InternalTls,
    ) -> anyhow::Result<Self> {
        // A check that takes longer is answered 451 by the caller, not waited for.
        let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT);
        let channel = tls.channel(endpoint, Role::AuthCheck);
        Ok(Self(
            AuthCheckClient::new(channel)
                .max_encoding_message_size(max_message_bytes.saturating_add(ENVELOPE_SLACK)),
        ))
    }
}

#[async_trait]
impl AuthCheck for GrpcAuthCheck {
    async fn check_client(&self, ip: IpAddr) -> Result<ClientVerdict, Unavailable> {
        let request = mailmesh_kit::grpc::traced(v1::CheckClientRequest { ip: ip.to_string() });
        let verdict = self
            .0
            .clone()
            .check_client(request)
            .await
            .map_err(|s| Unavailable(s.message().to_owned()))?;
        Ok(verdict.into_inner().into())
    }

    async fn check_message(&self, facts: MessageFacts<'_>) -> Result<MessageVerdict, Unavailable> {
        let request = mailmesh_kit::grpc::traced(v1::CheckMessageRequest {
            ip: facts.ip.to_string(),
            helo: facts.helo.to_owned(),
            mail_from: facts.mail_from.to_owned(),
            message: facts.message.to_vec(),
            arc_seal: facts.arc_seal,
        });
        let verdict = self
            .0
            .clone()
            .check_message(request)
            .await
            .map_err(|s| Unavailable(s.message().to_owned()))?;
        Ok(verdict.into_inner().into())
    }
}
