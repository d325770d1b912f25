//! Amazon Managed Service for Prometheus. The `[amp.workspace.<name>]` table is a composite:
//! loading expands it into one node per AWS object, each on the managed-object layer
//! ([`crate::managed`]):
//!
//! | node | AWS object |
//! |---|---|
//! | `amp.workspace.<name>` | the workspace (alias, tags) |
//! | `amp.workspace.<name>.rule_groups.<namespace>` | a rule groups namespace, from a rule file |
//! | `amp.workspace.<name>.alertmanager` | the alertmanager definition |
//! | `amp.workspace.<name>.logging` | the logging configuration |
//!
//! A policy naming the workspace's ARN depends on the workspace node alone, so it never waits
//! for the rules or for AMP's verdict on the alertmanager definition; one lost namespace is
//! created again alone.
//!
//! Workspaces are found by their ownership tags (aliases are not unique in AMP, so an unowned
//! workspace with the same alias is simply another workspace and is never touched); the parts
//! are found inside the workspace their composite manages. Rule groups namespaces and
//! definitions are compared by their parsed YAML, so a file that only changes formatting is no
//! drift. The workspace list is read once per observation, whichever nodes need it.
//!
//! # Guarantees
//! - A workspace is created with the ownership tags in the same call, so a crash right after
//!   the create leaves a workspace the next pass finds and completes, never a duplicate.
//! - A part dropped from a workspace still desired is deleted, a rule groups namespace only if
//!   it carries the stack's ownership tag.
//! - The alertmanager definition is checked by AMP after it is accepted, and may end
//!   CREATION_FAILED or UPDATE_FAILED. The hash of the definition last put is kept in the
//!   workspace tag `stackwarden:alertmanager`, so a failed definition is reported (with AMP's
//!   reason) instead of being put again every pass, and a fixed file is put at once. Only a
//!   definition carrying that tag is deleted when the desired state drops it.
//! - Nothing here waits: a workspace CREATING or a definition being checked is
//!   [`Error::Waiting`], and the runtime looks again later.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_amp::primitives::Blob;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use serde::Deserialize;
use toml::Spanned;

use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{
    check_tags, DesiredState, KindSpec, Resource, Spec, Tagging, Validator, TAG_STACK,
};
use crate::error::{aws_error, Error, Result};
use crate::kind::{schema, Form, Kind, KindDef};
use crate::managed::{usable_parent, Describe, Managed, ManagedObject, Readiness, LOOK_AGAIN};
use crate::model::{references_in, Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::tags::Tags;

// ---------------------------------------------------------------------------------------------
// Kinds

static WORKSPACE_KIND: KindDef = KindDef {
    path: "amp.workspace",
    attributes: &[
        "id",
        "arn",
        "alias",
        "prometheus_endpoint",
        "remote_write_url",
        "query_url",
    ],
    form: Form::Table {
        schema: schema::<WorkspaceSpec>,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(Workspace)),
};
/// `[amp.workspace.<name>]`: the workspace itself.
pub const WORKSPACE: Kind = Kind::new(&WORKSPACE_KIND);

static RULE_GROUPS_KIND: KindDef = KindDef {
    path: "amp.workspace.rule_groups",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&WORKSPACE_KIND),
        word: "rule_groups",
        keyed: true,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(RuleGroups)),
};
/// A rule groups namespace of a workspace, keyed by its name.
pub const RULE_GROUPS: Kind = Kind::new(&RULE_GROUPS_KIND);

static ALERTMANAGER_KIND: KindDef = KindDef {
    path: "amp.workspace.alertmanager",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&WORKSPACE_KIND),
        word: "alertmanager",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(Alertmanager)),
};
/// The alertmanager definition of a workspace.
pub const ALERTMANAGER: Kind = Kind::new(&ALERTMANAGER_KIND);

static LOGGING_KIND: KindDef = KindDef {
    path: "amp.workspace.logging",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&WORKSPACE_KIND),
        word: "logging",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(Logging)),
};
/// The logging configuration of a workspace.
pub const LOGGING: Kind = Kind::new(&LOGGING_KIND);

// ---------------------------------------------------------------------------------------------
// Schema

// ---------------------------------------------------------------------------------------------
// Schema

/// `[amp.workspace.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Defaults to `<stack>-<name>`.
    pub alias: Option<String>,
    /// Customer managed KMS key; only at creation (AMP cannot change it later).
    pub kms_key_arn: Option<String>,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
    /// Rule groups namespaces: namespace name → Prometheus rule file.
    #[serde(default)]
    pub rule_groups: BTreeMap<String, Spanned<String>>,
    /// Alertmanager definition file (AMP's `alertmanager_config` format).
    pub alertmanager: Option<Spanned<String>>,
    pub logging: Option<LoggingSpec>,
    #[serde(skip)]
    pub loaded: WorkspaceFiles,
}

#[derive(Debug, Clone, Default)]
pub struct WorkspaceFiles {
    /// Namespace → file content.
    pub rule_groups: BTreeMap<String, String>,
    pub alertmanager: Option<String>,
}

/// `logging = { log_group_arn = "..." }`: where AMP sends its rule and alerting logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSpec {
    pub log_group_arn: String,
}

