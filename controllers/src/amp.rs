//! Amazon Managed Service for Prometheus: workspaces (alias, tags), their rule groups namespaces
//! from rule files, their alertmanager definition, and logging configuration.
//!
//! Workspaces are found by their ownership tags (aliases are not unique in AMP, so an unowned
//! workspace with the same alias is simply another workspace and is never touched). Rule groups
//! namespaces are compared by their parsed YAML, so a file that only changes formatting is no
//! drift.
//!
//! # Guarantees
//! - A workspace is created with the ownership tags in the same call, so a crash right after
//!   the create leaves a workspace the next pass finds and completes, never a duplicate.
//! - Rule groups namespaces of an owned workspace are deleted when removed from the desired state
//!   only if they carry the stack's ownership tag.
//! - The alertmanager definition is checked by AMP after it is accepted, and may end
//!   CREATION_FAILED or UPDATE_FAILED. The hash of the definition last put is kept in the
//!   workspace tag `stackwarden:alertmanager`, so a failed definition is reported (with AMP's
//!   reason) instead of being put again every pass, and a fixed file is put at once. Only a
//!   definition carrying that tag is deleted when the desired state drops it.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use aws_sdk_amp::primitives::Blob;
use aws_sdk_amp::types::WorkspaceStatusCode;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use serde::Deserialize;
use toml::Spanned;

use crate::change::{removed_objects, Action, Change};
use crate::controller::{wait_until, Context, Controller, Progress};
use crate::desired::{check_tags, DesiredState, Resource, Spec, Validator, TAG_STACK};
use crate::error::{aws_error, Error, Result};
use crate::model::{Kind, Outputs, Refs, ResourceId};
use crate::tags::{self, owned_by, owner_id};

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

impl WorkspaceSpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
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

#[derive(Debug, Clone, Default)]
pub struct ObservedNamespace {
    pub data: String,
    pub tags: BTreeMap<String, String>,
}

/// Workspace tag holding the hash of the alertmanager definition stackwarden put last.
pub const TAG_ALERTMANAGER: &str = "stackwarden:alertmanager";

#[derive(Debug, Clone, Default)]
pub struct ObservedDefinition {
    pub data: String,
    /// ACTIVE, CREATING, UPDATING, DELETING, CREATION_FAILED or UPDATE_FAILED.
    pub status: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedWorkspace {
    pub id: String,
    pub arn: String,
    pub alias: Option<String>,
    pub status: String,
    pub tags: BTreeMap<String, String>,
    pub namespaces: BTreeMap<String, ObservedNamespace>,
    pub log_group_arn: Option<String>,
    pub alertmanager: Option<ObservedDefinition>,
}

impl ObservedWorkspace {
    fn outputs(&self, region: &str) -> Outputs {
        let endpoint = format!(
            "https://aps-workspaces.{region}.amazonaws.com/workspaces/{}/",
            self.id
        );
        Outputs::from([
            ("id".into(), self.id.clone()),
            ("arn".into(), self.arn.clone()),
            ("alias".into(), self.alias.clone().unwrap_or_default()),
            (
                "remote_write_url".into(),
                format!("{endpoint}api/v1/remote_write"),
            ),
            ("query_url".into(), format!("{endpoint}api/v1/query")),
            ("prometheus_endpoint".into(), endpoint),
        ])
    }
}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub region: String,
    /// Workspaces owned by the stack or adopted by id.
    pub workspaces: Vec<ObservedWorkspace>,
}

