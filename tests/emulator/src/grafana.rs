//! Amazon Managed Grafana (restJson1, signing name `grafana`): workspaces with their
//! CREATING → ACTIVE, UPDATING → ACTIVE and DELETING → gone transitions, tags, and the
//! Identity Center permissions of a workspace (UpdatePermissions with per-entry errors,
//! ListPermissions with filters and pagination).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::response::Response;
use http::StatusCode;
use serde_json::{json, Value};

use crate::route::Incoming;
use crate::wire::{epoch, paginate, rest_json, ApiError};
use crate::{lock, State};

const ACCOUNT: &str = "123456789012";
const ACCESS_TYPES: [&str; 2] = ["CURRENT_ACCOUNT", "ORGANIZATION"];
const PERMISSION_TYPES: [&str; 2] = ["CUSTOMER_MANAGED", "SERVICE_MANAGED"];
const PROVIDERS: [&str; 2] = ["AWS_SSO", "SAML"];
const DATA_SOURCES: [&str; 9] = [
    "AMAZON_OPENSEARCH_SERVICE",
    "CLOUDWATCH",
    "PROMETHEUS",
    "XRAY",
    "TIMESTREAM",
    "SITEWISE",
    "ATHENA",
    "REDSHIFT",
    "TWINMAKER",
];
const ROLES: [&str; 3] = ["ADMIN", "EDITOR", "VIEWER"];
const USER_TYPES: [&str; 2] = ["SSO_USER", "SSO_GROUP"];

/// The operation a grafana REST route names.
pub fn operation(method: &str, segments: &[&str]) -> Option<&'static str> {
    Some(match (method, segments) {
        ("POST", ["workspaces"]) => "CreateWorkspace",
        ("GET", ["workspaces"]) => "ListWorkspaces",
        ("GET", ["workspaces", _]) => "DescribeWorkspace",
        ("PUT", ["workspaces", _]) => "UpdateWorkspace",
        ("DELETE", ["workspaces", _]) => "DeleteWorkspace",
        ("PATCH", ["workspaces", _, "permissions"]) => "UpdatePermissions",
        ("GET", ["workspaces", _, "permissions"]) => "ListPermissions",
        ("POST", ["tags", _]) => "TagResource",
        ("DELETE", ["tags", _]) => "UntagResource",
        ("GET", ["tags", _]) => "ListTagsForResource",
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Creating(Instant),
    Updating(Instant),
    Deleting(Instant),
    Active,
}

struct Workspace {
    id: String,
    region: String,
    name: Option<String>,
    description: Option<String>,
    account_access_type: String,
    permission_type: String,
    providers: Vec<String>,
    data_sources: Vec<String>,
    notification_destinations: Vec<String>,
    organizational_units: Vec<String>,
    organization_role_name: Option<String>,
    stack_set_name: Option<String>,
    role_arn: Option<String>,
    grafana_version: String,
    tags: BTreeMap<String, String>,
    created: SystemTime,
    modified: SystemTime,
    phase: Phase,
    /// (user type, id) → role: a user or group holds one role in a workspace.
    permissions: BTreeMap<(String, String), String>,
}

impl Workspace {
    fn arn(&self) -> String {
        format!(
            "arn:aws:grafana:{}:{ACCOUNT}:/workspaces/{}",
            self.region, self.id
        )
    }

    fn status(&self) -> &'static str {
        match self.phase {
            Phase::Creating(_) => "CREATING",
            Phase::Updating(_) => "UPDATING",
            Phase::Deleting(_) => "DELETING",
            Phase::Active => "ACTIVE",
        }
    }

    fn authentication(&self) -> Value {
        let mut auth = json!({"providers": self.providers});
        if self.providers.iter().any(|p| p == "SAML") {
            auth["samlConfigurationStatus"] = "NOT_CONFIGURED".into();
        }
        auth
    }

    fn endpoint(&self) -> String {
        format!(
            "{}.grafana-workspace.{}.amazonaws.com",
            self.id, self.region
        )
    }

    fn summary(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "created": epoch(self.created),
            "modified": epoch(self.modified),
            "endpoint": self.endpoint(),
            "grafanaVersion": self.grafana_version,
            "status": self.status(),
            "authentication": self.authentication(),
            "notificationDestinations": self.notification_destinations,
            "tags": self.tags,
        });
        set_opt(&mut v, "name", &self.name);
        set_opt(&mut v, "description", &self.description);
        v
    }

    fn description(&self) -> Value {
        let mut v = self.summary();
        v["accountAccessType"] = self.account_access_type.clone().into();
        v["permissionType"] = self.permission_type.clone().into();
        v["dataSources"] = json!(self.data_sources);
        v["organizationalUnits"] = json!(self.organizational_units);
        set_opt(&mut v, "organizationRoleName", &self.organization_role_name);
        set_opt(&mut v, "stackSetName", &self.stack_set_name);
        set_opt(&mut v, "workspaceRoleArn", &self.role_arn);
        v
    }
}

