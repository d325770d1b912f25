//! AMP alertmanager definitions (restJson1, signing name `aps`; the rest of AMP is moto's).
//!
//! Like AWS, the emulator accepts any definition and checks it asynchronously: one that does not
//! parse as an AMP alertmanager configuration ends CREATION_FAILED or UPDATE_FAILED with the
//! reason, and a failed update keeps the previous definition in force. The check is the
//! emulator's own, independent of the operator's offline validation, and as strict as AMP:
//! only SNS receivers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::response::Response;
use base64::Engine as _;
use http::StatusCode;
use serde_json::{json, Value};

use crate::route::Incoming;
use crate::wire::{epoch, rest_json, ApiError};
use crate::{lock, State};

/// The operation an AMP REST route names (all of AMP, so faults can target moto's part too).
pub fn operation(method: &str, segments: &[&str]) -> Option<&'static str> {
    Some(match (method, segments) {
        ("POST", ["workspaces"]) => "CreateWorkspace",
        ("GET", ["workspaces"]) => "ListWorkspaces",
        ("GET", ["workspaces", _]) => "DescribeWorkspace",
        ("DELETE", ["workspaces", _]) => "DeleteWorkspace",
        ("POST", ["workspaces", _, "alias"]) => "UpdateWorkspaceAlias",
        ("POST", ["workspaces", _, "rulegroupsnamespaces"]) => "CreateRuleGroupsNamespace",
        ("GET", ["workspaces", _, "rulegroupsnamespaces"]) => "ListRuleGroupsNamespaces",
        ("GET", ["workspaces", _, "rulegroupsnamespaces", _]) => "DescribeRuleGroupsNamespace",
        ("PUT", ["workspaces", _, "rulegroupsnamespaces", _]) => "PutRuleGroupsNamespace",
        ("DELETE", ["workspaces", _, "rulegroupsnamespaces", _]) => "DeleteRuleGroupsNamespace",
        ("POST", ["workspaces", _, "logging"]) => "CreateLoggingConfiguration",
        ("GET", ["workspaces", _, "logging"]) => "DescribeLoggingConfiguration",
        ("PUT", ["workspaces", _, "logging"]) => "UpdateLoggingConfiguration",
        ("DELETE", ["workspaces", _, "logging"]) => "DeleteLoggingConfiguration",
        ("POST", ["workspaces", _, "alertmanager", "definition"]) => "CreateAlertManagerDefinition",
        ("GET", ["workspaces", _, "alertmanager", "definition"]) => {
            "DescribeAlertManagerDefinition"
        }
        ("PUT", ["workspaces", _, "alertmanager", "definition"]) => "PutAlertManagerDefinition",
        ("DELETE", ["workspaces", _, "alertmanager", "definition"]) => {
            "DeleteAlertManagerDefinition"
        }
        ("POST", ["tags", _]) => "TagResource",
        ("GET", ["tags", _]) => "ListTagsForResource",
        ("DELETE", ["tags", _]) => "UntagResource",
        _ => return None,
    })
}

/// Whether the emulator serves an AMP operation (the others go to moto).
pub fn serves(operation: &str) -> bool {
    operation.ends_with("AlertManagerDefinition")
}

#[derive(Clone, Debug)]
enum Phase {
    /// Until the instant, then ACTIVE or CREATION_FAILED with the reason.
    Creating(Instant, Option<String>),
    /// Until the instant, then the new data is in force, or UPDATE_FAILED with the reason.
    Updating(Instant, Vec<u8>, Option<String>),
    Deleting(Instant),
    Active,
    CreationFailed(String),
    UpdateFailed(String),
}

struct Definition {
    data: Vec<u8>,
    phase: Phase,
    created: SystemTime,
    modified: SystemTime,
}

