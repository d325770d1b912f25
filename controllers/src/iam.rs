//! IAM: roles (trust policy, managed policy attachments, inline policies), customer managed
//! policies, instance profiles: three kinds on the managed-object layer, each found by its name
//! (an IAM name is the object's identity).
//!
//! Observe reads the whole account's roles and local policies once per observation, with one
//! paginated `GetAccountAuthorizationDetails` shared by the three kinds, plus one tag read per
//! candidate policy and instance profile (IAM's list calls do not return tags). Policy
//! documents are compared as IAM evaluates and stores them ([`crate::policy`]). A changed
//! customer managed policy gets a new default version; the oldest non-default version is
//! deleted first when IAM's limit of five would be reached.
//!
//! # Guarantees
//! - An object of a node's name that carries neither the node's ownership tags nor its `adopt`
//!   is never modified (an error says so) and its attributes are never used; another stack's
//!   never, even adopted.
//! - Every operation is idempotent: re-applying after a crash converges to the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_iam::types::{EntityType, Tag};
use serde::Deserialize;
use serde_json::{json, Value};
use toml::Spanned;

use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{
    check_duration, check_tags, DesiredState, FileRef, KindSpec, Resource, Tagging, Validator,
};
use crate::diag::Diagnostics;
use crate::error::{aws_error, Error, Result};
use crate::kind::{schema, Form, Kind, KindDef};
use crate::managed::{is_gone, Describe, Managed, ManagedObject};
use crate::model::{Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::policy;
use crate::tags::{owner_id, Tags};

// ---------------------------------------------------------------------------------------------
// Kinds

static POLICY_KIND: KindDef = KindDef {
    path: "iam.policy",
    attributes: &["name", "arn"],
    form: Form::Table {
        schema: schema::<PolicySpec>,
    },
    attribute_parts: &[],
    whole: Some(check_unique_names),
    controller: || Box::new(Managed(Policy)),
};
/// `[iam.policy.<name>]`: a customer managed policy.
pub const POLICY: Kind = Kind::new(&POLICY_KIND);

static ROLE_KIND: KindDef = KindDef {
    path: "iam.role",
    attributes: &["name", "arn", "id"],
    form: Form::Table {
        schema: schema::<RoleSpec>,
    },
    attribute_parts: &[],
    whole: Some(check_unique_names),
    controller: || Box::new(Managed(Role)),
};
/// `[iam.role.<name>]`.
pub const ROLE: Kind = Kind::new(&ROLE_KIND);

static INSTANCE_PROFILE_KIND: KindDef = KindDef {
    path: "iam.instance_profile",
    attributes: &["name", "arn"],
    form: Form::Table {
        schema: schema::<InstanceProfileSpec>,
    },
    attribute_parts: &[],
    whole: Some(check_unique_names),
    controller: || Box::new(Managed(InstanceProfile)),
};
/// `[iam.instance_profile.<name>]`.
pub const INSTANCE_PROFILE: Kind = Kind::new(&INSTANCE_PROFILE_KIND);

/// Two resources of a kind with the same AWS name would fight over one object.
fn check_unique_names(kind: Kind, desired: &mut DesiredState, diags: &mut Diagnostics) {
    let mut seen: BTreeMap<String, &Resource> = BTreeMap::new();
    for r in desired.of_kind(kind) {
        let name = aws_name(desired, r);
        if let Some(first) = seen.get(&name) {
            diags.at_origin(
                &r.origin,
                format!("{} and {} both name the {kind} `{name}`", first.id, r.id),
            );
        } else {
            seen.insert(name, r);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schema

fn root_path() -> String {
    "/".into()
}

/// `[iam.role.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// AWS role name; defaults to `<stack>-<name>`.
    pub name: Option<String>,
    #[serde(default = "root_path")]
    pub path: String,
    pub description: Option<String>,
    pub trust: TrustSpec,
    /// ARNs of managed policies to attach (AWS managed, or `${iam.policy.<name>.arn}`).
    #[serde(default)]
    pub managed_policies: Vec<String>,
    /// Inline policies: policy name → JSON file.
    #[serde(default)]
    pub inline_policies: BTreeMap<String, Spanned<String>>,
    pub max_session_duration: Option<Spanned<String>>,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(skip)]
    pub loaded: RoleFiles,
}

#[derive(Debug, Clone, Default)]
pub struct RoleFiles {
    pub trust: Option<Value>,
    pub inline: BTreeMap<String, Value>,
    pub max_session_seconds: Option<i32>,
}

/// Who may assume the role: principals, or a whole trust policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSpec {
    /// Service principals, e.g. `ec2.amazonaws.com`.
    #[serde(default)]
    pub services: Vec<String>,
    /// AWS principals (account ids or ARNs).
    #[serde(default)]
    pub aws: Vec<String>,
    /// Federated principals (OIDC/SAML provider ARNs), allowed `sts:AssumeRoleWithWebIdentity`.
    #[serde(default)]
    pub federated: Vec<String>,
    /// A trust policy JSON file instead of the principals above.
    pub policy: Option<Spanned<String>>,
}

/// `[iam.policy.<name>]`: a customer managed policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: Option<String>,
    #[serde(default = "root_path")]
    pub path: String,
    pub description: Option<String>,
    /// The policy JSON file.
    pub document: Spanned<String>,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(skip)]
    pub loaded: Option<Value>,
}

/// `[iam.instance_profile.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceProfileSpec {
    pub name: Option<String>,
    #[serde(default = "root_path")]
    pub path: String,
    /// Role name, usually `${iam.role.<name>.name}`.
    pub role: String,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
}

fn check_iam_name(v: &mut Validator<'_>, name: &Option<String>, max: usize) {
    if let Some(n) = name {
        let ok = !n.is_empty()
            && n.len() <= max
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c));
        if !ok {
            v.here(format!(
                "IAM name `{n}` must be 1 to {max} characters of letters, digits and +=,.@_-"
            ));
        }
    }
}

fn check_path(v: &mut Validator<'_>, path: &str) {
    if !(path.starts_with('/') && path.ends_with('/')) || path.len() > 512 {
        v.here(format!("IAM path `{path}` must begin and end with `/`"));
    }
}

/// Reads and checks a policy JSON file, recording the references inside it.
fn load_policy(v: &mut Validator<'_>, path: &Spanned<String>) -> Option<Value> {
    let file: FileRef = v.read(path)?;
    let doc: Value = match serde_json::from_str(file.text()) {
        Ok(doc) => doc,
        Err(e) => {
            let offset = file.file.offset_of(e.line(), e.column());
            v.error_in(&file.file, offset, format!("invalid policy JSON: {e}"));
            return None;
        }
    };
    let problems = policy::check(&doc);
    for p in &problems {
        v.error_in(&file.file, 0, format!("policy document: {p}"));
    }
    v.scan_file_refs(&file);
    problems.is_empty().then_some(doc)
}

