//! The managed-object layer: what every kind of AWS object shares, written once.
//!
//! A kind of AWS object (an AMP workspace, a rule groups namespace, ...) implements
//! [`ManagedObject`]: its batched read, a pure diff, and its API calls. [`Managed`] turns it
//! into a [`Controller`] and owns the lifecycle around those calls, as crossplane-runtime's
//! managed reconciler does:
//!
//! - which observed object a node manages: adopted by id, or found by its ownership tags (or
//!   by the kind's own [`ManagedObject::find`] for parts found inside their parent);
//! - create versus update, decided from what observe found, never from memory; an adopted
//!   object that does not exist is an error, never a create;
//! - for kinds whose name is the identity ([`ManagedObject::NAMED`], IAM), refusing an object
//!   of the node's name that is neither the node's nor adopted;
//! - the tag diff (ownership tags, the stack's and the node's own) and its two calls, made
//!   before any other change of the object; an adopted object keeps its other tags;
//! - readiness: an object still converging answers [`Error::Waiting`] instead of being polled,
//!   so nothing else waits for it;
//! - objects the stack owns that no node manages: orphaned, or deleted under
//!   `deletion_policy = "delete"` / `--prune`; a part dropped from a composite that is still
//!   desired is deleted (it is an edit of the composite), unless it holds data
//!   ([`ManagedObject::DELETES_DROPPED`]: a data volume);
//! - what must go before a delete ([`ManagedObject::teardown`]: a role's policies), applied as
//!   updates first; "already gone" on delete is success;
//! - plan lines made from the very operations that are applied: every [`ManagedObject::Update`]
//!   describes itself, so a field cannot be shown without being applied, or applied without
//!   being shown.
//!
//! # The contract a kind keeps
//! `observe`, `create`, `update`, `tag`, `untag` and `delete` never wait for AWS to finish
//! anything; each is idempotent enough that running it again after a crash is safe (the layer
//! discovers before every create, so a create runs only when no object was found). `diff` and
//! `readiness` are pure.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::change::{Action, Change, FieldChange};
use crate::controller::{Context, Controller};
use crate::desired::{DesiredState, Resource, TAG_ID, TAG_STACK};
use crate::error::{Error, Result};
use crate::model::{Kind, Outputs, Refs, ResourceId};
use crate::tags::{self, owned_by, owner_id, Tags};

/// How long to wait before looking again at an object that is converging, when the kind has no
/// better idea: short, since `reconcile --once` waits for it.
pub const LOOK_AGAIN: Duration = Duration::from_secs(2);

/// Where an observed object stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Usable and comparable with the desired state.
    Ready,
    /// Still converging (CREATING, UPDATING, a check under way): look again after the time.
    Waiting(String, Duration),
}

/// One in-place change of an object, which also says what it changes (its plan lines).
pub trait Describe {
    fn fields(&self) -> Vec<FieldChange>;

    /// Attributes of the object this change gives new values that are known before it is
    /// made (a launch template's next version number): the plan of what references them
    /// shows these ([`Change::outputs`]).
    fn outputs(&self) -> Outputs {
        Outputs::new()
    }
}

