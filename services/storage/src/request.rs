//! Client request ids: a write sent again is not applied twice (issue 20, defect 2).
//!
//! A storage client that did not hear the answer to a write (the replica died, the
//! connection broke, the call timed out) cannot tell whether it was applied. It sends
//! the same call again with the same `mailmesh-request-id`; the index remembers each
//! user's recent requests with their outcomes ([`crate::index::UserIndex::apply_request`]),
//! so the repeat is answered with the first outcome and changes nothing. A streamed
//! APPEND whose answer was lost is finished with `resume` instead (its body was
//! stored under the request id), and a request that never arrived is abandoned, so
//! a late copy is refused and the client can be told it did not happen.
//!
//! The id reaches the engine as a task-local set for the whole call by
//! [`RequestScopeLayer`]; only the command that serves the call takes it
//! ([`crate::engine::StorageEngine::index_request`]), never the commands a call
//! makes on the way (creating a new user's mailboxes).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use mailmesh_proto::REQUEST_ID_METADATA;
use tonic::codegen::http;
use uuid::Uuid;

tokio::task_local! {
    static REQUEST: Option<Uuid>;
}

/// Runs `work` as the client's request `id`.
pub async fn as_request<F: Future>(id: Option<Uuid>, work: F) -> F::Output {
    REQUEST.scope(id, work).await
}

/// The id of the client request being served, if it has one.
pub(crate) fn current() -> Option<Uuid> {
    REQUEST.try_with(|r| *r).ok().flatten()
}

/// The request id a call carries; a malformed one is ignored (the call is then
/// applied as sent, as one without an id).
fn of(headers: &http::HeaderMap) -> Option<Uuid> {
    headers
        .get(REQUEST_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::try_parse(v).ok())
}

/// Serves each call inside its request id's scope.
#[derive(Clone, Copy, Default)]
pub struct RequestScopeLayer;

impl<S> tower_layer::Layer<S> for RequestScopeLayer {
    type Service = RequestScope<S>;
    fn layer(&self, inner: S) -> RequestScope<S> {
        RequestScope { inner }
    }
}

#[derive(Clone)]
pub struct RequestScope<S> {
    inner: S,
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for RequestScope<S>
where
    S: tonic::codegen::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let id = of(request.headers());
        let call = self.inner.call(request);
        Box::pin(as_request(id, call))
    }
}

/// The name of the object a request's message body is stored under: the same for
/// every attempt, so a repeat overwrites the first attempt's bytes instead of
/// leaving an orphan, and `resume` finds them.
pub(crate) fn object_name(id: Uuid) -> String {
    Uuid::new_v5(&id, b"message").simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_id_is_seen_inside_the_scope_only() {
        let id = Uuid::new_v4();
        assert_eq!(current(), None);
        assert_eq!(as_request(Some(id), async { current() }).await, Some(id));
        assert_eq!(as_request(None, async { current() }).await, None);
        assert_eq!(current(), None);
    }

    #[test]
    fn malformed_ids_are_ignored() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(of(&headers), None);
        headers.insert(REQUEST_ID_METADATA, "not-a-uuid".parse().unwrap());
        assert_eq!(of(&headers), None);
        let id = Uuid::new_v4();
        headers.insert(REQUEST_ID_METADATA, id.to_string().parse().unwrap());
        assert_eq!(of(&headers), Some(id));
    }

    #[test]
    fn every_attempt_names_the_same_object() {
        let id = Uuid::new_v4();
        assert_eq!(object_name(id), object_name(id));
        assert_ne!(object_name(id), object_name(Uuid::new_v4()));
    }
}