impl KindSpec for RoleSpec {
    fn tagging(&self, _: &DesiredState, _: &ResourceId) -> Option<Tagging<'_>> {
        Some(Tagging {
            own: self.tags.as_ref(),
            added: Vec::new(),
            ec2: false,
        })
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
        check_iam_name(v, &self.name, 64);
        check_path(v, &self.path);
        let t = &self.trust;
        match (
            &t.policy,
            t.services.is_empty() && t.aws.is_empty() && t.federated.is_empty(),
        ) {
            (Some(p), true) => self.loaded.trust = load_policy(v, p),
            (Some(p), false) => v.error(
                &p.span(),
                "`trust.policy` replaces the principal lists; give one or the other",
            ),
            (None, true) => {
                v.here("`trust` names no principal: set `services`, `aws`, `federated` or `policy`")
            }
            (None, false) => self.loaded.trust = Some(principals_trust(t)),
        }
        for (name, file) in &self.inline_policies {
            if let Some(doc) = load_policy(v, file) {
                self.loaded.inline.insert(name.clone(), doc);
            }
        }
        if let Some(d) = &self.max_session_duration {
            if let Some(dur) = check_duration(v, d, "max_session_duration") {
                let secs = dur.as_secs();
                if !(3600..=43200).contains(&secs) {
                    v.error(&d.span(), "max_session_duration must be between 1h and 12h");
                }
                self.loaded.max_session_seconds = Some(secs as i32);
            }
        }
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

fn principals_trust(t: &TrustSpec) -> Value {
    let mut statements = Vec::new();
    let mut principal = serde_json::Map::new();
    if !t.services.is_empty() {
        principal.insert("Service".into(), json!(t.services));
    }
    if !t.aws.is_empty() {
        principal.insert("AWS".into(), json!(t.aws));
    }
    if !principal.is_empty() {
        statements
            .push(json!({"Effect": "Allow", "Principal": principal, "Action": "sts:AssumeRole"}));
    }
    if !t.federated.is_empty() {
        statements.push(json!({"Effect": "Allow", "Principal": {"Federated": t.federated}, "Action": "sts:AssumeRoleWithWebIdentity"}));
    }
    json!({"Version": "2012-10-17", "Statement": statements})
}

impl KindSpec for PolicySpec {
    fn tagging(&self, _: &DesiredState, _: &ResourceId) -> Option<Tagging<'_>> {
        Some(Tagging {
            own: self.tags.as_ref(),
            added: Vec::new(),
            ec2: false,
        })
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
        check_iam_name(v, &self.name, 128);
        check_path(v, &self.path);
        self.loaded = load_policy(v, &self.document);
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

impl KindSpec for InstanceProfileSpec {
    fn tagging(&self, _: &DesiredState, _: &ResourceId) -> Option<Tagging<'_>> {
        Some(Tagging {
            own: self.tags.as_ref(),
            added: Vec::new(),
            ec2: false,
        })
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
        check_iam_name(v, &self.name, 128);
        check_path(v, &self.path);
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observed state

#[derive(Debug, Clone, Default)]
pub struct ObservedRole {
    pub name: String,
    pub arn: String,
    pub id: String,
    pub trust: Value,
    pub description: Option<String>,
    pub max_session_seconds: Option<i32>,
    pub tags: Tags,
    pub inline: BTreeMap<String, Value>,
    pub attached: BTreeSet<String>,
    pub profiles: Vec<String>,
    /// The ARNs of every role in the account when it was read: a principal IAM replaced by a
    /// unique id can be written back once a role of its ARN exists again.
    pub account_roles: Arc<BTreeSet<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyVersion {
    pub id: String,
    pub is_default: bool,
    pub created: i64,
    pub document: Value,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedPolicy {
    pub name: String,
    pub arn: String,
    pub path: String,
    pub versions: Vec<PolicyVersion>,
    pub tags: Tags,
}

impl ObservedPolicy {
    pub fn default_document(&self) -> Option<&Value> {
        self.versions
            .iter()
            .find(|v| v.is_default)
            .map(|v| &v.document)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ObservedProfile {
    pub name: String,
    pub arn: String,
    pub roles: Vec<String>,
    pub tags: Tags,
}

/// The account's roles and customer managed policies, read once per observation for the three
/// IAM kinds (one paginated `GetAccountAuthorizationDetails`).
#[derive(Debug, Default)]
struct Account {
    roles: Vec<ObservedRole>,
    policies: Vec<ObservedPolicy>,
}

fn tag_map(tags: &[Tag]) -> Tags {
    tags.iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect()
}

fn tag_list(tags: &Tags) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .expect("key and value are set")
        })
        .collect()
}

async fn account(ctx: &Context) -> Result<Arc<Account>> {
    ctx.shared("iam:GetAccountAuthorizationDetails", || async {
        let mut out = Account::default();
        let mut pages = ctx
            .iam
            .get_account_authorization_details()
            .filter(EntityType::Role)
            .filter(EntityType::LocalManagedPolicy)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("iam", "GetAccountAuthorizationDetails"))?;
            for r in page.role_detail_list() {
                out.roles.push(ObservedRole {
                    name: r.role_name().unwrap_or_default().to_string(),
                    arn: r.arn().unwrap_or_default().to_string(),
                    id: r.role_id().unwrap_or_default().to_string(),
                    trust: r
                        .assume_role_policy_document()
                        .map(policy::decode)
                        .transpose()
                        .map_err(Error::Invalid)?
                        .unwrap_or(Value::Null),
                    tags: tag_map(r.tags()),
                    inline: r
                        .role_policy_list()
                        .iter()
                        .filter_map(|p| {
                            Some((
                                p.policy_name()?.to_string(),
                                policy::decode(p.policy_document()?).ok()?,
                            ))
                        })
                        .collect(),
                    attached: r
                        .attached_managed_policies()
                        .iter()
                        .filter_map(|p| p.policy_arn().map(str::to_string))
                        .collect(),
                    profiles: r
                        .instance_profile_list()
                        .iter()
                        .map(|p| p.instance_profile_name().to_string())
                        .collect(),
                    ..Default::default()
                });
            }
            for p in page.policies() {
                // Some emulators leave PolicyName out; the ARN ends with it either way.
                let arn = p.arn().unwrap_or_default();
                out.policies.push(ObservedPolicy {
                    name: p
                        .policy_name()
                        .map(str::to_string)
                        .unwrap_or_else(|| arn.rsplit('/').next().unwrap_or_default().to_string()),
                    arn: arn.to_string(),
                    path: p.path().unwrap_or_default().to_string(),
                    versions: p
                        .policy_version_list()
                        .iter()
                        .map(|v| PolicyVersion {
                            id: v.version_id().unwrap_or_default().to_string(),
                            is_default: v.is_default_version(),
                            created: v.create_date().map(|d| d.secs()).unwrap_or_default(),
                            document: v
                                .document()
                                .and_then(|d| policy::decode(d).ok())
                                .unwrap_or(Value::Null),
                        })
                        .collect(),
                    tags: Tags::new(),
                });
            }
        }
        let arns: Arc<BTreeSet<String>> =
            Arc::new(out.roles.iter().map(|r| r.arn.clone()).collect());
        for r in &mut out.roles {
            r.account_roles = arns.clone();
        }
        Ok(out)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// What every IAM kind shares

/// The AWS name a desired IAM resource has.
pub fn aws_name(desired: &DesiredState, r: &Resource) -> String {
    let spec = &r.spec;
    let explicit = None
        .or_else(|| spec.get::<RoleSpec>().map(|s| &s.name))
        .or_else(|| spec.get::<PolicySpec>().map(|s| &s.name))
        .or_else(|| spec.get::<InstanceProfileSpec>().map(|s| &s.name))
        .cloned()
        .flatten();
    r.adopt
        .clone()
        .or(explicit)
        .unwrap_or_else(|| desired.default_name(&r.id))
}

/// The AWS names the nodes of one IAM kind have.
fn desired_names(desired: &DesiredState, kind: Kind) -> BTreeSet<String> {
    desired
        .of_kind(kind)
        .map(|r| aws_name(desired, r))
        .collect()
}

/// Whether this stack may care about an observed object: a node names it, or the stack's tag
/// is on it (a removed one).
fn relevant(desired: &DesiredState, names: &BTreeSet<String>, name: &str, tags: &Tags) -> bool {
    names.contains(name) || owner_id(tags, desired.stack_name()).is_some()
}

/// The object of `node`'s name (an IAM name is the object's identity), in objects sorted by
/// name (as each kind's observe leaves them): a binary search, so a stack of thousands of
/// roles is diffed in milliseconds.
fn by_name<'o, O>(
    desired: &DesiredState,
    node: &Resource,
    observed: &'o [O],
    name: impl Fn(&O) -> &str,
) -> Option<&'o O> {
    let wanted = aws_name(desired, node);
    observed
        .binary_search_by(|o| name(o).cmp(wanted.as_str()))
        .ok()
        .map(|i| &observed[i])
}

/// A document on one line, as written (IAM's own spelling for observed ones).
/// A policy document's change as a plan shows it: pretty-printed, diffed line by line.
fn document(field: impl Into<String>, from: Option<&Value>, to: Option<&Value>) -> FieldChange {
    let pretty = |v: &Value| format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default());
    FieldChange::document(
        field,
        from.map(pretty).as_deref(),
        to.map(pretty).as_deref(),
    )
}

fn spec_tags(tags: &Option<Spanned<Tags>>) -> Tags {
    tags.as_ref()
        .map(|t| t.get_ref().clone())
        .unwrap_or_default()
}

/// A call whose target is already gone has nothing left to do (a detach from a deleted role, a
/// resumed teardown).
fn gone_is_fine(result: Result<()>) -> Result<()> {
    match result {
        Err(e) if is_gone(&e) => Ok(()),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Roles

/// `iam.role`: a role, its trust policy, its attached and inline policies.
pub struct Role;

/// A role as its node wants it, references rendered.
#[derive(Debug, Clone)]
pub struct RoleWant {
    name: String,
    path: String,
    trust: Value,
    description: Option<String>,
    max_session_seconds: Option<i32>,
    managed: BTreeSet<String>,
    inline: BTreeMap<String, Value>,
    tags: Tags,
}

/// One change to a role.
#[derive(Debug, Clone)]
pub enum RoleUpdate {
    Trust {
        from: Value,
        to: Value,
    },
    /// Its description and maximum session duration (one `UpdateRole`).
    Settings {
        description: (Option<String>, Option<String>),
        max_session_seconds: (Option<i32>, Option<i32>),
    },
    Attach(String),
    Detach(String),
    PutInline {
        name: String,
        from: Option<Value>,
        to: Value,
    },
    DeleteInline {
        name: String,
        from: Value,
    },
    /// Out of an instance profile (before the role is deleted).
    LeaveProfile(String),
}

impl Describe for RoleUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match self {
            RoleUpdate::Trust { from, to } => vec![document("trust", Some(from), Some(to))],
            RoleUpdate::Settings {
                description,
                max_session_seconds,
            } => {
                let mut f = Vec::new();
                if description.1.is_some() && description.0 != description.1 {
                    f.push(FieldChange::new(
                        "description",
                        description.0.clone(),
                        description.1.clone(),
                    ));
                }
                let secs = |s: Option<i32>| s.map(|s| format!("{s}s"));
                if max_session_seconds.1.is_some() && max_session_seconds.0 != max_session_seconds.1
                {
                    f.push(FieldChange::new(
                        "max_session_duration",
                        secs(max_session_seconds.0),
                        secs(max_session_seconds.1),
                    ));
                }
                f
            }
            RoleUpdate::Attach(arn) => {
                vec![FieldChange::new(
                    "managed_policies",
                    None,
                    Some(arn.clone()),
                )]
            }
            RoleUpdate::Detach(arn) => {
                vec![FieldChange::new(
                    "managed_policies",
                    Some(arn.clone()),
                    None,
                )]
            }
            RoleUpdate::PutInline { name, from, to } => vec![document(
                format!("inline_policies.{name}"),
                from.as_ref(),
                Some(to),
            )],
            RoleUpdate::DeleteInline { name, from } => vec![document(
                format!("inline_policies.{name}"),
                Some(from),
                None,
            )],
            RoleUpdate::LeaveProfile(profile) => {
                vec![FieldChange::new(
                    "instance_profiles",
                    Some(profile.clone()),
                    None,
                )]
            }
        }
    }
}

impl Role {
    /// The trust principals IAM replaced by unique ids because their roles were deleted, while
    /// no role of those ARNs exists again: IAM refuses to store the ARNs until one does.
    fn deleted_principals(want: &RoleWant, have: &ObservedRole) -> Option<Vec<String>> {
        policy::deleted_principals(&have.trust, &want.trust)
            .filter(|gone| !gone.iter().any(|arn| have.account_roles.contains(arn)))
    }