/// One kind of AWS object.
#[async_trait]
pub trait ManagedObject: Send + Sync + 'static {
    /// What a node wants, references rendered.
    type Desired: fmt::Debug + Clone + Send + Sync + 'static;
    /// One object as read.
    type Observed: fmt::Debug + Clone + Send + Sync + 'static;
    /// One in-place change.
    type Update: Describe + fmt::Debug + Clone + Send + Sync + 'static;

    const KIND: Kind;
    /// What the object is called in plans: `workspace`, `rule groups namespace`.
    const NOUN: &'static str;
    /// Whether the object's name is its identity (IAM): its node finds the object of its name
    /// ([`ManagedObject::find`]), and one found there that neither carries the node's tags nor
    /// is adopted by it belongs to someone else: an error, never written, its attributes never
    /// used.
    const NAMED: bool = false;
    /// Whether a part dropped from a composite that is still desired is deleted (a rule
    /// groups namespace) or, holding data, orphaned like a removed table unless `--prune` or
    /// `deletion_policy = "delete"` (a data volume).
    const DELETES_DROPPED: bool = true;

    /// Pure: what `node` wants, with the references known now. [`Error::Waiting`] or
    /// [`Error::Dependency`] when something it needs is not there yet.
    fn desired(
        &self,
        desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<Self::Desired>;

    /// Batched reads: every object of this kind that the stack owns or its nodes adopt.
    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<Self::Observed>>;

    /// The object's identity in AWS (shown in plans, compared to `adopt`).
    fn id(&self, o: &Self::Observed) -> String;

    /// Its tags; `None` for objects AWS cannot tag (they belong to their parent).
    fn tags<'o>(&self, o: &'o Self::Observed) -> Option<&'o Tags>;

    /// Whether the object is on its way out (a workspace DELETING): no node manages it by its
    /// tags and it is nobody's removal, so a new one is made beside it.
    fn is_leaving(&self, _o: &Self::Observed) -> bool {
        false
    }

    /// The node an observed object belongs to when it is this stack's (by its tags, by
    /// default). Only such objects are ever deleted or reported as orphans.
    fn owner(&self, desired: &DesiredState, o: &Self::Observed) -> Option<ResourceId> {
        if self.is_leaving(o) {
            return None;
        }
        self.tags(o)
            .and_then(|t| owner_id(t, desired.stack_name()))
            .filter(|id| id.kind == Self::KIND)
    }

    /// The object `node` manages: by default the one adopted by id, or the one whose
    /// [`owner`](ManagedObject::owner) is the node.
    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [Self::Observed],
    ) -> Option<&'o Self::Observed> {
        match &node.adopt {
            Some(id) => observed.iter().find(|o| &self.id(o) == id),
            None => observed
                .iter()
                .find(|o| self.owner(desired, o).as_ref() == Some(&node.id)),
        }
    }

    /// Attribute values references may use.
    fn outputs(&self, _o: &Self::Observed) -> Outputs {
        Outputs::new()
    }

    /// Pure: whether the object can be compared now. An error for an object that failed for
    /// good (a workspace CREATION_FAILED, a definition the service rejected).
    fn readiness(&self, _want: &Self::Desired, _have: &Self::Observed) -> Result<Readiness> {
        Ok(Readiness::Ready)
    }

    /// Pure: the in-place changes from `have` to `want` (tags apart: the layer does those).
    fn diff(&self, want: &Self::Desired, have: &Self::Observed) -> Vec<Self::Update>;

    /// The tags the node's object should carry besides the ownership and stack tags.
    fn own_tags(&self, _want: &Self::Desired) -> Tags {
        Tags::new()
    }

    /// Whether the layer keeps the object's tags as desired (ownership tags included). Some
    /// kinds leave an adopted object's tags alone unless the desired state sets some.
    fn writes_tags(&self, _node: &Resource, _want: &Self::Desired) -> bool {
        true
    }

    /// Whether the object keeps the tags it has besides the desired ones (its previous
    /// owner's): an adopted object does.
    fn keeps_other_tags(&self, _desired: &DesiredState, node: &Resource) -> bool {
        node.adopt.is_some()
    }

    /// Pure: what a person should know about the object that no write changes (a setting
    /// fixed at creation that differs).
    fn notes(&self, _want: &Self::Desired, _have: &Self::Observed) -> Vec<String> {
        Vec::new()
    }

    /// The plan lines of a create.
    fn create_fields(&self, want: &Self::Desired) -> Vec<FieldChange>;

    /// The object's name in a create's plan line (`workspace <alias>`).
    fn label(&self, want: &Self::Desired) -> String;

    /// The tags of the object of `want`'s name, read directly (not from the pass's listing);
    /// `None` (or an error, such as "not found") when it cannot be read, and always for a kind
    /// whose names are not unique. Asked only after a create was refused as a name taken
    /// ([`name_taken`]); the refusal stands unless the object read carries the node's tags.
    async fn named_tags(&self, _ctx: &Context, _want: &Self::Desired) -> Result<Option<Tags>> {
        Ok(None)
    }

    /// Creates the object with its tags in the same call. Returns its attributes.
    async fn create(&self, ctx: &Context, want: &Self::Desired, tags: &Tags) -> Result<Outputs>;

    /// Applies one in-place change. Returns the attributes it changed, if any (a launch
    /// template's new latest version), for what uses them in the same pass.
    async fn update(
        &self,
        ctx: &Context,
        have: &Self::Observed,
        change: &Self::Update,
    ) -> Result<Option<Outputs>>;

    async fn tag(&self, _ctx: &Context, _have: &Self::Observed, _set: &Tags) -> Result<()> {
        Ok(())
    }

    async fn untag(&self, _ctx: &Context, _have: &Self::Observed, _keys: &[String]) -> Result<()> {
        Ok(())
    }

    /// Pure: whether an object carrying the tags of a node that manages another one is a
    /// leftover of an interrupted create, deleted rather than reported as orphaned.
    fn is_stray_duplicate(&self, _o: &Self::Observed) -> bool {
        false
    }

    /// Pure: what must go before the object can be deleted (an IAM role's attached policies),
    /// applied in order before [`ManagedObject::delete`]. Each tolerates its target being gone.
    fn teardown(&self, _have: &Self::Observed) -> Vec<Self::Update> {
        Vec::new()
    }

    /// Deletes the object. An object already gone may fail with any "not found" code: the
    /// layer counts that as done.
    async fn delete(&self, ctx: &Context, have: &Self::Observed) -> Result<()>;
}

