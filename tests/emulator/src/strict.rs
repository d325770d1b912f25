//! Where moto is laxer than AWS, the emulator answers as AWS does (each behaviour checked
//! against the AWS API reference, each with a conformance test in `tests/emulator.rs`):
//!
//! - `CreateAutoScalingGroup` on a name that exists fails with `AlreadyExists` ("You already
//!   have an Auto Scaling group or launch configuration with this name"); moto silently
//!   replaces the group.
//! - IAM is eventually consistent: for `profile_propagation` after `CreateInstanceProfile`,
//!   `RunInstances` naming the new profile fails with `InvalidParameterValue` ("Invalid IAM
//!   Instance Profile name"), as the first cold run of any stack with a host meets on AWS.
//! - An instance's SSM agent registers some time after launch: for `ssm_registration` after
//!   `RunInstances`, `SendCommand` naming the instance fails with `InvalidInstanceId`.
//!
//! Checks run before a request is served or forwarded; what they need to remember (when a
//! profile was created, when an instance launched) is recorded from moto's answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;

use crate::route::Incoming;
use crate::wire::ApiError;
use crate::{lock, State};

/// When each instance profile (by name) was created and each instance launched.
#[derive(Default)]
pub struct Store {
    profiles: BTreeMap<String, Instant>,
    instances: BTreeMap<String, Instant>,
}

fn param(form: &[(String, String)], key: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Refuses a request AWS would refuse where moto would not.
pub async fn check(state: &Arc<State>, req: &Incoming) -> Result<(), ApiError> {
    match (req.service.as_str(), req.operation.as_str()) {
        ("autoscaling", "CreateAutoScalingGroup") => {
            let form = req.form();
            let Some(group) = param(&form, "AutoScalingGroupName") else {
                return Ok(());
            };
            if state.moto.group_instances(req, &group).await?.is_some() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "AlreadyExists",
                    format!("AutoScalingGroup by this name already exists - A group with the name {group} already exists"),
                ));
            }
        }
        ("ec2", "RunInstances") => {
            let form = req.form();
            let named = param(&form, "IamInstanceProfile.Name").or_else(|| {
                param(&form, "IamInstanceProfile.Arn")
                    .and_then(|arn| arn.rsplit('/').next().map(str::to_string))
            });
            let Some(profile) = named else {
                return Ok(());
            };
            let young = state.settings().profile_propagation;
            let created = lock(&state.strict).profiles.get(&profile).copied();
            if created.is_some_and(|t| t.elapsed() < young) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValue",
                    format!("Value ({profile}) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"),
                ));
            }
        }
        ("ssm", "SendCommand") => {
            let body = req.json()?;
            let young = state.settings().ssm_registration;
            let store = lock(&state.strict);
            let unregistered: Vec<&str> = body["InstanceIds"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str())
                .filter(|i| store.instances.get(*i).is_some_and(|t| t.elapsed() < young))
                .collect();
            if !unregistered.is_empty() {
                return Err(ApiError::bad_request(
                    "InvalidInstanceId",
                    format!(
                        "Instances [[{}]] not in a valid state for account: the SSM agent has not registered yet",
                        unregistered.join(", ")
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Remembers what a later check needs from a successful answer of moto.
pub fn record(state: &Arc<State>, req: &Incoming, body: &[u8]) {
    match (req.service.as_str(), req.operation.as_str()) {
        ("iam", "CreateInstanceProfile") => {
            if let Some(name) = param(&req.form(), "InstanceProfileName") {
                lock(&state.strict).profiles.insert(name, Instant::now());
            }
        }
        ("ec2", "RunInstances") => {
            let text = String::from_utf8_lossy(body);
            let mut store = lock(&state.strict);
            for id in text.split("<instanceId>").skip(1) {
                if let Some((id, _)) = id.split_once("</instanceId>") {
                    store.instances.insert(id.to_string(), Instant::now());
                }
            }
        }
        _ => {}
    }
}
