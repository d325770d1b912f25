//! Auto Scaling instance refresh (awsQuery, signing name `autoscaling`; the rest of Auto Scaling
//! is moto's).
//!
//! A refresh advances one step per DescribeInstanceRefreshes call that shows it: Pending, then
//! InProgress with a growing percentage, then, after `refresh_polls` calls, it ends as the
//! `refresh_outcome` setting says at that moment ([`RefreshOutcome`]):
//! - `Successful`: the group takes the refresh's desired configuration (its launch template),
//!   as AWS updates the group's settings once a refresh with a desired configuration succeeds,
//!   and each instance the group had at the start is replaced by one launched from it.
//! - `Failed` or `RollbackSuccessful`, with the setting's `StatusReason`: no instance is
//!   replaced (a rollback restores the ones a refresh replaced; the emulator's ends before it
//!   replaces any) and the group keeps its configuration.
//!
//! `CancelInstanceRefresh` ends an active refresh `Cancelled`, nothing replaced. Only one
//! refresh per group is active at a time, as on AWS, and while one with a desired
//! configuration is active the group's launch template cannot be changed
//! ([`blocks_launch_template_update`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::response::Response;

use crate::route::Incoming;
use crate::wire::{escape, iso8601, paginate, query, ApiError};
use crate::{lock, RefreshOutcome, State};

const XMLNS: &str = "http://autoscaling.amazonaws.com/doc/2011-01-01/";

pub fn serves(operation: &str) -> bool {
    matches!(
        operation,
        "StartInstanceRefresh" | "DescribeInstanceRefreshes" | "CancelInstanceRefresh"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Pending,
    InProgress,
    Successful,
    Failed,
    Cancelled,
    RollbackSuccessful,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Pending => "Pending",
            Status::InProgress => "InProgress",
            Status::Successful => "Successful",
            Status::Failed => "Failed",
            Status::Cancelled => "Cancelled",
            Status::RollbackSuccessful => "RollbackSuccessful",
        }
    }

    fn active(self) -> bool {
        matches!(self, Status::Pending | Status::InProgress)
    }
}

struct Refresh {
    id: String,
    group: String,
    region: String,
    status: Status,
    /// `StatusReason`: why it ended as it did.
    reason: Option<String>,
    polls: u32,
    percentage: u32,
    /// The group's instances when the refresh started: the ones it replaces.
    instances: Vec<String>,
    started: SystemTime,
    ended: Option<SystemTime>,
    /// Request parameters under `Preferences.` and `DesiredConfiguration.`, echoed back.
    preferences: BTreeMap<String, String>,
    desired: BTreeMap<String, String>,
    strategy: String,
}

impl Refresh {
    fn xml(&self) -> String {
        let mut x = format!(
            "<member><InstanceRefreshId>{}</InstanceRefreshId><AutoScalingGroupName>{}</AutoScalingGroupName><Status>{}</Status><Strategy>{}</Strategy><StartTime>{}</StartTime>",
            self.id,
            escape(&self.group),
            self.status.word(),
            escape(&self.strategy),
            iso8601(self.started)
        );
        if let Some(reason) = &self.reason {
            x.push_str(&format!("<StatusReason>{}</StatusReason>", escape(reason)));
        }
        if let Some(t) = self.ended {
            x.push_str(&format!("<EndTime>{}</EndTime>", iso8601(t)));
        }
        let remaining = if self.status == Status::Successful {
            0
        } else {
            self.instances.len() as u32 * (100 - self.percentage) / 100
        };
        x.push_str(&format!(
            "<PercentageComplete>{p}</PercentageComplete><InstancesToUpdate>{remaining}</InstancesToUpdate><ProgressDetails><LivePoolProgress><PercentageComplete>{p}</PercentageComplete><InstancesToUpdate>{remaining}</InstancesToUpdate></LivePoolProgress></ProgressDetails>",
            p = self.percentage
        ));
        x.push_str(&format!(
            "<Preferences>{}</Preferences>",
            nested_xml(&self.preferences)
        ));
        if !self.desired.is_empty() {
            x.push_str(&format!(
                "<DesiredConfiguration>{}</DesiredConfiguration>",
                nested_xml(&self.desired)
            ));
        }
        x.push_str("</member>");
        x
    }
}