impl Definition {
    fn status(&self) -> Value {
        let (code, reason) = match &self.phase {
            Phase::Creating(..) => ("CREATING", None),
            Phase::Updating(..) => ("UPDATING", None),
            Phase::Deleting(_) => ("DELETING", None),
            Phase::Active => ("ACTIVE", None),
            Phase::CreationFailed(r) => ("CREATION_FAILED", Some(r)),
            Phase::UpdateFailed(r) => ("UPDATE_FAILED", Some(r)),
        };
        let mut status = json!({"statusCode": code});
        if let Some(r) = reason {
            status["statusReason"] = r.clone().into();
        }
        status
    }

    fn busy(&self) -> bool {
        matches!(
            self.phase,
            Phase::Creating(..) | Phase::Updating(..) | Phase::Deleting(_)
        )
    }
}

#[derive(Default)]
pub struct Store {
    definitions: BTreeMap<(String, String), Definition>,
}

impl Store {
    fn settle(&mut self) {
        let now = Instant::now();
        self.definitions.retain(|_, d| {
            match std::mem::replace(&mut d.phase, Phase::Active) {
                Phase::Creating(t, outcome) if t <= now => {
                    d.phase = outcome.map_or(Phase::Active, Phase::CreationFailed);
                }
                Phase::Updating(t, data, outcome) if t <= now => match outcome {
                    None => {
                        d.data = data;
                        d.phase = Phase::Active;
                    }
                    Some(reason) => d.phase = Phase::UpdateFailed(reason),
                },
                Phase::Deleting(t) if t <= now => return false,
                other => d.phase = other,
            }
            true
        });
    }

    /// Drops the definition of a deleted workspace.
    pub fn forget(&mut self, region: &str, workspace: &str) {
        self.definitions
            .remove(&(region.to_string(), workspace.to_string()));
    }
}

pub async fn handle(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let workspace = req.segments()[1].clone();
    let key = (req.region.clone(), workspace.clone());
    let ready = Instant::now() + state.settings().transition_delay;
    let not_found = || ApiError::not_found("AlertManagerDefinition", &workspace);
    match req.operation.as_str() {
        "CreateAlertManagerDefinition" => {
            let data = data_field(req)?;
            if !state.moto.amp_workspace_exists(req, &workspace).await? {
                return Err(ApiError::not_found("Workspace", &workspace));
            }
            let mut store = lock(&state.alertmanager);
            store.settle();
            if store.definitions.contains_key(&key) {
                return Err(ApiError::conflict(
                    "AlertManagerDefinition",
                    &workspace,
                    format!("workspace {workspace} already has an alertmanager definition"),
                ));
            }
            let outcome = check(&data).err();
            let now = SystemTime::now();
            let definition = Definition {
                data,
                phase: Phase::Creating(ready, outcome),
                created: now,
                modified: now,
            };
            let status = definition.status();
            store.definitions.insert(key, definition);
            Ok(rest_json(StatusCode::ACCEPTED, json!({"status": status})))
        }
        "PutAlertManagerDefinition" => {
            let data = data_field(req)?;
            let mut store = lock(&state.alertmanager);
            store.settle();
            let definition = store.definitions.get_mut(&key).ok_or_else(not_found)?;
            if definition.busy() {
                return Err(conflict(&workspace, definition));
            }
            let outcome = check(&data).err();
            // A definition that never became active is replaced as a new one.
            definition.phase = match definition.phase {
                Phase::CreationFailed(_) => {
                    definition.data = data;
                    Phase::Creating(ready, outcome)
                }
                _ => Phase::Updating(ready, data, outcome),
            };
            definition.modified = SystemTime::now();
            Ok(rest_json(
                StatusCode::ACCEPTED,
                json!({"status": definition.status()}),
            ))
        }
        "DescribeAlertManagerDefinition" => {
            let mut store = lock(&state.alertmanager);
            store.settle();
            let d = store.definitions.get(&key).ok_or_else(not_found)?;
            Ok(rest_json(
                StatusCode::OK,
                json!({"alertManagerDefinition": {
                    "status": d.status(),
                    "data": base64::engine::general_purpose::STANDARD.encode(&d.data),
                    "createdAt": epoch(d.created),
                    "modifiedAt": epoch(d.modified),
                }}),
            ))
        }
        "DeleteAlertManagerDefinition" => {
            let mut store = lock(&state.alertmanager);
            store.settle();
            let d = store.definitions.get_mut(&key).ok_or_else(not_found)?;
            if d.busy() {
                return Err(conflict(&workspace, d));
            }
            d.phase = Phase::Deleting(ready);
            Ok(rest_json(StatusCode::ACCEPTED, json!({})))
        }
        other => Err(ApiError::internal(format!("{other} is not served here"))),
    }
}