impl Observed {
    /// The workspace a desired resource manages: adopted by id, or owned by tag.
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

// ---------------------------------------------------------------------------------------------
// The controller

pub struct AmpController;

#[derive(Debug, Clone)]
pub enum Op {
    /// Creates the workspace and everything in it, waiting for it to become ACTIVE in between.
    CreateWorkspace {
        alias: String,
        kms_key_arn: Option<String>,
        tags: BTreeMap<String, String>,
        namespaces: Vec<(String, String, BTreeMap<String, String>)>,
        log_group_arn: Option<String>,
        alertmanager: Option<String>,
    },
    UpdateAlias {
        workspace: String,
        alias: String,
    },
    Tag {
        arn: String,
        tags: BTreeMap<String, String>,
    },
    Untag {
        arn: String,
        keys: Vec<String>,
    },
    CreateNamespace {
        workspace: String,
        name: String,
        data: String,
        tags: BTreeMap<String, String>,
    },
    PutNamespace {
        workspace: String,
        name: String,
        data: String,
    },
    DeleteNamespace {
        workspace: String,
        name: String,
    },
    CreateLogging {
        workspace: String,
        log_group_arn: String,
    },
    UpdateLogging {
        workspace: String,
        log_group_arn: String,
    },
    DeleteLogging {
        workspace: String,
    },
    /// Creates the alertmanager definition, records its hash, waits for AMP's verdict.
    CreateAlertmanager {
        workspace: String,
        arn: String,
        data: String,
    },
    /// Replaces the alertmanager definition, records its hash, waits for AMP's verdict.
    PutAlertmanager {
        workspace: String,
        arn: String,
        data: String,
    },
    /// The desired definition is being checked but its hash was never recorded (the process
    /// died between the put and the tag): records the hash, waits for AMP's verdict.
    SettleAlertmanager {
        workspace: String,
        arn: String,
        data: String,
    },
    DeleteAlertmanager {
        workspace: String,
        arn: String,
    },
    /// The definition AMP rejected is still the desired one: reported as the resource's error
    /// after the other changes are applied, until the file changes.
    AlertmanagerRejected {
        workspace: String,
        reason: String,
    },
    DeleteWorkspace {
        workspace: String,
    },
}

/// An alertmanager definition as compared: parsed YAML, with the embedded
/// `alertmanager_config` parsed too, so formatting is no drift.
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

fn alias_of(desired: &DesiredState, r: &Resource, s: &WorkspaceSpec) -> String {
    s.alias
        .clone()
        .unwrap_or_else(|| desired.default_name(&r.id))
}

fn namespace_tags(desired: &DesiredState, r: &Resource) -> BTreeMap<String, String> {
    desired.tags_for(&r.id, &BTreeMap::new())
}

fn hash_map(t: &BTreeMap<String, String>) -> HashMap<String, String> {
    t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn sorted(t: Option<&HashMap<String, String>>) -> BTreeMap<String, String> {
    t.map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// Waits until a workspace is ACTIVE, logging progress; a workspace that fails is an error.
async fn wait_active(ctx: &Context, workspace: &str) -> Result<()> {
    wait_until(ctx, &format!("workspace {workspace}"), || async {
        let out = ctx
            .amp
            .describe_workspace()
            .workspace_id(workspace)
            .send()
            .await
            .map_err(aws_error("aps", "DescribeWorkspace"))?;
        let status = out
            .workspace()
            .and_then(|w| w.status())
            .map(|s| s.status_code().clone());
        match status {
            Some(WorkspaceStatusCode::Active) => Ok(Progress::Done(())),
            Some(WorkspaceStatusCode::CreationFailed) => Err(Error::Invalid(format!(
                "workspace {workspace} failed to create"
            ))),
            other => Ok(Progress::Waiting(
                other.map_or_else(|| "unknown".to_string(), |s| s.as_str().to_string()),
            )),
        }
    })
    .await
}

#[async_trait]
impl Controller for AmpController {
    type Observed = Observed;
    type Op = Op;

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::AmpWorkspace]
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        let stack = desired.stack_name();
        let adopted: Vec<&str> = desired
            .of_kind(Kind::AmpWorkspace)
            .filter_map(|r| r.adopt.as_deref())
            .collect();
        let mut found = Vec::new();
        let mut pages = ctx.amp.list_workspaces().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("aps", "ListWorkspaces"))?;
            for w in page.workspaces() {
                let tags = sorted(w.tags());
                let status = w
                    .status()
                    .map(|s| s.status_code().as_str().to_string())
                    .unwrap_or_default();
                if tags.get(TAG_STACK).map(String::as_str) == Some(stack)
                    || adopted.contains(&w.workspace_id())
                {
                    found.push(ObservedWorkspace {
                        id: w.workspace_id().to_string(),
                        arn: w.arn().to_string(),
                        alias: w.alias().map(str::to_string),
                        status,
                        tags,
                        ..Default::default()
                    });
                }
            }
        }
        // The contents of each workspace, workspaces concurrently.
        let reads = found.into_iter().map(|mut w| async move {
            if w.status == "DELETING" || w.status == "CREATING" {
                return Ok(w);
            }
            let mut pages = ctx
                .amp
                .list_rule_groups_namespaces()
                .workspace_id(&w.id)
                .into_paginator()
                .send();
            let mut names = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(aws_error("aps", "ListRuleGroupsNamespaces"))?;
                names.extend(
                    page.rule_groups_namespaces()
                        .iter()
                        .map(|n| (n.name().to_string(), sorted(n.tags()))),
                );
            }
            let reads = names.into_iter().map(|(name, tags)| {
                let id = w.id.clone();
                async move {
                    let out = ctx
                        .amp
                        .describe_rule_groups_namespace()
                        .workspace_id(id)
                        .name(&name)
                        .send()
                        .await
                        .map_err(aws_error("aps", "DescribeRuleGroupsNamespace"))?;
                    let data = out
                        .rule_groups_namespace()
                        .map(|n| String::from_utf8_lossy(n.data().as_ref()).into_owned())
                        .unwrap_or_default();
                    Ok::<_, Error>((name, ObservedNamespace { data, tags }))
                }
            });
            for res in futures::future::join_all(reads).await {
                let (name, ns) = res?;
                w.namespaces.insert(name, ns);
            }
            w.log_group_arn = match ctx
                .amp
                .describe_logging_configuration()
                .workspace_id(&w.id)
                .send()
                .await
            {
                Ok(out) => out
                    .logging_configuration()
                    .map(|l| l.log_group_arn().to_string())
                    .filter(|a| !a.is_empty()),
                Err(e) if e.code() == Some("ResourceNotFoundException") => None,
                Err(e) => return Err(aws_error("aps", "DescribeLoggingConfiguration")(e)),
            };
            w.alertmanager = describe_alertmanager(ctx, &w.id).await?;
            Ok::<_, Error>(w)
        });
        let workspaces = futures::future::join_all(reads)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(Observed {
            region: ctx.region.clone(),
            workspaces,
        })
    }

    fn outputs(&self, desired: &DesiredState, obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        desired
            .of_kind(Kind::AmpWorkspace)
            .filter_map(|r| Some((r.id.clone(), obs.find(desired, r)?.outputs(&obs.region))))
            .collect()
    }

    fn diff(
        &self,
        desired: &DesiredState,
        r: &Resource,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let Spec::AmpWorkspace(s) = &r.spec else {
            return Ok(None);
        };
        let alias = alias_of(desired, r, s);
        let tags = desired.tags_for(
            &r.id,
            &s.tags
                .as_ref()
                .map(|t| t.get_ref().clone())
                .unwrap_or_default(),
        );
        let ns_tags = namespace_tags(desired, r);
        let log_group = s
            .logging
            .as_ref()
            .map(|l| refs.render(&l.log_group_arn).value);

        let Some(w) = obs.find(desired, r) else {
            if let Some(id) = &r.adopt {
                return Err(Error::Invalid(format!(
                    "workspace `{id}` to adopt does not exist"
                )));
            }
            let mut c = Change::new(r.id.clone(), Action::Create, format!("workspace {alias}"));
            c.field("alias", None, Some(alias.clone()));
            c.field("tags", None, Some(tags::show(&tags)));
            for ns in s.loaded.rule_groups.keys() {
                c.field(
                    format!("rule_groups.{ns}"),
                    None,
                    Some("(rule file)".into()),
                );
            }
            if let Some(l) = &log_group {
                c.field("logging.log_group_arn", None, Some(l.clone()));
            }
            c.op(Op::CreateWorkspace {
                alias,
                kms_key_arn: s.kms_key_arn.clone(),
                tags,
                namespaces: s
                    .loaded
                    .rule_groups
                    .iter()
                    .map(|(n, d)| (n.clone(), d.clone(), ns_tags.clone()))
                    .collect(),
                log_group_arn: log_group,
                alertmanager: s.loaded.alertmanager.clone(),
            });
            if s.loaded.alertmanager.is_some() {
                c.field("alertmanager", None, Some("(definition file)".into()));
            }
            return Ok(Some(c));
        };

        let mut c = Change::new(r.id.clone(), Action::Update, format!("workspace {}", w.id));
        if w.status == "CREATING" {
            return Err(Error::Pending(format!(
                "workspace {} is still CREATING",
                w.id
            )));
        }
        if r.adopt.is_some() && !owned_by(&w.tags, desired.stack_name(), &r.id) {
            c.notes
                .push(format!("adopting existing workspace {}", w.id));
        }
        if w.alias.as_deref() != Some(alias.as_str()) {
            c.field("alias", w.alias.clone(), Some(alias.clone()));
            c.op(Op::UpdateAlias {
                workspace: w.id.clone(),
                alias,
            });
        }
        c.tags(
            &w.tags,
            &tags,
            |tags| Op::Tag {
                arn: w.arn.clone(),
                tags,
            },
            |keys| Op::Untag {
                arn: w.arn.clone(),
                keys,
            },
        );
        for (ns, data) in &s.loaded.rule_groups {
            match w.namespaces.get(ns) {
                None => {
                    c.field(
                        format!("rule_groups.{ns}"),
                        None,
                        Some("(rule file)".into()),
                    );
                    c.op(Op::CreateNamespace {
                        workspace: w.id.clone(),
                        name: ns.clone(),
                        data: data.clone(),
                        tags: ns_tags.clone(),
                    });
                }
                Some(cur) if canonical_rules(&cur.data) != canonical_rules(data) => {
                    c.field(
                        format!("rule_groups.{ns}"),
                        Some(format!("sha256:{}", short_hash(&cur.data))),
                        Some(format!("sha256:{}", short_hash(data))),
                    );
                    c.op(Op::PutNamespace {
                        workspace: w.id.clone(),
                        name: ns.clone(),
                        data: data.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        for (ns, cur) in &w.namespaces {
            if !s.loaded.rule_groups.contains_key(ns)
                && owner_id(&cur.tags, desired.stack_name()).is_some()
            {
                c.field(
                    format!("rule_groups.{ns}"),
                    Some(format!("sha256:{}", short_hash(&cur.data))),
                    None,
                );
                c.op(Op::DeleteNamespace {
                    workspace: w.id.clone(),
                    name: ns.clone(),
                });
            }
        }
        match (&w.log_group_arn, &log_group) {
            (None, Some(want)) => {
                c.field("logging.log_group_arn", None, Some(want.clone()));
                c.op(Op::CreateLogging {
                    workspace: w.id.clone(),
                    log_group_arn: want.clone(),
                });
            }
            (Some(cur), Some(want)) if cur != want => {
                c.field(
                    "logging.log_group_arn",
                    Some(cur.clone()),
                    Some(want.clone()),
                );
                c.op(Op::UpdateLogging {
                    workspace: w.id.clone(),
                    log_group_arn: want.clone(),
                });
            }
            (Some(cur), None) => {
                c.field("logging.log_group_arn", Some(cur.clone()), None);
                c.op(Op::DeleteLogging {
                    workspace: w.id.clone(),
                });
            }
            _ => {}
        }
        diff_alertmanager(&mut c, w, s.loaded.alertmanager.as_deref());
        if c.ops.is_empty() {
            return Ok(None);
        }
        Ok(Some(c))
    }

    fn removed(&self, desired: &DesiredState, obs: &Observed, prune: bool) -> Vec<Change<Op>> {
        let live = obs.workspaces.iter().filter(|w| w.status != "DELETING");
        removed_objects(
            desired,
            Kind::AmpWorkspace,
            live.map(|w| (w.id.as_str(), &w.tags)),
            |r| obs.find(desired, r).map(|w| w.id.as_str()),
            "workspace",
            prune,
            |id| Op::DeleteWorkspace {
                workspace: id.to_string(),
            },
        )
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        let amp = &ctx.amp;
        match op {
            Op::CreateWorkspace {
                alias,
                kms_key_arn,
                tags,
                namespaces,
                log_group_arn,
                alertmanager,
            } => {
                let out = amp
                    .create_workspace()
                    .alias(alias)
                    .set_kms_key_arn(kms_key_arn.clone())
                    .set_tags(Some(hash_map(tags)))
                    .send()
                    .await
                    .map_err(aws_error("aps", "CreateWorkspace"))?;
                let w = ObservedWorkspace {
                    id: out.workspace_id().to_string(),
                    arn: out.arn().to_string(),
                    alias: Some(alias.clone()),
                    ..Default::default()
                };
                tracing::info!(workspace = %w.id, "created workspace");
                wait_active(ctx, &w.id).await?;
                for (name, data, tags) in namespaces {
                    Box::pin(self.apply(
                        ctx,
                        &Op::CreateNamespace {
                            workspace: w.id.clone(),
                            name: name.clone(),
                            data: data.clone(),
                            tags: tags.clone(),
                        },
                    ))
                    .await?;
                }
                if let Some(arn) = log_group_arn {
                    Box::pin(self.apply(
                        ctx,
                        &Op::CreateLogging {
                            workspace: w.id.clone(),
                            log_group_arn: arn.clone(),
                        },
                    ))
                    .await?;
                }
                if let Some(data) = alertmanager {
                    Box::pin(self.apply(
                        ctx,
                        &Op::CreateAlertmanager {
                            workspace: w.id.clone(),
                            arn: w.arn.clone(),
                            data: data.clone(),
                        },
                    ))
                    .await?;
                }
                return Ok(Some(w.outputs(&ctx.region)));
            }
            Op::UpdateAlias { workspace, alias } => {
                amp.update_workspace_alias()
                    .workspace_id(workspace)
                    .alias(alias)
                    .send()
                    .await
                    .map_err(aws_error("aps", "UpdateWorkspaceAlias"))?;
            }
            Op::Tag { arn, tags } => {
                amp.tag_resource()
                    .resource_arn(arn)
                    .set_tags(Some(hash_map(tags)))
                    .send()
                    .await
                    .map_err(aws_error("aps", "TagResource"))?;
            }
            Op::Untag { arn, keys } => {
                amp.untag_resource()
                    .resource_arn(arn)
                    .set_tag_keys(Some(keys.clone()))
                    .send()
                    .await
                    .map_err(aws_error("aps", "UntagResource"))?;
            }
            Op::CreateNamespace {
                workspace,
                name,
                data,
                tags,
            } => {
                amp.create_rule_groups_namespace()
                    .workspace_id(workspace)
                    .name(name)
                    .data(Blob::new(data.as_bytes()))
                    .set_tags(Some(hash_map(tags)))
                    .send()
                    .await
                    .map_err(aws_error("aps", "CreateRuleGroupsNamespace"))?;
            }
            Op::PutNamespace {
                workspace,
                name,
                data,
            } => {
                amp.put_rule_groups_namespace()
                    .workspace_id(workspace)
                    .name(name)
                    .data(Blob::new(data.as_bytes()))
                    .send()
                    .await
                    .map_err(aws_error("aps", "PutRuleGroupsNamespace"))?;
            }
            Op::DeleteNamespace { workspace, name } => {
                match amp
                    .delete_rule_groups_namespace()
                    .workspace_id(workspace)
                    .name(name)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code() == Some("ResourceNotFoundException") => {}
                    Err(e) => return Err(aws_error("aps", "DeleteRuleGroupsNamespace")(e)),
                }
            }
            Op::CreateLogging {
                workspace,
                log_group_arn,
            } => {
                amp.create_logging_configuration()
                    .workspace_id(workspace)
                    .log_group_arn(log_group_arn)
                    .send()
                    .await
                    .map_err(aws_error("aps", "CreateLoggingConfiguration"))?;
            }
            Op::UpdateLogging {
                workspace,
                log_group_arn,
            } => {
                amp.update_logging_configuration()
                    .workspace_id(workspace)
                    .log_group_arn(log_group_arn)
                    .send()
                    .await
                    .map_err(aws_error("aps", "UpdateLoggingConfiguration"))?;
            }
            Op::DeleteLogging { workspace } => {
                amp.delete_logging_configuration()
                    .workspace_id(workspace)
                    .send()
                    .await
                    .map_err(aws_error("aps", "DeleteLoggingConfiguration"))?;
            }
            Op::CreateAlertmanager {
                workspace,
                arn,
                data,
            } => {
                amp.create_alert_manager_definition()
                    .workspace_id(workspace)
                    .data(Blob::new(data.as_bytes()))
                    .send()
                    .await
                    .map_err(aws_error("aps", "CreateAlertManagerDefinition"))?;
                settle_alertmanager(ctx, workspace, arn, data).await?;
            }
            Op::PutAlertmanager {
                workspace,
                arn,
                data,
            } => {
                amp.put_alert_manager_definition()
                    .workspace_id(workspace)
                    .data(Blob::new(data.as_bytes()))
                    .send()
                    .await
                    .map_err(aws_error("aps", "PutAlertManagerDefinition"))?;
                settle_alertmanager(ctx, workspace, arn, data).await?;
            }
            Op::SettleAlertmanager {
                workspace,
                arn,
                data,
            } => settle_alertmanager(ctx, workspace, arn, data).await?,
            Op::DeleteAlertmanager { workspace, arn } => {
                match amp
                    .delete_alert_manager_definition()
                    .workspace_id(workspace)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code() == Some("ResourceNotFoundException") => {}
                    Err(e) => return Err(aws_error("aps", "DeleteAlertManagerDefinition")(e)),
                }
                Box::pin(self.apply(
                    ctx,
                    &Op::Untag {
                        arn: arn.clone(),
                        keys: vec![TAG_ALERTMANAGER.into()],
                    },
                ))
                .await?;
            }
            Op::AlertmanagerRejected { workspace, reason } => {
                return Err(Error::Invalid(format!(
                    "AMP rejected the alertmanager definition of workspace {workspace}: {reason}; fix the definition file"
                )));
            }
            Op::DeleteWorkspace { workspace } => {
                match amp.delete_workspace().workspace_id(workspace).send().await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some("ResourceNotFoundException") => {}
                    Err(e) => return Err(aws_error("aps", "DeleteWorkspace")(e)),
                }
            }
        }
        Ok(None)
    }
}

async fn describe_alertmanager(
    ctx: &Context,
    workspace: &str,
) -> Result<Option<ObservedDefinition>> {
    match ctx
        .amp
        .describe_alert_manager_definition()
        .workspace_id(workspace)
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
        })),
        Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(None),
        Err(e) => Err(aws_error("aps", "DescribeAlertManagerDefinition")(e)),
    }
}

