//! Liveness and readiness, and the HTTP server that exposes them with the
//! metrics: `/metrics`, `/healthz`, `/readyz`.
//!
//! Liveness follows progress: the consume loop reports every iteration and
//! every finished record; when nothing is reported for `stall_timeout`,
//! `/healthz` fails so Kubernetes restarts the pod. Readiness means joined
//! to the group with a reachable broker; it never depends on the providers.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub struct Health {
    last_progress_ms: AtomicI64,
    stall_timeout_ms: i64,
    joined: AtomicBool,
    broker_up: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    pub fn new(stall_timeout: Duration) -> Health {
        Health {
            last_progress_ms: AtomicI64::new(now_ms()),
            stall_timeout_ms: stall_timeout.as_millis() as i64,
            joined: AtomicBool::new(false),
            broker_up: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn set_connection(&self, joined: bool, broker_up: bool) {
        self.joined.store(joined, Ordering::Relaxed);
        self.broker_up.store(broker_up, Ordering::Relaxed);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Milliseconds since the last progress report.
    pub fn stalled_for_ms(&self) -> i64 {
        now_ms() - self.last_progress_ms.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        self.stalled_for_ms() <= self.stall_timeout_ms
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why the instance is not ready, if it is not.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            Some("shutting down")
        } else if !self.broker_up.load(Ordering::Relaxed) {
            Some("no Kafka broker reachable")
        } else if !self.joined.load(Ordering::Relaxed) {
            Some("not (yet) a member of the consumer group with partitions to read")
        } else {
            None
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_live() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: no progress for {} ms\n",
                s.health.stalled_for_ms()
            ),
        )
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.not_ready_because() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

pub fn router(metrics_: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics: metrics_,
            health,
        })
}

/// Binds `listen` and serves until `shutdown`. Binding errors are returned
/// at once so start-up fails naming the address. Returns the bound address
/// (useful with port 0).
pub async fn serve(
    listen: &str,
    metrics_: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<(tokio::task::JoinHandle<()>, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(metrics_, health);
    Ok((
        tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "metrics server failed");
            }
        }),
        addr,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("the server answers");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    #[tokio::test]
    async fn readiness_says_why_and_liveness_follows_progress_over_http() {
        let health = Arc::new(Health::new(Duration::from_millis(300)));
        let stop = CancellationToken::new();
        let (server, addr) = serve(
            "127.0.0.1:0",
            Arc::new(Metrics::new()),
            health.clone(),
            stop.clone(),
        )
        .await
        .expect("bind");

        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: no Kafka broker reachable\n".into())
        );
        health.set_connection(false, true);
        assert_eq!(
            get(addr, "/readyz").await,
            (
                503,
                "not ready: not (yet) a member of the consumer group with partitions to read\n"
                    .into()
            )
        );
        health.set_connection(true, true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (status, body) = get(addr, "/healthz").await;
        assert_eq!(status, 503);
        assert!(body.starts_with("stalled: no progress for "), "{body}");
        health.progress();
        assert_eq!(get(addr, "/healthz").await.0, 200);

        health.set_stopping();
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: shutting down\n".into())
        );
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("insights_assigned_partitions 0"), "{body}");
        stop.cancel();
        server.await.expect("the server stops");
    }
}
