//! Amazon Managed Grafana workspaces and their role associations.
//!
//! A workspace is created (or adopted by id, and then never recreated) with its authentication
//! providers, permission and account access types, data sources, notification destinations and
//! IAM role. When `roles` is given, it is the exact set of IAM Identity Center users and groups
//! per Grafana role: the diff becomes the minimal `UpdatePermissions` batch (ADD what is missing
//! or in another role, REVOKE what is extra), so out-of-band grants are corrected.
//!
//! # Guarantees
//! - A workspace is created with its ownership tags and a client token derived from the stack,
//!   the resource and the desired state, so a retried or crash-repeated create makes no second
//!   workspace.
//! - A workspace still CREATING is waited on (up to the wait timeout), then left to the next
//!   pass as pending, never failed or created again.
//! - Permission updates are per entry: the entries the service refuses are the resource's
//!   error, with the service's messages; the rest is applied.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_grafana::types::{
    AccountAccessType, AuthenticationProviderTypes, DataSourceType, NotificationDestinationType,
    PermissionType, Role, UpdateAction, UpdateInstruction, User, UserType, WorkspaceStatus,
};
use serde::Deserialize;
use toml::Spanned;

use crate::change::{removed_objects, Action, Change};
use crate::controller::{wait_until, Context, Controller, Progress};
use crate::desired::{check_tags, DesiredState, Resource, Spec, Validator, TAG_STACK};
use crate::error::{aws_error, Error, Result};
use crate::model::{Kind, Outputs, Refs, ResourceId};
use crate::tags::{self, owned_by, Tags};

/// `[amg.workspace.<name>]`; `adopt = "<workspace id>"` manages an existing one.
///
/// A setting left out is left as it is on an existing workspace, and takes its default when
/// the workspace is created.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Defaults to `<stack>-<name>` (an adopted workspace keeps its own).
    pub name: Option<String>,
    pub description: Option<String>,
    /// `AWS_SSO` and/or `SAML`; default `["AWS_SSO"]`; set at creation only.
    pub authentication_providers: Option<Vec<String>>,
    /// `SERVICE_MANAGED` (default) or `CUSTOMER_MANAGED`.
    pub permission_type: Option<String>,
    /// `CURRENT_ACCOUNT` (default) or `ORGANIZATION`.
    pub account_access_type: Option<String>,
    /// `PROMETHEUS`, `CLOUDWATCH`, ...
    pub data_sources: Option<Vec<String>>,
    /// `SNS`.
    pub notification_destinations: Option<Vec<String>>,
    /// Workspace IAM role, usually `${iam.role.<name>.arn}`.
    pub role_arn: Option<String>,
    /// Identity Center users and groups per Grafana role (`admin`, `editor`, `viewer`). When
    /// given, the exact set: a role left out has nobody. When absent, permissions are left
    /// alone.
    pub roles: Option<BTreeMap<String, RoleMembers>>,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
}

/// The exact set of users and groups a Grafana role grants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMembers {
    #[serde(default)]
    pub users: Vec<Spanned<String>>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
}

/// IAM Identity Center user and group ids: a UUID, optionally after the identity store's
/// 10-hex-digit prefix and a dash (`9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a`).
pub fn is_identity_center_id(id: &str) -> bool {
    let uuid = match id.split_at_checked(11) {
        Some((prefix, rest))
            if id.len() == 47
                && prefix.ends_with('-')
                && prefix[..10].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            rest
        }
        _ => id,
    };
    let groups: Vec<&str> = uuid.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

const DEFAULT_PROVIDER: &str = "AWS_SSO";
const DEFAULT_PERMISSION_TYPE: &str = "SERVICE_MANAGED";
const DEFAULT_ACCOUNT_ACCESS: &str = "CURRENT_ACCOUNT";

