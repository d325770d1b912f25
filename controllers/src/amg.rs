//! Amazon Managed Grafana. The `[amg.workspace.<name>]` table expands into two nodes on the
//! managed-object layer ([`crate::managed`]):
//!
//! | node | AWS object |
//! |---|---|
//! | `amg.workspace.<name>` | the workspace and its settings |
//! | `amg.workspace.<name>.permissions` | its IAM Identity Center role associations (when `roles` is given) |
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
//! - A workspace still CREATING (minutes, on AWS) is [`Error::Waiting`]: nothing polls it, and
//!   what does not reference it goes on. Its permissions are granted once it is ACTIVE.
//! - Permission updates are per entry: the entries the service refuses are the resource's
//!   error, with the service's messages; the rest is applied.
//! - An adopted workspace gets no write beyond what the desired state sets: no ownership tags
//!   unless `tags` is given.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_grafana::types::{
    AccountAccessType, AuthenticationProviderTypes, DataSourceType, NotificationDestinationType,
    PermissionType, Role, UpdateAction, UpdateInstruction, User, UserType,
};
use serde::Deserialize;
use toml::Spanned;

use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{
    check_tags, DesiredState, KindSpec, Resource, Spec, Tagging, Validator, TAG_STACK,
};
use crate::error::{aws_error, Error, Result};
use crate::kind::{schema, Form, Kind, KindDef};
use crate::managed::{usable_parent, Describe, Managed, ManagedObject, Readiness};
use crate::model::{Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::tags::Tags;

static WORKSPACE_KIND: KindDef = KindDef {
    path: "amg.workspace",
    attributes: &["id", "arn", "endpoint"],
    form: Form::Table {
        schema: schema::<WorkspaceSpec>,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(Workspace)),
};
/// `[amg.workspace.<name>]`: the workspace itself.
pub const WORKSPACE: Kind = Kind::new(&WORKSPACE_KIND);

static PERMISSIONS_KIND: KindDef = KindDef {
    path: "amg.workspace.permissions",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&WORKSPACE_KIND),
        word: "permissions",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(Permissions)),
};
/// The IAM Identity Center role associations of a workspace.
pub const PERMISSIONS: Kind = Kind::new(&PERMISSIONS_KIND);

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
/// How long before looking again at a workspace Managed Grafana is still creating or updating
/// (that takes minutes).
const WAIT: Duration = Duration::from_secs(10);
const DEFAULT_PERMISSION_TYPE: &str = "SERVICE_MANAGED";
const DEFAULT_ACCOUNT_ACCESS: &str = "CURRENT_ACCOUNT";

impl KindSpec for WorkspaceSpec {
    fn tagging(&self, _: &DesiredState, _: &ResourceId) -> Option<Tagging<'_>> {
        Some(Tagging {
            own: self.tags.as_ref(),
            added: Vec::new(),
            ec2: false,
        })
    }

    /// The workspace node keeps every reference of the table; its permissions depend on it.
    fn parts(&self, workspace: &Resource) -> Option<(Vec<Resource>, BTreeSet<ResourceId>)> {
        Some((self.part_nodes(workspace), workspace.depends_on.clone()))
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
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
    /// Its ARN (Managed Grafana returns none: built from the region and the account).
    pub arn: String,
}

impl ObservedWorkspace {
    fn is_live(&self) -> bool {
        self.status != "DELETING"
    }

    /// Settings can be read, and permissions changed, only in these states.
    fn is_settled(&self) -> bool {
        self.status == "ACTIVE" || self.status == "UPDATING"
    }
}

fn arn(region: &str, account: &str, id: &str) -> String {
    format!("arn:aws:grafana:{region}:{account}:/workspaces/{id}")
}