fn set_opt(v: &mut Value, key: &str, value: &Option<String>) {
    if let Some(s) = value {
        v[key] = s.clone().into();
    }
}

#[derive(Default)]
pub struct Store {
    workspaces: Vec<Workspace>,
    /// Client tokens of creates, for idempotent retries.
    tokens: HashMap<String, String>,
}

impl Store {
    /// Applies the transitions whose time has come.
    fn settle(&mut self) {
        let now = Instant::now();
        self.workspaces.retain_mut(|w| match w.phase {
            Phase::Creating(t) | Phase::Updating(t) if t <= now => {
                w.phase = Phase::Active;
                true
            }
            Phase::Deleting(t) => t > now,
            _ => true,
        });
    }

    fn get(&mut self, region: &str, id: &str) -> Result<&mut Workspace, ApiError> {
        self.settle();
        self.workspaces
            .iter_mut()
            .find(|w| w.region == region && w.id == id)
            .ok_or_else(|| ApiError::not_found("WORKSPACE", id))
    }

    fn by_arn(&mut self, arn: &str) -> Result<&mut Workspace, ApiError> {
        self.settle();
        self.workspaces
            .iter_mut()
            .find(|w| w.arn() == arn)
            .ok_or_else(|| ApiError::not_found("WORKSPACE", arn))
    }
}

