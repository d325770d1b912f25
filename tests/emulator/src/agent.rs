//! What SSM knows of instances and parameters, where moto is missing or kinder than AWS.
//!
//! - Which instances SSM manages: a running instance whose agent has registered
//!   (`ssm_registration` after launch) and that is not in `unmanaged` (no agent, no instance
//!   role). `SendCommand` naming any other fails as a whole with `InvalidInstanceId`; AWS
//!   documents that code for an instance that is not managed, whose agent is not running, or
//!   that is shutting down. `DescribeInstanceInformation` (which moto lacks) lists the managed
//!   ones, 5 to 50 a page: `Online` while running, `ConnectionLost` while stopped (or
//!   stopping, or starting again), as an agent that is not heard from shows.
//! - `DescribeParameters` applies its filters after paging, as AWS documents: each page is the
//!   next `MaxResults` (default 10) of all the account's parameters, keeping those the filters
//!   match, so a page may be empty and still carry a `NextToken`. moto filters first.

use std::sync::Arc;

use axum::response::Response;
use serde_json::{json, Value};

use crate::route::Incoming;
use crate::wire::{aws_json, paginate, ApiError};
use crate::{lock, State};

pub fn serves(operation: &str) -> bool {
    matches!(
        operation,
        "DescribeInstanceInformation" | "DescribeParameters"
    )
}

pub async fn handle(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    match req.operation.as_str() {
        "DescribeInstanceInformation" => instance_information(state, req).await,
        _ => parameters(state, req).await,
    }
}

/// The instances of `ids` SSM does not manage now, in the order given.
pub fn unmanaged(state: &State, ids: &[String]) -> Vec<String> {
    let settings = state.settings();
    let store = lock(&state.strict);
    ids.iter()
        .filter(|id| {
            settings.unmanaged.contains(*id) || store.launched_within(id, settings.ssm_registration)
        })
        .cloned()
        .collect()
}

async fn instance_information(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let body = req.json()?;
    let max = match body.get("MaxResults").and_then(Value::as_u64) {
        None => 50,
        Some(n) if (5..=50).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(
                "ValidationException",
                format!("1 validation error detected: Value '{n}' at 'maxResults' failed to satisfy constraint: Member must have value between 5 and 50"),
            ))
        }
    };
    // Both filter shapes name instance ids the same way.
    let mut wanted: Option<Vec<String>> = None;
    for (list, key, values) in [
        ("Filters", "Key", "Values"),
        ("InstanceInformationFilterList", "key", "valueSet"),
    ] {
        for f in body
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = f.get(key).and_then(Value::as_str).unwrap_or_default();
            if k != "InstanceIds" {
                return Err(ApiError::bad_request(
                    "InvalidFilterKey",
                    format!(
                        "the emulator filters instance information by InstanceIds only, not {k}"
                    ),
                ));
            }
            let ids = f
                .get(values)
                .and_then(Value::as_array)
                .into_iter()
                .flatten();
            wanted
                .get_or_insert_with(Vec::new)
                .extend(ids.filter_map(|v| v.as_str().map(str::to_string)));
        }
    }
    let filters: Vec<(String, Vec<String>)> = wanted
        .map(|ids| vec![("instance-id".to_string(), ids)])
        .unwrap_or_default();
    let live = ["pending", "running", "stopping", "stopped"];
    let registered: Vec<String> = state
        .moto
        .instances_in(req, &live, &filters)
        .await?
        .into_iter()
        .map(|i| i.id)
        .collect();
    let running: Vec<String> = state
        .moto
        .running_instances(req, &filters)
        .await?
        .into_iter()
        .map(|i| i.id)
        .collect();
    let not = unmanaged(state, &registered);
    let managed: Vec<&String> = registered.iter().filter(|i| !not.contains(i)).collect();
    let page = paginate(&managed, max, body.get("NextToken").and_then(Value::as_str))
        .map_err(|_| ApiError::bad_request("InvalidNextToken", "The token is not valid"))?;
    let list: Vec<Value> = page
        .items
        .iter()
        .map(|id| {
            json!({
                "InstanceId": id,
                // A stopped instance stays registered; its agent is not heard from.
                "PingStatus": if running.contains(id) { "Online" } else { "ConnectionLost" },
                "PlatformType": "Linux",
                "PlatformName": "Ubuntu",
                "ResourceType": "EC2Instance",
                "AgentVersion": "3.3.0.0",
                "IsLatestVersion": true,
            })
        })
        .collect();
    let mut answer = json!({ "InstanceInformationList": list });
    if let Some(t) = page.next_token {
        answer["NextToken"] = t.into();
    }
    Ok(aws_json(answer))
}

/// One page of the account's parameters, then the filters: moto answers which parameters the
/// filters match, and in which order all of them are listed.
async fn parameters(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let body = req.json()?;
    let max = match body.get("MaxResults").and_then(Value::as_u64) {
        None => 10,
        Some(n) if (1..=50).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(
                "ValidationException",
                format!("1 validation error detected: Value '{n}' at 'maxResults' failed to satisfy constraint: Member must have value less than or equal to 50"),
            ))
        }
    };
    let mut unfiltered = json!({});
    if let Some(shared) = body.get("Shared") {
        unfiltered["Shared"] = shared.clone();
    }
    let all = every_parameter(state, req, unfiltered).await?;
    let mut filtered = body.clone();
    if let Some(map) = filtered.as_object_mut() {
        map.remove("MaxResults");
        map.remove("NextToken");
    }
    let matching = every_parameter(state, req, filtered).await?;
    let name = |p: &Value| p["Name"].as_str().unwrap_or_default().to_string();
    let page = paginate(&all, max, body.get("NextToken").and_then(Value::as_str))
        .map_err(|_| ApiError::bad_request("InvalidNextToken", "The token is not valid"))?;
    let list: Vec<&Value> = page
        .items
        .iter()
        .filter_map(|p| matching.iter().find(|m| name(m) == name(p)))
        .collect();
    let mut answer = json!({ "Parameters": list });
    if let Some(t) = page.next_token {
        answer["NextToken"] = t.into();
    }
    Ok(aws_json(answer))
}

/// Every parameter moto's `DescribeParameters` answers to `request`, all its pages read.
async fn every_parameter(
    state: &Arc<State>,
    req: &Incoming,
    mut request: Value,
) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    loop {
        let call = Incoming::internal_json(req, "ssm", "AmazonSSM.DescribeParameters", &request);
        let response = state.moto.forward(&call).await?;
        let text = response.body();
        if !response.status().is_success() {
            // moto's refusal of the filters is the caller's answer.
            let error: Value = serde_json::from_slice(text).unwrap_or_default();
            let code = error["__type"].as_str().unwrap_or("ValidationException");
            let code = code.rsplit('#').next().unwrap_or(code);
            let message = error["message"].as_str().unwrap_or_default();
            return Err(ApiError::new(response.status(), code, message));
        }
        let page: Value = serde_json::from_slice(text).map_err(|e| {
            ApiError::internal(format!("moto's DescribeParameters is not JSON: {e}"))
        })?;
        out.extend(page["Parameters"].as_array().cloned().unwrap_or_default());
        match page.get("NextToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => request["NextToken"] = t.into(),
            _ => return Ok(out),
        }
    }
}