    async fn put_inline(ctx: &Context, role: &str, name: &str, document: &Value) -> Result<()> {
        ctx.iam
            .put_role_policy()
            .role_name(role)
            .policy_name(name)
            .policy_document(document.to_string())
            .send()
            .await
            .map_err(aws_error("iam", "PutRolePolicy"))?;
        Ok(())
    }

    async fn attach(ctx: &Context, role: &str, arn: &str) -> Result<()> {
        ctx.iam
            .attach_role_policy()
            .role_name(role)
            .policy_arn(arn)
            .send()
            .await
            .map_err(aws_error("iam", "AttachRolePolicy"))?;
        Ok(())
    }
}

#[async_trait]
impl ManagedObject for Role {
    type Desired = RoleWant;
    type Observed = ObservedRole;
    type Update = RoleUpdate;
    const KIND: Kind = ROLE;
    const NOUN: &'static str = "role";
    const NAMED: bool = true;

    fn desired(&self, desired: &DesiredState, node: &Resource, refs: &Refs) -> Result<RoleWant> {
        let s = node.spec.expect::<RoleSpec>();
        Ok(RoleWant {
            name: aws_name(desired, node),
            path: s.path.clone(),
            trust: refs
                .render_json(s.loaded.trust.as_ref().unwrap_or(&Value::Null))
                .0,
            description: s.description.clone(),
            max_session_seconds: s.loaded.max_session_seconds,
            managed: s
                .managed_policies
                .iter()
                .map(|a| refs.render(a).value)
                .collect(),
            inline: s
                .loaded
                .inline
                .iter()
                .map(|(k, v)| (k.clone(), refs.render_json(v).0))
                .collect(),
            tags: spec_tags(&s.tags),
        })
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<ObservedRole>> {
        let names = desired_names(desired, ROLE);
        let mut roles: Vec<ObservedRole> = account(ctx)
            .await?
            .roles
            .iter()
            .filter(|r| relevant(desired, &names, &r.name, &r.tags))
            .cloned()
            .collect();
        roles.sort_by(|a, b| a.name.cmp(&b.name));
        // Descriptions and session durations are not in the account details: read them only
        // for roles whose desired state sets them.
        for (node, s) in desired.specs::<RoleSpec>(ROLE) {
            if s.description.is_none() && s.max_session_duration.is_none() {
                continue;
            }
            let name = aws_name(desired, node);
            let Ok(at) = roles.binary_search_by(|r| r.name.as_str().cmp(&name)) else {
                continue;
            };
            let o = &mut roles[at];
            let out = ctx
                .iam
                .get_role()
                .role_name(&name)
                .send()
                .await
                .map_err(aws_error("iam", "GetRole"))?;
            if let Some(role) = out.role() {
                o.description = role.description().map(str::to_string);
                o.max_session_seconds = role.max_session_duration();
            }
        }
        Ok(roles)
    }

    fn id(&self, o: &ObservedRole) -> String {
        o.name.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedRole) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedRole],
    ) -> Option<&'o ObservedRole> {
        by_name(desired, node, observed, |o| &o.name)
    }

    fn outputs(&self, o: &ObservedRole) -> Outputs {
        Outputs::from([
            ("name".into(), o.name.clone()),
            ("arn".into(), o.arn.clone()),
            ("id".into(), o.id.clone()),
        ])
    }

