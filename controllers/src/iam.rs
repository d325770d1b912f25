//! IAM: roles (trust policy, managed policy attachments, inline policies), customer managed
//! policies, instance profiles.
//!
//! Observe reads the whole account's roles and local policies with one paginated
//! `GetAccountAuthorizationDetails`, plus one tag read per candidate policy and instance profile
//! (IAM's list calls do not return tags). Policy documents are compared as normalised JSON
//! ([`crate::policy`]). A changed customer managed policy gets a new default version; the oldest
//! non-default version is deleted first when IAM's limit of five would be reached.
//!
//! # Guarantees
//! - Nothing without both ownership tags (`stackwarden:stack`, `stackwarden:id`) is modified
//!   or deleted, unless the resource adopts it explicitly by name.
//! - Every operation is idempotent: re-applying after a crash converges to the same state.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use aws_sdk_iam::types::{EntityType, Tag};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use serde::Deserialize;
use serde_json::{json, Value};
use toml::Spanned;

use crate::change::{Action, Change};
use crate::controller::{Context, Controller};
use crate::desired::{
    check_duration, check_tags, DesiredState, FileRef, Resource, Spec, Validator, TAG_ID, TAG_STACK,
};
use crate::error::{aws_error, Error, Result};
use crate::model::{Kind, Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::policy;
use crate::tags::{self, owned_by, owner_id};

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

impl RoleSpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
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

impl PolicySpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
        check_iam_name(v, &self.name, 128);
        check_path(v, &self.path);
        self.loaded = load_policy(v, &self.document);
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

impl InstanceProfileSpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
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
    pub tags: BTreeMap<String, String>,
    pub inline: BTreeMap<String, Value>,
    pub attached: BTreeSet<String>,
    pub profiles: Vec<String>,
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
    pub tags: BTreeMap<String, String>,
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
    pub tags: BTreeMap<String, String>,
}

/// Everything IAM observe read, keyed by AWS name.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub roles: BTreeMap<String, ObservedRole>,
    pub policies: BTreeMap<String, ObservedPolicy>,
    pub profiles: BTreeMap<String, ObservedProfile>,
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect()
}