/// After a create or put: records the definition's hash on the workspace, then waits for AMP's
/// verdict. A rejection is a terminal error carrying AMP's reason.
async fn settle_alertmanager(ctx: &Context, workspace: &str, arn: &str, data: &str) -> Result<()> {
    ctx.amp
        .tag_resource()
        .resource_arn(arn)
        .tags(TAG_ALERTMANAGER, short_hash(data))
        .send()
        .await
        .map_err(aws_error("aps", "TagResource"))?;
    let what = format!("the alertmanager definition of workspace {workspace}");
    wait_until(ctx, &what, || async {
        let definition = describe_alertmanager(ctx, workspace).await?;
        match definition.as_ref().map(|d| d.status.as_str()) {
            Some("ACTIVE") => Ok(Progress::Done(())),
            Some(failed @ ("CREATION_FAILED" | "UPDATE_FAILED")) => {
                let reason = definition
                    .as_ref()
                    .and_then(|d| d.reason.clone())
                    .unwrap_or_default();
                Err(Error::Invalid(format!(
                    "AMP rejected the alertmanager definition of workspace {workspace} ({failed}): {reason}; fix the definition file"
                )))
            }
            other => Ok(Progress::Waiting(other.unwrap_or("absent").to_string())),
        }
    })
    .await
}