/// The operations [`Managed`] applies.
pub enum Op<K: ManagedObject> {
    Create {
        want: K::Desired,
        tags: Tags,
    },
    Update {
        have: K::Observed,
        change: K::Update,
    },
    Tag {
        have: K::Observed,
        set: Tags,
    },
    Untag {
        have: K::Observed,
        keys: Vec<String>,
    },
    Delete {
        have: K::Observed,
    },
}

impl<K: ManagedObject> fmt::Debug for Op<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create { want, tags } => write!(f, "Create {} {want:?} {tags:?}", K::NOUN),
            Op::Update { have, change } => write!(f, "Update {} {have:?}: {change:?}", K::NOUN),
            Op::Tag { have, set } => write!(f, "Tag {} {have:?}: {set:?}", K::NOUN),
            Op::Untag { have, keys } => write!(f, "Untag {} {have:?}: {keys:?}", K::NOUN),
            Op::Delete { have } => write!(f, "Delete {} {have:?}", K::NOUN),
        }
    }
}

/// Error codes that mean "no such object", whatever the service: a delete that gets one has
/// nothing left to do.
const GONE: &[&str] = &[
    "ResourceNotFoundException",
    "NoSuchEntity",
    "NotFoundException",
    "InvalidGroup.NotFound",
    "InvalidVolume.NotFound",
    "InvalidInstanceID.NotFound",
    "InvalidLaunchTemplateName.NotFoundException",
    "InvalidLaunchTemplateId.NotFound",
    "LoadBalancerNotFound",
    "TargetGroupNotFound",
    "ListenerNotFound",
    "ValidationError.NotFound",
];

/// Whether an error says the object does not exist.
pub fn is_gone(e: &Error) -> bool {
    e.code().is_some_and(|c| GONE.contains(&c))
}

/// How long before trying again to delete an object something still uses.
const IN_USE: Duration = Duration::from_secs(10);

/// Error codes that mean "something still uses the object": EC2's `DependencyViolation` (AWS
/// releases a deleted load balancer's network interfaces, and so its security groups, minutes
/// after the load balancer is gone), Elastic Load Balancing's `ResourceInUse` (a target group a
/// listener still forwards to).
const IN_USE_CODES: &[&str] = &["DependencyViolation", "ResourceInUse"];

/// What a delete's answer means: done when the object is already gone; waiting while something
/// still uses it ([`IN_USE_CODES`]); the error otherwise.
fn deleted(noun: &str, id: &str, result: Result<()>) -> Result<()> {
    match result {
        Err(e) if is_gone(&e) => Ok(()),
        Err(e) if e.code().is_some_and(|c| IN_USE_CODES.contains(&c)) => Err(Error::waiting(
            format!("{noun} {id} is still in use ({e}); it is deleted once nothing uses it"),
            IN_USE,
        )),
        other => other,
    }
}

/// The client token of a create AWS makes idempotent (RunInstances, CreateVolume aside, the
/// AMP and Managed Grafana workspaces): derived from what the request asks for, so the same
/// request carries the same token. A create repeated because the pass's listing did not show
/// the first one yet (AWS's listings are eventually consistent) then answers what the first
/// made instead of making a second. `parts` name the object (stack and node) and everything
/// the request sets: a changed request is a new token, never AWS's parameter mismatch.
/// Valid wherever AWS takes one: 35 printable ASCII characters.
pub fn client_token(parts: &[&str]) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    format!("sw-{}", &hex::encode(hash.finalize())[..32])
}