fn conflict(workspace: &str, d: &Definition) -> ApiError {
    ApiError::conflict(
        "AlertManagerDefinition",
        workspace,
        format!(
            "the alertmanager definition of {workspace} is {}",
            d.status()["statusCode"].as_str().unwrap_or_default()
        ),
    )
}

fn data_field(req: &Incoming) -> Result<Vec<u8>, ApiError> {
    let body = req.json()?;
    let data = body
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::validation("data is required"))?;
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| ApiError::validation("data is not base64"))
}

/// Receiver integrations Alertmanager knows; AMP accepts only `sns_configs`.
const INTEGRATIONS: [&str; 13] = [
    "sns_configs",
    "email_configs",
    "slack_configs",
    "pagerduty_configs",
    "opsgenie_configs",
    "webhook_configs",
    "victorops_configs",
    "pushover_configs",
    "wechat_configs",
    "telegram_configs",
    "discord_configs",
    "webex_configs",
    "msteams_configs",
];

const CONFIG_KEYS: [&str; 7] = [
    "global",
    "route",
    "receivers",
    "inhibit_rules",
    "templates",
    "mute_time_intervals",
    "time_intervals",
];

/// Checks a definition as AMP does; the error is the status reason.
fn check(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|_| "the definition is not UTF-8".to_string())?;
    let doc: Value = marked_yaml::from_yaml(0, text)
        .map_err(|e| format!("the definition is not valid YAML: {e}"))?;
    let doc = doc
        .as_object()
        .ok_or("the definition must be a YAML mapping")?;
    if let Some(k) = doc
        .keys()
        .find(|k| !["alertmanager_config", "template_files"].contains(&k.as_str()))
    {
        return Err(format!("field {k} not found in the definition"));
    }
    if let Some(files) = doc.get("template_files") {
        let ok = files
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string));
        if !ok {
            return Err("template_files must map file names to template text".into());
        }
    }
    let config = doc
        .get("alertmanager_config")
        .and_then(Value::as_str)
        .ok_or("alertmanager_config is required and must be a string")?;
    let config: Value = marked_yaml::from_yaml(0, config)
        .map_err(|e| format!("alertmanager_config is not valid YAML: {e}"))?;
    let config = config
        .as_object()
        .ok_or("alertmanager_config must be a YAML mapping")?;
    if let Some(k) = config.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
        return Err(format!("field {k} not found in type config.plain"));
    }
    let mut names = BTreeSet::new();
    for receiver in config
        .get("receivers")
        .map(|r| r.as_array().ok_or("receivers must be a list"))
        .transpose()?
        .into_iter()
        .flatten()
    {
        let receiver = receiver.as_object().ok_or("a receiver must be a mapping")?;
        let name = receiver
            .get("name")
            .and_then(Value::as_str)
            .ok_or("missing name in receiver")?;
        if !names.insert(name.to_string()) {
            return Err(format!("notification config name \"{name}\" is not unique"));
        }
        for key in receiver.keys().filter(|k| *k != "name") {
            if key == "sns_configs" {
                check_sns(name, &receiver[key])?;
            } else if INTEGRATIONS.contains(&key.as_str()) {
                return Err(format!(
                    "receiver \"{name}\": {key} is not supported by Amazon Managed Service for Prometheus, only sns_configs"
                ));
            } else {
                return Err(format!("field {key} not found in type config.plain"));
            }
        }
    }
    let route = config.get("route").ok_or("no route provided in config")?;
    if route.get("receiver").and_then(Value::as_str).is_none() {
        return Err("root route must specify a default receiver".into());
    }
    check_route(route, &names)
}

