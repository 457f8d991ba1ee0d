//! Trace context across gRPC calls: the caller's span travels as `traceparent` and
//! `tracestate` metadata, and the callee's span continues the same trace.

use std::collections::BTreeMap;

/// Wraps `message` in a request that carries the current span's trace context.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut carrier = BTreeMap::new();
    crate::telemetry::inject_context(&mut carrier);
    let mut request = tonic::Request::new(message);
    for (key, value) in carrier {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    request
}

/// Makes `span` a child of the trace context the request carries, if any.
pub fn follow<T>(request: &tonic::Request<T>, span: &tracing::Span) {
    let carrier: BTreeMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|key| {
            let value = request.metadata().get(key)?.to_str().ok()?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect();
    if !carrier.is_empty() {
        crate::telemetry::extract_context(span, &carrier);
    }
}