pub async fn handle(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let delay = state.settings().transition_delay;
    let segments = req.segments();
    let mut store = lock(&state.grafana);
    match req.operation.as_str() {
        "CreateWorkspace" => {
            let body = req.json()?;
            let token = str_field(&body, "clientToken")?;
            if let Some(id) = token.as_ref().and_then(|t| store.tokens.get(t)).cloned() {
                let w = store.get(&req.region, &id)?;
                return Ok(rest_json(
                    StatusCode::ACCEPTED,
                    json!({"workspace": w.description()}),
                ));
            }
            let w = create(&body, &req.region, Instant::now() + delay)?;
            let answer = json!({"workspace": w.description()});
            if let Some(t) = token {
                store.tokens.insert(t, w.id.clone());
            }
            store.workspaces.push(w);
            Ok(rest_json(StatusCode::ACCEPTED, answer))
        }
        "ListWorkspaces" => {
            let query = req.query();
            let max = max_results(&query, 100)?;
            let token = query
                .iter()
                .find(|(k, _)| k == "nextToken")
                .map(|(_, v)| v.as_str());
            store.settle();
            let mine: Vec<&Workspace> = store
                .workspaces
                .iter()
                .filter(|w| w.region == req.region)
                .collect();
            let page = paginate(&mine, max, token)
                .map_err(|_| ApiError::validation("invalid nextToken"))?;
            let mut answer = json!({
                "workspaces": page.items.iter().map(|w| w.summary()).collect::<Vec<_>>()
            });
            if let Some(t) = page.next_token {
                answer["nextToken"] = t.into();
            }
            Ok(rest_json(StatusCode::OK, answer))
        }
        "DescribeWorkspace" => {
            let w = store.get(&req.region, &segments[1])?;
            Ok(rest_json(
                StatusCode::OK,
                json!({"workspace": w.description()}),
            ))
        }
        "UpdateWorkspace" => {
            let body = req.json()?;
            let w = store.get(&req.region, &segments[1])?;
            if w.phase != Phase::Active {
                return Err(busy(w));
            }
            update(w, &body)?;
            w.phase = Phase::Updating(Instant::now() + delay);
            w.modified = SystemTime::now();
            Ok(rest_json(
                StatusCode::ACCEPTED,
                json!({"workspace": w.description()}),
            ))
        }
        "DeleteWorkspace" => {
            let w = store.get(&req.region, &segments[1])?;
            if matches!(w.phase, Phase::Creating(_) | Phase::Deleting(_)) {
                return Err(busy(w));
            }
            w.phase = Phase::Deleting(Instant::now() + delay);
            Ok(rest_json(
                StatusCode::ACCEPTED,
                json!({"workspace": w.description()}),
            ))
        }
        "UpdatePermissions" => {
            let body = req.json()?;
            let w = store.get(&req.region, &segments[1])?;
            if matches!(w.phase, Phase::Creating(_) | Phase::Deleting(_)) {
                return Err(busy(w));
            }
            let errors = update_permissions(w, &body)?;
            Ok(rest_json(StatusCode::OK, json!({"errors": errors})))
        }
        "ListPermissions" => {
            let query = req.query();
            let max = max_results(&query, 100)?;
            let param = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
            let w = store.get(&req.region, &segments[1])?;
            if let Some(t) = param("userType") {
                one_of("userType", t, &USER_TYPES)?;
            }
            let entries: Vec<Value> = w
                .permissions
                .iter()
                .filter(|((kind, id), _)| {
                    param("userType").is_none_or(|t| t == kind)
                        && param("userId").is_none_or(|u| kind == "SSO_USER" && u == id)
                        && param("groupId").is_none_or(|g| kind == "SSO_GROUP" && g == id)
                })
                .map(|((kind, id), role)| json!({"user": {"id": id, "type": kind}, "role": role}))
                .collect();
            let page = paginate(&entries, max, param("nextToken"))
                .map_err(|_| ApiError::validation("invalid nextToken"))?;
            let mut answer = json!({"permissions": page.items});
            if let Some(t) = page.next_token {
                answer["nextToken"] = t.into();
            }
            Ok(rest_json(StatusCode::OK, answer))
        }
        "TagResource" => {
            let body = req.json()?;
            let tags = tags_field(&body)?.unwrap_or_default();
            let w = store.by_arn(&segments[1])?;
            w.tags.extend(tags);
            check_tag_count(&w.tags)?;
            Ok(rest_json(StatusCode::OK, json!({})))
        }
        "UntagResource" => {
            let keys: Vec<String> = req
                .query()
                .into_iter()
                .filter(|(k, _)| k == "tagKeys")
                .map(|(_, v)| v)
                .collect();
            if keys.is_empty() {
                return Err(ApiError::validation("tagKeys is required"));
            }
            let w = store.by_arn(&segments[1])?;
            for k in keys {
                w.tags.remove(&k);
            }
            Ok(rest_json(StatusCode::OK, json!({})))
        }
        "ListTagsForResource" => {
            let w = store.by_arn(&segments[1])?;
            Ok(rest_json(StatusCode::OK, json!({"tags": w.tags})))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            format!(
                "the emulator does not serve {} {}",
                req.method,
                req.uri.path()
            ),
        )),
    }
}

fn busy(w: &Workspace) -> ApiError {
    ApiError::conflict(
        "WORKSPACE",
        &w.id,
        format!("workspace {} is {}", w.id, w.status()),
    )
}