/// Turns flattened query keys (`LaunchTemplate.Version` = `3`) back into nested XML. Lists
/// (`CheckpointPercentages.member.1`) keep their `member` elements.
fn nested_xml(fields: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut open: Vec<String> = Vec::new();
    for (key, value) in fields {
        let path: Vec<String> = key
            .split('.')
            .filter(|p| !p.chars().all(|c| c.is_ascii_digit()))
            .map(str::to_string)
            .collect();
        let common = open.iter().zip(&path).take_while(|(a, b)| a == b).count();
        while open.len() > common {
            out.push_str(&format!("</{}>", open.pop().expect("non-empty")));
        }
        for p in &path[common..path.len() - 1] {
            out.push_str(&format!("<{p}>"));
            open.push(p.clone());
        }
        let leaf = &path[path.len() - 1];
        out.push_str(&format!("<{leaf}>{}</{leaf}>", escape(value)));
    }
    while let Some(p) = open.pop() {
        out.push_str(&format!("</{p}>"));
    }
    out
}

#[derive(Default)]
pub struct Store {
    refreshes: Vec<Refresh>,
}

pub async fn handle(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let form = req.form();
    let param = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let group = param("AutoScalingGroupName")
        .filter(|g| !g.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("ValidationError", "AutoScalingGroupName is required")
        })?;
    let not_found = || {
        ApiError::bad_request(
            "ValidationError",
            format!("AutoScalingGroup name not found - {group}"),
        )
    };
    match req.operation.as_str() {
        "StartInstanceRefresh" => {
            let instances = state
                .moto
                .group_instances(req, &group)
                .await?
                .ok_or_else(not_found)?;
            let strategy = param("Strategy").unwrap_or_else(|| "Rolling".into());
            if strategy != "Rolling" {
                return Err(ApiError::bad_request(
                    "ValidationError",
                    format!(
                        "the emulator refreshes with the Rolling strategy only, not {strategy}"
                    ),
                ));
            }
            let prefixed = |prefix: &str| -> BTreeMap<String, String> {
                form.iter()
                    .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
                    .collect()
            };
            let mut preferences = prefixed("Preferences.");
            for (k, v) in [
                ("MinHealthyPercentage", "90"),
                ("SkipMatching", "false"),
                ("AutoRollback", "false"),
                ("ScaleInProtectedInstances", "Ignore"),
                ("StandbyInstances", "Ignore"),
            ] {
                preferences.entry(k.into()).or_insert_with(|| v.into());
            }
            let mut store = lock(&state.refresh);
            if store
                .refreshes
                .iter()
                .any(|r| r.group == group && r.region == req.region && r.status.active())
            {
                return Err(ApiError::bad_request(
                    "InstanceRefreshInProgress",
                    "An Instance Refresh is already in progress and blocks the execution of this Instance Refresh.",
                ));
            }
            let id = uuid::Uuid::new_v4().to_string();
            store.refreshes.push(Refresh {
                id: id.clone(),
                group,
                region: req.region.clone(),
                status: Status::Pending,
                reason: None,
                polls: 0,
                percentage: 0,
                instances,
                started: SystemTime::now(),
                ended: None,
                preferences,
                desired: prefixed("DesiredConfiguration."),
                strategy,
            });
            Ok(query(
                "StartInstanceRefresh",
                XMLNS,
                &format!("<InstanceRefreshId>{id}</InstanceRefreshId>"),
            ))
        }
        "DescribeInstanceRefreshes" => {
            let ids: Vec<String> = form
                .iter()
                .filter(|(k, _)| k.starts_with("InstanceRefreshIds.member."))
                .map(|(_, v)| v.clone())
                .collect();
            let max = match param("MaxRecords") {
                None => 50,
                Some(m) => m
                    .parse::<usize>()
                    .ok()
                    .filter(|m| (1..=100).contains(m))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "ValidationError",
                            "MaxRecords must be between 1 and 100",
                        )
                    })?,
            };
            let settings = state.settings();
            let polls = settings.refresh_polls.max(1);
            let (items, succeeded) = {
                let mut store = lock(&state.refresh);
                let mut succeeded = None;
                let mut items = Vec::new();
                for r in store.refreshes.iter_mut().rev().filter(|r| {
                    r.group == group
                        && r.region == req.region
                        && (ids.is_empty() || ids.contains(&r.id))
                }) {
                    if r.status.active() {
                        r.polls += 1;
                        if r.polls >= polls {
                            r.ended = Some(SystemTime::now());
                            match &settings.refresh_outcome {
                                RefreshOutcome::Successful => {
                                    r.status = Status::Successful;
                                    r.percentage = 100;
                                    succeeded = Some((r.desired.clone(), r.instances.clone()));
                                }
                                RefreshOutcome::Failed { reason } => {
                                    r.status = Status::Failed;
                                    r.reason = Some(reason.clone());
                                }
                                RefreshOutcome::RollbackSuccessful { reason } => {
                                    r.status = Status::RollbackSuccessful;
                                    r.reason = Some(reason.clone());
                                }
                            }
                        } else {
                            r.status = Status::InProgress;
                            r.percentage = (r.polls * 100 / polls).min(100);
                        }
                    }
                    items.push(r.xml());
                }
                (items, succeeded)
            };
            if let Some((desired, replaced)) = succeeded {
                take_desired_configuration(state, req, &group, &desired).await?;
                if !replaced.is_empty() {
                    state.moto.replace_in_group(req, &group, &replaced).await?;
                }
            }
            let page = paginate(&items, max, param("NextToken").as_deref()).map_err(|_| {
                ApiError::bad_request("InvalidNextToken", "the NextToken is not valid")
            })?;
            let mut result = format!(
                "<InstanceRefreshes>{}</InstanceRefreshes>",
                page.items.concat()
            );
            if let Some(t) = page.next_token {
                result.push_str(&format!("<NextToken>{t}</NextToken>"));
            }
            Ok(query("DescribeInstanceRefreshes", XMLNS, &result))
        }
        "CancelInstanceRefresh" => {
            let mut store = lock(&state.refresh);
            let active = store
                .refreshes
                .iter_mut()
                .find(|r| r.group == group && r.region == req.region && r.status.active())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "ActiveInstanceRefreshNotFound",
                        format!("No in progress or pending Instance Refresh found for Auto Scaling group {group}"),
                    )
                })?;
            active.status = Status::Cancelled;
            active.ended = Some(SystemTime::now());
            Ok(query(
                "CancelInstanceRefresh",
                XMLNS,
                &format!("<InstanceRefreshId>{}</InstanceRefreshId>", active.id),
            ))
        }
        other => Err(ApiError::internal(format!("{other} is not served here"))),
    }
}