fn check_sns(receiver: &str, configs: &Value) -> Result<(), String> {
    let configs = configs.as_array().ok_or(format!(
        "receiver \"{receiver}\": sns_configs must be a list"
    ))?;
    for c in configs {
        let has_target = ["topic_arn", "target_arn", "phone_number"]
            .iter()
            .any(|k| c.get(k).and_then(Value::as_str).is_some());
        if !has_target {
            return Err(format!(
                "receiver \"{receiver}\": must provide either a Target ARN, Topic ARN, or Phone Number for SNS config"
            ));
        }
    }
    Ok(())
}

fn check_route(route: &Value, receivers: &BTreeSet<String>) -> Result<(), String> {
    let route = route.as_object().ok_or("a route must be a mapping")?;
    if let Some(r) = route.get("receiver") {
        let r = r.as_str().ok_or("a route's receiver must be a string")?;
        if !receivers.contains(r) {
            return Err(format!("undefined receiver \"{r}\" used in route"));
        }
    }
    for key in ["group_wait", "group_interval", "repeat_interval"] {
        if let Some(v) = route.get(key) {
            let text = v.as_str().unwrap_or_default();
            if !is_duration(text) {
                return Err(format!("not a valid duration string: \"{text}\" ({key})"));
            }
        }
    }
    for child in route
        .get("routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        check_route(child, receivers)?;
    }
    Ok(())
}

/// A Prometheus duration: units y, w, d, h, m, s, ms in that order, each at most once.
fn is_duration(text: &str) -> bool {
    const UNITS: [&str; 7] = ["y", "w", "d", "h", "m", "s", "ms"];
    if text == "0" {
        return true;
    }
    let mut rest = text;
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let Some(pos) = UNITS[next_unit..].iter().position(|u| *u == &rest[..unit]) else {
            return false;
        };
        next_unit += pos + 1;
        rest = &rest[unit..];
    }
    !text.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
alertmanager_config: |
  route:
    receiver: default
    group_wait: 30s
    routes:
      - receiver: critical
        matchers: ['severity="critical"']
        repeat_interval: 1h30m
  receivers:
    - name: default
      sns_configs:
        - topic_arn: arn:aws:sns:us-east-1:123456789012:alerts
    - name: critical
      sns_configs:
        - topic_arn: arn:aws:sns:us-east-1:123456789012:critical
"#;

    #[test]
    fn a_valid_definition_passes() {
        assert_eq!(check(GOOD.as_bytes()), Ok(()));
    }

    #[test]
    fn an_undefined_receiver_fails_with_alertmanagers_words() {
        let bad = GOOD.replace("receiver: critical", "receiver: pager");
        let reason = check(bad.as_bytes()).unwrap_err();
        assert_eq!(reason, "undefined receiver \"pager\" used in route");
    }

    #[test]
    fn slack_is_refused_as_amp_does() {
        let bad = GOOD.replace(
            "sns_configs:\n        - topic_arn: arn:aws:sns:us-east-1:123456789012:alerts",
            "slack_configs:\n        - channel: '#ops'",
        );
        let reason = check(bad.as_bytes()).unwrap_err();
        assert!(
            reason.contains("slack_configs is not supported"),
            "{reason}"
        );
    }

    #[test]
    fn a_bad_duration_and_a_missing_config_fail() {
        let bad = GOOD.replace("1h30m", "90 minutes");
        assert!(check(bad.as_bytes()).unwrap_err().contains("duration"));
        assert!(check(b"template_files: {}").is_err());
        assert!(check(b"alertmanager_config: [").is_err());
    }

    #[test]
    fn durations_follow_prometheus() {
        for ok in ["0", "30s", "1h30m", "1d", "100ms", "2w3d"] {
            assert!(is_duration(ok), "{ok}");
        }
        for bad in ["", "1", "30m1h", "1x", "s", "1h1h"] {
            assert!(!is_duration(bad), "{bad}");
        }
    }
}