/// Every workspace the stack owns or adopts, listed (and, when settled, described) once per
/// observation.
async fn workspaces(ctx: &Context, desired: &DesiredState) -> Result<Arc<Vec<ObservedWorkspace>>> {
    let stack = desired.stack_name().to_string();
    let adopted: Vec<String> = desired
        .of_kind(WORKSPACE)
        .filter_map(|r| r.adopt.clone())
        .collect();
    ctx.shared("grafana:ListWorkspaces", || async move {
        let mut found = Vec::new();
        let mut pages = ctx.grafana.list_workspaces().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("grafana", "ListWorkspaces"))?;
            for w in page.workspaces() {
                let tags: Tags = w
                    .tags()
                    .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default();
                if tags.get(TAG_STACK) == Some(&stack) || adopted.iter().any(|a| a == w.id()) {
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
        if found.is_empty() {
            return Ok(found);
        }
        let account = ctx.account().await?;
        let reads = found.into_iter().map(|mut w| {
            let account = account.clone();
            async move {
                w.arn = arn(&ctx.region, &account, &w.id);
                if !w.is_settled() {
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
                Ok::<_, Error>(w)
            }
        });
        futures::future::join_all(reads).await.into_iter().collect()
    })
    .await
}

/// The workspace node managing an observed workspace: the one adopting its id, or the one its
/// ownership tags name.
fn workspace_node(desired: &DesiredState, w: &ObservedWorkspace) -> Option<ResourceId> {
    crate::managed::managing_node(desired, WORKSPACE, &w.id, &w.tags)
}

// ---------------------------------------------------------------------------------------------
// Settings and permissions

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
    /// The data sources as the API names them.
    fn data_source_types(&self) -> Option<Vec<DataSourceType>> {
        self.data_sources
            .as_ref()
            .map(|v| v.iter().map(|d| DataSourceType::from(d.as_str())).collect())
    }

    /// The notification destinations as the API names them.
    fn destination_types(&self) -> Option<Vec<NotificationDestinationType>> {
        self.notification_destinations.as_ref().map(|v| {
            v.iter()
                .map(|d| NotificationDestinationType::from(d.as_str()))
                .collect()
        })
    }

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

// ---------------------------------------------------------------------------------------------
// The workspace

pub struct Workspace;

/// What a workspace node wants.
#[derive(Debug, Clone)]
pub struct WorkspaceWant {
    pub settings: Settings,
    /// Set at creation only.
    pub providers: Vec<String>,
    /// Whether the desired state names the providers (a difference is then noted).
    pub providers_given: bool,
    /// As the desired state gives them (`None`: not given).
    pub tags: Option<Tags>,
    pub client_token: String,
    /// Whether the node adopts the workspace (then only what is set is written).
    pub adopted: bool,
}

#[derive(Debug, Clone)]
pub struct SettingsUpdate {
    /// Only the settings to change.
    pub settings: Settings,
    pub lines: Vec<FieldChange>,
}

impl Describe for SettingsUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        self.lines.clone()
    }
}

#[async_trait]
impl ManagedObject for Workspace {
    type Desired = WorkspaceWant;
    type Observed = ObservedWorkspace;
    type Update = SettingsUpdate;
    const KIND: Kind = WORKSPACE;
    const NOUN: &'static str = "Managed Grafana workspace";

    fn desired(
        &self,
        desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<WorkspaceWant> {
        let s = node.spec.expect::<WorkspaceSpec>();
        let token = crate::managed::client_token(&[
            desired.stack_name(),
            &node.id.to_string(),
            &desired.content_hash,
            &crate::managed::token_hour(),
        ]);
        Ok(WorkspaceWant {
            settings: desired_settings(desired, node, s, refs),
            providers: s
                .authentication_providers
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_PROVIDER.into()]),
            providers_given: s.authentication_providers.is_some(),
            tags: s.tags.as_ref().map(|t| t.get_ref().clone()),
            client_token: token,
            adopted: node.adopt.is_some(),
        })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedWorkspace>> {
        Ok(workspaces(ctx, desired).await?.as_ref().clone())
    }

    fn id(&self, o: &ObservedWorkspace) -> String {
        o.id.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedWorkspace) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    fn is_leaving(&self, o: &ObservedWorkspace) -> bool {
        !o.is_live()
    }

    fn outputs(&self, o: &ObservedWorkspace) -> Outputs {
        Outputs::from([
            ("id".into(), o.id.clone()),
            ("arn".into(), o.arn.clone()),
            ("endpoint".into(), format!("https://{}", o.endpoint)),
            // Not an attribute users reference: the permissions node waits for ACTIVE.
            ("status".into(), o.status.clone()),
        ])
    }