fn valid_namespace(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

impl KindSpec for WorkspaceSpec {
    /// The workspace records the hash of its alertmanager definition in a tag of its own.
    fn tagging(&self, _: &DesiredState, _: &ResourceId) -> Option<Tagging<'_>> {
        Some(Tagging {
            own: self.tags.as_ref(),
            added: self
                .alertmanager
                .iter()
                .map(|_| TAG_ALERTMANAGER.to_string())
                .collect(),
            ec2: false,
        })
    }

    /// The workspace node references what its own values name; each part depends on the
    /// workspace node (and on what its own values reference).
    fn parts(&self, workspace: &Resource) -> Option<(Vec<Resource>, BTreeSet<ResourceId>)> {
        Some((self.part_nodes(workspace), self.own_references()))
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
        if let Some(a) = &self.alias {
            if a.is_empty() || a.len() > 100 {
                v.here("`alias` must be 1 to 100 characters");
            }
        }
        for (ns, path) in &self.rule_groups {
            if !valid_namespace(ns) {
                v.error(
                    &path.span(),
                    format!("rule groups namespace `{ns}` must be 1 to 64 letters, digits and -._, starting with a letter or digit"),
                );
            }
            let Some(file) = v.read(path) else { continue };
            if crate::rules::check_rule_file(&file.file, v.diags).is_some() {
                self.loaded
                    .rule_groups
                    .insert(ns.clone(), file.text().to_string());
            }
        }
        if let Some(path) = &self.alertmanager {
            if let Some(file) = v.read(path) {
                crate::alertmanager::check_definition(&file.file, v.diags);
                self.loaded.alertmanager = Some(file.text().to_string());
            }
        }
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observed state

/// A rule groups namespace node: its rule file's content.
#[derive(Debug, Clone)]
pub struct RuleGroupsPart {
    pub data: String,
}

impl KindSpec for RuleGroupsPart {}

/// The alertmanager definition node: its file's content.
#[derive(Debug, Clone)]
pub struct AlertmanagerPart {
    pub data: String,
}

impl KindSpec for AlertmanagerPart {}

/// The logging configuration node.
#[derive(Debug, Clone)]
pub struct LoggingPart {
    pub log_group_arn: String,
}

impl KindSpec for LoggingPart {}

impl WorkspaceSpec {
    /// The nodes the table expands into besides the workspace itself.
    fn part_nodes(&self, workspace: &Resource) -> Vec<Resource> {
        let node = |kind, key: Option<String>, spec, extra: BTreeSet<ResourceId>| Resource {
            id: ResourceId::part(kind, workspace.id.name.clone(), key),
            origin: workspace.origin.clone(),
            adopt: None,
            observe_only: workspace.observe_only,
            spec,
            depends_on: extra.into_iter().chain([workspace.id.clone()]).collect(),
        };
        let mut parts: Vec<Resource> = self
            .loaded
            .rule_groups
            .iter()
            .map(|(ns, data)| {
                node(
                    RULE_GROUPS,
                    Some(ns.clone()),
                    Spec::new(RuleGroupsPart { data: data.clone() }),
                    BTreeSet::new(),
                )
            })
            .collect();
        if let Some(data) = &self.loaded.alertmanager {
            parts.push(node(
                ALERTMANAGER,
                None,
                Spec::new(AlertmanagerPart { data: data.clone() }),
                BTreeSet::new(),
            ));
        }
        if let Some(l) = &self.logging {
            parts.push(node(
                LOGGING,
                None,
                Spec::new(LoggingPart {
                    log_group_arn: l.log_group_arn.clone(),
                }),
                references_in(&l.log_group_arn),
            ));
        }
        parts
    }

    /// What the workspace itself references (its parts reference the rest).
    fn own_references(&self) -> BTreeSet<ResourceId> {
        let mut refs = BTreeSet::new();
        for s in self.alias.iter().chain(&self.kms_key_arn) {
            refs.extend(references_in(s));
        }
        if let Some(t) = &self.tags {
            for v in t.get_ref().values() {
                refs.extend(references_in(v));
            }
        }
        refs
    }
}

// ---------------------------------------------------------------------------------------------
// Reads shared by the four kinds

/// Workspace tag holding the hash of the alertmanager definition stackwarden put last.
pub const TAG_ALERTMANAGER: &str = "stackwarden:alertmanager";

/// A workspace as listed.
#[derive(Debug, Clone, Default)]
pub struct ObservedWorkspace {
    pub id: String,
    pub arn: String,
    pub alias: Option<String>,
    pub status: String,
    pub tags: Tags,
    /// The region its endpoints are in.
    pub region: String,
}

impl ObservedWorkspace {
    fn endpoints(id: &str, arn: &str, alias: &str, status: &str, region: &str) -> Outputs {
        let endpoint = format!("https://aps-workspaces.{region}.amazonaws.com/workspaces/{id}/");
        Outputs::from([
            ("id".into(), id.to_string()),
            ("arn".into(), arn.to_string()),
            ("alias".into(), alias.to_string()),
            (
                "remote_write_url".into(),
                format!("{endpoint}api/v1/remote_write"),
            ),
            ("query_url".into(), format!("{endpoint}api/v1/query")),
            ("prometheus_endpoint".into(), endpoint),
            // Not an attribute users reference: the parts read it to wait for ACTIVE.
            ("status".into(), status.to_string()),
        ])
    }

    fn is_live(&self) -> bool {
        self.status != "DELETING"
    }
}

/// Every workspace the stack owns or adopts, listed once per observation.
async fn workspaces(ctx: &Context, desired: &DesiredState) -> Result<Arc<Vec<ObservedWorkspace>>> {
    let stack = desired.stack_name().to_string();
    let adopted: Vec<String> = desired
        .of_kind(WORKSPACE)
        .filter_map(|r| r.adopt.clone())
        .collect();
    ctx.shared("amp:ListWorkspaces", || async move {
        let mut found = Vec::new();
        let mut pages = ctx.amp.list_workspaces().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("aps", "ListWorkspaces"))?;
            for w in page.workspaces() {
                let tags = sorted(w.tags());
                if tags.get(TAG_STACK) == Some(&stack)
                    || adopted.iter().any(|a| a == w.workspace_id())
                {
                    found.push(ObservedWorkspace {
                        id: w.workspace_id().to_string(),
                        arn: w.arn().to_string(),
                        alias: w.alias().map(str::to_string),
                        status: w
                            .status()
                            .map(|s| s.status_code().as_str().to_string())
                            .unwrap_or_default(),
                        tags,
                        region: ctx.region.clone(),
                    });
                }
            }
        }
        Ok(found)
    })
    .await
}

/// The workspace node that manages an observed workspace: the one adopting its id, or the one
/// its ownership tags name.
fn workspace_node(desired: &DesiredState, w: &ObservedWorkspace) -> Option<ResourceId> {
    crate::managed::managing_node(desired, WORKSPACE, &w.id, &w.tags)
}

/// Whether `w` is the workspace that the composite of `part` manages.
fn is_parent(desired: &DesiredState, part: &Resource, w: &ObservedWorkspace) -> bool {
    w.is_live() && workspace_node(desired, w) == Some(part.id.composite())
}

/// The ACTIVE workspace a part goes in (its id and ARN), from the workspace node's
/// attributes; "known after apply" in a plan made before the workspace exists (apply starts a
/// part only once its workspace's attributes are known).
fn parent(part: &Resource, refs: &Refs) -> Result<(String, String)> {
    Ok(
        match usable_parent(part, refs, ("workspace", &["ACTIVE"], LOOK_AGAIN))? {
            Some(out) => (out["id"].clone(), out["arn"].clone()),
            None => (KNOWN_AFTER_APPLY.into(), KNOWN_AFTER_APPLY.into()),
        },
    )
}

/// The live, ACTIVE workspaces: the only ones whose contents can be read.
async fn active_workspaces(
    ctx: &Context,
    desired: &DesiredState,
) -> Result<Vec<ObservedWorkspace>> {
    Ok(workspaces(ctx, desired)
        .await?
        .iter()
        .filter(|w| w.status == "ACTIVE" || w.status == "UPDATING")
        .cloned()
        .collect())
}