impl WorkspaceSpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
        for p in self.authentication_providers.iter().flatten() {
            if p != "AWS_SSO" && p != "SAML" {
                v.here(format!(
                    "authentication provider `{p}` is not AWS_SSO or SAML"
                ));
            }
        }
        if self
            .authentication_providers
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            v.here("`authentication_providers` needs AWS_SSO, SAML or both");
        }
        if let Some(t) = &self.permission_type {
            if !["SERVICE_MANAGED", "CUSTOMER_MANAGED"].contains(&t.as_str()) {
                v.here(format!(
                    "permission_type `{t}` is not SERVICE_MANAGED or CUSTOMER_MANAGED"
                ));
            }
        }
        if let Some(t) = &self.account_access_type {
            if !["CURRENT_ACCOUNT", "ORGANIZATION"].contains(&t.as_str()) {
                v.here(format!(
                    "account_access_type `{t}` is not CURRENT_ACCOUNT or ORGANIZATION"
                ));
            }
        }
        for d in self.data_sources.iter().flatten() {
            const KNOWN: [&str; 9] = [
                "AMAZON_OPENSEARCH_SERVICE",
                "ATHENA",
                "CLOUDWATCH",
                "PROMETHEUS",
                "REDSHIFT",
                "SITEWISE",
                "TIMESTREAM",
                "TWINMAKER",
                "XRAY",
            ];
            if !KNOWN.contains(&d.as_str()) {
                v.here(format!(
                    "data source `{d}` is not one of {}",
                    KNOWN.join(", ")
                ));
            }
        }
        for d in self.notification_destinations.iter().flatten() {
            if d != "SNS" {
                v.here(format!("notification destination `{d}` is not SNS"));
            }
        }
        // A user or group holds one role in a workspace.
        let mut holder: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for (role, members) in self.roles.iter().flatten() {
            if !["admin", "editor", "viewer"].contains(&role.as_str()) {
                v.here(format!(
                    "Grafana role `{role}` is not admin, editor or viewer"
                ));
            }
            let listed = members
                .users
                .iter()
                .map(|u| ("user", u))
                .chain(members.groups.iter().map(|g| ("group", g)));
            for (kind, member) in listed {
                let id = member.get_ref().as_str();
                if !is_identity_center_id(id) {
                    v.error(&member.span(), format!(
                        "{kind} `{id}` in role `{role}` is not an IAM Identity Center {kind} id (a UUID, optionally after a 10-hex-digit identity store prefix and `-`)"
                    ));
                }
                if let Some(other) = holder.insert((kind, id), role) {
                    v.error(&member.span(), format!(
                        "{kind} `{id}` is in both `{other}` and `{role}`: a user or group holds one Grafana role"
                    ));
                }
            }
        }
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observed state

/// A user or group: (`SSO_USER` or `SSO_GROUP`, Identity Center id).
pub type Member = (String, String);

#[derive(Debug, Clone, Default)]
pub struct ObservedWorkspace {
    pub id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub status: String,
    pub endpoint: String,
    pub tags: Tags,
    pub providers: Vec<String>,
    pub permission_type: String,
    pub account_access_type: String,
    pub data_sources: Vec<String>,
    pub notification_destinations: Vec<String>,
    pub role_arn: Option<String>,
    /// Member → Grafana role (`ADMIN`, `EDITOR`, `VIEWER`); read only when the workspace is
    /// ACTIVE or UPDATING.
    pub permissions: BTreeMap<Member, String>,
}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub region: String,
    pub account: String,
    /// Workspaces owned by the stack or adopted by id.
    pub workspaces: Vec<ObservedWorkspace>,
}

impl Observed {
    pub fn find(&self, desired: &DesiredState, r: &Resource) -> Option<&ObservedWorkspace> {
        match &r.adopt {
            Some(id) => self.workspaces.iter().find(|w| &w.id == id),
            None => self
                .workspaces
                .iter()
                .find(|w| owned_by(&w.tags, desired.stack_name(), &r.id) && w.status != "DELETING"),
        }
    }
}

fn arn(region: &str, account: &str, id: &str) -> String {
    format!("arn:aws:grafana:{region}:{account}:/workspaces/{id}")
}

// ---------------------------------------------------------------------------------------------
// The controller

pub struct AmgController;

/// One instruction of an `UpdatePermissions` batch: ADD or REVOKE, a role, its members.
pub type Instruction = (String, String, Vec<Member>);

/// A field of a plan: name, before, after.
type PlanLine = (&'static str, Option<String>, Option<String>);

/// The settings of a workspace that UpdateWorkspace can change; None: not set (left as is).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub name: Option<String>,
    pub description: Option<String>,
    pub permission_type: Option<String>,
    pub account_access_type: Option<String>,
    pub data_sources: Option<Vec<String>>,
    pub notification_destinations: Option<Vec<String>>,
    pub role_arn: Option<String>,
}