    fn readiness(&self, _want: &WorkspaceWant, have: &ObservedWorkspace) -> Result<Readiness> {
        match have.status.as_str() {
            "CREATION_FAILED" | "FAILED" => Err(Error::Invalid(format!(
                "Managed Grafana workspace {} failed to create; delete it and the next pass creates another",
                have.id
            ))),
            // UPDATE_FAILED, UPGRADE_FAILED, VERSION_UPDATE_FAILED, DELETION_FAILED,
            // LICENSE_REMOVAL_FAILED: the workspace is there, its last change is not. Never
            // waited for as if still converging; retried with backoff.
            s if s.ends_with("_FAILED") => Err(Error::Aws {
                service: "grafana",
                operation: "DescribeWorkspace",
                code: Some(s.to_string()),
                class: crate::error::ErrorClass::Retryable,
                message: format!(
                    "Managed Grafana workspace {} is {s}: its last change failed (the workspace's events in the console say why); tried again",
                    have.id
                ),
            }),
            // Managed Grafana takes minutes to create or update a workspace.
            s if !have.is_settled() || s == "UPDATING" => {
                Ok(Readiness::Waiting(format!("still {s}"), WAIT))
            }
            _ => Ok(Readiness::Ready),
        }
    }

    fn diff(&self, want: &WorkspaceWant, have: &ObservedWorkspace) -> Vec<SettingsUpdate> {
        let (settings, lines) = want.settings.changes(&observed_settings(have));
        if lines.is_empty() {
            return Vec::new();
        }
        vec![SettingsUpdate {
            settings,
            lines: lines
                .into_iter()
                .map(|(field, before, after)| FieldChange::new(field, before, after))
                .collect(),
        }]
    }

    fn notes(&self, want: &WorkspaceWant, have: &ObservedWorkspace) -> Vec<String> {
        if want.providers_given && sorted(have.providers.clone()) != sorted(want.providers.clone())
        {
            return vec![format!(
                "authentication providers are {} but the desired state says {}: this version sets them only at creation",
                have.providers.join(", "),
                want.providers.join(", ")
            )];
        }
        Vec::new()
    }

    /// An adopted workspace is found by its id every pass: it needs no ownership tags, and
    /// gets none unless the desired state sets tags.
    fn writes_tags(&self, _node: &Resource, want: &WorkspaceWant) -> bool {
        !want.adopted || want.tags.is_some()
    }

    fn own_tags(&self, want: &WorkspaceWant) -> Tags {
        want.tags.clone().unwrap_or_default()
    }

    fn create_fields(&self, want: &WorkspaceWant) -> Vec<FieldChange> {
        let mut f = vec![
            FieldChange::new("name", None, want.settings.name.clone()),
            FieldChange::new(
                "authentication_providers",
                None,
                Some(want.providers.join(", ")),
            ),
            FieldChange::new(
                "permission_type",
                None,
                Some(
                    want.settings
                        .permission_type
                        .clone()
                        .unwrap_or(DEFAULT_PERMISSION_TYPE.into()),
                ),
            ),
        ];
        if let Some(role) = &want.settings.role_arn {
            f.push(FieldChange::new("role_arn", None, Some(role.clone())));
        }
        f
    }

    fn label(&self, want: &WorkspaceWant) -> String {
        want.settings.name.clone().unwrap_or_default()
    }