/// The alertmanager part of a workspace's change.
fn diff_alertmanager(c: &mut Change<Op>, w: &ObservedWorkspace, want: Option<&str>) {
    let recorded = w.tags.get(TAG_ALERTMANAGER);
    let show = |d: &str| format!("sha256:{}", short_hash(d));
    match (&w.alertmanager, want) {
        (None, Some(data)) => {
            c.field("alertmanager", None, Some(show(data)));
            c.op(Op::CreateAlertmanager {
                workspace: w.id.clone(),
                arn: w.arn.clone(),
                data: data.to_string(),
            });
        }
        (Some(cur), Some(data)) => {
            let hash = short_hash(data);
            let same = canonical_definition(&cur.data) == canonical_definition(data);
            match cur.status.as_str() {
                "CREATING" | "UPDATING" if same && recorded != Some(&hash) => {
                    c.notes.push(format!(
                        "the alertmanager definition is {}: it is recorded as stackwarden's and its verdict waited for",
                        cur.status
                    ));
                    c.op(Op::SettleAlertmanager {
                        workspace: w.id.clone(),
                        arn: w.arn.clone(),
                        data: data.to_string(),
                    });
                }
                "CREATING" | "UPDATING" | "DELETING" => c.notes.push(format!(
                    "the alertmanager definition is {}; it is checked again next pass",
                    cur.status
                )),
                "CREATION_FAILED" | "UPDATE_FAILED" if recorded == Some(&hash) => {
                    c.field(
                        "alertmanager",
                        Some(format!("{} ({})", show(data), cur.status)),
                        Some(show(data)),
                    );
                    c.op(Op::AlertmanagerRejected {
                        workspace: w.id.clone(),
                        reason: cur.reason.clone().unwrap_or_default(),
                    });
                }
                status => {
                    let failed = status != "ACTIVE";
                    if failed || !same {
                        c.field("alertmanager", Some(show(&cur.data)), Some(show(data)));
                        c.op(Op::PutAlertmanager {
                            workspace: w.id.clone(),
                            arn: w.arn.clone(),
                            data: data.to_string(),
                        });
                    } else if recorded != Some(&hash) {
                        // In force but not recorded as ours (adopted, or a crash after the put).
                        c.notes.push(
                            "the alertmanager definition in force is the desired one: recorded as stackwarden's".into(),
                        );
                        c.op(Op::Tag {
                            arn: w.arn.clone(),
                            tags: BTreeMap::from([(TAG_ALERTMANAGER.into(), hash)]),
                        });
                    }
                }
            }
        }
        (Some(cur), None) if recorded.is_some() => {
            c.field("alertmanager", Some(show(&cur.data)), None);
            c.op(Op::DeleteAlertmanager {
                workspace: w.id.clone(),
                arn: w.arn.clone(),
            });
        }
        _ => {}
    }
}