fn tag_list(tags: &BTreeMap<String, String>) -> Vec<Tag> {
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

// ---------------------------------------------------------------------------------------------
// The controller

pub struct IamController;

/// One IAM write.
#[derive(Debug, Clone)]
pub enum Op {
    CreateRole {
        name: String,
        path: String,
        trust: Value,
        description: Option<String>,
        max_session_seconds: Option<i32>,
        tags: BTreeMap<String, String>,
    },
    UpdateTrust {
        role: String,
        trust: Value,
    },
    UpdateRole {
        role: String,
        description: Option<String>,
        max_session_seconds: Option<i32>,
    },
    AttachPolicy {
        role: String,
        arn: String,
    },
    DetachPolicy {
        role: String,
        arn: String,
    },
    PutInline {
        role: String,
        name: String,
        document: Value,
    },
    DeleteInline {
        role: String,
        name: String,
    },
    TagRole {
        role: String,
        tags: BTreeMap<String, String>,
    },
    UntagRole {
        role: String,
        keys: Vec<String>,
    },
    DeleteRole {
        role: String,
    },
    CreatePolicy {
        name: String,
        path: String,
        description: Option<String>,
        document: Value,
        tags: BTreeMap<String, String>,
    },
    DeletePolicyVersion {
        arn: String,
        version: String,
    },
    CreatePolicyVersion {
        arn: String,
        document: Value,
    },
    TagPolicy {
        arn: String,
        tags: BTreeMap<String, String>,
    },
    UntagPolicy {
        arn: String,
        keys: Vec<String>,
    },
    DeletePolicy {
        arn: String,
    },
    CreateProfile {
        name: String,
        path: String,
        tags: BTreeMap<String, String>,
    },
    AddRoleToProfile {
        profile: String,
        role: String,
    },
    RemoveRoleFromProfile {
        profile: String,
        role: String,
    },
    TagProfile {
        profile: String,
        tags: BTreeMap<String, String>,
    },
    UntagProfile {
        profile: String,
        keys: Vec<String>,
    },
    DeleteProfile {
        profile: String,
    },
}

/// The AWS name a desired IAM resource has.
pub fn aws_name(desired: &DesiredState, r: &Resource) -> String {
    let explicit = match &r.spec {
        Spec::IamRole(s) => s.name.clone(),
        Spec::IamPolicy(s) => s.name.clone(),
        Spec::IamInstanceProfile(s) => s.name.clone(),
        _ => None,
    };
    r.adopt
        .clone()
        .or(explicit)
        .unwrap_or_else(|| desired.default_name(&r.id))
}

/// A document on one line, as written (IAM's own spelling for observed ones).
fn compact(v: &Value) -> String {
    v.to_string()
}

fn spec_tags(tags: &Option<Spanned<BTreeMap<String, String>>>) -> BTreeMap<String, String> {
    tags.as_ref()
        .map(|t| t.get_ref().clone())
        .unwrap_or_default()
}

/// Decides how an observed object relates to the desired resource: ours, adoptable, or someone
/// else's.
fn ownership(
    desired: &DesiredState,
    r: &Resource,
    tags: &BTreeMap<String, String>,
    what: &str,
    name: &str,
) -> Result<bool> {
    if owned_by(tags, desired.stack_name(), &r.id) {
        Ok(false)
    } else if let Some(owner) = crate::tags::other_stack(tags, desired.stack_name()) {
        Err(crate::tags::owned_elsewhere(what, name, owner))
    } else if r.adopt.as_deref() == Some(name) {
        Ok(true)
    } else {
        Err(Error::NotOwned(format!(
            "{what} `{name}` already exists and is not managed by this stack (no `{TAG_STACK}={}` and `{TAG_ID}={}` tags); \
             set `adopt = \"{name}\"` on {} to manage it, or choose another name",
            desired.stack_name(),
            r.id,
            r.id
        )))
    }
}

impl IamController {
    fn diff_role(
        &self,
        desired: &DesiredState,
        r: &Resource,
        s: &RoleSpec,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let name = aws_name(desired, r);
        let tags = desired.tags_for(&r.id, &spec_tags(&s.tags));
        let (trust, _) = refs.render_json(s.loaded.trust.as_ref().unwrap_or(&Value::Null));
        let managed: BTreeSet<String> = s
            .managed_policies
            .iter()
            .map(|a| refs.render(a).value)
            .collect();
        let inline: BTreeMap<String, Value> = s
            .loaded
            .inline
            .iter()
            .map(|(k, v)| (k.clone(), refs.render_json(v).0))
            .collect();

        let Some(o) = obs.roles.get(&name) else {
            if r.adopt.is_some() {
                return Err(Error::Invalid(format!(
                    "role `{name}` to adopt does not exist"
                )));
            }
            let mut c = Change::new(r.id.clone(), Action::Create, format!("role {name}"));
            c.field("trust", None, Some(compact(&trust)));
            if !managed.is_empty() {
                c.field("managed_policies", None, Some(format!("{managed:?}")));
            }
            for (k, v) in &inline {
                c.field(format!("inline_policies.{k}"), None, Some(compact(v)));
            }
            c.field("tags", None, Some(tags::show(&tags)));
            c.op(Op::CreateRole {
                name: name.clone(),
                path: s.path.clone(),
                trust,
                description: s.description.clone(),
                max_session_seconds: s.loaded.max_session_seconds,
                tags,
            });
            for (k, v) in inline {
                c.op(Op::PutInline {
                    role: name.clone(),
                    name: k,
                    document: v,
                });
            }
            for arn in managed {
                c.op(Op::AttachPolicy {
                    role: name.clone(),
                    arn,
                });
            }
            return Ok(Some(c));
        };

        let adopting = ownership(desired, r, &o.tags, "role", &name)?;
        let mut c = Change::new(r.id.clone(), Action::Update, format!("role {name}"));
        if adopting {
            c.notes.push(format!("adopting existing role `{name}`: it gets the ownership tags and is managed from now on"));
        }
        // A principal IAM replaced by its unique id cannot be written back until it exists
        // again (IAM refuses the ARN): a note until then, never an endless failing update.
        let deleted = policy::deleted_principals(&o.trust, &trust).filter(|gone| {
            !gone
                .iter()
                .any(|arn| obs.roles.values().any(|r| &r.arn == arn))
        });
        if let Some(gone) = deleted {
            c.notes.push(format!(
                "the trust policy names {}, deleted since: IAM keeps a unique id in its place; the trust is written again once it exists",
                gone.join(", ")
            ));
        } else if !policy::equivalent(&o.trust, &trust) {
            c.field("trust", Some(compact(&o.trust)), Some(compact(&trust)));
            c.op(Op::UpdateTrust {
                role: name.clone(),
                trust,
            });
        }
        let wants_desc = s.description.is_some() && s.description != o.description;
        let wants_session = s.loaded.max_session_seconds.is_some()
            && s.loaded.max_session_seconds != o.max_session_seconds;
        if wants_desc {
            c.field("description", o.description.clone(), s.description.clone());
        }
        if wants_session {
            c.field(
                "max_session_duration",
                o.max_session_seconds.map(|s| format!("{s}s")),
                s.loaded.max_session_seconds.map(|s| format!("{s}s")),
            );
        }
        if wants_desc || wants_session {
            c.op(Op::UpdateRole {
                role: name.clone(),
                description: s.description.clone(),
                max_session_seconds: s.loaded.max_session_seconds,
            });
        }
        for arn in managed.difference(&o.attached) {
            c.field("managed_policies", None, Some(arn.clone()));
            c.op(Op::AttachPolicy {
                role: name.clone(),
                arn: arn.clone(),
            });
        }
        for arn in o.attached.difference(&managed) {
            c.field("managed_policies", Some(arn.clone()), None);
            c.op(Op::DetachPolicy {
                role: name.clone(),
                arn: arn.clone(),
            });
        }
        for (k, v) in &inline {
            match o.inline.get(k) {
                Some(cur) if policy::equivalent(cur, v) => {}
                cur => {
                    c.field(
                        format!("inline_policies.{k}"),
                        cur.map(compact),
                        Some(compact(v)),
                    );
                    c.op(Op::PutInline {
                        role: name.clone(),
                        name: k.clone(),
                        document: v.clone(),
                    });
                }
            }
        }
        for (k, cur) in &o.inline {
            if !inline.contains_key(k) {
                c.field(format!("inline_policies.{k}"), Some(compact(cur)), None);
                c.op(Op::DeleteInline {
                    role: name.clone(),
                    name: k.clone(),
                });
            }
        }
        // Tags first: an adopted object carries the stack's tag before anything else changes it
        // (the operator's policy allows IAM changes only to what carries it).
        let untagged = c.ops.len();
        c.tags(
            &o.tags,
            &tags,
            |tags| Op::TagRole {
                role: name.clone(),
                tags,
            },
            |keys| Op::UntagRole {
                role: name.clone(),
                keys,
            },
        );
        c.ops.rotate_left(untagged);
        Ok((!c.ops.is_empty() || !c.notes.is_empty()).then_some(c))
    }

    fn diff_policy(
        &self,
        desired: &DesiredState,
        r: &Resource,
        s: &PolicySpec,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let name = aws_name(desired, r);
        let tags = desired.tags_for(&r.id, &spec_tags(&s.tags));
        let (doc, unknown) = refs.render_json(s.loaded.as_ref().unwrap_or(&Value::Null));
        let shown = |d: &Value| {
            if unknown.is_empty() {
                compact(d)
            } else {
                format!("{} {KNOWN_AFTER_APPLY}", compact(d))
            }
        };
        let Some(o) = obs.policies.get(&name) else {
            if r.adopt.is_some() {
                return Err(Error::Invalid(format!(
                    "policy `{name}` to adopt does not exist"
                )));
            }
            let mut c = Change::new(r.id.clone(), Action::Create, format!("policy {name}"));
            c.field("document", None, Some(shown(&doc)));
            c.field("tags", None, Some(tags::show(&tags)));
            c.op(Op::CreatePolicy {
                name,
                path: s.path.clone(),
                description: s.description.clone(),
                document: doc,
                tags,
            });
            return Ok(Some(c));
        };
        let adopting = ownership(desired, r, &o.tags, "policy", &name)?;
        let mut c = Change::new(r.id.clone(), Action::Update, format!("policy {name}"));
        if adopting {
            c.notes.push(format!("adopting existing policy `{name}`"));
        }
        let current = o.default_document();
        if !current.is_some_and(|cur| policy::equivalent(cur, &doc)) {
            c.field("document", current.map(compact), Some(shown(&doc)));
            // IAM keeps at most five versions: make room by deleting the oldest non-default one.
            if o.versions.len() >= 5 {
                if let Some(oldest) = o
                    .versions
                    .iter()
                    .filter(|v| !v.is_default)
                    .min_by_key(|v| (v.created, v.id.clone()))
                {
                    c.notes.push(format!(
                        "deletes old version {} to stay within IAM's five versions",
                        oldest.id
                    ));
                    c.op(Op::DeletePolicyVersion {
                        arn: o.arn.clone(),
                        version: oldest.id.clone(),
                    });
                }
            }
            c.op(Op::CreatePolicyVersion {
                arn: o.arn.clone(),
                document: doc,
            });
        }
        // Tags first: an adopted object carries the stack's tag before anything else changes it
        // (the operator's policy allows IAM changes only to what carries it).
        let untagged = c.ops.len();
        c.tags(
            &o.tags,
            &tags,
            |tags| Op::TagPolicy {
                arn: o.arn.clone(),
                tags,
            },
            |keys| Op::UntagPolicy {
                arn: o.arn.clone(),
                keys,
            },
        );
        c.ops.rotate_left(untagged);
        Ok((!c.ops.is_empty()).then_some(c))
    }

    fn diff_profile(
        &self,
        desired: &DesiredState,
        r: &Resource,
        s: &InstanceProfileSpec,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let name = aws_name(desired, r);
        let tags = desired.tags_for(&r.id, &spec_tags(&s.tags));
        let role = refs.render(&s.role).value;
        let Some(o) = obs.profiles.get(&name) else {
            if r.adopt.is_some() {
                return Err(Error::Invalid(format!(
                    "instance profile `{name}` to adopt does not exist"
                )));
            }
            let mut c = Change::new(
                r.id.clone(),
                Action::Create,
                format!("instance profile {name}"),
            );
            c.field("role", None, Some(role.clone()));
            c.field("tags", None, Some(tags::show(&tags)));
            c.op(Op::CreateProfile {
                name: name.clone(),
                path: s.path.clone(),
                tags,
            });
            c.op(Op::AddRoleToProfile {
                profile: name,
                role,
            });
            return Ok(Some(c));
        };
        let adopting = ownership(desired, r, &o.tags, "instance profile", &name)?;
        let mut c = Change::new(
            r.id.clone(),
            Action::Update,
            format!("instance profile {name}"),
        );
        if adopting {
            c.notes
                .push(format!("adopting existing instance profile `{name}`"));
        }
        if o.roles != [role.clone()] {
            c.field("role", o.roles.first().cloned(), Some(role.clone()));
            for old in o.roles.iter().filter(|r| **r != role) {
                c.op(Op::RemoveRoleFromProfile {
                    profile: name.clone(),
                    role: old.clone(),
                });
            }
            if !o.roles.contains(&role) {
                c.op(Op::AddRoleToProfile {
                    profile: name.clone(),
                    role,
                });
            }
        }
        // Tags first: an adopted object carries the stack's tag before anything else changes it
        // (the operator's policy allows IAM changes only to what carries it).
        let untagged = c.ops.len();
        c.tags(
            &o.tags,
            &tags,
            |tags| Op::TagProfile {
                profile: name.clone(),
                tags,
            },
            |keys| Op::UntagProfile {
                profile: name.clone(),
                keys,
            },
        );
        c.ops.rotate_left(untagged);
        Ok((!c.ops.is_empty()).then_some(c))
    }
}

/// The desired AWS names of each IAM kind, with adopted names.
fn desired_names(desired: &DesiredState, kind: Kind) -> BTreeMap<String, &Resource> {
    desired
        .of_kind(kind)
        .map(|r| (aws_name(desired, r), r))
        .collect()
}

/// Whether an observed object is one of the desired resources (by name and ownership/adoption),
/// given the desired resources of its kind by name ([`desired_names`], built once per pass).
fn is_desired(
    wanted: &BTreeMap<String, &Resource>,
    stack: &str,
    name: &str,
    tags: &BTreeMap<String, String>,
) -> bool {
    wanted
        .get(name)
        .is_some_and(|r| owned_by(tags, stack, &r.id) || r.adopt.as_deref() == Some(name))
}

fn is_no_such_entity<E: ProvideErrorMetadata, R>(
    e: &aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> bool {
    e.code() == Some("NoSuchEntity")
}

/// Removals are idempotent: an object already gone is success (a retried or resumed pass).
fn gone_is_fine<T, E, R>(
    result: std::result::Result<T, aws_smithy_runtime_api::client::result::SdkError<E, R>>,
    op: &'static str,
) -> Result<()>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: crate::error::HttpStatus + std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_no_such_entity(&e) => Ok(()),
        Err(e) => Err(aws_error("iam", op)(e)),
    }
}