    async fn create(&self, ctx: &Context, want: &WorkspaceWant, tags: &Tags) -> Result<Outputs> {
        let s = &want.settings;
        let out = ctx
            .grafana
            .create_workspace()
            .set_workspace_name(s.name.clone())
            .set_workspace_description(s.description.clone())
            .account_access_type(AccountAccessType::from(
                s.account_access_type
                    .as_deref()
                    .unwrap_or(DEFAULT_ACCOUNT_ACCESS),
            ))
            .permission_type(PermissionType::from(
                s.permission_type
                    .as_deref()
                    .unwrap_or(DEFAULT_PERMISSION_TYPE),
            ))
            .set_authentication_providers(Some(
                want.providers
                    .iter()
                    .map(|p| AuthenticationProviderTypes::from(p.as_str()))
                    .collect(),
            ))
            .set_workspace_data_sources(s.data_source_types())
            .set_workspace_notification_destinations(s.destination_types())
            .set_workspace_role_arn(s.role_arn.clone())
            .set_tags(Some(
                tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ))
            .client_token(&want.client_token)
            .send()
            .await
            .map_err(aws_error("grafana", "CreateWorkspace"))?;
        let w = out
            .workspace()
            .ok_or_else(|| Error::Invalid("CreateWorkspace returned no workspace".into()))?;
        tracing::info!(workspace = %w.id(), "created Managed Grafana workspace");
        Ok(Outputs::from([
            ("id".into(), w.id().to_string()),
            (
                "arn".into(),
                arn(&ctx.region, &ctx.account().await?, w.id()),
            ),
            ("endpoint".into(), format!("https://{}", w.endpoint())),
            ("status".into(), w.status().as_str().to_string()),
        ]))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedWorkspace,
        change: &SettingsUpdate,
    ) -> Result<Option<Outputs>> {
        let s = &change.settings;
        ctx.grafana
            .update_workspace()
            .workspace_id(&have.id)
            .set_workspace_name(s.name.clone())
            .set_workspace_description(s.description.clone())
            .set_account_access_type(
                s.account_access_type
                    .as_deref()
                    .map(AccountAccessType::from),
            )
            .set_permission_type(s.permission_type.as_deref().map(PermissionType::from))
            .set_workspace_data_sources(s.data_source_types())
            .set_workspace_notification_destinations(s.destination_types())
            .set_workspace_role_arn(s.role_arn.clone())
            .send()
            .await
            .map_err(aws_error("grafana", "UpdateWorkspace"))?;
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedWorkspace, set: &Tags) -> Result<()> {
        ctx.grafana
            .tag_resource()
            .resource_arn(&have.arn)
            .set_tags(Some(
                set.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ))
            .send()
            .await
            .map_err(aws_error("grafana", "TagResource"))?;
        Ok(())
    }

    async fn untag(&self, ctx: &Context, have: &ObservedWorkspace, keys: &[String]) -> Result<()> {
        ctx.grafana
            .untag_resource()
            .resource_arn(&have.arn)
            .set_tag_keys(Some(keys.to_vec()))
            .send()
            .await
            .map_err(aws_error("grafana", "UntagResource"))?;
        Ok(())
    }