fn hash_map(t: &Tags) -> HashMap<String, String> {
    t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn sorted(t: Option<&HashMap<String, String>>) -> Tags {
    t.map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn canonical_definition(data: &str) -> String {
    let Ok(mut v) = marked_yaml::from_yaml::<serde_json::Value>(0, data) else {
        return data.to_string();
    };
    let inner = v
        .get("alertmanager_config")
        .and_then(|c| c.as_str())
        .and_then(|c| marked_yaml::from_yaml::<serde_json::Value>(0, c).ok());
    if let Some(inner) = inner {
        v["alertmanager_config"] = inner;
    }
    v.to_string()
}

/// Rule file content as compared: parsed YAML when it parses, else the text.
fn canonical_rules(data: &str) -> String {
    match marked_yaml::from_yaml::<serde_json::Value>(0, data) {
        Ok(v) => v.to_string(),
        Err(_) => data.to_string(),
    }
}

async fn tag(ctx: &Context, arn: &str, set: &Tags) -> Result<()> {
    ctx.amp
        .tag_resource()
        .resource_arn(arn)
        .set_tags(Some(hash_map(set)))
        .send()
        .await
        .map_err(aws_error("aps", "TagResource"))?;
    Ok(())
}

async fn untag(ctx: &Context, arn: &str, keys: &[String]) -> Result<()> {
    ctx.amp
        .untag_resource()
        .resource_arn(arn)
        .set_tag_keys(Some(keys.to_vec()))
        .send()
        .await
        .map_err(aws_error("aps", "UntagResource"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The workspace

pub struct Workspace;

/// Whether a workspace a create answered is gone or going (a stale client token's answer).
async fn deleted(ctx: &Context, id: &str) -> Result<bool> {
    match ctx.amp.describe_workspace().workspace_id(id).send().await {
        Ok(out) => Ok(out
            .workspace()
            .and_then(|w| w.status())
            .is_some_and(|s| s.status_code().as_str() == "DELETING")),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Ok(true)
        }
        Err(e) => Err(aws_error("aps", "DescribeWorkspace")(e)),
    }
}

#[derive(Debug, Clone)]
pub struct WorkspaceWant {
    pub alias: String,
    pub kms_key_arn: Option<String>,
    pub tags: Tags,
    /// The stack and node, for the create's client token.
    pub owner: String,
}

#[derive(Debug, Clone)]
pub enum WorkspaceUpdate {
    Alias { from: Option<String>, to: String },
}

impl Describe for WorkspaceUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match self {
            WorkspaceUpdate::Alias { from, to } => {
                vec![FieldChange::new("alias", from.clone(), Some(to.clone()))]
            }
        }
    }
}

#[async_trait]
impl ManagedObject for Workspace {
    type Desired = WorkspaceWant;
    type Observed = ObservedWorkspace;
    type Update = WorkspaceUpdate;
    const KIND: Kind = WORKSPACE;
    const NOUN: &'static str = "workspace";

    fn desired(
        &self,
        desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<WorkspaceWant> {
        let s = node.spec.expect::<WorkspaceSpec>();
        Ok(WorkspaceWant {
            alias: refs
                .render(
                    &s.alias
                        .clone()
                        .unwrap_or_else(|| desired.default_name(&node.id)),
                )
                .value,
            kms_key_arn: s.kms_key_arn.as_ref().map(|k| refs.render(k).value),
            tags: s
                .tags
                .as_ref()
                .map(|t| {
                    t.get_ref()
                        .iter()
                        .map(|(k, v)| (k.clone(), refs.render(v).value))
                        .collect()
                })
                .unwrap_or_default(),
            owner: format!("{}/{}", desired.stack_name(), node.id),
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
        ObservedWorkspace::endpoints(
            &o.id,
            &o.arn,
            o.alias.as_deref().unwrap_or_default(),
            &o.status,
            &o.region,
        )
    }

    fn readiness(&self, _want: &WorkspaceWant, have: &ObservedWorkspace) -> Result<Readiness> {
        match have.status.as_str() {
            "CREATING" | "UPDATING" => Ok(Readiness::Waiting(
                format!("still {}", have.status),
                Duration::from_secs(5),
            )),
            "CREATION_FAILED" => Err(Error::Invalid(format!(
                "workspace {} failed to create; delete it and the next pass creates another",
                have.id
            ))),
            _ => Ok(Readiness::Ready),
        }
    }

    fn diff(&self, want: &WorkspaceWant, have: &ObservedWorkspace) -> Vec<WorkspaceUpdate> {
        let mut out = Vec::new();
        if have.alias.as_deref() != Some(want.alias.as_str()) {
            out.push(WorkspaceUpdate::Alias {
                from: have.alias.clone(),
                to: want.alias.clone(),
            });
        }
        out
    }

    fn own_tags(&self, want: &WorkspaceWant) -> Tags {
        want.tags.clone()
    }

    fn create_fields(&self, want: &WorkspaceWant) -> Vec<FieldChange> {
        let mut f = vec![FieldChange::new("alias", None, Some(want.alias.clone()))];
        if let Some(k) = &want.kms_key_arn {
            f.push(FieldChange::new("kms_key_arn", None, Some(k.clone())));
        }
        f
    }

    fn label(&self, want: &WorkspaceWant) -> String {
        want.alias.clone()
    }

    /// The client token is derived from the request ([`crate::managed::client_token`]): a
    /// create repeated because the listing does not show the workspace yet gets the one the
    /// first made. AWS documents no end to such a token, so it may answer a workspace deleted
    /// since: one AMP no longer knows, or knows as DELETING, is a stale answer, and the
    /// create is made again with a token of its own.
    async fn create(&self, ctx: &Context, want: &WorkspaceWant, tags: &Tags) -> Result<Outputs> {
        // Tags are the request's too: the token changes with them.
        let request = format!(
            "{}\n{}\n{}\n{tags:?}",
            want.owner,
            want.alias,
            want.kms_key_arn.as_deref().unwrap_or_default()
        );
        let mut stale: Vec<String> = Vec::new();
        let out = loop {
            let mut parts = vec![request.as_str()];
            parts.extend(stale.iter().map(String::as_str));
            let out = ctx
                .amp
                .create_workspace()
                .client_token(crate::managed::client_token(&parts))
                .alias(&want.alias)
                .set_kms_key_arn(want.kms_key_arn.clone())
                .set_tags(Some(hash_map(tags)))
                .send()
                .await
                .map_err(aws_error("aps", "CreateWorkspace"))?;
            if !deleted(ctx, out.workspace_id()).await? {
                break out;
            }
            if stale.len() >= crate::managed::STALE_TOKENS {
                return Err(Error::Invalid(format!(
                    "CreateWorkspace answered deleted workspaces for {} client tokens in a row ({})",
                    stale.len() + 1,
                    stale.join(", ")
                )));
            }
            tracing::info!(
                workspace = out.workspace_id(),
                "client token answered a deleted workspace: creating with another"
            );
            stale.push(out.workspace_id().to_string());
        };
        tracing::info!(workspace = out.workspace_id(), "created workspace");
        Ok(ObservedWorkspace::endpoints(
            out.workspace_id(),
            out.arn(),
            &want.alias,
            out.status()
                .map(|s| s.status_code().as_str())
                .unwrap_or("CREATING"),
            &ctx.region,
        ))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedWorkspace,
        change: &WorkspaceUpdate,
    ) -> Result<Option<Outputs>> {
        match change {
            WorkspaceUpdate::Alias { to, .. } => {
                ctx.amp
                    .update_workspace_alias()
                    .workspace_id(&have.id)
                    .alias(to)
                    .send()
                    .await
                    .map_err(aws_error("aps", "UpdateWorkspaceAlias"))?;
            }
        }
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedWorkspace, set: &Tags) -> Result<()> {
        tag(ctx, &have.arn, set).await
    }

    async fn untag(&self, ctx: &Context, have: &ObservedWorkspace, keys: &[String]) -> Result<()> {
        untag(ctx, &have.arn, keys).await
    }

    async fn delete(&self, ctx: &Context, have: &ObservedWorkspace) -> Result<()> {
        ctx.amp
            .delete_workspace()
            .workspace_id(&have.id)
            .send()
            .await
            .map_err(aws_error("aps", "DeleteWorkspace"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Rule groups namespaces

pub struct RuleGroups;

#[derive(Debug, Clone)]
pub struct RuleGroupsWant {
    pub workspace: String,
    pub name: String,
    pub data: String,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedNamespace {
    pub workspace: ObservedWorkspace,
    pub name: String,
    pub arn: String,
    pub data: String,
    pub tags: Tags,
    /// CREATING, ACTIVE, UPDATING, DELETING, CREATION_FAILED or UPDATE_FAILED.
    pub status: String,
    /// Why AMP failed it, for the *_FAILED statuses.
    pub reason: String,
}

/// A namespace as `ListRuleGroupsNamespaces` answers it.
struct Listed {
    name: String,
    arn: String,
    tags: Tags,
    status: String,
    reason: String,
}

#[derive(Debug, Clone)]
pub enum RuleGroupsUpdate {
    Data { from: String, to: String },
}

impl Describe for RuleGroupsUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        let RuleGroupsUpdate::Data { from, to } = self;
        vec![FieldChange::document("data", Some(from), Some(to))]
    }
}

#[async_trait]
impl ManagedObject for RuleGroups {
    type Desired = RuleGroupsWant;
    type Observed = ObservedNamespace;
    type Update = RuleGroupsUpdate;
    const KIND: Kind = RULE_GROUPS;
    const NOUN: &'static str = "rule groups namespace";

    fn desired(
        &self,
        _desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<RuleGroupsWant> {
        let s = node.spec.expect::<RuleGroupsPart>();
        let (workspace, _) = parent(node, refs)?;
        Ok(RuleGroupsWant {
            workspace,
            name: node.id.key.clone().unwrap_or_default(),
            data: s.data.clone(),
        })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedNamespace>> {
        let reads = active_workspaces(ctx, desired)
            .await?
            .into_iter()
            .map(|w| async move {
                let mut pages = ctx
                    .amp
                    .list_rule_groups_namespaces()
                    .workspace_id(&w.id)
                    .into_paginator()
                    .send();
                let mut listed = Vec::new();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(aws_error("aps", "ListRuleGroupsNamespaces"))?;
                    listed.extend(page.rule_groups_namespaces().iter().map(|n| {
                        let status = n.status();
                        Listed {
                            name: n.name().to_string(),
                            arn: n.arn().to_string(),
                            tags: sorted(n.tags()),
                            status: status
                                .map(|s| s.status_code().as_str().to_string())
                                .unwrap_or_else(|| "ACTIVE".into()),
                            reason: status
                                .and_then(|s| s.status_reason())
                                .unwrap_or_default()
                                .to_string(),
                        }
                    }));
                }
                let reads = listed.into_iter().map(|listed| {
                    let w = w.clone();
                    let Listed {
                        name,
                        arn,
                        tags,
                        status,
                        reason,
                    } = listed;
                    async move {
                        let out = ctx
                            .amp
                            .describe_rule_groups_namespace()
                            .workspace_id(&w.id)
                            .name(&name)
                            .send()
                            .await
                            .map_err(aws_error("aps", "DescribeRuleGroupsNamespace"))?;
                        let data = out
                            .rule_groups_namespace()
                            .map(|n| String::from_utf8_lossy(n.data().as_ref()).into_owned())
                            .unwrap_or_default();
                        Ok::<_, Error>(ObservedNamespace {
                            workspace: w,
                            name,
                            arn,
                            data,
                            tags,
                            status,
                            reason,
                        })
                    }
                });
                futures::future::join_all(reads)
                    .await
                    .into_iter()
                    .collect::<Result<Vec<_>>>()
            });
        Ok(futures::future::join_all(reads)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    fn id(&self, o: &ObservedNamespace) -> String {
        format!("{}/{}", o.workspace.id, o.name)
    }

    fn tags<'o>(&self, o: &'o ObservedNamespace) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    /// A namespace is the stack's when it carries the stack's tag inside a workspace a node
    /// manages (namespaces made before workspaces had parts carry the workspace's address).
    fn owner(&self, desired: &DesiredState, o: &ObservedNamespace) -> Option<ResourceId> {
        if o.tags.get(TAG_STACK).map(String::as_str) != Some(desired.stack_name()) {
            return None;
        }
        let ws = workspace_node(desired, &o.workspace)?;
        Some(ResourceId::part(RULE_GROUPS, ws.name, Some(o.name.clone())))
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedNamespace],
    ) -> Option<&'o ObservedNamespace> {
        observed.iter().find(|o| {
            Some(&o.name) == node.id.key.as_ref() && is_parent(desired, node, &o.workspace)
        })
    }

    /// AMP applies a namespace's rules after the call returns: CREATING or UPDATING is waited
    /// for, and a namespace AMP failed with the very rules desired is an error with its
    /// reason (other rules are put again by the diff).
    fn readiness(&self, want: &RuleGroupsWant, have: &ObservedNamespace) -> Result<Readiness> {
        let same = canonical_rules(&have.data) == canonical_rules(&want.data);
        match have.status.as_str() {
            "CREATING" | "UPDATING" | "DELETING" => Ok(Readiness::Waiting(
                format!("AMP is applying the rule groups ({})", have.status),
                LOOK_AGAIN,
            )),
            "CREATION_FAILED" | "UPDATE_FAILED" if same => Err(Error::Invalid(format!(
                "AMP failed the rule groups namespace {} of workspace {} ({}): {}; fix the rule file",
                have.name, have.workspace.id, have.status, have.reason
            ))),
            _ => Ok(Readiness::Ready),
        }
    }

    fn diff(&self, want: &RuleGroupsWant, have: &ObservedNamespace) -> Vec<RuleGroupsUpdate> {
        if canonical_rules(&have.data) == canonical_rules(&want.data) {
            return Vec::new();
        }
        vec![RuleGroupsUpdate::Data {
            from: have.data.clone(),
            to: want.data.clone(),
        }]
    }

    fn create_fields(&self, want: &RuleGroupsWant) -> Vec<FieldChange> {
        vec![FieldChange::document("data", None, Some(&want.data))]
    }

    fn label(&self, want: &RuleGroupsWant) -> String {
        want.name.clone()
    }

    async fn create(&self, ctx: &Context, want: &RuleGroupsWant, tags: &Tags) -> Result<Outputs> {
        ctx.amp
            .create_rule_groups_namespace()
            .workspace_id(&want.workspace)
            .name(&want.name)
            .data(Blob::new(want.data.as_bytes()))
            .set_tags(Some(hash_map(tags)))
            .send()
            .await
            .map_err(aws_error("aps", "CreateRuleGroupsNamespace"))?;
        Ok(Outputs::new())
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedNamespace,
        change: &RuleGroupsUpdate,
    ) -> Result<Option<Outputs>> {
        let RuleGroupsUpdate::Data { to, .. } = change;
        ctx.amp
            .put_rule_groups_namespace()
            .workspace_id(&have.workspace.id)
            .name(&have.name)
            .data(Blob::new(to.as_bytes()))
            .send()
            .await
            .map_err(aws_error("aps", "PutRuleGroupsNamespace"))?;
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedNamespace, set: &Tags) -> Result<()> {
        tag(ctx, &have.arn, set).await
    }

    async fn untag(&self, ctx: &Context, have: &ObservedNamespace, keys: &[String]) -> Result<()> {
        untag(ctx, &have.arn, keys).await
    }

    async fn delete(&self, ctx: &Context, have: &ObservedNamespace) -> Result<()> {
        ctx.amp
            .delete_rule_groups_namespace()
            .workspace_id(&have.workspace.id)
            .name(&have.name)
            .send()
            .await
            .map_err(aws_error("aps", "DeleteRuleGroupsNamespace"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The alertmanager definition

pub struct Alertmanager;

#[derive(Debug, Clone)]
pub struct AlertmanagerWant {
    pub workspace: String,
    pub workspace_arn: String,
    pub data: String,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedDefinition {
    pub workspace: ObservedWorkspace,
    pub data: String,
    /// ACTIVE, CREATING, UPDATING, DELETING, CREATION_FAILED or UPDATE_FAILED.
    pub status: String,
    pub reason: Option<String>,
}

impl ObservedDefinition {
    /// The hash of the definition stackwarden put last, as recorded on the workspace.
    fn recorded(&self) -> Option<&String> {
        self.workspace.tags.get(TAG_ALERTMANAGER)
    }
}

#[derive(Debug, Clone)]
pub enum AlertmanagerUpdate {
    /// Replaces the definition and records its hash.
    Put { from: String, to: String },
    /// The definition in force (or being checked) is the desired one but was never recorded
    /// as stackwarden's: adopted, or the process died between the put and the tag.
    Record { data: String },
}

impl Describe for AlertmanagerUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        vec![match self {
            AlertmanagerUpdate::Put { from, to } => {
                FieldChange::document("data", Some(from), Some(to))
            }
            AlertmanagerUpdate::Record { data } => FieldChange::new(
                TAG_ALERTMANAGER,
                None,
                Some(crate::change::short_digest(data)),
            ),
        }]
    }
}

#[async_trait]
impl ManagedObject for Alertmanager {
    type Desired = AlertmanagerWant;
    type Observed = ObservedDefinition;
    type Update = AlertmanagerUpdate;
    const KIND: Kind = ALERTMANAGER;
    const NOUN: &'static str = "alertmanager definition";

    fn desired(
        &self,
        _desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<AlertmanagerWant> {
        let s = node.spec.expect::<AlertmanagerPart>();
        let (workspace, workspace_arn) = parent(node, refs)?;
        Ok(AlertmanagerWant {
            workspace,
            workspace_arn,
            data: s.data.clone(),
        })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedDefinition>> {
        let reads = active_workspaces(ctx, desired)
            .await?
            .into_iter()
            .map(|w| async move { describe_alertmanager(ctx, w).await });
        Ok(futures::future::join_all(reads)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    fn id(&self, o: &ObservedDefinition) -> String {
        o.workspace.id.clone()
    }

    fn tags<'o>(&self, _o: &'o ObservedDefinition) -> Option<&'o Tags> {
        None
    }

    /// The stack's when its workspace is and the definition was recorded as put by stackwarden.
    fn owner(&self, desired: &DesiredState, o: &ObservedDefinition) -> Option<ResourceId> {
        o.recorded()?;
        let ws = workspace_node(desired, &o.workspace)?;
        Some(ResourceId::part(ALERTMANAGER, ws.name, None))
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedDefinition],
    ) -> Option<&'o ObservedDefinition> {
        observed
            .iter()
            .find(|o| is_parent(desired, node, &o.workspace))
    }

    fn readiness(&self, want: &AlertmanagerWant, have: &ObservedDefinition) -> Result<Readiness> {
        let hash = crate::change::short_digest(&want.data);
        let recorded = have.recorded() == Some(&hash);
        let same = canonical_definition(&have.data) == canonical_definition(&want.data);
        match have.status.as_str() {
            // Put but never recorded: ready to be recorded (the diff says so).
            "CREATING" | "UPDATING" if same && !recorded => Ok(Readiness::Ready),
            "CREATING" | "UPDATING" | "DELETING" => Ok(Readiness::Waiting(
                format!("AMP is checking it ({})", have.status),
                LOOK_AGAIN,
            )),
            "CREATION_FAILED" | "UPDATE_FAILED" if recorded => Err(Error::Invalid(format!(
                "AMP rejected the alertmanager definition of workspace {} ({}): {}; fix the definition file",
                have.workspace.id,
                have.status,
                have.reason.clone().unwrap_or_default()
            ))),
            _ => Ok(Readiness::Ready),
        }
    }

    fn diff(&self, want: &AlertmanagerWant, have: &ObservedDefinition) -> Vec<AlertmanagerUpdate> {
        let same = canonical_definition(&have.data) == canonical_definition(&want.data);
        let failed = matches!(have.status.as_str(), "CREATION_FAILED" | "UPDATE_FAILED");
        if failed || !same {
            vec![AlertmanagerUpdate::Put {
                from: have.data.clone(),
                to: want.data.clone(),
            }]
        } else if have.recorded() != Some(&crate::change::short_digest(&want.data)) {
            vec![AlertmanagerUpdate::Record {
                data: want.data.clone(),
            }]
        } else {
            Vec::new()
        }
    }

    fn create_fields(&self, want: &AlertmanagerWant) -> Vec<FieldChange> {
        vec![FieldChange::document("data", None, Some(&want.data))]
    }

    fn label(&self, want: &AlertmanagerWant) -> String {
        want.workspace.clone()
    }

    async fn create(
        &self,
        ctx: &Context,
        want: &AlertmanagerWant,
        _tags: &Tags,
    ) -> Result<Outputs> {
        ctx.amp
            .create_alert_manager_definition()
            .workspace_id(&want.workspace)
            .data(Blob::new(want.data.as_bytes()))
            .send()
            .await
            .map_err(aws_error("aps", "CreateAlertManagerDefinition"))?;
        record(ctx, &want.workspace_arn, &want.data).await?;
        Ok(Outputs::new())
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedDefinition,
        change: &AlertmanagerUpdate,
    ) -> Result<Option<Outputs>> {
        match change {
            AlertmanagerUpdate::Put { to, .. } => {
                ctx.amp
                    .put_alert_manager_definition()
                    .workspace_id(&have.workspace.id)
                    .data(Blob::new(to.as_bytes()))
                    .send()
                    .await
                    .map_err(aws_error("aps", "PutAlertManagerDefinition"))?;
                record(ctx, &have.workspace.arn, to).await?
            }
            AlertmanagerUpdate::Record { data } => record(ctx, &have.workspace.arn, data).await?,
        }
        Ok(None)
    }

    async fn delete(&self, ctx: &Context, have: &ObservedDefinition) -> Result<()> {
        match ctx
            .amp
            .delete_alert_manager_definition()
            .workspace_id(&have.workspace.id)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {}
            Err(e) => return Err(aws_error("aps", "DeleteAlertManagerDefinition")(e)),
        }
        untag(ctx, &have.workspace.arn, &[TAG_ALERTMANAGER.to_string()]).await
    }
}

/// Records on the workspace the hash of the definition just put: a rejected definition is then
/// reported, not put again each pass.
async fn record(ctx: &Context, workspace_arn: &str, data: &str) -> Result<()> {
    tag(
        ctx,
        workspace_arn,
        &Tags::from([(
            TAG_ALERTMANAGER.to_string(),
            crate::change::short_digest(data),
        )]),
    )
    .await
}

async fn describe_alertmanager(
    ctx: &Context,
    w: ObservedWorkspace,
) -> Result<Option<ObservedDefinition>> {
    match ctx
        .amp
        .describe_alert_manager_definition()
        .workspace_id(&w.id)
        .send()
        .await
    {
        Ok(out) => Ok(out.alert_manager_definition().map(|d| ObservedDefinition {
            data: String::from_utf8_lossy(d.data().as_ref()).into_owned(),
            status: d
                .status()
                .map(|s| s.status_code().as_str().to_string())
                .unwrap_or_default(),
            reason: d
                .status()
                .and_then(|s| s.status_reason())
                .map(str::to_string),
            workspace: w,
        })),
        Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(None),
        Err(e) => Err(aws_error("aps", "DescribeAlertManagerDefinition")(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// The logging configuration

pub struct Logging;

#[derive(Debug, Clone)]
pub struct LoggingWant {
    pub workspace: String,
    pub log_group_arn: String,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedLogging {
    pub workspace: ObservedWorkspace,
    pub log_group_arn: String,
    /// CREATING, ACTIVE, UPDATING, DELETING, CREATION_FAILED or UPDATE_FAILED.
    pub status: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub enum LoggingUpdate {
    LogGroup { from: String, to: String },
}

impl Describe for LoggingUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        let LoggingUpdate::LogGroup { from, to } = self;
        vec![FieldChange::new(
            "log_group_arn",
            Some(from.clone()),
            Some(to.clone()),
        )]
    }
}

#[async_trait]
impl ManagedObject for Logging {
    type Desired = LoggingWant;
    type Observed = ObservedLogging;
    type Update = LoggingUpdate;
    const KIND: Kind = LOGGING;
    const NOUN: &'static str = "logging configuration";

    fn desired(
        &self,
        _desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<LoggingWant> {
        let s = node.spec.expect::<LoggingPart>();
        let (workspace, _) = parent(node, refs)?;
        Ok(LoggingWant {
            workspace,
            log_group_arn: refs.render(&s.log_group_arn).value,
        })
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<ObservedLogging>> {
        let reads = active_workspaces(ctx, desired)
            .await?
            .into_iter()
            .map(|w| async move {
                match ctx
                    .amp
                    .describe_logging_configuration()
                    .workspace_id(&w.id)
                    .send()
                    .await
                {
                    Ok(out) => Ok(out
                        .logging_configuration()
                        .filter(|l| !l.log_group_arn().is_empty())
                        .map(|l| ObservedLogging {
                            workspace: w,
                            log_group_arn: l.log_group_arn().to_string(),
                            status: l
                                .status()
                                .map(|s| s.status_code().as_str().to_string())
                                .unwrap_or_else(|| "ACTIVE".into()),
                            reason: l
                                .status()
                                .and_then(|s| s.status_reason())
                                .unwrap_or_default()
                                .to_string(),
                        })),
                    Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(None),
                    Err(e) => Err(aws_error("aps", "DescribeLoggingConfiguration")(e)),
                }
            });
        Ok(futures::future::join_all(reads)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    fn id(&self, o: &ObservedLogging) -> String {
        o.workspace.id.clone()
    }

    fn tags<'o>(&self, _o: &'o ObservedLogging) -> Option<&'o Tags> {
        None
    }

    /// A logging configuration belongs to the workspace it configures.
    fn owner(&self, desired: &DesiredState, o: &ObservedLogging) -> Option<ResourceId> {
        let ws = workspace_node(desired, &o.workspace)?;
        Some(ResourceId::part(LOGGING, ws.name, None))
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedLogging],
    ) -> Option<&'o ObservedLogging> {
        observed
            .iter()
            .find(|o| is_parent(desired, node, &o.workspace))
    }

    /// As a rule groups namespace: applying waited for, a failure of the desired log group an
    /// error with AMP's reason.
    fn readiness(&self, want: &LoggingWant, have: &ObservedLogging) -> Result<Readiness> {
        match have.status.as_str() {
            "CREATING" | "UPDATING" | "DELETING" => Ok(Readiness::Waiting(
                format!("AMP is applying the logging configuration ({})", have.status),
                LOOK_AGAIN,
            )),
            "CREATION_FAILED" | "UPDATE_FAILED" if have.log_group_arn == want.log_group_arn => {
                Err(Error::Invalid(format!(
                    "AMP failed the logging configuration of workspace {} ({}): {}; check the log group and its resource policy",
                    have.workspace.id, have.status, have.reason
                )))
            }
            _ => Ok(Readiness::Ready),
        }
    }

    fn diff(&self, want: &LoggingWant, have: &ObservedLogging) -> Vec<LoggingUpdate> {
        if have.log_group_arn == want.log_group_arn {
            return Vec::new();
        }
        vec![LoggingUpdate::LogGroup {
            from: have.log_group_arn.clone(),
            to: want.log_group_arn.clone(),
        }]
    }

    fn create_fields(&self, want: &LoggingWant) -> Vec<FieldChange> {
        vec![FieldChange::new(
            "log_group_arn",
            None,
            Some(want.log_group_arn.clone()),
        )]
    }

    fn label(&self, want: &LoggingWant) -> String {
        want.workspace.clone()
    }

    async fn create(&self, ctx: &Context, want: &LoggingWant, _tags: &Tags) -> Result<Outputs> {
        ctx.amp
            .create_logging_configuration()
            .workspace_id(&want.workspace)
            .log_group_arn(&want.log_group_arn)
            .send()
            .await
            .map_err(aws_error("aps", "CreateLoggingConfiguration"))?;
        Ok(Outputs::new())
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedLogging,
        change: &LoggingUpdate,
    ) -> Result<Option<Outputs>> {
        let LoggingUpdate::LogGroup { to, .. } = change;
        ctx.amp
            .update_logging_configuration()
            .workspace_id(&have.workspace.id)
            .log_group_arn(to)
            .send()
            .await
            .map_err(aws_error("aps", "UpdateLoggingConfiguration"))?;
        Ok(None)
    }

    async fn delete(&self, ctx: &Context, have: &ObservedLogging) -> Result<()> {
        ctx.amp
            .delete_logging_configuration()
            .workspace_id(&have.workspace.id)
            .send()
            .await
            .map_err(aws_error("aps", "DeleteLoggingConfiguration"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Action;
    use crate::controller::Controller;
    use crate::managed::{Managed, Op};
    use crate::testing::{desired, owned_tags, resource};

    const RULES: &str = "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up == 0\n";
    const AM: &str =
        "alertmanager_config: |\n  route:\n    receiver: a\n  receivers:\n    - name: a\n";

    fn spec() -> WorkspaceSpec {
        let mut s: WorkspaceSpec =
            toml::from_str("alias = \"main\"\nlogging = { log_group_arn = \"arn:lg\" }").unwrap();
        s.loaded.rule_groups.insert("node".into(), RULES.into());
        s.loaded.alertmanager = Some(AM.into());
        s
    }

    /// The workspace table `amp.workspace.main` and its parts, as loading expands them.
    fn nodes(s: WorkspaceSpec) -> DesiredState {
        let table = resource(WORKSPACE, "main", Spec::new(s.clone()));
        let mut all = s.part_nodes(&table);
        all.push(table);
        desired(all)
    }

    fn workspace(status: &str) -> ObservedWorkspace {
        ObservedWorkspace {
            id: "ws-1".into(),
            arn: "arn:ws-1".into(),
            alias: Some("main".into()),
            status: status.into(),
            tags: owned_tags("amp.workspace.main"),
            region: "us-east-1".into(),
        }
    }

    fn refs(status: &str) -> Refs {
        let w = workspace(status);
        Refs {
            outputs: [(ResourceId::new(WORKSPACE, "main"), Workspace.outputs(&w))].into(),
            ..Default::default()
        }
    }

    fn part(kind: Kind, key: Option<&str>) -> ResourceId {
        ResourceId::part(kind, "main", key.map(str::to_string))
    }

    fn diff<K: ManagedObject>(
        k: K,
        d: &DesiredState,
        id: &ResourceId,
        observed: Vec<K::Observed>,
        refs: &Refs,
    ) -> Result<Option<crate::change::Change<Op<K>>>> {
        Managed(k).diff(d, &d.resources[id], &observed, refs)
    }

    fn ws_id() -> ResourceId {
        ResourceId::new(WORKSPACE, "main")
    }

    #[test]
    fn a_workspace_table_expands_into_one_node_per_object_each_depending_on_the_workspace() {
        let d = nodes(spec());
        let ids: Vec<String> = d.resources.keys().map(ToString::to_string).collect();
        assert_eq!(
            ids,
            [
                "amp.workspace.main",
                "amp.workspace.main.rule_groups.node",
                "amp.workspace.main.alertmanager",
                "amp.workspace.main.logging",
            ]
        );
        for (id, r) in &d.resources {
            if id != &ws_id() {
                assert_eq!(r.depends_on, BTreeSet::from([ws_id()]), "{id}");
            }
        }
    }

    #[test]
    fn a_workspace_as_desired_has_no_change() {
        let d = nodes(spec());
        assert!(diff(
            Workspace,
            &d,
            &ws_id(),
            vec![workspace("ACTIVE")],
            &refs("ACTIVE")
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn a_missing_workspace_is_created_with_its_ownership_tags_in_the_same_call() {
        let d = nodes(spec());
        let c = diff(Workspace, &d, &ws_id(), vec![], &Refs::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create);
        assert!(matches!(
            &c.ops[..],
            [Op::Create { want, tags }]
                if want.alias == "main" && tags[crate::desired::TAG_ID] == "amp.workspace.main"
        ));
        let shown: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(shown, ["alias", "tags"]);
    }

    #[test]
    fn alias_and_tag_drift_is_corrected_and_each_correction_is_a_plan_line() {
        let d = nodes(spec());
        let mut w = workspace("ACTIVE");
        w.alias = Some("renamed".into());
        w.tags.remove("team");
        w.tags.insert("extra".into(), "x".into());
        let c = diff(Workspace, &d, &ws_id(), vec![w], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                &c.ops[..],
                [Op::Tag { .. }, Op::Untag { keys, .. }, Op::Update { change: WorkspaceUpdate::Alias { .. }, .. }]
                    if keys == &["extra".to_string()]
            ),
            "tags first, so the workspace is the stack's before it changes: {:?}",
            c.ops
        );
        let shown: Vec<(&str, Option<&str>, Option<&str>)> = c
            .fields
            .iter()
            .map(|f| (f.field.as_str(), f.before.as_deref(), f.after.as_deref()))
            .collect();
        assert_eq!(
            shown,
            [
                ("alias", Some("renamed"), Some("main")),
                ("tags.extra", Some("x"), None),
                ("tags.team", None, Some("sre")),
            ],
            "one line per tag that differs"
        );
    }

    #[test]
    fn a_creating_workspace_is_waited_for_without_polling() {
        let d = nodes(spec());
        let e = diff(
            Workspace,
            &d,
            &ws_id(),
            vec![workspace("CREATING")],
            &refs("CREATING"),
        )
        .unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(5)), "{e}");
        assert!(e.to_string().contains("still CREATING"), "{e}");
    }

    #[test]
    fn an_adopted_workspace_that_does_not_exist_is_an_error_never_a_create() {
        let mut d = nodes(spec());
        d.resources.get_mut(&ws_id()).unwrap().adopt = Some("ws-gone".into());
        let e = diff(
            Workspace,
            &d,
            &ws_id(),
            vec![workspace("ACTIVE")],
            &refs("ACTIVE"),
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Invalid(ref m) if m.contains("`ws-gone` to adopt does not exist")),
            "{e}"
        );
    }

    #[test]
    fn a_workspace_of_another_stack_is_never_adopted() {
        let mut d = nodes(spec());
        d.resources.get_mut(&ws_id()).unwrap().adopt = Some("ws-1".into());
        let mut theirs = workspace("ACTIVE");
        theirs
            .tags
            .insert(crate::desired::TAG_STACK.into(), "other".into());
        let e = diff(Workspace, &d, &ws_id(), vec![theirs], &refs("ACTIVE")).unwrap_err();
        assert!(
            matches!(e, Error::NotOwned(ref m) if m.contains("belongs to the stack `other`")),
            "{e}"
        );
    }

    #[test]
    fn owned_workspaces_no_longer_desired_are_orphaned_or_deleted() {
        let d = desired(vec![]);
        let observed = vec![workspace("ACTIVE")];
        let orphaned = Managed(Workspace).removed(&d, &observed, false);
        assert_eq!(orphaned.len(), 1);
        assert_eq!(orphaned[0].action, Action::Orphan);
        assert!(orphaned[0].ops.is_empty());
        let deleted = Managed(Workspace).removed(&d, &observed, true);
        assert_eq!(deleted.len(), 1);
        assert!(matches!(&deleted[0].ops[..], [Op::Delete { .. }]));
    }

    fn namespace(name: &str, data: &str, tags: Tags) -> ObservedNamespace {
        ObservedNamespace {
            workspace: workspace("ACTIVE"),
            name: name.into(),
            arn: format!("arn:ws-1/{name}"),
            data: data.into(),
            tags,
            status: "ACTIVE".into(),
            reason: String::new(),
        }
    }

    #[test]
    fn a_namespace_amp_is_applying_waits_and_one_it_failed_is_an_error_with_its_reason() {
        let d = nodes(spec());
        let node = part(RULE_GROUPS, Some("node"));
        let tags = owned_tags("amp.workspace.main.rule_groups.node");
        let mut updating = namespace("node", RULES, tags.clone());
        updating.status = "UPDATING".into();
        let e = diff(RuleGroups, &d, &node, vec![updating], &refs("ACTIVE")).unwrap_err();
        assert_eq!(e.class(), crate::error::ErrorClass::Waiting, "{e}");
        assert!(
            e.to_string()
                .contains("AMP is applying the rule groups (UPDATING)"),
            "{e}"
        );

        let mut failed = namespace("node", RULES, tags.clone());
        failed.status = "UPDATE_FAILED".into();
        failed.reason = "rule group node: parse error".into();
        let e = diff(RuleGroups, &d, &node, vec![failed.clone()], &refs("ACTIVE")).unwrap_err();
        assert_eq!(e.class(), crate::error::ErrorClass::Terminal, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("(UPDATE_FAILED): rule group node: parse error"),
            "{text}"
        );

        // Other rules than the failed ones: put again.
        failed.data = "groups: []\n".into();
        let c = diff(RuleGroups, &d, &node, vec![failed], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        assert!(matches!(&c.ops[..], [Op::Update { .. }]));
    }

    #[test]
    fn a_namespace_waits_for_its_workspace_to_be_active_then_is_created_in_it() {
        let d = nodes(spec());
        let node = part(RULE_GROUPS, Some("node"));
        let e = diff(RuleGroups, &d, &node, vec![], &refs("CREATING")).unwrap_err();
        assert!(e.retry_after().is_some(), "{e}");
        let c = diff(RuleGroups, &d, &node, vec![], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        assert!(matches!(
            &c.ops[..],
            [Op::Create { want, tags }]
                if want.workspace == "ws-1" && want.name == "node"
                    && tags[crate::desired::TAG_ID] == "amp.workspace.main.rule_groups.node"
        ));
    }

    #[test]
    fn a_namespace_planned_before_its_workspace_exists_is_a_create_known_after_apply() {
        let d = nodes(spec());
        let node = part(RULE_GROUPS, Some("node"));
        let c = diff(RuleGroups, &d, &node, vec![], &Refs::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create);
        assert!(
            matches!(&c.ops[..], [Op::Create { want, .. }] if want.workspace == KNOWN_AFTER_APPLY)
        );
    }

    #[test]
    fn changed_rules_are_put_and_reformatted_rules_are_no_drift() {
        let d = nodes(spec());
        let node = part(RULE_GROUPS, Some("node"));
        let tags = owned_tags("amp.workspace.main.rule_groups.node");
        let changed = namespace("node", "groups: []\n", tags.clone());
        let c = diff(RuleGroups, &d, &node, vec![changed], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Update { change: RuleGroupsUpdate::Data { to, .. }, .. }] if to == RULES)
        );
        let reformatted = namespace(
            "node",
            "groups:\n  - name: g\n    rules:\n      - {alert: A, expr: up == 0}\n",
            tags,
        );
        assert!(
            diff(RuleGroups, &d, &node, vec![reformatted], &refs("ACTIVE"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_namespace_tagged_with_its_workspace_address_is_taken_over_not_recreated() {
        // Namespaces made before workspaces had parts carry the workspace's address.
        let d = nodes(spec());
        let node = part(RULE_GROUPS, Some("node"));
        let old = namespace("node", RULES, owned_tags("amp.workspace.main"));
        let c = diff(RuleGroups, &d, &node, vec![old], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        assert!(matches!(
            &c.ops[..],
            [Op::Tag { set, .. }] if set[crate::desired::TAG_ID] == "amp.workspace.main.rule_groups.node"
        ));
    }

    #[test]
    fn a_namespace_dropped_from_a_desired_workspace_is_deleted_only_when_the_stack_owns_it() {
        let d = nodes(spec());
        let observed = vec![
            namespace(
                "node",
                RULES,
                owned_tags("amp.workspace.main.rule_groups.node"),
            ),
            namespace(
                "old",
                RULES,
                owned_tags("amp.workspace.main.rule_groups.old"),
            ),
            namespace("theirs", RULES, Tags::new()),
        ];
        let removed = Managed(RuleGroups).removed(&d, &observed, false);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].id, part(RULE_GROUPS, Some("old")));
        assert_eq!(removed[0].action, Action::Delete);
        // With the workspace itself gone from the desired state, its parts follow the policy.
        let removed = Managed(RuleGroups).removed(&desired(vec![]), &observed, false);
        assert_eq!(removed.len(), 2);
        assert!(removed.iter().all(|c| c.action == Action::Orphan));
    }

    fn definition(status: &str, data: &str, recorded: Option<&str>) -> ObservedDefinition {
        let mut workspace = workspace("ACTIVE");
        if let Some(h) = recorded {
            workspace.tags.insert(TAG_ALERTMANAGER.into(), h.into());
        }
        ObservedDefinition {
            workspace,
            data: data.into(),
            status: status.into(),
            reason: Some("undefined receiver".into()),
        }
    }

    fn am(
        data: &str,
        observed: Vec<ObservedDefinition>,
    ) -> Result<Option<crate::change::Change<Op<Alertmanager>>>> {
        let mut s = spec();
        s.loaded.alertmanager = Some(data.into());
        let d = nodes(s);
        diff(
            Alertmanager,
            &d,
            &part(ALERTMANAGER, None),
            observed,
            &refs("ACTIVE"),
        )
    }

    #[test]
    fn a_missing_alertmanager_definition_is_created() {
        let c = am(AM, vec![]).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Create { want, .. }] if want.data == AM && want.workspace == "ws-1")
        );
    }

    #[test]
    fn an_alertmanager_definition_differing_only_in_format_is_in_sync() {
        let reformatted =
            "alertmanager_config: |\n  route: {receiver: a}\n  receivers: [{name: a}]\n";
        let o = definition(
            "ACTIVE",
            reformatted,
            Some(&crate::change::short_digest(AM)),
        );
        assert!(am(AM, vec![o]).unwrap().is_none());
    }

    #[test]
    fn a_definition_put_but_never_recorded_is_recorded_not_put_again() {
        // The process died between CreateAlertManagerDefinition and the tag.
        let c = am(AM, vec![definition("CREATING", AM, None)])
            .unwrap()
            .unwrap();
        assert!(matches!(
            &c.ops[..],
            [Op::Update {
                change: AlertmanagerUpdate::Record { .. },
                ..
            }]
        ));
        // Recorded and being checked: waiting for the verdict, nothing written.
        let e = am(
            AM,
            vec![definition(
                "CREATING",
                AM,
                Some(&crate::change::short_digest(AM)),
            )],
        )
        .unwrap_err();
        assert_eq!(e.retry_after(), Some(LOOK_AGAIN), "{e}");
    }

    #[test]
    fn a_changed_alertmanager_definition_is_put() {
        let o = definition("ACTIVE", AM, Some(&crate::change::short_digest(AM)));
        let changed = AM.replace(
            "name: a",
            "name: a\n      sns_configs: [{topic_arn: arn:t}]",
        );
        let c = am(&changed, vec![o]).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Update { change: AlertmanagerUpdate::Put { to, .. }, .. }] if to == &changed)
        );
    }

    #[test]
    fn a_rejected_definition_is_reported_not_put_again_until_the_file_changes() {
        let o = definition(
            "UPDATE_FAILED",
            "old",
            Some(&crate::change::short_digest(AM)),
        );
        let e = am(AM, vec![o.clone()]).unwrap_err();
        assert!(
            matches!(e, Error::Invalid(ref m) if m.contains("undefined receiver")),
            "{e}"
        );
        let fixed = AM.replace("a\n", "b\n");
        let c = am(&fixed, vec![o]).unwrap().unwrap();
        assert!(matches!(
            &c.ops[..],
            [Op::Update {
                change: AlertmanagerUpdate::Put { .. },
                ..
            }]
        ));
    }

    #[test]
    fn a_dropped_definition_is_deleted_only_when_stackwarden_put_it() {
        let mut s = spec();
        s.loaded.alertmanager = None;
        let d = nodes(s);
        let ours = vec![definition(
            "ACTIVE",
            AM,
            Some(&crate::change::short_digest(AM)),
        )];
        let removed = Managed(Alertmanager).removed(&d, &ours, false);
        assert_eq!(removed.len(), 1);
        assert!(matches!(&removed[0].ops[..], [Op::Delete { .. }]));
        let theirs = vec![definition("ACTIVE", AM, None)];
        assert!(Managed(Alertmanager).removed(&d, &theirs, false).is_empty());
    }

    #[test]
    fn logging_is_created_updated_and_removed() {
        let d = nodes(spec());
        let node = part(LOGGING, None);
        let c = diff(Logging, &d, &node, vec![], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        assert!(matches!(&c.ops[..], [Op::Create { want, .. }] if want.log_group_arn == "arn:lg"));
        let other = ObservedLogging {
            workspace: workspace("ACTIVE"),
            log_group_arn: "arn:other".into(),
            status: "ACTIVE".into(),
            reason: String::new(),
        };
        let c = diff(Logging, &d, &node, vec![other.clone()], &refs("ACTIVE"))
            .unwrap()
            .unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Update { change: LoggingUpdate::LogGroup { to, .. }, .. }] if to == "arn:lg")
        );
        let mut s = spec();
        s.logging = None;
        let removed = Managed(Logging).removed(&nodes(s), &vec![other], false);
        assert_eq!(removed.len(), 1);
        assert!(matches!(&removed[0].ops[..], [Op::Delete { .. }]));
    }

    #[test]
    fn logging_amp_is_applying_waits_and_a_failed_one_is_an_error_with_its_reason() {
        let d = nodes(spec());
        let node = part(LOGGING, None);
        let mut have = ObservedLogging {
            workspace: workspace("ACTIVE"),
            log_group_arn: "arn:lg".into(),
            status: "CREATING".into(),
            reason: String::new(),
        };
        let e = diff(Logging, &d, &node, vec![have.clone()], &refs("ACTIVE")).unwrap_err();
        assert_eq!(e.class(), crate::error::ErrorClass::Waiting, "{e}");
        have.status = "CREATION_FAILED".into();
        have.reason = "the log group's resource policy does not allow AMP".into();
        let e = diff(Logging, &d, &node, vec![have], &refs("ACTIVE")).unwrap_err();
        assert_eq!(e.class(), crate::error::ErrorClass::Terminal, "{e}");
        assert!(
            e.to_string()
                .contains("(CREATION_FAILED): the log group's resource policy"),
            "{e}"
        );
    }
}