/// How many stale client tokens a create steps past (an answer naming an object deleted
/// since: one per object of the same request deleted while AWS keeps its token).
pub const STALE_TOKENS: usize = 8;

/// The hour a client token is made in, as a part of it for the Managed Grafana workspace,
/// whose create is not checked for a stale answer: AWS documents no end to such a token, so a
/// workspace deleted by hand and made again with the same request could be answered the
/// deleted one. With the hour in the token, it is made again within the hour at worst, while
/// the repeats a lagging listing causes (seconds apart) share their token.
pub fn token_hour() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs() / 3600).to_string()
}

/// How long before looking again for an object an earlier run made that is not yet listed.
const NOT_YET_LISTED: Duration = Duration::from_secs(2);

/// What a create refused as a name taken means, given the tags of the object of that name
/// (`found`, read directly after the refusal): one carrying the node's own ownership tags was
/// made by an earlier run (killed before it saw the answer) and is not yet in the listing the
/// pass read, so it is looked for again; anyone else's, or one that could not be read, is the
/// error.
pub fn name_taken(what: &str, found: Option<&Tags>, tags: &Tags, e: Error) -> Error {
    let ours = found.is_some_and(|found| {
        [TAG_STACK, TAG_ID]
            .iter()
            .all(|k| found.get(*k).is_some() && found.get(*k) == tags.get(*k))
    });
    if ours {
        Error::waiting(
            format!("{what} was made by an earlier run and is not listed yet: looked for again"),
            NOT_YET_LISTED,
        )
    } else {
        e
    }
}

/// The node of a table kind that manages the object with this id and these tags: the one
/// adopting the id, or the one the ownership tags name. How a part finds its parent's node.
pub fn managing_node(
    desired: &DesiredState,
    kind: Kind,
    id: &str,
    tags: &Tags,
) -> Option<ResourceId> {
    desired
        .of_kind(kind)
        .find(|r| r.adopt.as_deref() == Some(id))
        .map(|r| r.id.clone())
        .or_else(|| owner_id(tags, desired.stack_name()).filter(|o| o.kind == kind))
}

/// The attributes of the composite a part belongs to, once the composite can take it (its
/// `status` attribute is one of `usable`): `None` while it does not exist (a plan made before
/// its create: the part's values are "known after apply"), [`Error::Waiting`] while it
/// converges.
pub fn usable_parent<'r>(
    part: &Resource,
    refs: &'r Refs,
    (noun, usable, after): (&str, &[&str], Duration),
) -> Result<Option<&'r Outputs>> {
    let Some(out) = refs.outputs.get(&part.id.composite()) else {
        return Ok(None);
    };
    let status = out.get("status").map(String::as_str).unwrap_or_default();
    if !usable.contains(&status) {
        let id = out.get("id").map(String::as_str).unwrap_or_default();
        return Err(Error::waiting(format!("{noun} {id} is {status}"), after));
    }
    Ok(Some(out))
}

/// A [`ManagedObject`] as a [`Controller`].
pub struct Managed<K>(pub K);

impl<K: ManagedObject> Managed<K> {
    /// Whether `node` may manage the object it found: an error for another stack's object, and
    /// for a [`ManagedObject::NAMED`] object that is neither the node's nor adopted by it.
    fn claim(&self, desired: &DesiredState, node: &Resource, have: &K::Observed) -> Result<()> {
        let Some(tags) = self.0.tags(have) else {
            return Ok(());
        };
        let id = self.0.id(have);
        if let Some(owner) = tags::other_stack(tags, desired.stack_name()) {
            return Err(tags::owned_elsewhere(K::NOUN, &id, owner));
        }
        if K::NAMED
            && !owned_by(tags, desired.stack_name(), &node.id)
            && node.adopt.as_deref() != Some(id.as_str())
        {
            return Err(Error::NotOwned(format!(
                "{} `{id}` already exists and is not managed by this stack (no `{TAG_STACK}={}` and `{TAG_ID}={}` tags); \
                 set `adopt = \"{id}\"` on {} to manage it, or choose another name",
                K::NOUN,
                desired.stack_name(),
                node.id,
                node.id
            )));
        }
        Ok(())
    }

    /// The ids of the objects the nodes manage: found once per node, so removals cost one
    /// lookup per node, not one per node and object.
    fn managed(
        &self,
        desired: &DesiredState,
        observed: &[K::Observed],
    ) -> std::collections::BTreeSet<String> {
        desired
            .of_kind(K::KIND)
            .filter_map(|n| self.0.find(desired, n, observed))
            .map(|o| self.0.id(o))
            .collect()
    }
}