    async fn delete(&self, ctx: &Context, have: &ObservedWorkspace) -> Result<()> {
        ctx.grafana
            .delete_workspace()
            .workspace_id(&have.id)
            .send()
            .await
            .map_err(aws_error("grafana", "DeleteWorkspace"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The role associations

pub struct Permissions;

/// The permissions node of a workspace whose table sets `roles`.
#[derive(Debug, Clone)]
pub struct PermissionsPart {
    pub roles: BTreeMap<String, RoleMembers>,
}

impl KindSpec for PermissionsPart {}

impl WorkspaceSpec {
    /// The nodes the table expands into besides the workspace: its permissions, when `roles`
    /// is given (without it, permissions are left alone).
    fn part_nodes(&self, workspace: &Resource) -> Vec<Resource> {
        let Some(roles) = &self.roles else {
            return Vec::new();
        };
        vec![Resource {
            id: ResourceId::part(PERMISSIONS, workspace.id.name.clone(), None),
            origin: workspace.origin.clone(),
            adopt: None,
            observe_only: workspace.observe_only,
            spec: Spec::new(PermissionsPart {
                roles: roles.clone(),
            }),
            depends_on: [workspace.id.clone()].into(),
        }]
    }
}

#[derive(Debug, Clone)]
pub struct PermissionsWant {
    pub workspace: String,
    pub members: BTreeMap<Member, String>,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedPermissions {
    pub workspace: ObservedWorkspace,
    /// Member → Grafana role (`ADMIN`, `EDITOR`, `VIEWER`).
    pub members: BTreeMap<Member, String>,
}

#[derive(Debug, Clone)]
pub struct PermissionsUpdate {
    pub batch: Vec<Instruction>,
    pub before: String,
    pub after: String,
}

impl Describe for PermissionsUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        vec![FieldChange::new(
            "roles",
            Some(self.before.clone()),
            Some(self.after.clone()),
        )]
    }
}

#[async_trait]
impl ManagedObject for Permissions {
    type Desired = PermissionsWant;
    type Observed = ObservedPermissions;
    type Update = PermissionsUpdate;
    const KIND: Kind = PERMISSIONS;
    const NOUN: &'static str = "Managed Grafana permissions";

    fn desired(
        &self,
        _desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<PermissionsWant> {
        let s = node.spec.expect::<PermissionsPart>();
        let members = desired_permissions(&s.roles);
        // A new workspace grants nobody, and takes grants only once ACTIVE.
        let usable = (
            "Managed Grafana workspace",
            &["ACTIVE", "UPDATING"][..],
            WAIT,
        );
        let workspace = match usable_parent(node, refs, usable)? {
            Some(out) => out["id"].clone(),
            None => KNOWN_AFTER_APPLY.into(),
        };
        Ok(PermissionsWant { workspace, members })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedPermissions>> {
        let listed = workspaces(ctx, desired).await?;
        let reads = listed
            .iter()
            .filter(|w| w.is_settled())
            .map(|w| async move {
                let mut members = BTreeMap::new();
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
                            members.insert(
                                (u.r#type().as_str().to_string(), u.id().to_string()),
                                p.role().as_str().to_string(),
                            );
                        }
                    }
                }
                Ok::<_, Error>(ObservedPermissions {
                    workspace: w.clone(),
                    members,
                })
            });
        futures::future::join_all(reads).await.into_iter().collect()
    }

    fn id(&self, o: &ObservedPermissions) -> String {
        o.workspace.id.clone()
    }

    /// Role associations carry no tags, and are never removed by removing `roles`.
    fn tags<'o>(&self, _o: &'o ObservedPermissions) -> Option<&'o Tags> {
        None
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedPermissions],
    ) -> Option<&'o ObservedPermissions> {
        observed.iter().find(|o| {
            o.workspace.is_live()
                && workspace_node(desired, &o.workspace) == Some(node.id.composite())
        })
    }

    fn diff(&self, want: &PermissionsWant, have: &ObservedPermissions) -> Vec<PermissionsUpdate> {
        let batch = permission_batch(&have.members, &want.members);
        if batch.is_empty() {
            return Vec::new();
        }
        vec![PermissionsUpdate {
            batch,
            before: show_permissions(&have.members),
            after: show_permissions(&want.members),
        }]
    }

    fn create_fields(&self, want: &PermissionsWant) -> Vec<FieldChange> {
        vec![FieldChange::new(
            "roles",
            None,
            Some(show_permissions(&want.members)),
        )]
    }

    fn label(&self, want: &PermissionsWant) -> String {
        want.workspace.clone()
    }

    /// A workspace's permissions exist with it: "creating" them is granting them.
    async fn create(&self, ctx: &Context, want: &PermissionsWant, _tags: &Tags) -> Result<Outputs> {
        update_permissions(
            ctx,
            &want.workspace,
            &permission_batch(&BTreeMap::new(), &want.members),
        )
        .await?;
        Ok(Outputs::new())
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedPermissions,
        change: &PermissionsUpdate,
    ) -> Result<Option<Outputs>> {
        update_permissions(ctx, &have.workspace.id, &change.batch).await?;
        Ok(None)
    }

    async fn delete(&self, _ctx: &Context, _have: &ObservedPermissions) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Action, Change};
    use crate::controller::Controller;
    use crate::managed::{Managed, Op};
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

    fn workspace() -> ObservedWorkspace {
        ObservedWorkspace {
            id: "g-1".into(),
            name: Some("s-main".into()),
            status: "ACTIVE".into(),
            endpoint: "g-1.grafana-workspace.us-east-1.amazonaws.com".into(),
            tags: owned_tags("amg.workspace.main"),
            providers: vec!["AWS_SSO".into()],
            permission_type: "SERVICE_MANAGED".into(),
            account_access_type: "CURRENT_ACCOUNT".into(),
            data_sources: vec!["PROMETHEUS".into()],
            arn: "arn:aws:grafana:us-east-1:123456789012:/workspaces/g-1".into(),
            ..Default::default()
        }
    }

    fn granted() -> ObservedPermissions {
        ObservedPermissions {
            workspace: workspace(),
            members: BTreeMap::from([
                (member("SSO_GROUP", ADMINS), "ADMIN".to_string()),
                (member("SSO_GROUP", VIEWERS), "VIEWER".to_string()),
                (member("SSO_USER", ALICE), "VIEWER".to_string()),
            ]),
        }
    }

    /// The table `amg.workspace.main` and its parts, as loading expands them.
    fn nodes(s: WorkspaceSpec, adopt: Option<&str>) -> DesiredState {
        let mut table = resource(WORKSPACE, "main", Spec::new(s.clone()));
        table.adopt = adopt.map(str::to_string);
        let mut all = s.part_nodes(&table);
        all.push(table);
        desired(all)
    }

    fn ws_id() -> ResourceId {
        ResourceId::new(WORKSPACE, "main")
    }

    fn permissions_id() -> ResourceId {
        ResourceId::part(PERMISSIONS, "main", None)
    }

    fn refs(status: &str) -> Refs {
        let mut w = workspace();
        w.status = status.into();
        Refs {
            outputs: [(ws_id(), Workspace.outputs(&w))].into(),
            ..Default::default()
        }
    }

    fn diff_ws(
        s: WorkspaceSpec,
        adopt: Option<&str>,
        observed: Vec<ObservedWorkspace>,
    ) -> Result<Option<Change<Op<Workspace>>>> {
        let d = nodes(s, adopt);
        Managed(Workspace).diff(&d, &d.resources[&ws_id()], &observed, &refs("ACTIVE"))
    }

    fn diff_permissions(
        observed: Vec<ObservedPermissions>,
        refs: &Refs,
    ) -> Result<Option<Change<Op<Permissions>>>> {
        let d = nodes(access(), None);
        Managed(Permissions).diff(&d, &d.resources[&permissions_id()], &observed, refs)
    }

    #[test]
    fn roles_make_a_permissions_node_and_no_roles_none() {
        let d = nodes(access(), None);
        assert_eq!(d.resources.len(), 2);
        assert_eq!(d.resources[&permissions_id()].depends_on, [ws_id()].into());
        assert_eq!(
            permissions_id().to_string(),
            "amg.workspace.main.permissions"
        );
        assert_eq!(
            nodes(spec("data_sources = [\"PROMETHEUS\"]"), None)
                .resources
                .len(),
            1
        );
    }

    #[test]
    fn a_workspace_as_desired_has_no_change() {
        assert!(diff_ws(access(), None, vec![workspace()])
            .unwrap()
            .is_none());
        assert!(diff_permissions(vec![granted()], &refs("ACTIVE"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_missing_workspace_is_created_with_defaults_tags_and_a_client_token() {
        let c = diff_ws(access(), None, vec![]).unwrap().unwrap();
        let [Op::Create { want, tags }] = &c.ops[..] else {
            panic!("{:?}", c.ops);
        };
        assert_eq!(want.settings.name.as_deref(), Some("s-main"));
        assert_eq!(want.providers, ["AWS_SSO"]);
        assert_eq!(tags[crate::desired::TAG_ID], "amg.workspace.main");
        assert!(want.client_token.starts_with("sw-"));
        let shown: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            shown,
            [
                "name",
                "authentication_providers",
                "permission_type",
                "tags"
            ]
        );
    }

    #[test]
    fn roles_are_granted_once_the_workspace_is_active_and_planned_before_it_exists() {
        let e = diff_permissions(vec![], &refs("CREATING")).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(10)), "{e}");
        let planned = diff_permissions(vec![], &Refs::default()).unwrap().unwrap();
        assert_eq!(planned.action, Action::Create);
        let mut fresh = granted();
        fresh.members.clear();
        let c = diff_permissions(vec![fresh], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        let [Op::Update { change, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops);
        };
        assert_eq!(
            change.batch,
            vec![
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
        let mut o = granted();
        // A user added out of band, a group's role changed, a user removed.
        o.members.insert(
            member(
                "SSO_USER",
                "9067729b3d-1b2c3d4e-0000-4000-8000-000000000009",
            ),
            "EDITOR".into(),
        );
        o.members
            .insert(member("SSO_GROUP", VIEWERS), "ADMIN".into());
        o.members.remove(&member("SSO_USER", ALICE));
        let c = diff_permissions(vec![o], &refs("ACTIVE")).unwrap().unwrap();
        let [Op::Update { change, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops);
        };
        assert_eq!(
            change.batch,
            vec![
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
        assert_eq!(c.fields.len(), 1);
        assert_eq!(c.fields[0].field, "roles");
    }

    #[test]
    fn permissions_are_never_removed_by_dropping_roles() {
        let d = nodes(spec("data_sources = [\"PROMETHEUS\"]"), None);
        assert!(Managed(Permissions)
            .removed(&d, &vec![granted()], true)
            .is_empty());
    }

    #[test]
    fn settings_set_and_differing_are_updated_alone() {
        let mut w = workspace();
        w.data_sources = vec!["CLOUDWATCH".into()];
        w.description = Some("theirs".into());
        let c = diff_ws(access(), None, vec![w]).unwrap().unwrap();
        let [Op::Update { change, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops);
        };
        assert_eq!(
            change.settings,
            Settings {
                data_sources: Some(vec!["PROMETHEUS".into()]),
                ..Settings::default()
            },
            "the description is not set in the desired state, so it is left alone"
        );
        assert_eq!(c.fields.len(), 1);
        assert_eq!(c.fields[0].field, "data_sources");
    }

    #[test]
    fn tag_drift_is_corrected() {
        let mut w = workspace();
        w.tags.remove("team");
        w.tags.insert("extra".into(), "x".into());
        let c = diff_ws(access(), None, vec![w]).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Tag { .. }, Op::Untag { keys, .. }] if keys == &["extra"])
        );
    }

    #[test]
    fn an_adopted_workspace_gets_no_write_beyond_what_is_desired() {
        let mut w = workspace();
        w.tags.clear();
        w.name = Some("theirs".into());
        assert!(diff_ws(access(), Some("g-1"), vec![w.clone()])
            .unwrap()
            .is_none());
        assert!(matches!(
            diff_ws(access(), Some("g-404"), vec![w]),
            Err(Error::Invalid(m)) if m.contains("g-404")
        ));
    }

    #[test]
    fn a_workspace_whose_change_failed_is_an_error_and_an_upgrade_is_waited_for() {
        for status in ["UPDATE_FAILED", "UPGRADE_FAILED", "VERSION_UPDATE_FAILED"] {
            let mut w = workspace();
            w.status = status.into();
            let e = diff_ws(access(), None, vec![w]).unwrap_err();
            assert_eq!(
                e.class(),
                crate::error::ErrorClass::Retryable,
                "{status}: {e}"
            );
            assert!(e.to_string().contains(&format!("is {status}")), "{e}");
        }
        for status in ["UPGRADING", "VERSION_UPDATING"] {
            let mut w = workspace();
            w.status = status.into();
            let e = diff_ws(access(), None, vec![w]).unwrap_err();
            assert_eq!(
                e.class(),
                crate::error::ErrorClass::Waiting,
                "{status}: {e}"
            );
        }
    }

    #[test]
    fn a_creating_workspace_is_waited_for_without_polling() {
        let mut w = workspace();
        w.status = "CREATING".into();
        let e = diff_ws(access(), None, vec![w]).unwrap_err();
        assert!(e.to_string().contains("still CREATING"), "{e}");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_provider_differing_from_the_desired_one_is_a_note_not_a_write() {
        let mut w = workspace();
        w.providers = vec!["SAML".into()];
        let mut s = access();
        s.authentication_providers = Some(vec!["AWS_SSO".into()]);
        let c = diff_ws(s, None, vec![w]).unwrap().unwrap();
        assert!(c.ops.is_empty());
        assert!(c.notes[0].contains("only at creation"), "{:?}", c.notes);
    }

    #[test]
    fn removed_workspaces_are_orphaned_unless_pruned() {
        let d = desired(vec![]);
        let observed = vec![workspace()];
        let orphaned = Managed(Workspace).removed(&d, &observed, false);
        assert_eq!(orphaned.len(), 1);
        assert_eq!(orphaned[0].action, Action::Orphan);
        let pruned = Managed(Workspace).removed(&d, &observed, true);
        assert_eq!(pruned.len(), 1);
        assert!(matches!(&pruned[0].ops[..], [Op::Delete { have }] if have.id == "g-1"));
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