fn short_hash(data: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(data.as_bytes())[..6])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{desired, owned_tags, resource};

    const RULES: &str = "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up == 0\n";

    fn spec() -> WorkspaceSpec {
        let mut s: WorkspaceSpec =
            toml::from_str("alias = \"main\"\nlogging = { log_group_arn = \"arn:lg\" }").unwrap();
        s.loaded.rule_groups.insert("node".into(), RULES.into());
        s
    }

    fn observed() -> Observed {
        Observed {
            region: "us-east-1".into(),
            workspaces: vec![ObservedWorkspace {
                id: "ws-1".into(),
                arn: "arn:ws-1".into(),
                alias: Some("main".into()),
                status: "ACTIVE".into(),
                tags: owned_tags("amp.workspace.main"),
                namespaces: BTreeMap::from([(
                    "node".into(),
                    ObservedNamespace {
                        data: RULES.into(),
                        tags: owned_tags("amp.workspace.main"),
                    },
                )]),
                log_group_arn: Some("arn:lg".into()),
                alertmanager: None,
            }],
        }
    }

    const AM: &str =
        "alertmanager_config: |\n  route:\n    receiver: a\n  receivers:\n    - name: a\n";

    fn with_definition(status: &str, data: &str, recorded: Option<&str>) -> Observed {
        let mut o = observed();
        o.workspaces[0].alertmanager = Some(ObservedDefinition {
            data: data.into(),
            status: status.into(),
            reason: Some("undefined receiver".into()),
        });
        if let Some(h) = recorded {
            o.workspaces[0]
                .tags
                .insert(TAG_ALERTMANAGER.into(), h.into());
        }
        o
    }

    fn spec_with_definition(data: &str) -> WorkspaceSpec {
        let mut s = spec();
        s.loaded.alertmanager = Some(data.into());
        s
    }

    #[test]
    fn a_missing_alertmanager_definition_is_created() {
        let c = diff(spec_with_definition(AM), &observed())
            .unwrap()
            .unwrap();
        assert!(matches!(&c.ops[..], [Op::CreateAlertmanager { data, .. }] if data == AM));
    }

    #[test]
    fn an_alertmanager_definition_differing_only_in_format_is_in_sync() {
        let reformatted =
            "alertmanager_config: |\n  route: {receiver: a}\n  receivers: [{name: a}]\n";
        let o = with_definition("ACTIVE", reformatted, Some(&short_hash(AM)));
        assert!(diff(spec_with_definition(AM), &o).unwrap().is_none());
    }

    #[test]
    fn a_definition_put_but_never_recorded_is_recorded_and_waited_for_not_put_again() {
        // The process died between CreateAlertManagerDefinition and the tag.
        let o = with_definition("CREATING", AM, None);
        let c = diff(spec_with_definition(AM), &o).unwrap().unwrap();
        assert!(matches!(&c.ops[..], [Op::SettleAlertmanager { data, .. }] if data == AM));
        // Recorded and being checked: nothing to do until the verdict.
        let o = with_definition("CREATING", AM, Some(&short_hash(AM)));
        assert!(diff(spec_with_definition(AM), &o).unwrap().is_none());
    }

    #[test]
    fn a_changed_alertmanager_definition_is_put() {
        let o = with_definition("ACTIVE", AM, Some(&short_hash(AM)));
        let changed = AM.replace(
            "name: a",
            "name: a\n      sns_configs: [{topic_arn: arn:t}]",
        );
        let c = diff(spec_with_definition(&changed), &o).unwrap().unwrap();
        assert!(matches!(&c.ops[..], [Op::PutAlertmanager { .. }]));
    }

    #[test]
    fn a_rejected_definition_is_reported_not_put_again_until_the_file_changes() {
        let o = with_definition("UPDATE_FAILED", "old", Some(&short_hash(AM)));
        let c = diff(spec_with_definition(AM), &o).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::AlertmanagerRejected { reason, .. }] if reason == "undefined receiver")
        );
        let fixed = AM.replace("a\n", "b\n");
        let c = diff(spec_with_definition(&fixed), &o).unwrap().unwrap();
        assert!(matches!(&c.ops[..], [Op::PutAlertmanager { .. }]));
    }

    #[test]
    fn a_dropped_definition_is_deleted_only_when_stackwarden_put_it() {
        let ours = with_definition("ACTIVE", AM, Some(&short_hash(AM)));
        let c = diff(spec(), &ours).unwrap().unwrap();
        assert!(matches!(&c.ops[..], [Op::DeleteAlertmanager { .. }]));
        let theirs = with_definition("ACTIVE", AM, None);
        assert!(diff(spec(), &theirs).unwrap().is_none());
    }

    fn diff(s: WorkspaceSpec, o: &Observed) -> Result<Option<Change<Op>>> {
        let r = resource(Kind::AmpWorkspace, "main", Spec::AmpWorkspace(s));
        AmpController.diff(&desired(vec![r.clone()]), &r, o, &Refs::default())
    }

    #[test]
    fn a_workspace_as_desired_has_no_change() {
        assert!(diff(spec(), &observed()).unwrap().is_none());
    }

    #[test]
    fn a_missing_workspace_is_created_with_its_rules_tags_and_logging() {
        let c = diff(spec(), &Observed::default()).unwrap().unwrap();
        assert!(matches!(
            &c.ops[..],
            [Op::CreateWorkspace { alias, tags, namespaces, log_group_arn: Some(_), .. }]
                if alias == "main" && tags.contains_key(crate::desired::TAG_ID) && namespaces.len() == 1
        ));
    }

    #[test]
    fn alias_and_tag_drift_is_corrected() {
        let mut o = observed();
        o.workspaces[0].alias = Some("renamed".into());
        o.workspaces[0].tags.remove("team");
        let c = diff(spec(), &o).unwrap().unwrap();
        assert!(matches!(
            &c.ops[..],
            [Op::UpdateAlias { .. }, Op::Tag { .. }]
        ));
    }

    #[test]
    fn rule_groups_changed_missing_or_extra_are_corrected() {
        let mut o = observed();
        o.workspaces[0].namespaces.get_mut("node").unwrap().data = "groups: []\n".into();
        o.workspaces[0].namespaces.insert(
            "old".into(),
            ObservedNamespace {
                data: RULES.into(),
                tags: owned_tags("amp.workspace.main"),
            },
        );
        o.workspaces[0].namespaces.insert(
            "theirs".into(),
            ObservedNamespace {
                data: RULES.into(),
                tags: BTreeMap::new(),
            },
        );
        let mut s = spec();
        s.loaded.rule_groups.insert("new".into(), RULES.into());
        let c = diff(s, &o).unwrap().unwrap();
        assert!(c
            .ops
            .iter()
            .any(|op| matches!(op, Op::PutNamespace { name, .. } if name == "node")));
        assert!(c
            .ops
            .iter()
            .any(|op| matches!(op, Op::CreateNamespace { name, .. } if name == "new")));
        assert!(c
            .ops
            .iter()
            .any(|op| matches!(op, Op::DeleteNamespace { name, .. } if name == "old")));
        assert!(!c
            .ops
            .iter()
            .any(|op| matches!(op, Op::DeleteNamespace { name, .. } if name == "theirs")));
    }

    #[test]
    fn reformatted_rules_are_no_drift() {
        let mut o = observed();
        o.workspaces[0].namespaces.get_mut("node").unwrap().data =
            "groups:\n  - name: g\n    rules:\n      - {alert: A, expr: up == 0}\n".into();
        assert!(diff(spec(), &o).unwrap().is_none());
    }

    #[test]
    fn logging_is_created_updated_and_removed() {
        let mut o = observed();
        o.workspaces[0].log_group_arn = None;
        assert!(matches!(
            &diff(spec(), &o).unwrap().unwrap().ops[..],
            [Op::CreateLogging { .. }]
        ));
        o.workspaces[0].log_group_arn = Some("arn:other".into());
        assert!(matches!(
            &diff(spec(), &o).unwrap().unwrap().ops[..],
            [Op::UpdateLogging { .. }]
        ));
        let mut s = spec();
        s.logging = None;
        assert!(matches!(
            &diff(s, &observed()).unwrap().unwrap().ops[..],
            [Op::DeleteLogging { .. }]
        ));
    }

    #[test]
    fn a_creating_workspace_is_waited_for() {
        let mut o = observed();
        o.workspaces[0].status = "CREATING".into();
        assert!(matches!(diff(spec(), &o), Err(Error::Pending(_))));
    }

    #[test]
    fn owned_workspaces_no_longer_desired_are_orphaned_or_deleted() {
        let o = observed();
        let d = desired(vec![]);
        assert_eq!(
            AmpController.removed(&d, &o, false)[0].action,
            Action::Orphan
        );
        assert!(matches!(
            &AmpController.removed(&d, &o, true)[0].ops[..],
            [Op::DeleteWorkspace { .. }]
        ));
    }
}