fn create(body: &Value, region: &str, ready: Instant) -> Result<Workspace, ApiError> {
    let required = |k: &str| {
        str_field(body, k)?.ok_or_else(|| ApiError::validation(format!("{k} is required")))
    };
    let account_access_type = required("accountAccessType")?;
    one_of("accountAccessType", &account_access_type, &ACCESS_TYPES)?;
    let permission_type = required("permissionType")?;
    one_of("permissionType", &permission_type, &PERMISSION_TYPES)?;
    let providers = list_field(body, "authenticationProviders", &PROVIDERS)?
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::validation("authenticationProviders is required"))?;
    let name = str_field(body, "workspaceName")?;
    if let Some(n) = &name {
        check_name(n)?;
    }
    let organizational_units =
        list_field(body, "workspaceOrganizationalUnits", &[])?.unwrap_or_default();
    if account_access_type == "ORGANIZATION" && organizational_units.is_empty() {
        return Err(ApiError::validation(
            "workspaceOrganizationalUnits is required when accountAccessType is ORGANIZATION",
        ));
    }
    let tags = tags_field(body)?.unwrap_or_default();
    check_tag_count(&tags)?;
    let now = SystemTime::now();
    Ok(Workspace {
        id: format!("g-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
        region: region.to_string(),
        name,
        description: str_field(body, "workspaceDescription")?,
        account_access_type,
        permission_type,
        providers,
        data_sources: list_field(body, "workspaceDataSources", &DATA_SOURCES)?.unwrap_or_default(),
        notification_destinations: list_field(body, "workspaceNotificationDestinations", &["SNS"])?
            .unwrap_or_default(),
        organizational_units,
        organization_role_name: str_field(body, "organizationRoleName")?,
        stack_set_name: str_field(body, "stackSetName")?,
        role_arn: str_field(body, "workspaceRoleArn")?,
        grafana_version: str_field(body, "grafanaVersion")?.unwrap_or_else(|| "10.4".into()),
        tags,
        created: now,
        modified: now,
        phase: Phase::Creating(ready),
        permissions: BTreeMap::new(),
    })
}

fn update(w: &mut Workspace, body: &Value) -> Result<(), ApiError> {
    if let Some(v) = str_field(body, "accountAccessType")? {
        one_of("accountAccessType", &v, &ACCESS_TYPES)?;
        w.account_access_type = v;
    }
    if let Some(v) = str_field(body, "permissionType")? {
        one_of("permissionType", &v, &PERMISSION_TYPES)?;
        w.permission_type = v;
    }
    if let Some(v) = str_field(body, "workspaceName")? {
        check_name(&v)?;
        w.name = Some(v);
    }
    if let Some(v) = str_field(body, "workspaceDescription")? {
        w.description = Some(v);
    }
    if let Some(v) = str_field(body, "workspaceRoleArn")? {
        w.role_arn = Some(v);
    }
    if let Some(v) = str_field(body, "organizationRoleName")? {
        w.organization_role_name = Some(v);
    }
    if let Some(v) = str_field(body, "stackSetName")? {
        w.stack_set_name = Some(v);
    }
    if let Some(v) = list_field(body, "workspaceDataSources", &DATA_SOURCES)? {
        w.data_sources = v;
    }
    if let Some(v) = list_field(body, "workspaceNotificationDestinations", &["SNS"])? {
        w.notification_destinations = v;
    }
    if let Some(v) = list_field(body, "workspaceOrganizationalUnits", &[])? {
        w.organizational_units = v;
    }
    Ok(())
}