    fn diff(&self, want: &RoleWant, have: &ObservedRole) -> Vec<RoleUpdate> {
        let mut out = Vec::new();
        // A principal IAM replaced by its unique id cannot be written back until it exists
        // again (IAM refuses the ARN): a note until then, never an endless failing update.
        if Role::deleted_principals(want, have).is_none()
            && !policy::equivalent(&have.trust, &want.trust)
        {
            out.push(RoleUpdate::Trust {
                from: have.trust.clone(),
                to: want.trust.clone(),
            });
        }
        let settings = RoleUpdate::Settings {
            description: (have.description.clone(), want.description.clone()),
            max_session_seconds: (have.max_session_seconds, want.max_session_seconds),
        };
        if !settings.fields().is_empty() {
            out.push(settings);
        }
        out.extend(
            want.managed
                .difference(&have.attached)
                .map(|arn| RoleUpdate::Attach(arn.clone())),
        );
        out.extend(
            have.attached
                .difference(&want.managed)
                .map(|arn| RoleUpdate::Detach(arn.clone())),
        );
        for (name, doc) in &want.inline {
            match have.inline.get(name) {
                Some(cur) if policy::equivalent(cur, doc) => {}
                cur => out.push(RoleUpdate::PutInline {
                    name: name.clone(),
                    from: cur.cloned(),
                    to: doc.clone(),
                }),
            }
        }
        for (name, cur) in &have.inline {
            if !want.inline.contains_key(name) {
                out.push(RoleUpdate::DeleteInline {
                    name: name.clone(),
                    from: cur.clone(),
                });
            }
        }
        out
    }

    fn own_tags(&self, want: &RoleWant) -> Tags {
        want.tags.clone()
    }

    fn notes(&self, want: &RoleWant, have: &ObservedRole) -> Vec<String> {
        Role::deleted_principals(want, have)
            .map(|gone| {
                format!(
                    "the trust policy names {}, deleted since: IAM keeps a unique id in its place; the trust is written again once it exists",
                    gone.join(", ")
                )
            })
            .into_iter()
            .collect()
    }

    fn create_fields(&self, want: &RoleWant) -> Vec<FieldChange> {
        let mut f = vec![document("trust", None, Some(&want.trust))];
        if !want.managed.is_empty() {
            f.push(FieldChange::new(
                "managed_policies",
                None,
                Some(format!("{:?}", want.managed)),
            ));
        }
        for (name, doc) in &want.inline {
            f.push(document(format!("inline_policies.{name}"), None, Some(doc)));
        }
        f
    }

    fn label(&self, want: &RoleWant) -> String {
        want.name.clone()
    }

    async fn named_tags(&self, ctx: &Context, want: &RoleWant) -> Result<Option<Tags>> {
        let out = ctx
            .iam
            .get_role()
            .role_name(&want.name)
            .send()
            .await
            .map_err(aws_error("iam", "GetRole"))?;
        Ok(out.role().map(|r| tag_map(r.tags())))
    }

    /// The role with its tags, then its inline and managed policies: a crash in between leaves
    /// a role the next pass finds and completes.
    async fn create(&self, ctx: &Context, want: &RoleWant, tags: &Tags) -> Result<Outputs> {
        let out = ctx
            .iam
            .create_role()
            .role_name(&want.name)
            .path(&want.path)
            .assume_role_policy_document(want.trust.to_string())
            .set_description(want.description.clone())
            .set_max_session_duration(want.max_session_seconds)
            .set_tags(Some(tag_list(tags)))
            .send()
            .await
            .map_err(aws_error("iam", "CreateRole"))?;
        let role = out
            .role()
            .ok_or_else(|| Error::Invalid("CreateRole returned no role".into()))?;
        for (name, doc) in &want.inline {
            Role::put_inline(ctx, &want.name, name, doc).await?;
        }
        for arn in &want.managed {
            Role::attach(ctx, &want.name, arn).await?;
        }
        Ok(Outputs::from([
            ("name".into(), role.role_name().to_string()),
            ("arn".into(), role.arn().to_string()),
            ("id".into(), role.role_id().to_string()),
        ]))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedRole,
        change: &RoleUpdate,
    ) -> Result<Option<Outputs>> {
        let iam = &ctx.iam;
        let role = have.name.as_str();
        match change {
            RoleUpdate::Trust { to, .. } => {
                iam.update_assume_role_policy()
                    .role_name(role)
                    .policy_document(to.to_string())
                    .send()
                    .await
                    .map_err(aws_error("iam", "UpdateAssumeRolePolicy"))?;
            }
            RoleUpdate::Settings {
                description,
                max_session_seconds,
            } => {
                iam.update_role()
                    .role_name(role)
                    .set_description(description.1.clone())
                    .set_max_session_duration(max_session_seconds.1)
                    .send()
                    .await
                    .map_err(aws_error("iam", "UpdateRole"))?;
            }
            RoleUpdate::Attach(arn) => Role::attach(ctx, role, arn).await?,
            RoleUpdate::Detach(arn) => gone_is_fine(
                iam.detach_role_policy()
                    .role_name(role)
                    .policy_arn(arn)
                    .send()
                    .await
                    .map(drop)
                    .map_err(aws_error("iam", "DetachRolePolicy")),
            )?,
            RoleUpdate::PutInline { name, to, .. } => Role::put_inline(ctx, role, name, to).await?,
            RoleUpdate::DeleteInline { name, .. } => gone_is_fine(
                iam.delete_role_policy()
                    .role_name(role)
                    .policy_name(name)
                    .send()
                    .await
                    .map(drop)
                    .map_err(aws_error("iam", "DeleteRolePolicy")),
            )?,
            RoleUpdate::LeaveProfile(profile) => remove_from_profile(ctx, profile, role).await?,
        }
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedRole, set: &Tags) -> Result<()> {
        ctx.iam
            .tag_role()
            .role_name(&have.name)
            .set_tags(Some(tag_list(set)))
            .send()
            .await
            .map_err(aws_error("iam", "TagRole"))?;
        Ok(())
    }

    async fn untag(&self, ctx: &Context, have: &ObservedRole, keys: &[String]) -> Result<()> {
        ctx.iam
            .untag_role()
            .role_name(&have.name)
            .set_tag_keys(Some(keys.to_vec()))
            .send()
            .await
            .map_err(aws_error("iam", "UntagRole"))?;
        Ok(())
    }

    /// IAM refuses to delete a role that is in an instance profile or has policies.
    fn teardown(&self, have: &ObservedRole) -> Vec<RoleUpdate> {
        let profiles = have.profiles.iter().cloned().map(RoleUpdate::LeaveProfile);
        let detach = have.attached.iter().cloned().map(RoleUpdate::Detach);
        let inline = have
            .inline
            .iter()
            .map(|(name, from)| RoleUpdate::DeleteInline {
                name: name.clone(),
                from: from.clone(),
            });
        profiles.chain(detach).chain(inline).collect()
    }

    async fn delete(&self, ctx: &Context, have: &ObservedRole) -> Result<()> {
        ctx.iam
            .delete_role()
            .role_name(&have.name)
            .send()
            .await
            .map_err(aws_error("iam", "DeleteRole"))?;
        Ok(())
    }
}

async fn remove_from_profile(ctx: &Context, profile: &str, role: &str) -> Result<()> {
    gone_is_fine(
        ctx.iam
            .remove_role_from_instance_profile()
            .instance_profile_name(profile)
            .role_name(role)
            .send()
            .await
            .map(drop)
            .map_err(aws_error("iam", "RemoveRoleFromInstanceProfile")),
    )
}

// ---------------------------------------------------------------------------------------------
// Customer managed policies

/// `iam.policy`: a customer managed policy. A changed document is a new default version; the
/// oldest other version goes first when IAM's limit of five would be passed.
pub struct Policy;

#[derive(Debug, Clone)]
pub struct PolicyWant {
    name: String,
    path: String,
    description: Option<String>,
    document: Value,
    /// The document names values not known yet (shown as such in plans).
    unknown: bool,
    tags: Tags,
}