#[async_trait]
impl<K: ManagedObject> Controller for Managed<K> {
    type Observed = Vec<K::Observed>;
    type Op = Op<K>;

    fn kind(&self) -> Kind {
        K::KIND
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Self::Observed> {
        self.0.observe(ctx, desired).await
    }

    fn outputs(
        &self,
        desired: &DesiredState,
        observed: &Self::Observed,
    ) -> Vec<(ResourceId, Outputs)> {
        desired
            .of_kind(K::KIND)
            .filter_map(|n| {
                let o = self.0.find(desired, n, observed)?;
                self.claim(desired, n, o).ok()?;
                Some((n.id.clone(), self.0.outputs(o)))
            })
            .collect()
    }

    fn diff(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &Self::Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op<K>>>> {
        let found = self.0.find(desired, node, observed);
        if found.is_none() {
            if let Some(id) = &node.adopt {
                return Err(Error::Invalid(format!(
                    "{} `{id}` to adopt does not exist",
                    K::NOUN
                )));
            }
        }
        let want = self.0.desired(desired, node, refs)?;
        let tags = desired.tags_for(&node.id, &self.0.own_tags(&want));
        let Some(have) = found else {
            let mut c = Change::new(
                node.id.clone(),
                Action::Create,
                format!("{} {}", K::NOUN, self.0.label(&want)),
            );
            c.fields = self.0.create_fields(&want);
            let chosen = tags::chosen(&tags);
            if !chosen.is_empty() {
                c.field("tags", None, Some(tags::show(&chosen)));
            }
            c.op(Op::Create { want, tags });
            return Ok(Some(c));
        };
        self.claim(desired, node, have)?;
        if let Readiness::Waiting(why, after) = self.0.readiness(&want, have)? {
            return Err(Error::waiting(
                format!("{} {}: {why}", K::NOUN, self.0.id(have)),
                after,
            ));
        }
        let mut c = Change::new(
            node.id.clone(),
            Action::Update,
            format!("{} {}", K::NOUN, self.0.id(have)),
        );
        // Tags first: an adopted object carries the stack's tags before anything else changes
        // it (the operator's own policy allows changes only to what carries them).
        if let Some(current) = self
            .0
            .tags(have)
            .filter(|_| self.0.writes_tags(node, &want))
        {
            if node.adopt.is_some() && !owned_by(current, desired.stack_name(), &node.id) {
                c.notes
                    .push(format!("adopting existing {} {}", K::NOUN, self.0.id(have)));
            }
            if self.0.keeps_other_tags(desired, node) {
                // The tags its previous owner gave it stay.
                c.tags_added(&self.0.id(have), current, &tags, |set| Op::Tag {
                    have: have.clone(),
                    set,
                });
            } else {
                c.tags(
                    current,
                    &tags,
                    |set| Op::Tag {
                        have: have.clone(),
                        set,
                    },
                    |keys| Op::Untag {
                        have: have.clone(),
                        keys,
                    },
                );
            }
        }
        // The plan shows the tags last, as a create does.
        let tag_fields = c.fields.len();
        c.notes.extend(self.0.notes(&want, have));
        for change in self.0.diff(&want, have) {
            c.fields.extend(change.fields());
            c.outputs.extend(change.outputs());
            c.op(Op::Update {
                have: have.clone(),
                change,
            });
        }
        c.fields.rotate_left(tag_fields);
        Ok((!c.ops.is_empty() || !c.notes.is_empty()).then_some(c))
    }

    fn removed(
        &self,
        desired: &DesiredState,
        observed: &Self::Observed,
        prune: bool,
    ) -> Vec<Change<Op<K>>> {
        let managed = self.managed(desired, observed);
        observed
            .iter()
            .filter_map(|o| {
                let id = self.0.owner(desired, o)?;
                if managed.contains(&self.0.id(o)) {
                    return None;
                }
                // A part dropped from a composite still desired is an edit of the composite.
                let edit = K::DELETES_DROPPED
                    && !id.kind.is_table()
                    && desired.resources.contains_key(&id.composite());
                // Its node is desired and manages another: a second one of it.
                let stray = desired.resources.contains_key(&id) && self.0.is_stray_duplicate(o);
                let delete = prune || edit || stray;
                let action = if delete {
                    Action::Delete
                } else {
                    Action::Orphan
                };
                let mut c = Change::new(id, action, format!("{} {}", K::NOUN, self.0.id(o)));
                if delete {
                    for change in self.0.teardown(o) {
                        c.op(Op::Update {
                            have: o.clone(),
                            change,
                        });
                    }
                    c.op(Op::Delete { have: o.clone() });
                }
                Some(c)
            })
            .collect()
    }

    async fn apply(&self, ctx: &Context, op: &Op<K>) -> Result<Option<Outputs>> {
        match op {
            Op::Create { want, tags } => {
                let outputs = match self.0.create(ctx, want, tags).await {
                    Ok(outputs) => outputs,
                    Err(e) if e.is_name_taken() => {
                        let found = self.0.named_tags(ctx, want).await.ok().flatten();
                        let what = format!("{} {}", K::NOUN, self.0.label(want));
                        return Err(name_taken(&what, found.as_ref(), tags, e));
                    }
                    Err(e) => return Err(e),
                };
                tracing::info!(object = K::NOUN, "created");
                return Ok(Some(outputs));
            }
            Op::Update { have, change } => return self.0.update(ctx, have, change).await,
            Op::Tag { have, set } => self.0.tag(ctx, have, set).await?,
            Op::Untag { have, keys } => self.0.untag(ctx, have, keys).await?,
            Op::Delete { have } => {
                deleted(K::NOUN, &self.0.id(have), self.0.delete(ctx, have).await)?
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    fn aws(code: &str) -> Error {
        Error::Aws {
            service: "ec2",
            operation: "DeleteSecurityGroup",
            code: Some(code.into()),
            class: ErrorClass::Terminal,
            message: format!("{code}: resource sg-1 has a dependent object"),
        }
    }

    #[test]
    fn a_name_taken_by_the_nodes_own_object_is_waiting_and_by_anyone_elses_the_error() {
        let taken = || aws("InvalidLaunchTemplateName.AlreadyExistsException");
        let tags = Tags::from([
            (TAG_STACK.to_string(), "s".to_string()),
            (
                TAG_ID.to_string(),
                "grafana.main.launch_template".to_string(),
            ),
            ("Team".to_string(), "obs".to_string()),
        ]);
        // Made by an earlier run: the ownership tags match (the others need not).
        let mut found = tags.clone();
        found.remove("Team");
        let e = name_taken("launch template s-main", Some(&found), &tags, taken());
        assert_eq!(e.class(), ErrorClass::Waiting);
        assert_eq!(e.retry_after(), Some(NOT_YET_LISTED));
        assert!(e.to_string().contains("made by an earlier run"), "{e}");
        // Another node's, another stack's, an untagged one, or none read: the error stays.
        for other in [(TAG_ID, "grafana.other.launch_template"), (TAG_STACK, "t")] {
            let mut found = tags.clone();
            found.insert(other.0.to_string(), other.1.to_string());
            let e = name_taken("launch template s-main", Some(&found), &tags, taken());
            assert_eq!(e.class(), ErrorClass::Terminal, "{other:?}");
        }
        let e = name_taken("launch template s-main", Some(&Tags::new()), &tags, taken());
        assert_eq!(e.class(), ErrorClass::Terminal);
        let e = name_taken("launch template s-main", None, &tags, taken());
        assert_eq!(
            e.code(),
            Some("InvalidLaunchTemplateName.AlreadyExistsException")
        );
        assert_eq!(e.class(), ErrorClass::Terminal);
    }

    #[test]
    fn a_delete_is_done_when_gone_waiting_while_in_use_and_an_error_otherwise() {
        assert!(deleted("security group", "sg-1", Err(aws("InvalidGroup.NotFound"))).is_ok());
        let e = deleted("security group", "sg-1", Err(aws("DependencyViolation"))).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Waiting);
        assert_eq!(e.retry_after(), Some(IN_USE));
        assert!(e.to_string().contains("sg-1 is still in use"), "{e}");
        let e = deleted("target group", "arn:tg", Err(aws("ResourceInUse"))).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Waiting);
        let e = deleted("security group", "sg-1", Err(aws("UnauthorizedOperation"))).unwrap_err();
        assert_ne!(e.class(), ErrorClass::Waiting);
        assert!(deleted("security group", "sg-1", Ok(())).is_ok());
    }
}
