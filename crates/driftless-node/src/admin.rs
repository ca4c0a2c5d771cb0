//! The admin HTTP listener: `/healthz` (process alive), `/readyz` (store reachable, not shutting
//! down), `/status` (JSON for `driftless status`), `/metrics`, and `POST /reconcile` with its
//! `/reconcile/progress` (for `driftless diff` and `driftless reconcile`).

use crate::node::Context;
use crate::status::{NodeStatus, TableStatus};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

pub async fn serve(ctx: Arc<Context>, listener: TcpListener) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reconcile", axum::routing::post(reconcile))
        .route("/reconcile/progress", get(reconcile_progress))
        .with_state(ctx.clone());
    let mut shutdown = ctx.shutdown.clone();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            crate::node::stopped(&mut shutdown).await;
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "admin listener stopped");
    }
}

async fn ready(State(ctx): State<Arc<Context>>) -> (StatusCode, String) {
    if *ctx.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match ctx.store.call(|s| s.log_head()).await {
        Ok(_) => (StatusCode::OK, "ready\n".into()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unreachable: {e}\n"),
        ),
    }
}

/// Builds the status document of a running node.
pub async fn node_status(ctx: &Context) -> Result<NodeStatus, driftless_store::StoreError> {
    let (head, pending, held, tables) = ctx
        .store
        .call(|s| {
            Ok((
                s.log_head()?,
                s.pending_local_writes()?,
                s.held_count()?,
                s.table_stats()?,
            ))
        })
        .await?;
    Ok(NodeStatus {
        name: ctx.name.clone(),
        node_id: ctx.node_id.to_string(),
        store: ctx.config.store.describe(),
        log_head: head.0,
        pending_local_writes: pending,
        held_changes: held,
        auth_failures: ctx.auth_failures.load(Ordering::Relaxed),
        protocol_errors: ctx.protocol_errors.load(Ordering::Relaxed),
        changes_captured: ctx.changes_captured.load(Ordering::Relaxed),
        changes_applied: ctx.changes_applied.load(Ordering::Relaxed),
        peers: ctx.peers.snapshot(),
        tables: tables
            .into_iter()
            .map(|t| TableStatus {
                table: t.table.to_string(),
                rows: t.rows,
                conflicts: t.conflicts,
                dead_letters: t.dead_letters,
            })
            .collect(),
    })
}

async fn status(State(ctx): State<Arc<Context>>) -> Result<Json<NodeStatus>, (StatusCode, String)> {
    node_status(&ctx).await.map(Json).map_err(|e| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unreachable: {e}\n"),
        )
    })
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
}

/// Query of `POST /reconcile`.
#[derive(Debug, serde::Deserialize)]
struct ReconcileQuery {
    peer: String,
    table: Option<String>,
    #[serde(default)]
    repair: bool,
    #[serde(default)]
    local: bool,
}

/// Runs a reconciliation with a peer (repair or just diff) and answers with its report.
async fn reconcile(
    State(ctx): State<Arc<Context>>,
    axum::extract::Query(q): axum::extract::Query<ReconcileQuery>,
) -> Result<Json<crate::reconcile::ReconcileReport>, (StatusCode, String)> {
    let options = crate::reconcile::ReconcileOptions {
        repair: q.repair,
        local_check: q.local,
    };
    crate::reconcile::reconcile(&ctx, &q.peer, q.table.as_deref(), options, "manual")
        .await
        .map(Json)
        .map_err(|e| {
            let status = match e {
                crate::reconcile::ReconcileError::NotConnected(_)
                | crate::reconcile::ReconcileError::UnknownTable(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            (status, format!("{e}\n"))
        })
}

/// What the running reconciliation is doing (`null` when none runs).
async fn reconcile_progress(
    State(ctx): State<Arc<Context>>,
) -> Json<Option<crate::reconcile::ReconcileProgress>> {
    Json(
        ctx.reconcile_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    )
}