impl PolicyWant {
    /// The document's change from `from`, saying when it names values not known yet.
    fn field(&self, from: Option<&Value>) -> FieldChange {
        let mut f = document("document", from, Some(&self.document));
        if self.unknown {
            f.after = f.after.map(|a| format!("{a} {KNOWN_AFTER_APPLY}"));
        }
        f
    }
}

/// IAM keeps at most five versions of a policy.
const MAX_VERSIONS: usize = 5;

#[derive(Debug, Clone)]
pub enum PolicyUpdate {
    /// A new default version, after deleting `making_room` when the limit would be passed.
    Document {
        from: Option<Value>,
        to: Value,
        /// The desired document's field, as [`PolicyWant::field`] makes it.
        shown: FieldChange,
        making_room: Option<String>,
    },
    /// One old version, before the policy is deleted.
    DeleteVersion(String),
}

impl Describe for PolicyUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match self {
            PolicyUpdate::Document { shown, .. } => vec![shown.clone()],
            PolicyUpdate::DeleteVersion(v) => {
                vec![FieldChange::new("versions", Some(v.clone()), None)]
            }
        }
    }
}

impl Policy {
    /// The version deleted to make room for a new one, when five exist.
    fn making_room(have: &ObservedPolicy) -> Option<String> {
        (have.versions.len() >= MAX_VERSIONS)
            .then(|| {
                have.versions
                    .iter()
                    .filter(|v| !v.is_default)
                    .min_by_key(|v| (v.created, v.id.clone()))
                    .map(|v| v.id.clone())
            })
            .flatten()
    }

    async fn delete_version(ctx: &Context, arn: &str, version: &str) -> Result<()> {
        gone_is_fine(
            ctx.iam
                .delete_policy_version()
                .policy_arn(arn)
                .version_id(version)
                .send()
                .await
                .map(drop)
                .map_err(aws_error("iam", "DeletePolicyVersion")),
        )
    }
}

/// A customer managed policy's tags, every page of `ListPolicyTags` (IAM may answer fewer than
/// there are and say `IsTruncated`).
async fn policy_tags(ctx: &Context, arn: &str) -> Result<Tags> {
    let tags = ctx
        .iam
        .list_policy_tags()
        .policy_arn(arn)
        .into_paginator()
        .items()
        .send()
        .collect::<std::result::Result<Vec<_>, _>>()
        .await
        .map_err(aws_error("iam", "ListPolicyTags"))?;
    Ok(tag_map(&tags))
}

#[async_trait]
impl ManagedObject for Policy {
    type Desired = PolicyWant;
    type Observed = ObservedPolicy;
    type Update = PolicyUpdate;
    const KIND: Kind = POLICY;
    const NOUN: &'static str = "policy";
    const NAMED: bool = true;

    fn desired(&self, desired: &DesiredState, node: &Resource, refs: &Refs) -> Result<PolicyWant> {
        let s = node.spec.expect::<PolicySpec>();
        let (document, unknown) = refs.render_json(s.loaded.as_ref().unwrap_or(&Value::Null));
        Ok(PolicyWant {
            name: aws_name(desired, node),
            path: s.path.clone(),
            description: s.description.clone(),
            document,
            unknown: !unknown.is_empty(),
            tags: spec_tags(&s.tags),
        })
    }

    /// Every customer managed policy comes with the account details, but IAM's list calls do
    /// not return tags: they are read for the desired ones and those that may be the stack's
    /// (attached to its roles, or on stackwarden's path), so removed ones are found.
    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<ObservedPolicy>> {
        let account = account(ctx).await?;
        let names = desired_names(desired, POLICY);
        let attached: BTreeSet<&String> = account
            .roles
            .iter()
            .filter(|r| owner_id(&r.tags, desired.stack_name()).is_some())
            .flat_map(|r| r.attached.iter())
            .collect();
        let candidates = account.policies.iter().filter(|p| {
            names.contains(&p.name)
                || attached.contains(&p.arn)
                || p.path.starts_with("/stackwarden/")
        });
        let reads = candidates.map(|p| async move {
            Ok::<_, Error>(ObservedPolicy {
                tags: policy_tags(ctx, &p.arn).await?,
                ..p.clone()
            })
        });
        let mut policies = futures::future::try_join_all(reads).await?;
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(policies)
    }