/// Applies a permission batch; what cannot be applied comes back as per-entry errors, the way
/// the service reports them, while the rest of the batch is applied.
fn update_permissions(w: &mut Workspace, body: &Value) -> Result<Vec<Value>, ApiError> {
    let batch = body
        .get("updateInstructionBatch")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::validation("updateInstructionBatch is required"))?;
    let sso = w.providers.iter().any(|p| p == "AWS_SSO");
    let mut errors = Vec::new();
    for instruction in batch {
        let action = str_field(instruction, "action")?.unwrap_or_default();
        one_of("action", &action, &["ADD", "REVOKE"])?;
        let role = str_field(instruction, "role")?.unwrap_or_default();
        one_of("role", &role, &ROLES)?;
        let users = instruction
            .get("users")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::validation("users is required"))?;
        for user in users {
            let id = str_field(user, "id")?.unwrap_or_default();
            let kind = str_field(user, "type")?.unwrap_or_default();
            one_of("type", &kind, &USER_TYPES)?;
            if id.is_empty() || id.len() > 47 {
                return Err(ApiError::validation(format!(
                    "user id {id:?} must be 1 to 47 characters"
                )));
            }
            let refuse = |code: u16, message: String| {
                json!({
                    "code": code,
                    "message": message,
                    "causedBy": {"action": action, "role": role, "users": [{"id": id, "type": kind}]},
                })
            };
            if !sso {
                errors.push(refuse(
                    400,
                    format!(
                        "workspace {} does not use IAM Identity Center (AWS_SSO)",
                        w.id
                    ),
                ));
                continue;
            }
            if !is_identity_center_id(&id) {
                errors.push(refuse(
                    404,
                    format!("{kind} {id} does not exist in IAM Identity Center"),
                ));
                continue;
            }
            let key = (kind.clone(), id.clone());
            match action.as_str() {
                "ADD" => {
                    w.permissions.insert(key, role.clone());
                }
                _ => {
                    if w.permissions.get(&key) == Some(&role) {
                        w.permissions.remove(&key);
                    } else {
                        errors.push(refuse(
                            400,
                            format!("{kind} {id} does not have the role {role}"),
                        ));
                    }
                }
            }
        }
    }
    Ok(errors)
}

/// IAM Identity Center user and group ids: a UUID, optionally after a 10-hex-digit store prefix
/// and a dash (`9067729b3d-94f1e0c8-...`).
fn is_identity_center_id(id: &str) -> bool {
    let uuid = match id.len() {
        36 => id,
        47 if id.as_bytes()[10] == b'-' && id[..10].bytes().all(|b| b.is_ascii_hexdigit()) => {
            &id[11..]
        }
        _ => return false,
    };
    uuid::Uuid::try_parse(uuid).is_ok()
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(format!(
            "workspaceName {name:?} must match [a-zA-Z0-9-._~]{{1,255}}"
        )))
    }
}

fn one_of(field: &str, value: &str, allowed: &[&str]) -> Result<(), ApiError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ApiError::validation(format!(
            "{field} {value:?} is not one of {}",
            allowed.join(", ")
        )))
    }
}

fn str_field(body: &Value, key: &str) -> Result<Option<String>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::validation(format!("{key} must be a string"))),
    }
}

/// A list of strings; each must be one of `allowed` unless that is empty.
fn list_field(body: &Value, key: &str, allowed: &[&str]) -> Result<Option<Vec<String>>, ApiError> {
    let Some(v) = body.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::validation(format!("{key} must be a list")))?;
    let mut out = Vec::new();
    for item in items {
        let s = item
            .as_str()
            .ok_or_else(|| ApiError::validation(format!("{key} must be a list of strings")))?;
        if !allowed.is_empty() {
            one_of(key, s, allowed)?;
        }
        out.push(s.to_string());
    }
    Ok(Some(out))
}

fn tags_field(body: &Value) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    let Some(v) = body.get("tags").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let map: BTreeMap<String, String> = serde_json::from_value(v.clone())
        .map_err(|_| ApiError::validation("tags must map strings to strings"))?;
    for (k, v) in &map {
        if k.is_empty() || k.len() > 128 || v.len() > 256 {
            return Err(ApiError::validation(format!(
                "tag {k:?}: keys are 1 to 128 characters, values at most 256"
            )));
        }
    }
    Ok(Some(map))
}

fn check_tag_count(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if tags.len() > 50 {
        return Err(ApiError::validation("a resource has at most 50 tags"));
    }
    Ok(())
}

fn max_results(query: &[(String, String)], default: usize) -> Result<usize, ApiError> {
    match query.iter().find(|(k, _)| k == "maxResults") {
        None => Ok(default),
        Some((_, v)) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::validation("maxResults must be between 1 and 100")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_center_ids_with_and_without_store_prefix() {
        assert!(is_identity_center_id(
            "94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a"
        ));
        assert!(is_identity_center_id(
            "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a"
        ));
        assert!(!is_identity_center_id("alice"));
        assert!(!is_identity_center_id(
            "zz67729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a"
        ));
    }
}
