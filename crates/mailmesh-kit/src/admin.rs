//! The admin HTTP port: `/livez` (the process answers), `/readyz` (dependencies are
//! reachable and the service is not draining) and `/metrics` (Prometheus text format).
//! It stays up while the service drains, so probes see readiness fail, and closes at
//! the `stopped` phase.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::{Health, Readiness};
use crate::shutdown::Shutdown;

/// How long each readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound admin port.
pub struct AdminServer {
    listener: TcpListener,
    health: Health,
}

impl AdminServer {
    pub async fn bind(addr: SocketAddr, health: Health) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self { listener, health })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the shutdown reaches its `stopped` phase.
    pub async fn serve(self, shutdown: Shutdown) -> std::io::Result<()> {
        let app = Router::new()
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.health);
        let stopped = shutdown.stopped_token();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await
    }
}

async fn livez(State(health): State<Health>) -> impl IntoResponse {
    let stuck = health.stuck();
    if stuck.is_empty() {
        return (StatusCode::OK, "ok\n".to_string());
    }
    let body: String = stuck
        .iter()
        .map(|(name, why)| format!("{name}: {why}\n"))
        .collect();
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    match health.readiness(CHECK_TIMEOUT).await {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_string()),
        Readiness::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string()),
        Readiness::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string()),
        Readiness::Unavailable(failing) => {
            let body: String = failing
                .iter()
                .map(|(name, err)| format!("{name}: {err}\n"))
                .collect();
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let health = Health::new();
        let shutdown = Shutdown::new();
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), health.clone())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.serve(shutdown.clone()));

        crate::metrics::set_build_info("test");
        assert_eq!(get(addr, "/livez").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("mailmesh_build_info{service=\"test\""),
            "{body}"
        );

        health.set_draining();
        assert_eq!(get(addr, "/readyz").await, (503, "draining\n".into()));
        assert_eq!(get(addr, "/livez").await.0, 200);

        struct Stuck;
        impl crate::health::LivenessCheck for Stuck {
            fn name(&self) -> &str {
                "queue"
            }
            fn stuck(&self) -> Option<String> {
                Some("producer failed".into())
            }
        }
        health.add_liveness(std::sync::Arc::new(Stuck));
        assert_eq!(
            get(addr, "/livez").await,
            (503, "queue: producer failed\n".into())
        );

        shutdown.stopped_token().cancel();
        task.await.unwrap().unwrap();
    }
}