    fn id(&self, o: &ObservedPolicy) -> String {
        o.name.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedPolicy) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedPolicy],
    ) -> Option<&'o ObservedPolicy> {
        by_name(desired, node, observed, |o| &o.name)
    }

    fn outputs(&self, o: &ObservedPolicy) -> Outputs {
        Outputs::from([
            ("name".into(), o.name.clone()),
            ("arn".into(), o.arn.clone()),
        ])
    }

    fn diff(&self, want: &PolicyWant, have: &ObservedPolicy) -> Vec<PolicyUpdate> {
        let current = have.default_document();
        if current.is_some_and(|cur| policy::equivalent(cur, &want.document)) {
            return Vec::new();
        }
        vec![PolicyUpdate::Document {
            from: current.cloned(),
            to: want.document.clone(),
            shown: want.field(current),
            making_room: Policy::making_room(have),
        }]
    }

    fn own_tags(&self, want: &PolicyWant) -> Tags {
        want.tags.clone()
    }

    fn notes(&self, want: &PolicyWant, have: &ObservedPolicy) -> Vec<String> {
        self.diff(want, have)
            .iter()
            .filter_map(|u| match u {
                PolicyUpdate::Document {
                    making_room: Some(v),
                    ..
                } => Some(format!(
                    "deletes old version {v} to stay within IAM's five versions"
                )),
                _ => None,
            })
            .collect()
    }

    fn create_fields(&self, want: &PolicyWant) -> Vec<FieldChange> {
        vec![want.field(None)]
    }

    fn label(&self, want: &PolicyWant) -> String {
        want.name.clone()
    }

    /// The account's policies on the policy's path, for its ARN, then its tags.
    async fn named_tags(&self, ctx: &Context, want: &PolicyWant) -> Result<Option<Tags>> {
        let mut pages = ctx
            .iam
            .list_policies()
            .scope(aws_sdk_iam::types::PolicyScopeType::Local)
            .path_prefix(&want.path)
            .into_paginator()
            .send();
        let mut arn = None;
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("iam", "ListPolicies"))?;
            arn = page
                .policies()
                .iter()
                .find(|p| p.policy_name() == Some(want.name.as_str()))
                .and_then(|p| p.arn().map(str::to_string));
            if arn.is_some() {
                break;
            }
        }
        let Some(arn) = arn else { return Ok(None) };
        Ok(Some(policy_tags(ctx, &arn).await?))
    }

    async fn create(&self, ctx: &Context, want: &PolicyWant, tags: &Tags) -> Result<Outputs> {
        let out = ctx
            .iam
            .create_policy()
            .policy_name(&want.name)
            .path(&want.path)
            .policy_document(want.document.to_string())
            .set_description(want.description.clone())
            .set_tags(Some(tag_list(tags)))
            .send()
            .await
            .map_err(aws_error("iam", "CreatePolicy"))?;
        let p = out
            .policy()
            .ok_or_else(|| Error::Invalid("CreatePolicy returned no policy".into()))?;
        Ok(Outputs::from([
            (
                "name".into(),
                p.policy_name().unwrap_or(&want.name).to_string(),
            ),
            ("arn".into(), p.arn().unwrap_or_default().to_string()),
        ]))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedPolicy,
        change: &PolicyUpdate,
    ) -> Result<Option<Outputs>> {
        match change {
            PolicyUpdate::Document {
                to, making_room, ..
            } => {
                if let Some(v) = making_room {
                    Policy::delete_version(ctx, &have.arn, v).await?;
                }
                ctx.iam
                    .create_policy_version()
                    .policy_arn(&have.arn)
                    .policy_document(to.to_string())
                    .set_as_default(true)
                    .send()
                    .await
                    .map_err(aws_error("iam", "CreatePolicyVersion"))?;
            }
            PolicyUpdate::DeleteVersion(v) => Policy::delete_version(ctx, &have.arn, v).await?,
        }
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedPolicy, set: &Tags) -> Result<()> {
        ctx.iam
            .tag_policy()
            .policy_arn(&have.arn)
            .set_tags(Some(tag_list(set)))
            .send()
            .await
            .map_err(aws_error("iam", "TagPolicy"))?;
        Ok(())
    }

    async fn untag(&self, ctx: &Context, have: &ObservedPolicy, keys: &[String]) -> Result<()> {
        ctx.iam
            .untag_policy()
            .policy_arn(&have.arn)
            .set_tag_keys(Some(keys.to_vec()))
            .send()
            .await
            .map_err(aws_error("iam", "UntagPolicy"))?;
        Ok(())
    }

    /// IAM deletes a policy only once its other versions are gone.
    fn teardown(&self, have: &ObservedPolicy) -> Vec<PolicyUpdate> {
        have.versions
            .iter()
            .filter(|v| !v.is_default)
            .map(|v| PolicyUpdate::DeleteVersion(v.id.clone()))
            .collect()
    }

    /// A policy attached to a role outside the stack cannot be deleted; IAM says so.
    async fn delete(&self, ctx: &Context, have: &ObservedPolicy) -> Result<()> {
        ctx.iam
            .delete_policy()
            .policy_arn(&have.arn)
            .send()
            .await
            .map_err(aws_error("iam", "DeletePolicy"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Instance profiles

/// `iam.instance_profile`: an instance profile holding one role.
pub struct InstanceProfile;

#[derive(Debug, Clone)]
pub struct ProfileWant {
    name: String,
    path: String,
    role: String,
    tags: Tags,
}

#[derive(Debug, Clone)]
pub enum ProfileUpdate {
    /// The roles it holds that are not the desired one go, and the desired one goes in.
    Role { from: Vec<String>, to: String },
    /// Its roles out (before it is deleted).
    Empty(Vec<String>),
}

impl Describe for ProfileUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match self {
            ProfileUpdate::Role { from, to } => {
                vec![FieldChange::new(
                    "role",
                    from.first().cloned(),
                    Some(to.clone()),
                )]
            }
            ProfileUpdate::Empty(from) => {
                vec![FieldChange::new("role", from.first().cloned(), None)]
            }
        }
    }
}

async fn add_to_profile(ctx: &Context, profile: &str, role: &str) -> Result<()> {
    ctx.iam
        .add_role_to_instance_profile()
        .instance_profile_name(profile)
        .role_name(role)
        .send()
        .await
        .map_err(aws_error("iam", "AddRoleToInstanceProfile"))?;
    Ok(())
}

#[async_trait]
impl ManagedObject for InstanceProfile {
    type Desired = ProfileWant;
    type Observed = ObservedProfile;
    type Update = ProfileUpdate;
    const KIND: Kind = INSTANCE_PROFILE;
    const NOUN: &'static str = "instance profile";
    const NAMED: bool = true;

    fn desired(&self, desired: &DesiredState, node: &Resource, refs: &Refs) -> Result<ProfileWant> {
        let s = node.spec.expect::<InstanceProfileSpec>();
        Ok(ProfileWant {
            name: aws_name(desired, node),
            path: s.path.clone(),
            role: refs.render(&s.role).value,
            tags: spec_tags(&s.tags),
        })
    }

    /// IAM lists no instance profile tags: the desired ones and those holding the stack's
    /// roles are read one by one.
    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<ObservedProfile>> {
        let mut names = desired_names(desired, INSTANCE_PROFILE);
        names.extend(
            account(ctx)
                .await?
                .roles
                .iter()
                .filter(|r| owner_id(&r.tags, desired.stack_name()).is_some())
                .flat_map(|r| r.profiles.iter().cloned()),
        );
        let reads = names.iter().map(|name| async move {
            match ctx
                .iam
                .get_instance_profile()
                .instance_profile_name(name)
                .send()
                .await
                .map_err(aws_error("iam", "GetInstanceProfile"))
            {
                Ok(out) => Ok(out.instance_profile().map(|p| ObservedProfile {
                    name: p.instance_profile_name().to_string(),
                    arn: p.arn().to_string(),
                    roles: p
                        .roles()
                        .iter()
                        .map(|r| r.role_name().to_string())
                        .collect(),
                    tags: tag_map(p.tags()),
                })),
                Err(e) if is_gone(&e) => Ok(None),
                Err(e) => Err(e),
            }
        });
        let mut profiles: Vec<ObservedProfile> = futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            .collect();
        profiles.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(profiles)
    }

    fn id(&self, o: &ObservedProfile) -> String {
        o.name.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedProfile) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedProfile],
    ) -> Option<&'o ObservedProfile> {
        by_name(desired, node, observed, |o| &o.name)
    }

    fn outputs(&self, o: &ObservedProfile) -> Outputs {
        Outputs::from([
            ("name".into(), o.name.clone()),
            ("arn".into(), o.arn.clone()),
        ])
    }

    fn diff(&self, want: &ProfileWant, have: &ObservedProfile) -> Vec<ProfileUpdate> {
        if have.roles == [want.role.clone()] {
            return Vec::new();
        }
        vec![ProfileUpdate::Role {
            from: have.roles.clone(),
            to: want.role.clone(),
        }]
    }

    fn own_tags(&self, want: &ProfileWant) -> Tags {
        want.tags.clone()
    }

    fn create_fields(&self, want: &ProfileWant) -> Vec<FieldChange> {
        vec![FieldChange::new("role", None, Some(want.role.clone()))]
    }

    fn label(&self, want: &ProfileWant) -> String {
        want.name.clone()
    }

    async fn named_tags(&self, ctx: &Context, want: &ProfileWant) -> Result<Option<Tags>> {
        let out = ctx
            .iam
            .get_instance_profile()
            .instance_profile_name(&want.name)
            .send()
            .await
            .map_err(aws_error("iam", "GetInstanceProfile"))?;
        Ok(out.instance_profile().map(|p| tag_map(p.tags())))
    }

    async fn create(&self, ctx: &Context, want: &ProfileWant, tags: &Tags) -> Result<Outputs> {
        let out = ctx
            .iam
            .create_instance_profile()
            .instance_profile_name(&want.name)
            .path(&want.path)
            .set_tags(Some(tag_list(tags)))
            .send()
            .await
            .map_err(aws_error("iam", "CreateInstanceProfile"))?;
        let p = out
            .instance_profile()
            .ok_or_else(|| Error::Invalid("CreateInstanceProfile returned nothing".into()))?;
        let outputs = Outputs::from([
            ("name".into(), p.instance_profile_name().to_string()),
            ("arn".into(), p.arn().to_string()),
        ]);
        add_to_profile(ctx, &want.name, &want.role).await?;
        Ok(outputs)
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedProfile,
        change: &ProfileUpdate,
    ) -> Result<Option<Outputs>> {
        let (from, to) = match change {
            ProfileUpdate::Role { from, to } => (from, Some(to)),
            ProfileUpdate::Empty(from) => (from, None),
        };
        for old in from.iter().filter(|r| Some(*r) != to) {
            remove_from_profile(ctx, &have.name, old).await?;
        }
        if let Some(role) = to.filter(|r| !from.contains(r)) {
            add_to_profile(ctx, &have.name, role).await?;
        }
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedProfile, set: &Tags) -> Result<()> {
        ctx.iam
            .tag_instance_profile()
            .instance_profile_name(&have.name)
            .set_tags(Some(tag_list(set)))
            .send()
            .await
            .map_err(aws_error("iam", "TagInstanceProfile"))?;
        Ok(())
    }

    async fn untag(&self, ctx: &Context, have: &ObservedProfile, keys: &[String]) -> Result<()> {
        ctx.iam
            .untag_instance_profile()
            .instance_profile_name(&have.name)
            .set_tag_keys(Some(keys.to_vec()))
            .send()
            .await
            .map_err(aws_error("iam", "UntagInstanceProfile"))?;
        Ok(())
    }

    fn teardown(&self, have: &ObservedProfile) -> Vec<ProfileUpdate> {
        if have.roles.is_empty() {
            Vec::new()
        } else {
            vec![ProfileUpdate::Empty(have.roles.clone())]
        }
    }

    async fn delete(&self, ctx: &Context, have: &ObservedProfile) -> Result<()> {
        ctx.iam
            .delete_instance_profile()
            .instance_profile_name(&have.name)
            .send()
            .await
            .map_err(aws_error("iam", "DeleteInstanceProfile"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Action, Change};
    use crate::controller::Controller;
    use crate::desired::Spec;
    use crate::desired::{TAG_ID, TAG_STACK};
    use crate::managed::Op;
    use crate::model::ResourceId;
    use crate::testing::{desired, owned_tags, resource};

    fn role_spec(extra: &str) -> RoleSpec {
        let mut s: RoleSpec = toml::from_str(&format!(
            "trust = {{ services = [\"ec2.amazonaws.com\"] }}\nmanaged_policies = [\"arn:aws:iam::aws:policy/A\", \"${{iam.policy.p.arn}}\"]\n{extra}"
        ))
        .unwrap();
        s.loaded.trust = Some(principals_trust(&s.trust));
        s.loaded.inline.insert("inline".into(), doc("s3:GetObject"));
        s
    }

    fn doc(action: &str) -> Value {
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]})
    }

    fn refs() -> Refs {
        let mut refs = Refs::default();
        refs.outputs.insert(
            ResourceId::new(POLICY, "p"),
            Outputs::from([("arn".into(), "arn:aws:iam::1:policy/s-p".into())]),
        );
        refs
    }

    /// The role as stackwarden would have left it.
    fn observed_role(r: &RoleSpec) -> ObservedRole {
        ObservedRole {
            name: "s-prometheus".into(),
            arn: "arn:aws:iam::1:role/s-prometheus".into(),
            id: "AROA".into(),
            trust: r.loaded.trust.clone().unwrap(),
            tags: owned_tags("iam.role.prometheus"),
            inline: r.loaded.inline.clone(),
            attached: [
                "arn:aws:iam::aws:policy/A".to_string(),
                "arn:aws:iam::1:policy/s-p".to_string(),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn diff<K: ManagedObject>(
        kind: K,
        node: &Resource,
        observed: &[K::Observed],
        refs: &Refs,
    ) -> Result<Option<Change<Op<K>>>> {
        Managed(kind).diff(&desired(vec![node.clone()]), node, &observed.to_vec(), refs)
    }

    fn role_node(spec: RoleSpec) -> Resource {
        resource(ROLE, "prometheus", Spec::new(spec))
    }

    fn diff_role(spec: RoleSpec, observed: &[ObservedRole]) -> Result<Option<Change<Op<Role>>>> {
        diff(Role, &role_node(spec), observed, &refs())
    }

    /// The in-place updates of a change, in order.
    fn updates<K: ManagedObject>(c: &Change<Op<K>>) -> Vec<&K::Update> {
        c.ops
            .iter()
            .filter_map(|o| match o {
                Op::Update { change, .. } => Some(change),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_role_as_desired_has_no_change() {
        let spec = role_spec("");
        let have = observed_role(&spec);
        assert!(diff_role(spec, &[have]).unwrap().is_none());
    }

    #[test]
    fn a_missing_role_is_created_with_its_policies_and_tags_in_one_operation() {
        let c = diff_role(role_spec(""), &[]).unwrap().unwrap();
        assert_eq!(c.action, Action::Create);
        assert_eq!(c.object, "role s-prometheus");
        assert_eq!(c.ops.len(), 1);
        let Op::Create { want, tags } = &c.ops[0] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(want.name, "s-prometheus");
        assert_eq!(tags, &owned_tags("iam.role.prometheus"));
        assert_eq!(want.managed.len(), 2);
        assert_eq!(want.inline.len(), 1);
        let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "trust",
                "managed_policies",
                "inline_policies.inline",
                "tags"
            ]
        );
    }

    #[test]
    fn trust_policy_drift_is_corrected() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.trust = json!({"Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]});
        let c = diff_role(spec, &[have]).unwrap().unwrap();
        assert!(matches!(updates(&c)[..], [RoleUpdate::Trust { .. }]));
        assert_eq!(c.ops.len(), 1);
        assert_eq!(c.fields[0].field, "trust");
    }

    #[test]
    fn a_deleted_trust_principal_is_a_note_until_a_role_of_its_arn_exists_again() {
        let mut spec = role_spec("");
        spec.loaded.trust = Some(
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"AWS": "arn:aws:iam::1:role/ci"}}]}),
        );
        let mut have = observed_role(&spec);
        have.trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"AWS": "AROAEXAMPLEID1234567"}}]});
        let c = diff_role(spec.clone(), &[have.clone()]).unwrap().unwrap();
        assert!(c.ops.is_empty(), "{:?}", c.ops);
        assert_eq!(c.notes.len(), 1);
        assert!(
            c.notes[0].contains("arn:aws:iam::1:role/ci"),
            "{:?}",
            c.notes
        );
        // The role exists again: the trust is written back.
        have.account_roles = Arc::new(["arn:aws:iam::1:role/ci".to_string()].into());
        let c = diff_role(spec, &[have]).unwrap().unwrap();
        assert!(
            matches!(updates(&c)[..], [RoleUpdate::Trust { .. }]),
            "{:?}",
            c.ops
        );
        assert!(c.notes.is_empty());
    }

    #[test]
    fn detached_and_extra_managed_policies_are_corrected() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.attached.remove("arn:aws:iam::1:policy/s-p");
        have.attached.insert("arn:aws:iam::aws:policy/Extra".into());
        let c = diff_role(spec, &[have]).unwrap().unwrap();
        assert!(matches!(
            updates(&c)[..],
            [RoleUpdate::Attach(a), RoleUpdate::Detach(d)]
                if a == "arn:aws:iam::1:policy/s-p" && d == "arn:aws:iam::aws:policy/Extra"
        ));
    }

    #[test]
    fn inline_policies_edited_added_or_extra_are_corrected() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.inline.insert("inline".into(), doc("s3:*"));
        have.inline.insert("extra".into(), doc("ec2:*"));
        let c = diff_role(spec.clone(), &[have]).unwrap().unwrap();
        assert!(matches!(
            updates(&c)[..],
            [RoleUpdate::PutInline { name: put, .. }, RoleUpdate::DeleteInline { name: gone, .. }]
                if put == "inline" && gone == "extra"
        ));

        // The same policy spelled differently by IAM is no drift.
        let mut have = observed_role(&spec);
        have.inline.insert(
            "inline".into(),
            json!({"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": ["S3:GetObject"], "Resource": ["*"]}}),
        );
        assert!(diff_role(spec, &[have]).unwrap().is_none());
    }

    #[test]
    fn tags_are_restored_and_extra_ones_removed_but_aws_tags_kept() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.tags.remove("team");
        have.tags.insert("extra".into(), "x".into());
        have.tags
            .insert("aws:cloudformation:stack-name".into(), "x".into());
        let c = diff_role(spec, &[have]).unwrap().unwrap();
        assert!(
            matches!(
                &c.ops[..],
                [Op::Tag { set, .. }, Op::Untag { keys, .. }]
                    if set == &Tags::from([("team".into(), "sre".into())]) && keys == &["extra".to_string()]
            ),
            "{:?}",
            c.ops
        );
    }

    #[test]
    fn description_and_session_duration_drift_is_corrected() {
        let mut spec = role_spec("description = \"d\"");
        spec.loaded.max_session_seconds = Some(7200);
        let have = observed_role(&spec);
        let c = diff_role(spec, &[have]).unwrap().unwrap();
        assert!(matches!(
            updates(&c)[..],
            [RoleUpdate::Settings { description: (None, Some(d)), max_session_seconds: (None, Some(7200)) }] if d == "d"
        ));
        let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["description", "max_session_duration"]);
    }

    #[test]
    fn a_role_without_our_tags_is_not_ours_unless_adopted_and_tagged_before_any_change() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.tags.clear();
        have.attached.clear();
        let err = diff_role(spec.clone(), &[have.clone()]).unwrap_err();
        assert!(
            matches!(err, Error::NotOwned(ref m) if m.contains("set `adopt = \"s-prometheus\"`")),
            "{err}"
        );
        // Nor are its attributes anyone's to use.
        let d = desired(vec![role_node(spec.clone())]);
        assert!(Managed(Role).outputs(&d, &vec![have.clone()]).is_empty());

        let mut r = role_node(spec);
        r.adopt = Some("s-prometheus".into());
        let c = diff(Role, &r, &[have], &refs()).unwrap().unwrap();
        assert!(
            c.notes[0].contains("adopting existing role s-prometheus"),
            "{:?}",
            c.notes
        );
        assert!(
            matches!(&c.ops[..], [Op::Tag { set, .. }, Op::Update { .. }, Op::Update { .. }] if set.contains_key(TAG_ID)),
            "tags first, so the role is the stack's before it changes: {:?}",
            c.ops
        );
    }

    #[test]
    fn a_role_of_another_stack_is_never_adopted() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.tags.insert(TAG_STACK.into(), "other".into());
        let mut r = role_node(spec);
        r.adopt = Some("s-prometheus".into());
        let err = diff(Role, &r, &[have], &refs()).unwrap_err();
        assert!(
            matches!(err, Error::NotOwned(ref m) if m.contains("belongs to the stack `other`")),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_reference_shows_as_known_after_apply() {
        let c = diff(Role, &role_node(role_spec("")), &[], &Refs::default())
            .unwrap()
            .unwrap();
        assert!(c.fields.iter().any(|f| f
            .after
            .as_deref()
            .is_some_and(|a| a.contains(KNOWN_AFTER_APPLY))));
    }

    fn policy_fixture(versions: usize) -> (Resource, ObservedPolicy) {
        let mut spec: PolicySpec = toml::from_str("document = \"p.json\"").unwrap();
        spec.loaded = Some(doc("aps:RemoteWrite"));
        let r = resource(POLICY, "p", Spec::new(spec));
        let o = ObservedPolicy {
            name: "s-p".into(),
            arn: "arn:p".into(),
            path: "/".into(),
            versions: (1..=versions)
                .map(|i| PolicyVersion {
                    id: format!("v{i}"),
                    is_default: i == versions,
                    created: i as i64,
                    document: doc(if i == versions {
                        "aps:RemoteWrite"
                    } else {
                        "old:x"
                    }),
                })
                .collect(),
            tags: owned_tags("iam.policy.p"),
        };
        (r, o)
    }

    #[test]
    fn a_policy_as_desired_has_no_change() {
        let (r, o) = policy_fixture(1);
        assert!(diff(Policy, &r, &[o], &Refs::default()).unwrap().is_none());
    }

    #[test]
    fn a_changed_document_makes_a_new_default_version() {
        let (r, mut o) = policy_fixture(2);
        o.versions[1].document = doc("aps:*");
        let c = diff(Policy, &r, &[o], &Refs::default()).unwrap().unwrap();
        assert!(matches!(
            updates(&c)[..],
            [PolicyUpdate::Document {
                making_room: None,
                ..
            }]
        ));
        assert_eq!(c.ops.len(), 1);
        assert!(c.notes.is_empty());
    }

    #[test]
    fn the_oldest_version_is_deleted_before_the_five_version_limit() {
        let (r, mut o) = policy_fixture(5);
        o.versions[4].document = doc("aps:*");
        let c = diff(Policy, &r, &[o], &Refs::default()).unwrap().unwrap();
        assert!(matches!(
            updates(&c)[..],
            [PolicyUpdate::Document { making_room: Some(v), .. }] if v == "v1"
        ));
        assert_eq!(
            c.notes,
            ["deletes old version v1 to stay within IAM's five versions"]
        );
    }

    #[test]
    fn policy_tag_drift_is_corrected() {
        let (r, mut o) = policy_fixture(1);
        o.tags.insert("extra".into(), "1".into());
        let c = diff(Policy, &r, &[o], &Refs::default()).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Untag { keys, .. }] if keys == &vec!["extra".to_string()])
        );
    }

    #[test]
    fn an_instance_profile_gets_its_role_back_and_its_tags() {
        let spec: InstanceProfileSpec = toml::from_str("role = \"s-prometheus\"").unwrap();
        let r = resource(INSTANCE_PROFILE, "prometheus", Spec::new(spec));
        let mut tags = owned_tags("iam.instance_profile.prometheus");
        tags.remove("team");
        let o = ObservedProfile {
            name: "s-prometheus".into(),
            arn: "arn".into(),
            roles: vec!["other".into()],
            tags,
        };
        let c = diff(InstanceProfile, &r, &[o], &Refs::default())
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                &c.ops[..],
                [Op::Tag { .. }, Op::Update { change: ProfileUpdate::Role { from, to }, .. }]
                    if from == &["other".to_string()] && to == "s-prometheus"
            ),
            "tags first, so the profile is the stack's before it changes: {:?}",
            c.ops
        );
    }

    #[test]
    fn owned_objects_no_longer_desired_are_orphaned_or_deleted_after_their_attachments() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.profiles = vec!["s-prometheus".into()];
        let d = desired(vec![]);
        let orphans = Managed(Role).removed(&d, &vec![have.clone()], false);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].action, Action::Orphan);
        assert!(orphans[0].ops.is_empty());
        let deletes = Managed(Role).removed(&d, &vec![have], true);
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[0].action, Action::Delete);
        // Out of its profile, policies detached and inline ones deleted first: IAM refuses to
        // delete a role that has them.
        assert!(
            matches!(
                &deletes[0].ops[..],
                [
                    Op::Update { change: RoleUpdate::LeaveProfile(p), .. },
                    Op::Update { change: RoleUpdate::Detach(_), .. },
                    Op::Update { change: RoleUpdate::Detach(_), .. },
                    Op::Update { change: RoleUpdate::DeleteInline { name, .. }, .. },
                    Op::Delete { .. },
                ] if p == "s-prometheus" && name == "inline"
            ),
            "{:?}",
            deletes[0].ops
        );
        let (_, policy) = policy_fixture(3);
        let deletes = Managed(Policy).removed(&d, &vec![policy], true);
        assert!(matches!(
            &deletes[0].ops[..],
            [
                Op::Update { change: PolicyUpdate::DeleteVersion(a), .. },
                Op::Update { change: PolicyUpdate::DeleteVersion(b), .. },
                Op::Delete { .. },
            ] if a == "v1" && b == "v2"
        ));
    }

    #[test]
    fn objects_of_other_stacks_are_never_removed() {
        let spec = role_spec("");
        let mut have = observed_role(&spec);
        have.tags.insert(TAG_STACK.into(), "other".into());
        assert!(Managed(Role)
            .removed(&desired(vec![]), &vec![have], true)
            .is_empty());
    }
}