#[async_trait]
impl Controller for IamController {
    type Observed = Observed;
    type Op = Op;

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::IamPolicy, Kind::IamRole, Kind::IamInstanceProfile]
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        let stack = desired.stack_name();
        let mut obs = Observed::default();
        let mut pages = ctx
            .iam
            .get_account_authorization_details()
            .filter(EntityType::Role)
            .filter(EntityType::LocalManagedPolicy)
            .into_paginator()
            .send();
        let mut profile_names: BTreeSet<String> = BTreeSet::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("iam", "GetAccountAuthorizationDetails"))?;
            for r in page.role_detail_list() {
                let name = r.role_name().unwrap_or_default().to_string();
                let tags = tag_map(r.tags());
                let profiles: Vec<String> = r
                    .instance_profile_list()
                    .iter()
                    .map(|p| p.instance_profile_name().to_string())
                    .collect();
                if owner_id(&tags, stack).is_some() {
                    profile_names.extend(profiles.iter().cloned());
                }
                let role = ObservedRole {
                    name: name.clone(),
                    arn: r.arn().unwrap_or_default().to_string(),
                    id: r.role_id().unwrap_or_default().to_string(),
                    trust: r
                        .assume_role_policy_document()
                        .map(policy::decode)
                        .transpose()
                        .map_err(Error::Invalid)?
                        .unwrap_or(Value::Null),
                    tags,
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
                    profiles,
                    ..Default::default()
                };
                obs.roles.insert(name, role);
            }
            for p in page.policies() {
                // Some emulators leave PolicyName out; the ARN ends with it either way.
                let arn = p.arn().unwrap_or_default();
                let name = p
                    .policy_name()
                    .map(str::to_string)
                    .unwrap_or_else(|| arn.rsplit('/').next().unwrap_or_default().to_string());
                let versions = p
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
                    .collect();
                obs.policies.insert(
                    name.clone(),
                    ObservedPolicy {
                        name,
                        arn: p.arn().unwrap_or_default().to_string(),
                        path: p.path().unwrap_or_default().to_string(),
                        versions,
                        tags: BTreeMap::new(),
                    },
                );
            }
        }

        // Descriptions and session durations are not in the account details: read them only
        // for roles whose desired state sets them.
        for r in desired.of_kind(Kind::IamRole) {
            let Spec::IamRole(s) = &r.spec else { continue };
            let name = aws_name(desired, r);
            if (s.description.is_some() || s.max_session_duration.is_some())
                && obs.roles.contains_key(&name)
            {
                let out = ctx
                    .iam
                    .get_role()
                    .role_name(&name)
                    .send()
                    .await
                    .map_err(aws_error("iam", "GetRole"))?;
                if let (Some(role), Some(o)) = (out.role(), obs.roles.get_mut(&name)) {
                    o.description = role.description().map(str::to_string);
                    o.max_session_seconds = role.max_session_duration();
                }
            }
        }

        // Tags of candidate policies: the desired ones, and those attached to our roles or on
        // stackwarden's path (so removed ones are found).
        let wanted = desired_names(desired, Kind::IamPolicy);
        let owned_role_arns: BTreeSet<&String> = obs
            .roles
            .values()
            .filter(|r| owner_id(&r.tags, stack).is_some())
            .flat_map(|r| r.attached.iter())
            .collect();
        let candidates: Vec<(String, String)> = obs
            .policies
            .values()
            .filter(|p| {
                wanted.contains_key(&p.name)
                    || owned_role_arns.contains(&p.arn)
                    || p.path.starts_with("/stackwarden/")
            })
            .map(|p| (p.name.clone(), p.arn.clone()))
            .collect();
        let reads = candidates.iter().map(|(name, arn)| {
            let iam = ctx.iam.clone();
            async move {
                let out = iam
                    .list_policy_tags()
                    .policy_arn(arn)
                    .send()
                    .await
                    .map_err(aws_error("iam", "ListPolicyTags"))?;
                Ok::<_, Error>((name.clone(), tag_map(out.tags())))
            }
        });
        for res in futures::future::join_all(reads).await {
            let (name, tags) = res?;
            if let Some(p) = obs.policies.get_mut(&name) {
                p.tags = tags;
            }
        }

        // Instance profiles: the desired ones and those holding our roles.
        profile_names.extend(desired_names(desired, Kind::IamInstanceProfile).into_keys());
        let reads = profile_names.into_iter().map(|name| {
            let iam = ctx.iam.clone();
            async move {
                match iam
                    .get_instance_profile()
                    .instance_profile_name(&name)
                    .send()
                    .await
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
                    Err(e) if is_no_such_entity(&e) => Ok(None),
                    Err(e) => Err(aws_error("iam", "GetInstanceProfile")(e)),
                }
            }
        });
        for res in futures::future::join_all(reads).await {
            if let Some(p) = res? {
                obs.profiles.insert(p.name.clone(), p);
            }
        }
        Ok(obs)
    }

    fn outputs(&self, desired: &DesiredState, obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        let mut out = Vec::new();
        for r in desired.resources.values() {
            let name = aws_name(desired, r);
            let adopted = r.adopt.as_deref() == Some(name.as_str());
            let mine = |tags: &BTreeMap<String, String>| {
                adopted || owned_by(tags, desired.stack_name(), &r.id)
            };
            let values: Option<Vec<(&str, String)>> = match r.id.kind {
                Kind::IamRole => obs.roles.get(&name).filter(|o| mine(&o.tags)).map(|o| {
                    vec![
                        ("name", o.name.clone()),
                        ("arn", o.arn.clone()),
                        ("id", o.id.clone()),
                    ]
                }),
                Kind::IamPolicy => obs
                    .policies
                    .get(&name)
                    .filter(|o| mine(&o.tags))
                    .map(|o| vec![("name", o.name.clone()), ("arn", o.arn.clone())]),
                Kind::IamInstanceProfile => obs
                    .profiles
                    .get(&name)
                    .filter(|o| mine(&o.tags))
                    .map(|o| vec![("name", o.name.clone()), ("arn", o.arn.clone())]),
                _ => None,
            };
            if let Some(v) = values {
                out.push((
                    r.id.clone(),
                    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                ));
            }
        }
        out
    }

    fn diff(
        &self,
        desired: &DesiredState,
        r: &Resource,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        match &r.spec {
            Spec::IamRole(s) => self.diff_role(desired, r, s, obs, refs),
            Spec::IamPolicy(s) => self.diff_policy(desired, r, s, obs, refs),
            Spec::IamInstanceProfile(s) => self.diff_profile(desired, r, s, obs, refs),
            _ => Ok(None),
        }
    }

    fn removed(&self, desired: &DesiredState, obs: &Observed, prune: bool) -> Vec<Change<Op>> {
        let stack = desired.stack_name();
        let action = if prune {
            Action::Delete
        } else {
            Action::Orphan
        };
        let mut out = Vec::new();
        let profiles = desired_names(desired, Kind::IamInstanceProfile);
        let roles = desired_names(desired, Kind::IamRole);
        let policies = desired_names(desired, Kind::IamPolicy);
        for p in obs.profiles.values() {
            let Some(id) = owner_id(&p.tags, stack) else {
                continue;
            };
            if is_desired(&profiles, stack, &p.name, &p.tags) {
                continue;
            }
            let mut c = Change::new(id, action, format!("instance profile {}", p.name));
            if prune {
                for role in &p.roles {
                    c.op(Op::RemoveRoleFromProfile {
                        profile: p.name.clone(),
                        role: role.clone(),
                    });
                }
                c.op(Op::DeleteProfile {
                    profile: p.name.clone(),
                });
            }
            out.push(c);
        }
        for r in obs.roles.values() {
            let Some(id) = owner_id(&r.tags, stack) else {
                continue;
            };
            if is_desired(&roles, stack, &r.name, &r.tags) {
                continue;
            }
            let mut c = Change::new(id, action, format!("role {}", r.name));
            if prune {
                for profile in &r.profiles {
                    c.op(Op::RemoveRoleFromProfile {
                        profile: profile.clone(),
                        role: r.name.clone(),
                    });
                }
                for arn in &r.attached {
                    c.op(Op::DetachPolicy {
                        role: r.name.clone(),
                        arn: arn.clone(),
                    });
                }
                for name in r.inline.keys() {
                    c.op(Op::DeleteInline {
                        role: r.name.clone(),
                        name: name.clone(),
                    });
                }
                c.op(Op::DeleteRole {
                    role: r.name.clone(),
                });
            }
            out.push(c);
        }
        for p in obs.policies.values() {
            let Some(id) = owner_id(&p.tags, stack) else {
                continue;
            };
            if is_desired(&policies, stack, &p.name, &p.tags) {
                continue;
            }
            let mut c = Change::new(id, action, format!("policy {}", p.name));
            if prune {
                for v in p.versions.iter().filter(|v| !v.is_default) {
                    c.op(Op::DeletePolicyVersion {
                        arn: p.arn.clone(),
                        version: v.id.clone(),
                    });
                }
                c.op(Op::DeletePolicy { arn: p.arn.clone() });
            }
            out.push(c);
        }
        out
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        let iam = &ctx.iam;
        match op {
            Op::CreateRole {
                name,
                path,
                trust,
                description,
                max_session_seconds,
                tags,
            } => {
                let out = iam
                    .create_role()
                    .role_name(name)
                    .path(path)
                    .assume_role_policy_document(trust.to_string())
                    .set_description(description.clone())
                    .set_max_session_duration(*max_session_seconds)
                    .set_tags(Some(tag_list(tags)))
                    .send()
                    .await
                    .map_err(aws_error("iam", "CreateRole"))?;
                let role = out
                    .role()
                    .ok_or_else(|| Error::Invalid("CreateRole returned no role".into()))?;
                return Ok(Some(Outputs::from([
                    ("name".into(), role.role_name().to_string()),
                    ("arn".into(), role.arn().to_string()),
                    ("id".into(), role.role_id().to_string()),
                ])));
            }
            Op::UpdateTrust { role, trust } => {
                iam.update_assume_role_policy()
                    .role_name(role)
                    .policy_document(trust.to_string())
                    .send()
                    .await
                    .map_err(aws_error("iam", "UpdateAssumeRolePolicy"))?;
            }
            Op::UpdateRole {
                role,
                description,
                max_session_seconds,
            } => {
                iam.update_role()
                    .role_name(role)
                    .set_description(description.clone())
                    .set_max_session_duration(*max_session_seconds)
                    .send()
                    .await
                    .map_err(aws_error("iam", "UpdateRole"))?;
            }
            Op::AttachPolicy { role, arn } => {
                iam.attach_role_policy()
                    .role_name(role)
                    .policy_arn(arn)
                    .send()
                    .await
                    .map_err(aws_error("iam", "AttachRolePolicy"))?;
            }
            Op::DetachPolicy { role, arn } => gone_is_fine(
                iam.detach_role_policy()
                    .role_name(role)
                    .policy_arn(arn)
                    .send()
                    .await,
                "DetachRolePolicy",
            )?,
            Op::PutInline {
                role,
                name,
                document,
            } => {
                iam.put_role_policy()
                    .role_name(role)
                    .policy_name(name)
                    .policy_document(document.to_string())
                    .send()
                    .await
                    .map_err(aws_error("iam", "PutRolePolicy"))?;
            }
            Op::DeleteInline { role, name } => gone_is_fine(
                iam.delete_role_policy()
                    .role_name(role)
                    .policy_name(name)
                    .send()
                    .await,
                "DeleteRolePolicy",
            )?,
            Op::TagRole { role, tags } => {
                iam.tag_role()
                    .role_name(role)
                    .set_tags(Some(tag_list(tags)))
                    .send()
                    .await
                    .map_err(aws_error("iam", "TagRole"))?;
            }
            Op::UntagRole { role, keys } => {
                iam.untag_role()
                    .role_name(role)
                    .set_tag_keys(Some(keys.clone()))
                    .send()
                    .await
                    .map_err(aws_error("iam", "UntagRole"))?;
            }
            Op::DeleteRole { role } => {
                gone_is_fine(iam.delete_role().role_name(role).send().await, "DeleteRole")?
            }
            Op::CreatePolicy {
                name,
                path,
                description,
                document,
                tags,
            } => {
                let out = iam
                    .create_policy()
                    .policy_name(name)
                    .path(path)
                    .policy_document(document.to_string())
                    .set_description(description.clone())
                    .set_tags(Some(tag_list(tags)))
                    .send()
                    .await
                    .map_err(aws_error("iam", "CreatePolicy"))?;
                let p = out
                    .policy()
                    .ok_or_else(|| Error::Invalid("CreatePolicy returned no policy".into()))?;
                return Ok(Some(Outputs::from([
                    ("name".into(), p.policy_name().unwrap_or(name).to_string()),
                    ("arn".into(), p.arn().unwrap_or_default().to_string()),
                ])));
            }
            Op::DeletePolicyVersion { arn, version } => gone_is_fine(
                iam.delete_policy_version()
                    .policy_arn(arn)
                    .version_id(version)
                    .send()
                    .await,
                "DeletePolicyVersion",
            )?,
            Op::CreatePolicyVersion { arn, document } => {
                iam.create_policy_version()
                    .policy_arn(arn)
                    .policy_document(document.to_string())
                    .set_as_default(true)
                    .send()
                    .await
                    .map_err(aws_error("iam", "CreatePolicyVersion"))?;
            }
            Op::TagPolicy { arn, tags } => {
                iam.tag_policy()
                    .policy_arn(arn)
                    .set_tags(Some(tag_list(tags)))
                    .send()
                    .await
                    .map_err(aws_error("iam", "TagPolicy"))?;
            }
            Op::UntagPolicy { arn, keys } => {
                iam.untag_policy()
                    .policy_arn(arn)
                    .set_tag_keys(Some(keys.clone()))
                    .send()
                    .await
                    .map_err(aws_error("iam", "UntagPolicy"))?;
            }
            Op::DeletePolicy { arn } => {
                // A policy attached to a role outside the stack cannot be deleted; IAM says so.
                gone_is_fine(
                    iam.delete_policy().policy_arn(arn).send().await,
                    "DeletePolicy",
                )?
            }
            Op::CreateProfile { name, path, tags } => {
                let out = iam
                    .create_instance_profile()
                    .instance_profile_name(name)
                    .path(path)
                    .set_tags(Some(tag_list(tags)))
                    .send()
                    .await
                    .map_err(aws_error("iam", "CreateInstanceProfile"))?;
                let p = out.instance_profile().ok_or_else(|| {
                    Error::Invalid("CreateInstanceProfile returned nothing".into())
                })?;
                return Ok(Some(Outputs::from([
                    ("name".into(), p.instance_profile_name().to_string()),
                    ("arn".into(), p.arn().to_string()),
                ])));
            }
            Op::AddRoleToProfile { profile, role } => {
                iam.add_role_to_instance_profile()
                    .instance_profile_name(profile)
                    .role_name(role)
                    .send()
                    .await
                    .map_err(aws_error("iam", "AddRoleToInstanceProfile"))?;
            }
            Op::RemoveRoleFromProfile { profile, role } => gone_is_fine(
                iam.remove_role_from_instance_profile()
                    .instance_profile_name(profile)
                    .role_name(role)
                    .send()
                    .await,
                "RemoveRoleFromInstanceProfile",
            )?,
            Op::TagProfile { profile, tags } => {
                iam.tag_instance_profile()
                    .instance_profile_name(profile)
                    .set_tags(Some(tag_list(tags)))
                    .send()
                    .await
                    .map_err(aws_error("iam", "TagInstanceProfile"))?;
            }
            Op::UntagProfile { profile, keys } => {
                iam.untag_instance_profile()
                    .instance_profile_name(profile)
                    .set_tag_keys(Some(keys.clone()))
                    .send()
                    .await
                    .map_err(aws_error("iam", "UntagInstanceProfile"))?;
            }
            Op::DeleteProfile { profile } => gone_is_fine(
                iam.delete_instance_profile()
                    .instance_profile_name(profile)
                    .send()
                    .await,
                "DeleteInstanceProfile",
            )?,
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            ResourceId::new(Kind::IamPolicy, "p"),
            Outputs::from([("arn".into(), "arn:aws:iam::1:policy/s-p".into())]),
        );
        refs
    }

    /// The role as stackwarden would have left it.
    fn observed_role(r: &RoleSpec) -> Observed {
        let mut o = Observed::default();
        o.roles.insert(
            "s-prometheus".into(),
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
            },
        );
        o
    }

    fn diff_role(spec: RoleSpec, obs: &Observed) -> Result<Option<Change<Op>>> {
        let r = resource(Kind::IamRole, "prometheus", Spec::IamRole(spec));
        let d = desired(vec![r.clone()]);
        IamController.diff(&d, &r, obs, &refs())
    }

    #[test]
    fn a_role_as_desired_has_no_change() {
        let spec = role_spec("");
        assert!(diff_role(spec.clone(), &observed_role(&spec))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_missing_role_is_created_with_its_policies_and_tags() {
        let c = diff_role(role_spec(""), &Observed::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create);
        assert!(
            matches!(&c.ops[0], Op::CreateRole { name, tags, .. } if name == "s-prometheus" && tags == &owned_tags("iam.role.prometheus"))
        );
        assert_eq!(
            c.ops
                .iter()
                .filter(|o| matches!(o, Op::AttachPolicy { .. }))
                .count(),
            2
        );
        assert_eq!(
            c.ops
                .iter()
                .filter(|o| matches!(o, Op::PutInline { .. }))
                .count(),
            1
        );
    }

    #[test]
    fn trust_policy_drift_is_corrected() {
        let spec = role_spec("");
        let mut obs = observed_role(&spec);
        obs.roles.get_mut("s-prometheus").unwrap().trust = json!({"Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]});
        let c = diff_role(spec, &obs).unwrap().unwrap();
        assert!(matches!(&c.ops[..], [Op::UpdateTrust { .. }]));
        assert_eq!(c.fields[0].field, "trust");
    }

    #[test]
    fn a_deleted_trust_principal_is_a_note_until_a_role_of_its_arn_exists_again() {
        let spec = role_spec("");
        let mut spec_with_ci = spec.clone();
        spec_with_ci.loaded.trust = Some(
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"AWS": "arn:aws:iam::1:role/ci"}}]}),
        );
        let mut obs = observed_role(&spec);
        obs.roles.get_mut("s-prometheus").unwrap().trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"AWS": "AROAEXAMPLEID1234567"}}]});
        let c = diff_role(spec_with_ci.clone(), &obs).unwrap().unwrap();
        assert!(c.ops.is_empty(), "{:?}", c.ops);
        assert!(
            c.notes[0].contains("arn:aws:iam::1:role/ci"),
            "{:?}",
            c.notes
        );
        // The role exists again: the trust is written back.
        obs.roles.insert(
            "ci".into(),
            ObservedRole {
                name: "ci".into(),
                arn: "arn:aws:iam::1:role/ci".into(),
                ..Default::default()
            },
        );
        let c = diff_role(spec_with_ci, &obs).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::UpdateTrust { .. }]),
            "{:?}",
            c.ops
        );
    }

    #[test]
    fn detached_and_extra_managed_policies_are_corrected() {
        let spec = role_spec("");
        let mut obs = observed_role(&spec);
        let role = obs.roles.get_mut("s-prometheus").unwrap();
        role.attached.remove("arn:aws:iam::1:policy/s-p");
        role.attached.insert("arn:aws:iam::aws:policy/Extra".into());
        let c = diff_role(spec, &obs).unwrap().unwrap();
        assert!(c.ops.iter().any(
            |o| matches!(o, Op::AttachPolicy { arn, .. } if arn == "arn:aws:iam::1:policy/s-p")
        ));
        assert!(c.ops.iter().any(
            |o| matches!(o, Op::DetachPolicy { arn, .. } if arn == "arn:aws:iam::aws:policy/Extra")
        ));
    }

    #[test]
    fn inline_policies_edited_added_or_extra_are_corrected() {
        let spec = role_spec("");
        let mut obs = observed_role(&spec);
        let role = obs.roles.get_mut("s-prometheus").unwrap();
        role.inline.insert("inline".into(), doc("s3:*"));
        role.inline.insert("extra".into(), doc("ec2:*"));
        let c = diff_role(spec.clone(), &obs).unwrap().unwrap();
        assert!(c
            .ops
            .iter()
            .any(|o| matches!(o, Op::PutInline { name, .. } if name == "inline")));
        assert!(c
            .ops
            .iter()
            .any(|o| matches!(o, Op::DeleteInline { name, .. } if name == "extra")));

        // The same policy spelled differently by IAM is no drift.
        let mut obs = observed_role(&spec);
        obs.roles.get_mut("s-prometheus").unwrap().inline.insert(
            "inline".into(),
            json!({"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": ["S3:GetObject"], "Resource": ["*"]}}),
        );
        assert!(diff_role(spec, &obs).unwrap().is_none());
    }

    #[test]
    fn tags_are_restored_and_extra_ones_removed_but_aws_tags_kept() {
        let spec = role_spec("");
        let mut obs = observed_role(&spec);
        let role = obs.roles.get_mut("s-prometheus").unwrap();
        role.tags.remove("team");
        role.tags.insert("extra".into(), "x".into());
        role.tags
            .insert("aws:cloudformation:stack-name".into(), "x".into());
        let c = diff_role(spec, &obs).unwrap().unwrap();
        assert!(c.ops.iter().any(|o| matches!(o, Op::TagRole { tags, .. } if tags.get("team").map(String::as_str) == Some("sre"))));
        assert!(c.ops.iter().any(
            |o| matches!(o, Op::UntagRole { keys, .. } if keys == &vec!["extra".to_string()])
        ));
    }

    #[test]
    fn description_and_session_duration_drift_is_corrected() {
        let mut spec = role_spec("description = \"d\"");
        spec.loaded.max_session_seconds = Some(7200);
        let obs = observed_role(&spec);
        let c = diff_role(spec, &obs).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::UpdateRole { description: Some(d), max_session_seconds: Some(7200), .. }] if d == "d")
        );
    }

    #[test]
    fn a_role_without_our_tags_is_not_ours_unless_adopted() {
        let spec = role_spec("");
        let mut obs = observed_role(&spec);
        obs.roles.get_mut("s-prometheus").unwrap().tags.clear();
        let err = diff_role(spec.clone(), &obs).unwrap_err();
        assert!(matches!(err, Error::NotOwned(_)), "{err}");

        let mut r = resource(Kind::IamRole, "prometheus", Spec::IamRole(spec));
        r.adopt = Some("s-prometheus".into());
        let d = desired(vec![r.clone()]);
        let c = IamController.diff(&d, &r, &obs, &refs()).unwrap().unwrap();
        assert!(c.notes[0].contains("adopting"));
        assert!(c
            .ops
            .iter()
            .any(|o| matches!(o, Op::TagRole { tags, .. } if tags.contains_key(TAG_ID))));
    }

    #[test]
    fn a_role_of_another_stack_is_never_adopted() {
        let spec = role_spec("");
        let mut obs = observed_role(&spec);
        let role = obs.roles.get_mut("s-prometheus").unwrap();
        role.tags.insert(TAG_STACK.into(), "other".into());
        let mut r = resource(Kind::IamRole, "prometheus", Spec::IamRole(spec));
        r.adopt = Some("s-prometheus".into());
        let d = desired(vec![r.clone()]);
        let err = IamController.diff(&d, &r, &obs, &refs()).unwrap_err();
        assert!(
            matches!(err, Error::NotOwned(ref m) if m.contains("belongs to the stack `other`")),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_reference_shows_as_known_after_apply() {
        let r = resource(Kind::IamRole, "prometheus", Spec::IamRole(role_spec("")));
        let d = desired(vec![r.clone()]);
        let c = IamController
            .diff(&d, &r, &Observed::default(), &Refs::default())
            .unwrap()
            .unwrap();
        assert!(c.fields.iter().any(|f| f
            .after
            .as_deref()
            .is_some_and(|a| a.contains(KNOWN_AFTER_APPLY))));
    }

    fn policy_fixture(versions: usize) -> (Resource, Observed) {
        let mut spec: PolicySpec = toml::from_str("document = \"p.json\"").unwrap();
        spec.loaded = Some(doc("aps:RemoteWrite"));
        let r = resource(Kind::IamPolicy, "p", Spec::IamPolicy(spec));
        let mut o = Observed::default();
        o.policies.insert(
            "s-p".into(),
            ObservedPolicy {
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
            },
        );
        (r, o)
    }

    #[test]
    fn a_policy_as_desired_has_no_change() {
        let (r, o) = policy_fixture(1);
        assert!(IamController
            .diff(&desired(vec![r.clone()]), &r, &o, &Refs::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_changed_document_makes_a_new_default_version() {
        let (r, mut o) = policy_fixture(2);
        o.policies.get_mut("s-p").unwrap().versions[1].document = doc("aps:*");
        let c = IamController
            .diff(&desired(vec![r.clone()]), &r, &o, &Refs::default())
            .unwrap()
            .unwrap();
        assert!(matches!(&c.ops[..], [Op::CreatePolicyVersion { .. }]));
    }

    #[test]
    fn the_oldest_version_is_deleted_before_the_five_version_limit() {
        let (r, mut o) = policy_fixture(5);
        o.policies.get_mut("s-p").unwrap().versions[4].document = doc("aps:*");
        let c = IamController
            .diff(&desired(vec![r.clone()]), &r, &o, &Refs::default())
            .unwrap()
            .unwrap();
        assert!(
            matches!(&c.ops[..], [Op::DeletePolicyVersion { version, .. }, Op::CreatePolicyVersion { .. }] if version == "v1")
        );
    }

    #[test]
    fn policy_tag_drift_is_corrected() {
        let (r, mut o) = policy_fixture(1);
        o.policies
            .get_mut("s-p")
            .unwrap()
            .tags
            .insert("extra".into(), "1".into());
        let c = IamController
            .diff(&desired(vec![r.clone()]), &r, &o, &Refs::default())
            .unwrap()
            .unwrap();
        assert!(
            matches!(&c.ops[..], [Op::UntagPolicy { keys, .. }] if keys == &vec!["extra".to_string()])
        );
    }

    #[test]
    fn an_instance_profile_gets_its_role_back_and_its_tags() {
        let spec: InstanceProfileSpec = toml::from_str("role = \"s-prometheus\"").unwrap();
        let r = resource(
            Kind::IamInstanceProfile,
            "prometheus",
            Spec::IamInstanceProfile(spec),
        );
        let mut o = Observed::default();
        o.profiles.insert(
            "s-prometheus".into(),
            ObservedProfile {
                name: "s-prometheus".into(),
                arn: "arn".into(),
                roles: vec!["other".into()],
                tags: BTreeMap::new(),
            },
        );
        let mut tags = owned_tags("iam.instance_profile.prometheus");
        tags.remove("team");
        o.profiles.get_mut("s-prometheus").unwrap().tags = tags;
        let c = IamController
            .diff(&desired(vec![r.clone()]), &r, &o, &Refs::default())
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                &c.ops[..],
                [Op::TagProfile { .. }, Op::RemoveRoleFromProfile { role: old, .. }, Op::AddRoleToProfile { role: new, .. }]
                    if old == "other" && new == "s-prometheus"
            ),
            "tags first, so the profile is the stack's before it changes: {:?}",
            c.ops
        );
    }

    #[test]
    fn owned_objects_no_longer_desired_are_orphaned_or_deleted() {
        let spec = role_spec("");
        let obs = observed_role(&spec);
        let d = desired(vec![]);
        let orphans = IamController.removed(&d, &obs, false);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].action, Action::Orphan);
        assert!(orphans[0].ops.is_empty());
        let deletes = IamController.removed(&d, &obs, true);
        assert_eq!(deletes[0].action, Action::Delete);
        assert!(matches!(deletes[0].ops.last(), Some(Op::DeleteRole { .. })));
        // Detach and delete inline policies first: IAM refuses to delete a role that has them.
        assert!(deletes[0]
            .ops
            .iter()
            .any(|o| matches!(o, Op::DetachPolicy { .. })));
        assert!(deletes[0]
            .ops
            .iter()
            .any(|o| matches!(o, Op::DeleteInline { .. })));
    }

    #[test]
    fn objects_of_other_stacks_are_never_removed() {
        let spec = role_spec("");
        let mut obs = observed_role(&spec);
        obs.roles
            .get_mut("s-prometheus")
            .unwrap()
            .tags
            .insert(TAG_STACK.into(), "other".into());
        assert!(IamController
            .removed(&desired(vec![]), &obs, true)
            .is_empty());
    }
}
