//! The emulator's own control API under `/_emulator/`, for tests and scripts in other
//! languages than Rust (Rust tests hold an [`crate::Emulator`] and call it directly):
//!
//! - `GET /_emulator/health`: 200 once serving.
//! - `GET /_emulator/calls`: every request so far (service, operation, status, fault).
//! - `PUT /_emulator/sandboxes/{instance}`: `{"root": "/dir", "env": {...}}`.
//! - `GET|PUT /_emulator/settings`: the [`crate::Settings`] as JSON; PUT merges the fields given.
//! - `GET|POST|DELETE /_emulator/faults`: list, add one [`crate::Fault`], remove all.
//! - `POST /_emulator/images`: publish a [`crate::PublicImage`]; answers `{"image_id": "ami-..."}`.

use std::sync::Arc;

use axum::extract::{Path, State as Extract};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::Value;

use crate::{lock, Call, Fault, PublicImage, Sandbox, Settings, State};

pub fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/_emulator/health", get(|| async { "ok" }))
        .route("/_emulator/calls", get(calls))
        .route("/_emulator/sandboxes/{instance}", put(sandbox))
        .route("/_emulator/settings", get(settings).put(change_settings))
        .route(
            "/_emulator/faults",
            get(faults).post(add_fault).delete(clear_faults),
        )
        .route("/_emulator/images", post(publish_image))
}

async fn publish_image(
    Extract(state): Extract<Arc<State>>,
    Json(image): Json<PublicImage>,
) -> (StatusCode, Json<Value>) {
    let id = lock(&state.images).publish(image);
    (
        StatusCode::CREATED,
        Json(serde_json::json!({ "image_id": id })),
    )
}

async fn calls(Extract(state): Extract<Arc<State>>) -> Json<Vec<Call>> {
    Json(lock(&state.calls).clone())
}

async fn sandbox(
    Extract(state): Extract<Arc<State>>,
    Path(instance): Path<String>,
    Json(sandbox): Json<Sandbox>,
) -> StatusCode {
    lock(&state.sandboxes).insert(instance, sandbox);
    StatusCode::NO_CONTENT
}

async fn settings(Extract(state): Extract<Arc<State>>) -> Json<Settings> {
    Json(state.settings())
}

async fn change_settings(
    Extract(state): Extract<Arc<State>>,
    Json(change): Json<Value>,
) -> Result<Json<Settings>, (StatusCode, String)> {
    let mut settings = lock(&state.settings);
    let mut merged = serde_json::to_value(&*settings).expect("settings serialize");
    if let (Value::Object(base), Value::Object(change)) = (&mut merged, change) {
        base.extend(change);
    }
    let next: Settings = serde_json::from_value(merged)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid settings: {e}")))?;
    lock(&state.faults).reseed(next.seed);
    *settings = next.clone();
    Ok(Json(next))
}

async fn faults(Extract(state): Extract<Arc<State>>) -> Json<Vec<Fault>> {
    Json(lock(&state.faults).list())
}

async fn add_fault(Extract(state): Extract<Arc<State>>, Json(fault): Json<Fault>) -> StatusCode {
    lock(&state.faults).add(fault);
    StatusCode::CREATED
}

async fn clear_faults(Extract(state): Extract<Arc<State>>) -> StatusCode {
    lock(&state.faults).clear();
    StatusCode::NO_CONTENT
}