impl Settings {
    /// The desired settings that differ from `have`, with a plan line for each.
    fn changes(&self, have: &Settings) -> (Settings, Vec<PlanLine>) {
        fn pick<T: Clone + PartialEq>(
            want: &Option<T>,
            have: &Option<T>,
            out: &mut Option<T>,
        ) -> bool {
            let differs = want.is_some() && want != have;
            if differs {
                *out = want.clone();
            }
            differs
        }
        let list = |v: &Option<Vec<String>>| v.as_ref().map(|v| v.join(", "));
        let mut out = Settings::default();
        let mut lines = Vec::new();
        if pick(&self.name, &have.name, &mut out.name) {
            lines.push(("name", have.name.clone(), self.name.clone()));
        }
        if pick(&self.description, &have.description, &mut out.description) {
            lines.push((
                "description",
                have.description.clone(),
                self.description.clone(),
            ));
        }
        if pick(
            &self.permission_type,
            &have.permission_type,
            &mut out.permission_type,
        ) {
            lines.push((
                "permission_type",
                have.permission_type.clone(),
                self.permission_type.clone(),
            ));
        }
        if pick(
            &self.account_access_type,
            &have.account_access_type,
            &mut out.account_access_type,
        ) {
            lines.push((
                "account_access_type",
                have.account_access_type.clone(),
                self.account_access_type.clone(),
            ));
        }
        if pick(
            &self.data_sources,
            &have.data_sources,
            &mut out.data_sources,
        ) {
            lines.push((
                "data_sources",
                list(&have.data_sources),
                list(&self.data_sources),
            ));
        }
        if pick(
            &self.notification_destinations,
            &have.notification_destinations,
            &mut out.notification_destinations,
        ) {
            lines.push((
                "notification_destinations",
                list(&have.notification_destinations),
                list(&self.notification_destinations),
            ));
        }
        if pick(&self.role_arn, &have.role_arn, &mut out.role_arn) {
            lines.push(("role_arn", have.role_arn.clone(), self.role_arn.clone()));
        }
        (out, lines)
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    /// Creates the workspace, waits for it to become ACTIVE, then grants the roles.
    Create {
        settings: Settings,
        providers: Vec<String>,
        tags: Tags,
        client_token: String,
        permissions: Vec<Instruction>,
    },
    /// Waits for a workspace still CREATING (up to the wait timeout), then grants the roles.
    AwaitActive {
        workspace: String,
        permissions: Vec<Instruction>,
    },
    Update {
        workspace: String,
        settings: Settings,
    },
    Tag {
        workspace: String,
        tags: Tags,
    },
    Untag {
        workspace: String,
        keys: Vec<String>,
    },
    UpdatePermissions {
        workspace: String,
        batch: Vec<Instruction>,
    },
    Delete {
        workspace: String,
    },
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// The desired members of each role, as the API names them.
fn desired_permissions(roles: &BTreeMap<String, RoleMembers>) -> BTreeMap<Member, String> {
    let mut out = BTreeMap::new();
    for (role, members) in roles {
        let role = role.to_uppercase();
        for u in &members.users {
            out.insert(("SSO_USER".to_string(), u.get_ref().clone()), role.clone());
        }
        for g in &members.groups {
            out.insert(("SSO_GROUP".to_string(), g.get_ref().clone()), role.clone());
        }
    }
    out
}

/// The minimal batch from `observed` to `desired`: ADD members missing or in another role (a
/// member holds one role, so an ADD moves it), REVOKE members not desired at all.
pub fn permission_batch(
    observed: &BTreeMap<Member, String>,
    desired: &BTreeMap<Member, String>,
) -> Vec<Instruction> {
    let mut grouped: BTreeMap<(String, String), Vec<Member>> = BTreeMap::new();
    for (member, role) in desired {
        if observed.get(member) != Some(role) {
            grouped
                .entry(("ADD".into(), role.clone()))
                .or_default()
                .push(member.clone());
        }
    }
    for (member, role) in observed {
        if !desired.contains_key(member) {
            grouped
                .entry(("REVOKE".into(), role.clone()))
                .or_default()
                .push(member.clone());
        }
    }
    grouped
        .into_iter()
        .map(|((action, role), members)| (action, role, members))
        .collect()
}

/// `role: [members]` for plans.
fn show_permissions(p: &BTreeMap<Member, String>) -> String {
    let mut by_role: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((kind, id), role) in p {
        let kind = if kind == "SSO_GROUP" { "group" } else { "user" };
        by_role
            .entry(role.as_str())
            .or_default()
            .push(format!("{kind}:{id}"));
    }
    let parts: Vec<String> = by_role
        .into_iter()
        .map(|(role, m)| format!("{}=[{}]", role.to_lowercase(), m.join(", ")))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// The settings the desired state sets. An owned workspace is named `<stack>-<name>` unless
/// named; an adopted one keeps its name unless named.
fn desired_settings(
    desired: &DesiredState,
    r: &Resource,
    s: &WorkspaceSpec,
    refs: &Refs,
) -> Settings {
    Settings {
        name: s
            .name
            .clone()
            .or_else(|| r.adopt.is_none().then(|| desired.default_name(&r.id))),
        description: s.description.clone(),
        permission_type: s.permission_type.clone(),
        account_access_type: s.account_access_type.clone(),
        data_sources: s.data_sources.clone().map(sorted),
        notification_destinations: s.notification_destinations.clone().map(sorted),
        role_arn: s.role_arn.as_ref().map(|a| refs.render(a).value),
    }
}

fn observed_settings(w: &ObservedWorkspace) -> Settings {
    Settings {
        name: w.name.clone(),
        description: w.description.clone(),
        permission_type: Some(w.permission_type.clone()),
        account_access_type: Some(w.account_access_type.clone()),
        data_sources: Some(sorted(w.data_sources.clone())),
        notification_destinations: Some(sorted(w.notification_destinations.clone())),
        role_arn: w.role_arn.clone(),
    }
}

/// Waits until a workspace is ACTIVE; still CREATING after the timeout is pending, a failed
/// creation an error.
async fn wait_active(ctx: &Context, workspace: &str) -> Result<()> {
    let what = format!("Managed Grafana workspace {workspace}");
    wait_until(ctx, &what, || async {
        let out = ctx
            .grafana
            .describe_workspace()
            .workspace_id(workspace)
            .send()
            .await
            .map_err(aws_error("grafana", "DescribeWorkspace"))?;
        match out.workspace().map(|w| w.status().clone()) {
            Some(WorkspaceStatus::Active) => Ok(Progress::Done(())),
            Some(WorkspaceStatus::CreationFailed | WorkspaceStatus::Failed) => Err(Error::Invalid(
                format!("Managed Grafana workspace {workspace} failed to create"),
            )),
            Some(other) => Ok(Progress::Waiting(other.as_str().to_string())),
            None => Ok(Progress::Waiting("unknown".into())),
        }
    })
    .await
}

async fn update_permissions(ctx: &Context, workspace: &str, batch: &[Instruction]) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut call = ctx.grafana.update_permissions().workspace_id(workspace);
    for (action, role, members) in batch {
        let users = members
            .iter()
            .map(|(kind, id)| {
                User::builder()
                    .id(id)
                    .r#type(UserType::from(kind.as_str()))
                    .build()
                    .map_err(|e| Error::Invalid(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let instruction = UpdateInstruction::builder()
            .action(UpdateAction::from(action.as_str()))
            .role(Role::from(role.as_str()))
            .set_users(Some(users))
            .build()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        call = call.update_instruction_batch(instruction);
    }
    let out = call
        .send()
        .await
        .map_err(aws_error("grafana", "UpdatePermissions"))?;
    if out.errors().is_empty() {
        return Ok(());
    }
    let refused: Vec<String> = out
        .errors()
        .iter()
        .map(|e| {
            let what = e
                .caused_by()
                .map(|c| {
                    let ids: Vec<&str> = c.users().iter().map(|u| u.id()).collect();
                    format!(
                        "{} {} {}",
                        c.action().as_str(),
                        c.role().as_str(),
                        ids.join(",")
                    )
                })
                .unwrap_or_default();
            format!("{what}: {} ({})", e.message(), e.code())
        })
        .collect();
    Err(Error::Invalid(format!(
        "Managed Grafana refused permission changes on {workspace}: {}",
        refused.join("; ")
    )))
}

#[async_trait]
impl Controller for AmgController {
    type Observed = Observed;
    type Op = Op;

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::AmgWorkspace]
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        let stack = desired.stack_name();
        let adopted: Vec<&str> = desired
            .of_kind(Kind::AmgWorkspace)
            .filter_map(|r| r.adopt.as_deref())
            .collect();
        let mut found = Vec::new();
        let mut pages = ctx.grafana.list_workspaces().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("grafana", "ListWorkspaces"))?;
            for w in page.workspaces() {
                let tags: Tags = w
                    .tags()
                    .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default();
                if tags.get(TAG_STACK).map(String::as_str) == Some(stack)
                    || adopted.contains(&w.id())
                {
                    found.push(ObservedWorkspace {
                        id: w.id().to_string(),
                        status: w.status().as_str().to_string(),
                        endpoint: w.endpoint().to_string(),
                        tags,
                        ..Default::default()
                    });
                }
            }
        }
        let reads = found.into_iter().map(|mut w| async move {
            if w.status == "CREATING" || w.status == "DELETING" {
                return Ok(w);
            }
            let out = ctx
                .grafana
                .describe_workspace()
                .workspace_id(&w.id)
                .send()
                .await
                .map_err(aws_error("grafana", "DescribeWorkspace"))?;
            if let Some(d) = out.workspace() {
                w.name = d.name().map(str::to_string);
                w.description = d.description().map(str::to_string);
                w.providers = d
                    .authentication()
                    .map(|a| {
                        a.providers()
                            .iter()
                            .map(|p| p.as_str().to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                w.permission_type = d
                    .permission_type()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                w.account_access_type = d
                    .account_access_type()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                w.data_sources = d
                    .data_sources()
                    .iter()
                    .map(|s| s.as_str().to_string())
                    .collect();
                w.notification_destinations = d
                    .notification_destinations()
                    .iter()
                    .map(|s| s.as_str().to_string())
                    .collect();
                w.role_arn = d.workspace_role_arn().map(str::to_string);
            }
            let mut pages = ctx
                .grafana
                .list_permissions()
                .workspace_id(&w.id)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(aws_error("grafana", "ListPermissions"))?;
                for p in page.permissions() {
                    if let Some(u) = p.user() {
                        w.permissions.insert(
                            (u.r#type().as_str().to_string(), u.id().to_string()),
                            p.role().as_str().to_string(),
                        );
                    }
                }
            }
            Ok::<_, Error>(w)
        });
        let workspaces = futures::future::join_all(reads)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let account = if workspaces.is_empty() {
            String::new()
        } else {
            ctx.account().await?
        };
        Ok(Observed {
            region: ctx.region.clone(),
            account,
            workspaces,
        })
    }

    fn outputs(&self, desired: &DesiredState, obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        desired
            .of_kind(Kind::AmgWorkspace)
            .filter_map(|r| {
                let w = obs.find(desired, r)?;
                Some((
                    r.id.clone(),
                    Outputs::from([
                        ("id".into(), w.id.clone()),
                        ("arn".into(), arn(&obs.region, &obs.account, &w.id)),
                        ("endpoint".into(), format!("https://{}", w.endpoint)),
                    ]),
                ))
            })
            .collect()
    }

    fn diff(
        &self,
        desired: &DesiredState,
        r: &Resource,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let Spec::AmgWorkspace(s) = &r.spec else {
            return Ok(None);
        };
        let want = desired_settings(desired, r, s, refs);
        let tags = desired.tags_for(
            &r.id,
            &s.tags
                .as_ref()
                .map(|t| t.get_ref().clone())
                .unwrap_or_default(),
        );
        let permissions = s.roles.as_ref().map(desired_permissions);

        let Some(w) = obs.find(desired, r) else {
            if let Some(id) = &r.adopt {
                return Err(Error::Invalid(format!(
                    "Managed Grafana workspace `{id}` to adopt does not exist"
                )));
            }
            let name = want.name.clone().unwrap_or_default();
            let mut c = Change::new(
                r.id.clone(),
                Action::Create,
                format!("Grafana workspace {name}"),
            );
            c.field("name", None, Some(name));
            let providers = s
                .authentication_providers
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_PROVIDER.into()]);
            let want = Settings {
                permission_type: want
                    .permission_type
                    .or(Some(DEFAULT_PERMISSION_TYPE.into())),
                account_access_type: want
                    .account_access_type
                    .or(Some(DEFAULT_ACCOUNT_ACCESS.into())),
                ..want
            };
            c.field("authentication_providers", None, Some(providers.join(", ")));
            c.field("permission_type", None, want.permission_type.clone());
            if let Some(role) = &want.role_arn {
                c.field("role_arn", None, Some(role.clone()));
            }
            c.field("tags", None, Some(tags::show(&tags)));
            if let Some(p) = &permissions {
                c.field("roles", None, Some(show_permissions(p)));
            }
            let token = {
                use sha2::Digest;
                let seed = format!("{}/{}/{}", desired.stack_name(), r.id, desired.content_hash);
                format!(
                    "sw-{}",
                    &hex::encode(sha2::Sha256::digest(seed.as_bytes()))[..32]
                )
            };
            c.op(Op::Create {
                settings: want,
                providers,
                tags,
                client_token: token,
                permissions: permissions
                    .map(|p| permission_batch(&BTreeMap::new(), &p))
                    .unwrap_or_default(),
            });
            return Ok(Some(c));
        };

        let mut c = Change::new(
            r.id.clone(),
            Action::Update,
            format!("Grafana workspace {}", w.id),
        );
        if w.status == "CREATING" {
            // Nothing of it can be read yet, and a new workspace grants nobody: wait, then grant.
            c.field("status", Some("CREATING".into()), Some("ACTIVE".into()));
            if let Some(p) = &permissions {
                c.field("roles", None, Some(show_permissions(p)));
            }
            c.op(Op::AwaitActive {
                workspace: w.id.clone(),
                permissions: permissions
                    .map(|p| permission_batch(&BTreeMap::new(), &p))
                    .unwrap_or_default(),
            });
            return Ok(Some(c));
        }
        if r.adopt.is_some() && !owned_by(&w.tags, desired.stack_name(), &r.id) {
            c.notes
                .push(format!("adopting existing workspace {}", w.id));
        }
        let (changed, lines) = want.changes(&observed_settings(w));
        if !lines.is_empty() {
            for (field, before, after) in lines {
                c.field(field, before, after);
            }
            c.op(Op::Update {
                workspace: w.id.clone(),
                settings: changed,
            });
        }
        if let Some(providers) = &s.authentication_providers {
            if sorted(w.providers.clone()) != sorted(providers.clone()) {
                c.notes.push(format!(
                    "authentication providers are {} but the desired state says {}: this version sets them only at creation",
                    w.providers.join(", "),
                    providers.join(", ")
                ));
            }
        }
        // An adopted workspace is found by its id every pass: it needs no ownership tags, and
        // nothing is written to it that the desired state does not set.
        let tags = if r.adopt.is_some() && s.tags.is_none() {
            w.tags.clone()
        } else {
            tags
        };
        c.tags(
            &w.tags,
            &tags,
            |tags| Op::Tag {
                workspace: w.id.clone(),
                tags,
            },
            |keys| Op::Untag {
                workspace: w.id.clone(),
                keys,
            },
        );
        if let Some(p) = &permissions {
            let batch = permission_batch(&w.permissions, p);
            if !batch.is_empty() {
                c.field(
                    "roles",
                    Some(show_permissions(&w.permissions)),
                    Some(show_permissions(p)),
                );
                c.op(Op::UpdatePermissions {
                    workspace: w.id.clone(),
                    batch,
                });
            }
        }
        if c.ops.is_empty() {
            return Ok(None);
        }
        Ok(Some(c))
    }

    fn removed(&self, desired: &DesiredState, obs: &Observed, prune: bool) -> Vec<Change<Op>> {
        let live = obs.workspaces.iter().filter(|w| w.status != "DELETING");
        removed_objects(
            desired,
            Kind::AmgWorkspace,
            live.map(|w| (w.id.as_str(), &w.tags)),
            |r| obs.find(desired, r).map(|w| w.id.as_str()),
            "Grafana workspace",
            prune,
            |id| Op::Delete {
                workspace: id.to_string(),
            },
        )
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        let g = &ctx.grafana;
        match op {
            Op::Create {
                settings,
                providers,
                tags,
                client_token,
                permissions,
            } => {
                let out =
                    g.create_workspace()
                        .set_workspace_name(settings.name.clone())
                        .set_workspace_description(settings.description.clone())
                        .set_account_access_type(
                            settings
                                .account_access_type
                                .as_deref()
                                .map(AccountAccessType::from),
                        )
                        .set_permission_type(
                            settings
                                .permission_type
                                .as_deref()
                                .map(PermissionType::from),
                        )
                        .set_authentication_providers(Some(
                            providers
                                .iter()
                                .map(|p| AuthenticationProviderTypes::from(p.as_str()))
                                .collect(),
                        ))
                        .set_workspace_data_sources(
                            settings.data_sources.as_ref().map(|v| {
                                v.iter().map(|d| DataSourceType::from(d.as_str())).collect()
                            }),
                        )
                        .set_workspace_notification_destinations(
                            settings.notification_destinations.as_ref().map(|v| {
                                v.iter()
                                    .map(|d| NotificationDestinationType::from(d.as_str()))
                                    .collect()
                            }),
                        )
                        .set_workspace_role_arn(settings.role_arn.clone())
                        .set_tags(Some(
                            tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        ))
                        .client_token(client_token)
                        .send()
                        .await
                        .map_err(aws_error("grafana", "CreateWorkspace"))?;
                let w = out.workspace().ok_or_else(|| {
                    Error::Invalid("CreateWorkspace returned no workspace".into())
                })?;
                let id = w.id().to_string();
                tracing::info!(workspace = %id, "created Managed Grafana workspace");
                let outputs = Outputs::from([
                    ("id".into(), id.clone()),
                    ("arn".into(), arn(&ctx.region, &ctx.account().await?, &id)),
                    ("endpoint".into(), format!("https://{}", w.endpoint())),
                ]);
                wait_active(ctx, &id).await?;
                update_permissions(ctx, &id, permissions).await?;
                return Ok(Some(outputs));
            }
            Op::Update {
                workspace,
                settings,
            } => {
                g.update_workspace()
                    .workspace_id(workspace)
                    .set_workspace_name(settings.name.clone())
                    .set_workspace_description(settings.description.clone())
                    .set_account_access_type(
                        settings
                            .account_access_type
                            .as_deref()
                            .map(AccountAccessType::from),
                    )
                    .set_permission_type(
                        settings
                            .permission_type
                            .as_deref()
                            .map(PermissionType::from),
                    )
                    .set_workspace_data_sources(
                        settings
                            .data_sources
                            .as_ref()
                            .map(|v| v.iter().map(|d| DataSourceType::from(d.as_str())).collect()),
                    )
                    .set_workspace_notification_destinations(
                        settings.notification_destinations.as_ref().map(|v| {
                            v.iter()
                                .map(|d| NotificationDestinationType::from(d.as_str()))
                                .collect()
                        }),
                    )
                    .set_workspace_role_arn(settings.role_arn.clone())
                    .send()
                    .await
                    .map_err(aws_error("grafana", "UpdateWorkspace"))?;
            }
            Op::Tag { workspace, tags } => {
                g.tag_resource()
                    .resource_arn(arn(&ctx.region, &ctx.account().await?, workspace))
                    .set_tags(Some(
                        tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    ))
                    .send()
                    .await
                    .map_err(aws_error("grafana", "TagResource"))?;
            }
            Op::Untag { workspace, keys } => {
                g.untag_resource()
                    .resource_arn(arn(&ctx.region, &ctx.account().await?, workspace))
                    .set_tag_keys(Some(keys.clone()))
                    .send()
                    .await
                    .map_err(aws_error("grafana", "UntagResource"))?;
            }
            Op::AwaitActive {
                workspace,
                permissions,
            } => {
                wait_active(ctx, workspace).await?;
                update_permissions(ctx, workspace, permissions).await?;
            }
            Op::UpdatePermissions { workspace, batch } => {
                update_permissions(ctx, workspace, batch).await?;
            }
            Op::Delete { workspace } => {
                match g.delete_workspace().workspace_id(workspace).send().await {
                    Ok(_) => {}
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_resource_not_found_exception()) => {}
                    Err(e) => return Err(aws_error("grafana", "DeleteWorkspace")(e)),
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{desired, owned_tags, resource};

    const ADMINS: &str = "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a";
    const VIEWERS: &str = "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0b";
    const ALICE: &str = "9067729b3d-1b2c3d4e-0000-4000-8000-000000000001";

    fn spec(toml_text: &str) -> WorkspaceSpec {
        toml::from_str(toml_text).unwrap()
    }

    fn access() -> WorkspaceSpec {
        spec(&format!(
            "data_sources = [\"PROMETHEUS\"]\nroles = {{ admin = {{ groups = [\"{ADMINS}\"] }}, viewer = {{ groups = [\"{VIEWERS}\"], users = [\"{ALICE}\"] }} }}"
        ))
    }

    fn member(kind: &str, id: &str) -> Member {
        (kind.to_string(), id.to_string())
    }

    fn observed() -> Observed {
        Observed {
            region: "us-east-1".into(),
            account: "123456789012".into(),
            workspaces: vec![ObservedWorkspace {
                id: "g-1".into(),
                name: Some("s-main".into()),
                status: "ACTIVE".into(),
                endpoint: "g-1.grafana-workspace.us-east-1.amazonaws.com".into(),
                tags: owned_tags("amg.workspace.main"),
                providers: vec!["AWS_SSO".into()],
                permission_type: "SERVICE_MANAGED".into(),
                account_access_type: "CURRENT_ACCOUNT".into(),
                data_sources: vec!["PROMETHEUS".into()],
                permissions: BTreeMap::from([
                    (member("SSO_GROUP", ADMINS), "ADMIN".to_string()),
                    (member("SSO_GROUP", VIEWERS), "VIEWER".to_string()),
                    (member("SSO_USER", ALICE), "VIEWER".to_string()),
                ]),
                ..Default::default()
            }],
        }
    }

    fn diff_with(
        s: WorkspaceSpec,
        adopt: Option<&str>,
        o: &Observed,
    ) -> Result<Option<Change<Op>>> {
        let mut r = resource(Kind::AmgWorkspace, "main", Spec::AmgWorkspace(s));
        r.adopt = adopt.map(str::to_string);
        AmgController.diff(&desired(vec![r.clone()]), &r, o, &Refs::default())
    }

    fn diff(s: WorkspaceSpec, o: &Observed) -> Result<Option<Change<Op>>> {
        diff_with(s, None, o)
    }

    #[test]
    fn a_workspace_as_desired_has_no_change() {
        assert!(diff(access(), &observed()).unwrap().is_none());
    }

    #[test]
    fn a_missing_workspace_is_created_with_defaults_tags_and_its_roles() {
        let c = diff(access(), &Observed::default()).unwrap().unwrap();
        let [Op::Create {
            settings,
            providers,
            tags,
            client_token,
            permissions,
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops);
        };
        assert_eq!(settings.name.as_deref(), Some("s-main"));
        assert_eq!(settings.permission_type.as_deref(), Some("SERVICE_MANAGED"));
        assert_eq!(providers, &["AWS_SSO"]);
        assert!(tags.contains_key(crate::desired::TAG_ID));
        assert!(client_token.starts_with("sw-"));
        assert_eq!(
            permissions,
            &vec![
                (
                    "ADD".to_string(),
                    "ADMIN".to_string(),
                    vec![member("SSO_GROUP", ADMINS)]
                ),
                (
                    "ADD".to_string(),
                    "VIEWER".to_string(),
                    vec![member("SSO_GROUP", VIEWERS), member("SSO_USER", ALICE)]
                ),
            ]
        );
    }

    #[test]
    fn out_of_band_grants_become_the_minimal_batch() {
        let mut o = observed();
        let perms = &mut o.workspaces[0].permissions;
        // A user added out of band, a group's role changed, a group removed.
        perms.insert(
            member(
                "SSO_USER",
                "9067729b3d-1b2c3d4e-0000-4000-8000-000000000009",
            ),
            "EDITOR".into(),
        );
        perms.insert(member("SSO_GROUP", VIEWERS), "ADMIN".into());
        perms.remove(&member("SSO_USER", ALICE));
        let c = diff(access(), &o).unwrap().unwrap();
        let [Op::UpdatePermissions { batch, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops);
        };
        assert_eq!(
            batch,
            &vec![
                (
                    "ADD".to_string(),
                    "VIEWER".to_string(),
                    vec![member("SSO_GROUP", VIEWERS), member("SSO_USER", ALICE)]
                ),
                (
                    "REVOKE".to_string(),
                    "EDITOR".to_string(),
                    vec![member(
                        "SSO_USER",
                        "9067729b3d-1b2c3d4e-0000-4000-8000-000000000009"
                    )]
                ),
            ]
        );
    }

    #[test]
    fn without_roles_permissions_are_left_alone() {
        let mut o = observed();
        o.workspaces[0].permissions.clear();
        assert!(diff(spec("data_sources = [\"PROMETHEUS\"]"), &o)
            .unwrap()
            .is_none());
    }

    #[test]
    fn settings_set_and_differing_are_updated_alone() {
        let mut o = observed();
        o.workspaces[0].data_sources = vec!["CLOUDWATCH".into()];
        o.workspaces[0].description = Some("theirs".into());
        let c = diff(access(), &o).unwrap().unwrap();
        let [Op::Update { settings, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops);
        };
        assert_eq!(
            settings,
            &Settings {
                data_sources: Some(vec!["PROMETHEUS".into()]),
                ..Settings::default()
            },
            "the description is not set in the desired state, so it is left alone"
        );
    }

    #[test]
    fn tag_drift_is_corrected() {
        let mut o = observed();
        o.workspaces[0].tags.remove("team");
        o.workspaces[0].tags.insert("extra".into(), "x".into());
        let c = diff(access(), &o).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Tag { .. }, Op::Untag { keys, .. }] if keys == &["extra"])
        );
    }

    #[test]
    fn an_adopted_workspace_gets_no_write_beyond_what_is_desired() {
        let mut o = observed();
        o.workspaces[0].tags.clear();
        o.workspaces[0].name = Some("theirs".into());
        assert!(diff_with(access(), Some("g-1"), &o).unwrap().is_none());
        assert!(matches!(
            diff_with(access(), Some("g-404"), &o),
            Err(Error::Invalid(m)) if m.contains("g-404")
        ));
    }

    #[test]
    fn a_creating_workspace_is_waited_on_then_granted() {
        let mut o = observed();
        o.workspaces[0].status = "CREATING".into();
        o.workspaces[0].permissions.clear();
        let c = diff(access(), &o).unwrap().unwrap();
        assert!(matches!(
            &c.ops[..],
            [Op::AwaitActive { workspace, permissions }] if workspace == "g-1" && permissions.len() == 2
        ));
    }

    #[test]
    fn removed_workspaces_are_orphaned_unless_pruned() {
        let d = desired(vec![]);
        let o = observed();
        assert!(matches!(
            AmgController.removed(&d, &o, false)[0].action,
            Action::Orphan
        ));
        let pruned = AmgController.removed(&d, &o, true);
        assert!(matches!(&pruned[0].ops[..], [Op::Delete { workspace }] if workspace == "g-1"));
    }

    #[test]
    fn identity_center_ids_with_or_without_the_store_prefix() {
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
        assert!(!is_identity_center_id(
            "94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0"
        ));
    }
}
