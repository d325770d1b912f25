//! What AWS shows late, and moto at once:
//!
//! - `DescribeInstances` leaves out an instance for [`crate::Settings::listing_lag`] after
//!   `RunInstances` launched it: the EC2 API is eventually consistent, and a describe right
//!   after a launch may not show the instance yet ("Eventual consistency in the Amazon EC2
//!   API").
//! - A deleted load balancer's network interfaces stay in its security groups for
//!   [`crate::Settings::interface_release`]: `DeleteSecurityGroup` of one fails with
//!   `DependencyViolation` until they are released, as terraform-provider-aws meets when it
//!   destroys an ALB and its group together.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};

use crate::moto::{child_text, instance_items, xml};
use crate::route::Incoming;
use crate::wire::ApiError;
use crate::{lock, State};

/// Load balancers deleted, with the security groups they were in.
#[derive(Default)]
pub struct Store {
    deleted_balancers: Vec<(Instant, BTreeSet<String>)>,
}

/// `DescribeInstances` without the instances launched less than `listing_lag` ago. `None`
/// when there is no lag: moto serves it.
pub async fn describe_instances(
    state: &Arc<State>,
    req: &Incoming,
) -> Option<Result<Response, ApiError>> {
    let lag = state.settings().listing_lag;
    if lag.is_zero() {
        return None;
    }
    Some(hide_young_instances(state, req, lag).await)
}

async fn hide_young_instances(
    state: &Arc<State>,
    req: &Incoming,
    lag: std::time::Duration,
) -> Result<Response, ApiError> {
    let response = state.moto.forward(req).await?;
    if !response.status().is_success() {
        return Ok(response.map(Body::from).into_response());
    }
    let text = String::from_utf8_lossy(response.body()).into_owned();
    let young: Vec<std::ops::Range<usize>> = {
        let doc = xml(&text)?;
        let strict = lock(&state.strict);
        instance_items(&doc)
            .filter(|i| {
                child_text(*i, "instanceId").is_some_and(|id| strict.launched_within(&id, lag))
            })
            .map(|i| i.range())
            .collect()
    };
    let mut page = text;
    for range in young.into_iter().rev() {
        page.replace_range(range, "");
    }
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, Body::from(page)))
}

/// Before `DeleteLoadBalancer`: remembers the security groups of the load balancer, whose
/// network interfaces outlive it.
pub async fn deleting_balancer(state: &Arc<State>, req: &Incoming) -> Result<(), ApiError> {
    if state.settings().interface_release.is_zero() {
        return Ok(());
    }
    let Some(arn) = req
        .form()
        .into_iter()
        .find(|(k, _)| k == "LoadBalancerArn")
        .map(|(_, v)| v)
    else {
        return Ok(());
    };
    let params = [
        ("Action", "DescribeLoadBalancers"),
        ("Version", "2015-12-01"),
        ("LoadBalancerArns.member.1", arn.as_str()),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let Ok(text) = state.moto.query(req, "elasticloadbalancing", &params).await else {
        // No such load balancer: the delete answers for itself.
        return Ok(());
    };
    let doc = xml(&text)?;
    let groups: BTreeSet<String> = doc
        .root()
        .descendants()
        .filter(|n| n.has_tag_name("SecurityGroups"))
        .flat_map(|l| l.children().filter(|n| n.has_tag_name("member")))
        .filter_map(|m| m.text().map(str::to_string))
        .collect();
    if !groups.is_empty() {
        lock(&state.consistency)
            .deleted_balancers
            .push((Instant::now(), groups));
    }
    Ok(())
}

/// Whether a deleted load balancer's network interfaces are still in `group`.
pub fn interfaces_in(state: &Arc<State>, group: &str) -> bool {
    let release = state.settings().interface_release;
    let mut store = lock(&state.consistency);
    store
        .deleted_balancers
        .retain(|(at, _)| at.elapsed() < release);
    store
        .deleted_balancers
        .iter()
        .any(|(_, groups)| groups.contains(group))
}