/// The group takes a successful refresh's desired launch template (AWS: "Once the instance
/// refresh succeeds, Amazon EC2 Auto Scaling updates the settings of the Auto Scaling group to
/// reflect the new desired configuration").
async fn take_desired_configuration(
    state: &Arc<State>,
    req: &Incoming,
    group: &str,
    desired: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let template: Vec<(String, String)> = desired
        .iter()
        .filter(|(k, _)| k.starts_with("LaunchTemplate."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if template.is_empty() {
        return Ok(());
    }
    let mut params: Vec<(String, String)> = [
        ("Action", "UpdateAutoScalingGroup"),
        ("Version", "2011-01-01"),
        ("AutoScalingGroupName", group),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    params.extend(template);
    state.moto.query(req, "autoscaling", &params).await?;
    Ok(())
}

/// Whether an `UpdateAutoScalingGroup` of `group` must be refused because it changes the
/// group's launch template while a refresh with a desired configuration is active. The AWS
/// user guide ("How an instance refresh works", Limitations, Update restriction) gives the
/// error this answers.
pub(crate) fn blocks_launch_template_update(
    state: &Arc<State>,
    req: &Incoming,
    form: &[(String, String)],
) -> Result<(), ApiError> {
    let Some(group) = form
        .iter()
        .find(|(k, _)| k == "AutoScalingGroupName")
        .map(|(_, v)| v.as_str())
    else {
        return Ok(());
    };
    let changes_template = form.iter().any(|(k, _)| {
        k.starts_with("LaunchTemplate.")
            || k == "LaunchConfigurationName"
            || k.starts_with("MixedInstancesPolicy.")
    });
    let blocked = changes_template
        && lock(&state.refresh).refreshes.iter().any(|r| {
            r.group == group && r.region == req.region && r.status.active() && !r.desired.is_empty()
        });
    if blocked {
        return Err(ApiError::bad_request(
            "ValidationError",
            "An active instance refresh with a desired configuration exists. All configuration options derived from the desired configuration are not available for update while the instance refresh is active.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_parameters_nest_back() {
        let fields: BTreeMap<String, String> = [
            ("LaunchTemplate.LaunchTemplateId", "lt-1"),
            ("LaunchTemplate.Version", "3"),
            ("MinHealthyPercentage", "50"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            nested_xml(&fields),
            "<LaunchTemplate><LaunchTemplateId>lt-1</LaunchTemplateId><Version>3</Version></LaunchTemplate><MinHealthyPercentage>50</MinHealthyPercentage>"
        );
    }
}
