//! Client tokens: the creates AWS makes idempotent on a token the caller gives, which moto
//! ignores. A call repeating a token (an SDK retry after a lost answer, or a second pass whose
//! listing does not show yet what the first made) answers what the token made, and makes
//! nothing.
//!
//! - `CreateVolume`: the volume the token made.
//! - `RunInstances`: the reservation the token made, its instances in their state now: a
//!   token outlives its instances (EC2 keeps it at least 24 hours after they terminate), so a
//!   repeat after a termination answers the terminated instance and launches nothing. With
//!   other parameters it fails with `IdempotentParameterMismatch`.
//! - Amazon Managed Service for Prometheus `CreateWorkspace` (`clientToken`): the workspace
//!   the token made.
//!
//! A repeat arriving while the first call is still with moto waits for its answer
//! ([`crate::State::token_creates`]) instead of making a second object.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::moto::{child_text, ec2_query, instance_items, xml};
use crate::route::Incoming;
use crate::wire::ApiError;
use crate::{lock, State};

/// What each token made.
#[derive(Default)]
pub struct Store {
    /// `CreateVolume` and AMP `CreateWorkspace` answers, by operation and token.
    answers: BTreeMap<(String, String), Answer>,
    launches: BTreeMap<String, Launch>,
}

/// An answer as moto gave it.
#[derive(Clone)]
struct Answer {
    status: http::StatusCode,
    content_type: Option<http::HeaderValue>,
    body: Bytes,
}

/// A `RunInstances` a token made.
#[derive(Clone)]
struct Launch {
    /// The request's parameters but the token, sorted: a repeat must match them.
    params: Vec<(String, String)>,
    /// moto's answer.
    answer: String,
}

/// Whether the emulator serves this call (it carries a client token).
pub fn serves(req: &Incoming) -> bool {
    matches!(
        (req.service.as_str(), req.operation.as_str()),
        ("ec2", "CreateVolume" | "RunInstances") | ("aps", "CreateWorkspace")
    ) && token(req).is_some()
}

fn token(req: &Incoming) -> Option<String> {
    if req.service == "aps" {
        return req.json().ok()?["clientToken"].as_str().map(str::to_string);
    }
    req.form()
        .into_iter()
        .find(|(k, _)| k == "ClientToken")
        .map(|(_, v)| v)
}

pub async fn handle(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let Some(token) = token(req) else {
        return Err(ApiError::internal("no client token"));
    };
    let _one_at_a_time = state.token_creates.lock().await;
    if req.operation == "RunInstances" {
        return run_instances(state, req, token).await;
    }
    let key = (req.operation.clone(), token);
    let known = lock(&state.tokens).answers.get(&key).cloned();
    let answer = match known {
        Some(answer) => answer,
        None => {
            let response = state.moto.forward(req).await?;
            let answer = Answer {
                status: response.status(),
                content_type: response.headers().get(http::header::CONTENT_TYPE).cloned(),
                body: response.body().clone(),
            };
            if answer.status.is_success() {
                lock(&state.tokens).answers.insert(key, answer.clone());
            }
            answer
        }
    };
    let mut response = (answer.status, Body::from(answer.body)).into_response();
    if let Some(kind) = answer.content_type {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, kind);
    }
    Ok(response)
}

/// `RunInstances` with a token: the first call goes to moto; a repeat with the same
/// parameters answers moto's first answer with each instance's state as it is now.
async fn run_instances(
    state: &Arc<State>,
    req: &Incoming,
    token: String,
) -> Result<Response, ApiError> {
    let mut params: Vec<(String, String)> = req
        .form()
        .into_iter()
        .filter(|(k, _)| k != "ClientToken")
        .collect();
    params.sort();
    let known = lock(&state.tokens).launches.get(&token).cloned();
    let Some(launch) = known else {
        let response = state.moto.forward(req).await?;
        if response.status().is_success() {
            crate::strict::record(state, req, response.body());
            let answer = String::from_utf8_lossy(response.body()).into_owned();
            lock(&state.tokens)
                .launches
                .insert(token, Launch { params, answer });
        }
        return Ok(response.map(Body::from).into_response());
    };
    if launch.params != params {
        return Err(ApiError::bad_request(
            "IdempotentParameterMismatch",
            "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
        ));
    }
    let answer = with_current_states(state, req, &launch.answer).await?;
    Ok((
        [(http::header::CONTENT_TYPE, "text/xml")],
        Body::from(answer),
    )
        .into_response())
}

/// Each instance of an EC2 answer with where its `instanceState` element is in the text.
fn instance_states(doc: &roxmltree::Document) -> Vec<(String, std::ops::Range<usize>)> {
    instance_items(doc)
        .filter_map(|i| {
            let id = child_text(i, "instanceId")?;
            let at = i.children().find(|n| n.has_tag_name("instanceState"))?;
            Some((id, at.range()))
        })
        .collect()
}

/// A `RunInstances` answer with each instance's `instanceState` replaced by the one
/// `DescribeInstances` answers now.
async fn with_current_states(
    state: &Arc<State>,
    caller: &Incoming,
    answer: &str,
) -> Result<String, ApiError> {
    let items = instance_states(&xml(answer)?);
    let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).collect();
    let text = state
        .moto
        .query(
            caller,
            "ec2",
            &ec2_query("DescribeInstances", &[("instance-id", &ids)]),
        )
        .await?;
    let current: BTreeMap<String, String> = instance_states(&xml(&text)?)
        .into_iter()
        .map(|(id, range)| (id, text[range].to_string()))
        .collect();
    let mut out = answer.to_string();
    // From the last, so the earlier ranges stay where they are.
    for (id, range) in items.into_iter().rev() {
        if let Some(state) = current.get(&id) {
            out.replace_range(range, state);
        }
    }
    Ok(out)
}
