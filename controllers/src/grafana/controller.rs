//! The Grafana controller: per `grafana` resource, its Auto Scaling Group (the node
//! `grafana.<name>`). The group's other objects are nodes of their own: its two security groups
//! and their rules ([`crate::security_group`]), launch template ([`super::template`]), target
//! group ([`super::target_group`]), load balancer ([`super::balancer`]), listeners
//! ([`super::listener`]) and provisioning ([`super::provision`]). The group uses its template's
//! `id` and `latest_version` and its target group's `arn`; nothing else.
//!
//! Found by its ownership tags, or adopted by name (the table's `adopt`).
//!
//! # Guarantees
//! - The group runs its template's latest version. A new version (made by the template's
//!   node) starts one rolling instance refresh whose desired configuration is that version:
//!   AWS pins the group to it once the refresh succeeds, and a refresh that fails leaves the
//!   group on the version its instances run. The version is recorded on the group (tag
//!   `stackwarden:template-version`) only once the refresh toward it is read `Successful`, so
//!   a rollout is done when AWS says it is, not when it was asked for.
//! - A refresh under way is waited for ("waiting", never a loop), never doubled, and nothing
//!   changes the group's launch template meanwhile: AWS refuses that while a refresh with a
//!   desired configuration is active ("An active instance refresh with a desired
//!   configuration exists", Auto Scaling user guide, instance refresh limitations).
//! - A refresh toward the latest version that ended `Failed`, `Cancelled`, `RollbackFailed`
//!   or `RollbackSuccessful` is an error naming the refresh, its status reason and the group,
//!   and the template change stays pending in `plan`. It is not started again by itself: a
//!   new version (a change of the desired state, a new AMI) starts a new refresh, and one the
//!   user starts by hand toward the version is followed and recorded when it succeeds.
//! - A template made anew (the old one lost) is pinned and recorded as the version the
//!   instances run: no refresh replaces them.
//! - `desired_capacity` is enforced only when given; otherwise scaling policies own it.
//! - An existing group is never created again; a create answered `AlreadyExists` by a group
//!   carrying this node's tags (an earlier run's, not yet listed) is looked for again.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_autoscaling::types::{
    DesiredConfiguration, Filter as AsgFilter, LaunchTemplateSpecification, RefreshPreferences,
    RefreshStrategy, Tag as AsgTag,
};

use super::{seconds, GrafanaSpec};
use super::{GRAFANA, LAUNCH_TEMPLATE, TARGET_GROUP};
use crate::change::{removal, Action, Change};
use crate::controller::{Context, Controller};
use crate::desired::{DesiredState, Resource, TAG_STACK};
use crate::error::{aws_error, Error, Result};
use crate::managed::{is_gone, name_taken};
use crate::model::{Kind, Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::tags::{self, owner_id, Tags};

/// Auto Scaling Group tag: the launch template version its instances were refreshed to.
const TAG_VERSION: &str = "stackwarden:template-version";

// ---------------------------------------------------------------------------------------------
// Observed state

#[derive(Debug, Clone, Default)]
pub struct ObservedGroupRefresh {
    pub id: String,
    /// Its `InstanceRefreshStatus` (`Pending`, `InProgress`, `Successful`, `Failed`, ...).
    pub status: String,
    /// Its `StatusReason`: why it is where it is (why it failed, once ended).
    pub reason: Option<String>,
    pub percentage: i32,
    /// The launch template version of its desired configuration, when it has one.
    pub version: Option<String>,
}

/// Where an instance refresh is, from its status (the `InstanceRefreshStatus` values of the
/// Auto Scaling API reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `Pending`, `InProgress`, `Cancelling`, `RollbackInProgress`, `Baking` (waiting its bake
    /// time after replacing the instances), or a status this version does not know: still
    /// running, so nothing is started beside it.
    Active,
    Successful,
    /// `Failed`, `Cancelled`, `RollbackFailed`, `RollbackSuccessful`: ended, the rollout not
    /// made.
    Unsuccessful,
}

impl ObservedGroupRefresh {
    fn phase(&self) -> Phase {
        match self.status.as_str() {
            "Successful" => Phase::Successful,
            "Failed" | "Cancelled" | "RollbackFailed" | "RollbackSuccessful" => Phase::Unsuccessful,
            _ => Phase::Active,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ObservedAsg {
    pub name: String,
    pub min: i32,
    pub max: i32,
    pub desired: i32,
    pub template: Option<(String, String)>,
    pub subnets: BTreeSet<String>,
    pub health_check_type: String,
    pub grace: i32,
    pub target_groups: BTreeSet<String>,
    /// Its instances and their lifecycle states (`Pending`, `InService`, ...).
    pub members: Vec<(String, String)>,
    pub tags: Tags,
    /// The latest instance refresh, when the group has one.
    pub refresh: Option<ObservedGroupRefresh>,
}

#[derive(Debug, Default)]
pub struct Observed {
    pub groups: Vec<ObservedAsg>,
}

impl Observed {
    /// The group a table manages: the one it adopts by name, or the one carrying its
    /// ownership tags.
    fn group(&self, desired: &DesiredState, r: &Resource) -> Option<&ObservedAsg> {
        match &r.adopt {
            Some(name) => self.groups.iter().find(|g| &g.name == name),
            None => self
                .groups
                .iter()
                .find(|g| tags::owned_by(&g.tags, desired.stack_name(), &r.id)),
        }
    }
}

/// An adopted part that does not exist, or belongs to another stack: an error naming it.
fn check_adopted(
    desired: &DesiredState,
    what: &str,
    adopt: Option<&str>,
    found: Option<&Tags>,
) -> Result<()> {
    let Some(id) = adopt else { return Ok(()) };
    let Some(tags) = found else {
        return Err(Error::Invalid(format!(
            "{what} `{id}` to adopt does not exist; remove its `adopt` to have one made"
        )));
    };
    match tags::other_stack(tags, desired.stack_name()) {
        Some(owner) => Err(tags::owned_elsewhere(what, id, owner)),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

/// A new group, pinned to its template's latest version (recorded as the version its
/// instances run), its target group attached.
#[derive(Debug, Clone, PartialEq)]
pub struct Create {
    pub name: String,
    /// The template's id and latest version, from its node.
    pub template: (String, String),
    /// The target group's ARN, from its node.
    pub target_group: String,
    pub sizes: Sizes,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sizes {
    pub min: i32,
    pub max: i32,
    pub desired: Option<i32>,
    pub subnets: Vec<String>,
    pub grace: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Create(Box<Create>),
    AsgTag {
        group: String,
        tags: Tags,
    },
    AsgUntag {
        group: String,
        keys: Vec<String>,
    },
    UpdateGroup {
        group: String,
        sizes: Sizes,
    },
    AttachTargetGroup {
        group: String,
        target_group: String,
    },
    DetachTargetGroups {
        group: String,
        target_groups: Vec<String>,
    },
    Roll(Box<Roll>),
    DeleteGroup {
        group: String,
    },
}

/// What the rollout toward a template version does: see [`Refresh`].
#[derive(Debug, Clone, PartialEq)]
pub struct Roll {
    pub group: String,
    pub template: String,
    pub version: String,
    /// With [`Refresh::Record`]: pin the group to the version first.
    pub repin: bool,
    pub min_healthy: i32,
    pub refresh: Refresh,
}

/// What a rollout does about the instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// Start a rolling instance refresh whose desired configuration is the version. Nothing
    /// is recorded: a later pass reads its outcome.
    Start,
    /// Record the version as the one the instances run, starting nothing: the refresh toward
    /// it was read `Successful`, or the template was made anew from the desired state and says
    /// what they run.
    Record,
    /// The latest refresh toward the version ended without success: the apply is the error
    /// that names it, and writes nothing.
    Failed(Box<Ended>),
}

/// An instance refresh that ended without success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub id: String,
    pub status: String,
    pub reason: Option<String>,
}

/// How long a pass waits before it looks at a running instance refresh again.
const REFRESHING: std::time::Duration = std::time::Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Desired values

fn sizes(s: &GrafanaSpec, refs: &Refs) -> Sizes {
    Sizes {
        min: s.min_size,
        max: s.max_size,
        desired: s.desired_capacity,
        subnets: s.subnets.iter().map(|n| refs.render(n).value).collect(),
        grace: seconds(&s.health_check_grace_period, 300),
    }
}

// ---------------------------------------------------------------------------------------------
// The controller

pub struct GrafanaController;

#[async_trait]
impl Controller for GrafanaController {
    type Observed = Observed;
    type Op = Op;

    fn kind(&self) -> Kind {
        GRAFANA
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        // Nothing desired and no group left: nothing read.
        let groups = stack_groups(ctx, desired).await?;
        Ok(Observed {
            groups: groups.map(|g| g.as_ref().clone()).unwrap_or_default(),
        })
    }

    fn outputs(&self, desired: &DesiredState, obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        desired
            .of_kind(GRAFANA)
            .filter_map(|r| {
                let group = obs.group(desired, r)?;
                Some((
                    r.id.clone(),
                    Outputs::from([("asg_name".into(), group.name.clone())]),
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
        let s = r.spec.expect::<GrafanaSpec>();
        let name = desired.default_name(&r.id);
        let mut tags = desired.tags_for(
            &r.id,
            &s.tags
                .as_ref()
                .map(|t| t.get_ref().clone())
                .unwrap_or_default(),
        );
        tags.entry("Name".into()).or_insert_with(|| name.clone());
        let group = obs.group(desired, r);
        check_adopted(
            desired,
            "Auto Scaling Group",
            r.adopt.as_deref(),
            group.map(|g| &g.tags),
        )?;
        // The template and the target group are nodes of their own: the group uses their
        // attributes.
        let attribute = |kind: Kind, name: &str| {
            refs.outputs
                .get(&ResourceId::part(kind, r.id.name.clone(), None))
                .and_then(|o| o.get(name))
                .cloned()
                .unwrap_or_else(|| KNOWN_AFTER_APPLY.to_string())
        };
        let live = Live {
            template: (
                attribute(LAUNCH_TEMPLATE, "id"),
                attribute(LAUNCH_TEMPLATE, "latest_version"),
            ),
            tg: attribute(TARGET_GROUP, "arn"),
        };
        let Some(group) = group else {
            return Ok(Some(create_change(r, s, refs, &name, tags, live)));
        };

        let mut c = Change::new(r.id.clone(), Action::Update, format!("grafana {name}"));
        // A group taken over gets the stack's tags before anything else changes it; the tags
        // its previous owner gave it stay.
        if r.adopt.is_some() {
            c.tags_added(&group.name, &group.tags, &tags, |tags| Op::AsgTag {
                group: group.name.clone(),
                tags,
            });
            if !c.ops.is_empty() {
                c.notes.push(
                    "taking over the group it adopts: it is tagged the stack's and managed from now on, never recreated; the tags it has besides the desired ones are kept".into(),
                );
            }
        }
        diff_group(&mut c, s, refs, &live, group, &tags, r.adopt.is_none());
        if let Some(waiting) = diff_rollout(&mut c, s, &live, group) {
            // The group's other changes (sizes, tags) do not wait for the refresh.
            if c.ops.is_empty() {
                return Err(waiting);
            }
            c.notes.push(waiting.to_string());
        }
        if c.ops.is_empty() {
            return Ok(None);
        }
        Ok(Some(c))
    }

    fn removed(&self, desired: &DesiredState, obs: &Observed, prune: bool) -> Vec<Change<Op>> {
        // Per group no longer desired: deleted with its instances. The table's other objects
        // are nodes of their own.
        obs.groups
            .iter()
            .filter_map(|g| {
                let id = owner_id(&g.tags, desired.stack_name())?;
                let label = format!("grafana {}", desired.default_name(&id));
                removal(
                    desired,
                    GRAFANA,
                    &g.tags,
                    |r| r.id == id,
                    label,
                    prune,
                    || {
                        vec![Op::DeleteGroup {
                            group: g.name.clone(),
                        }]
                    },
                )
            })
            .collect()
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        let asg = &ctx.autoscaling;
        match op {
            Op::Create(c) => return create(ctx, c).await.map(Some),
            Op::AsgTag { group, tags } => {
                asg.create_or_update_tags()
                    .set_tags(Some(asg_tags(group, tags)))
                    .send()
                    .await
                    .map_err(aws_error("autoscaling", "CreateOrUpdateTags"))?;
            }
            Op::AsgUntag { group, keys } => {
                let tags = keys
                    .iter()
                    .map(|k| {
                        AsgTag::builder()
                            .resource_id(group)
                            .resource_type("auto-scaling-group")
                            .key(k)
                            .build()
                    })
                    .collect();
                asg.delete_tags()
                    .set_tags(Some(tags))
                    .send()
                    .await
                    .map_err(aws_error("autoscaling", "DeleteTags"))?;
            }
            Op::UpdateGroup { group, sizes } => {
                asg.update_auto_scaling_group()
                    .auto_scaling_group_name(group)
                    .min_size(sizes.min)
                    .max_size(sizes.max)
                    .set_desired_capacity(sizes.desired)
                    .vpc_zone_identifier(sizes.subnets.join(","))
                    .health_check_type("ELB")
                    .health_check_grace_period(sizes.grace)
                    .send()
                    .await
                    .map_err(aws_error("autoscaling", "UpdateAutoScalingGroup"))?;
            }
            Op::AttachTargetGroup {
                group,
                target_group,
            } => attach_target_group(ctx, group, target_group).await?,
            Op::DetachTargetGroups {
                group,
                target_groups,
            } => detach_target_groups(ctx, group, target_groups.clone()).await?,
            Op::Roll(r) => roll(ctx, r).await?,
            Op::DeleteGroup { group } => {
                // AWS deletes a group (and terminates its instances) over minutes; until it is
                // gone the load balancer and target group it uses stay, and a later pass
                // deletes them. A deletion under way is not asked for again.
                let status = |out: &aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsOutput| {
                    out.auto_scaling_groups()
                        .first()
                        .map(|g| g.status().unwrap_or("deleting").to_string())
                };
                let describe = || async {
                    asg.describe_auto_scaling_groups()
                        .auto_scaling_group_names(group)
                        .send()
                        .await
                        .map_err(aws_error("autoscaling", "DescribeAutoScalingGroups"))
                };
                let before = status(&describe().await?);
                if before.as_ref().is_some_and(|s| s != "Delete in progress") {
                    asg.delete_auto_scaling_group()
                        .auto_scaling_group_name(group)
                        .force_delete(true)
                        .send()
                        .await
                        .map_err(aws_error("autoscaling", "DeleteAutoScalingGroup"))?;
                }
                if before.is_some() && status(&describe().await?).is_some() {
                    return Err(Error::waiting(
                        format!("group {group} is being deleted with its instances; its load balancer and target group go after it"),
                        std::time::Duration::from_secs(15),
                    ));
                }
            }
        }
        Ok(None)
    }
}

/// The attributes of the group's template and target group nodes ([`KNOWN_AFTER_APPLY`]
/// before they exist).
struct Live {
    /// The template's id and latest version.
    template: (String, String),
    /// The target group's ARN.
    tg: String,
}

/// The group's sizes, placement, health checks, target group and tags.
fn diff_group(
    c: &mut Change<Op>,
    s: &GrafanaSpec,
    refs: &Refs,
    live: &Live,
    group: &ObservedAsg,
    tags: &Tags,
    all_tags: bool,
) {
    let tg = live.tg.as_str();
    let want_sizes = sizes(s, refs);
    let mut resize = false;
    let mut cmp = |c: &mut Change<Op>, field: &str, have: String, want: String| {
        if have != want {
            c.field(field, Some(have), Some(want));
            resize = true;
        }
    };
    cmp(
        c,
        "min_size",
        group.min.to_string(),
        want_sizes.min.to_string(),
    );
    cmp(
        c,
        "max_size",
        group.max.to_string(),
        want_sizes.max.to_string(),
    );
    if let Some(d) = want_sizes.desired {
        cmp(
            c,
            "desired_capacity",
            group.desired.to_string(),
            d.to_string(),
        );
    }
    let subnets: BTreeSet<String> = want_sizes.subnets.iter().cloned().collect();
    cmp(
        c,
        "subnets",
        group.subnets.iter().cloned().collect::<Vec<_>>().join(","),
        subnets.into_iter().collect::<Vec<_>>().join(","),
    );
    cmp(
        c,
        "health_check_type",
        group.health_check_type.clone(),
        "ELB".into(),
    );
    cmp(
        c,
        "health_check_grace_period",
        format!("{}s", group.grace),
        format!("{}s", want_sizes.grace),
    );
    if resize {
        c.op(Op::UpdateGroup {
            group: group.name.clone(),
            sizes: want_sizes,
        });
    }
    let extra_tgs: Vec<String> = group
        .target_groups
        .iter()
        .filter(|t| t.as_str() != tg)
        .cloned()
        .collect();
    if !extra_tgs.is_empty() {
        c.field("target_groups", Some(extra_tgs.join(",")), None);
        c.op(Op::DetachTargetGroups {
            group: group.name.clone(),
            target_groups: extra_tgs,
        });
    }
    if !group.target_groups.contains(tg) {
        c.field("target_groups", None, Some(tg.to_string()));
        c.op(Op::AttachTargetGroup {
            group: group.name.clone(),
            target_group: tg.to_string(),
        });
    }
    // An adopted group keeps its other tags (see the adoption above).
    if all_tags {
        c.tags(
            &group.tags,
            tags,
            |tags| Op::AsgTag {
                group: group.name.clone(),
                tags,
            },
            |keys| Op::AsgUntag {
                group: group.name.clone(),
                keys,
            },
        );
    }
}

/// The rollout: the group's instances refreshed to its template's latest version, and that
/// version recorded once the refresh toward it succeeded (the template's node makes the
/// versions). Pure: what the group and its latest refresh say decides. Answers "waiting"
/// while a refresh runs and the rollout is not done: nothing else is written to the launch
/// template meanwhile.
fn diff_rollout(
    c: &mut Change<Op>,
    s: &GrafanaSpec,
    live: &Live,
    group: &ObservedAsg,
) -> Option<Error> {
    let (template, latest) = &live.template;
    let roll = |version: &str, repin, refresh| {
        Op::Roll(Box::new(Roll {
            group: group.name.clone(),
            template: template.clone(),
            version: version.to_string(),
            repin,
            min_healthy: s.min_healthy_percentage,
            refresh,
        }))
    };
    let last = group.refresh.as_ref();
    let running = last.filter(|f| f.phase() == Phase::Active);
    let pinned = group.template.as_ref();
    if pinned.map(|(t, _)| t) != Some(template) {
        if let Some(f) = running {
            return Some(Error::waiting(
                format!(
                    "instance refresh {} of group {} is {} ({}%): the group is pinned to template {template} once it ends",
                    f.id, group.name, f.status, f.percentage
                ),
                REFRESHING,
            ));
        }
        // The template was made anew from the desired state (lost out of band), or another one
        // is adopted: the group launches from it; its instances run on, recorded as running it
        // (nothing says they differ from it), so no refresh replaces them.
        c.field(
            "launch_template",
            pinned.map(|(t, v)| format!("{t} version {v}")),
            Some(format!("{template} version {latest}")),
        );
        c.op(roll(latest, true, Refresh::Record));
        return None;
    }
    let pinned = pinned.map(|(_, v)| v.clone());
    let recorded = group.tags.get(TAG_VERSION).cloned();
    let behind = pinned.as_deref() != Some(latest.as_str());
    // The version a refresh rolls out: its desired configuration's, else the group's own.
    let toward = |f: &ObservedGroupRefresh| f.version.clone().or_else(|| pinned.clone());
    let toward_latest = last.filter(|f| toward(f).as_deref() == Some(latest.as_str()));
    let failed = toward_latest.filter(|f| f.phase() == Phase::Unsuccessful);
    let done = !behind && recorded.as_deref() == Some(latest.as_str());
    if done && failed.is_none() {
        // Converged; a refresh running now was started by someone else, not waited for.
        return None;
    }
    if let Some(f) = running {
        let after = if toward(f).as_deref() == Some(latest.as_str()) {
            "the version is recorded once it succeeds".to_string()
        } else {
            format!("version {latest} is rolled out after it ends")
        };
        return Some(Error::waiting(
            format!(
                "instance refresh {} of group {} is {} ({}%) toward launch template version {}: {after}",
                f.id,
                group.name,
                f.status,
                f.percentage,
                toward(f).unwrap_or_default()
            ),
            REFRESHING,
        ));
    }
    if behind {
        c.field("launch_template.version", pinned, Some(latest.clone()));
    }
    let before = match (&recorded, failed) {
        (Some(v), Some(f)) if v == latest => Some(format!("{v} (its refresh {})", f.status)),
        _ => recorded.clone(),
    };
    c.field("instance_refresh", before, Some(latest.clone()));
    let refresh = match (toward_latest, failed) {
        (_, Some(f)) => {
            let ended = Ended {
                id: f.id.clone(),
                status: f.status.clone(),
                reason: f.reason.clone(),
            };
            c.notes.push(failure(
                &group.name,
                template,
                latest,
                s.min_healthy_percentage,
                &ended,
            ));
            Refresh::Failed(Box::new(ended))
        }
        (Some(f), None) => {
            // Successful (neither running nor failed): what remains is the record.
            c.notes.push(format!(
                "instance refresh {} toward version {latest} succeeded: the version is recorded",
                f.id
            ));
            Refresh::Record
        }
        (None, None) => {
            c.notes.push(format!(
                "a rolling instance refresh replaces the instances, keeping {}% healthy",
                s.min_healthy_percentage
            ));
            Refresh::Start
        }
    };
    let repin = behind && refresh == Refresh::Record;
    c.op(roll(latest, repin, refresh));
    None
}

/// What a refresh toward `version` that ended without success means, and what the user does.
fn failure(group: &str, template: &str, version: &str, min_healthy: i32, f: &Ended) -> String {
    format!(
        "instance refresh {id} of Auto Scaling group {group} toward launch template {template} version {version} ended {status}: {reason}. \
         The instances it did not replace keep the version they run, and stackwarden does not start it again by itself: \
         fix the cause, then start it again (aws autoscaling start-instance-refresh --auto-scaling-group-name {group} \
         --desired-configuration '{{\"LaunchTemplate\":{{\"LaunchTemplateId\":\"{template}\",\"Version\":\"{version}\"}}}}' \
         --preferences '{{\"SkipMatching\":true,\"MinHealthyPercentage\":{min_healthy}}}'), \
         or change the desired state so that the template gets a new version, which starts a new refresh",
        id = f.id,
        status = f.status,
        reason = f.reason.as_deref().unwrap_or("no status reason given"),
    )
}

/// The change that creates a missing group.
fn create_change(
    r: &Resource,
    s: &GrafanaSpec,
    refs: &Refs,
    name: &str,
    tags: Tags,
    live: Live,
) -> Change<Op> {
    let mut c = Change::new(r.id.clone(), Action::Create, format!("grafana {name}"));
    let sizes = sizes(s, refs);
    c.field(
        "size",
        None,
        Some(format!(
            "min {} max {}{}",
            sizes.min,
            sizes.max,
            sizes
                .desired
                .map(|d| format!(" desired {d}"))
                .unwrap_or_default()
        )),
    );
    c.field("subnets", None, Some(sizes.subnets.join(",")));
    c.field(
        "launch_template",
        None,
        Some(format!("{} version {}", live.template.0, live.template.1)),
    );
    c.op(Op::Create(Box::new(Create {
        name: name.to_string(),
        template: live.template,
        target_group: live.tg,
        sizes,
        tags,
    })));
    c
}

// ---------------------------------------------------------------------------------------------
// Reads

/// The stack's Auto Scaling Groups and those its tables adopt, read once per observation for
/// the Grafana groups and their parts; `None` when there is no Grafana table and no group left,
/// so a stack without Grafana groups reads nothing more of them.
pub(crate) async fn stack_groups(
    ctx: &Context,
    desired: &DesiredState,
) -> Result<Option<Arc<Vec<ObservedAsg>>>> {
    let groups = ctx
        .shared("autoscaling:DescribeAutoScalingGroups", || async {
            observe_groups(
                ctx,
                desired.stack_name(),
                desired
                    .of_kind(GRAFANA)
                    .filter_map(|r| r.adopt.as_deref())
                    .collect(),
            )
            .await
        })
        .await?;
    let wanted = desired.of_kind(GRAFANA).next().is_some();
    Ok((wanted || !groups.is_empty()).then_some(groups))
}

/// Whether the stack may own load balancers, target groups, listeners or launch templates: a
/// Grafana table is desired, a group is left, or a security group of a removed table is. A
/// removed table's parts go in reverse dependency order, its security groups last, and AWS
/// refuses to delete a group a load balancer or an instance still uses: so while a removed
/// table's load balancer is left, so is a group that keeps these reads going. (A target group
/// or template whose delete failed in the very pass its security groups went would be missed;
/// each is deleted in the first pruning pass, long before its groups are free.) A stack that
/// never had a Grafana table reads none of them.
pub(crate) async fn grafana_objects_possible(
    ctx: &Context,
    desired: &DesiredState,
) -> Result<bool> {
    if stack_groups(ctx, desired).await?.is_some() {
        return Ok(true);
    }
    let stack = desired.stack_name();
    Ok(crate::security_group::stack_groups(ctx, desired)
        .await?
        .iter()
        .any(|g| owner_id(&g.tags, stack).is_some_and(|id| id.kind == super::SECURITY_GROUP)))
}

async fn observe_groups(ctx: &Context, stack: &str, adopt: Vec<&str>) -> Result<Vec<ObservedAsg>> {
    let mut groups = Vec::new();
    read_groups(
        ctx.autoscaling.describe_auto_scaling_groups().filters(
            AsgFilter::builder()
                .name(format!("tag:{TAG_STACK}"))
                .values(stack)
                .build(),
        ),
        &mut groups,
    )
    .await?;
    let unadopted: Vec<String> = adopt
        .into_iter()
        .filter(|name| !groups.iter().any(|g| g.name == *name))
        .map(str::to_string)
        .collect();
    if !unadopted.is_empty() {
        read_groups(
            ctx.autoscaling
                .describe_auto_scaling_groups()
                .set_auto_scaling_group_names(Some(unadopted)),
            &mut groups,
        )
        .await?;
    }
    for g in &mut groups {
        let out = ctx
            .autoscaling
            .describe_instance_refreshes()
            .auto_scaling_group_name(&g.name)
            .max_records(1)
            .send()
            .await
            .map_err(aws_error("autoscaling", "DescribeInstanceRefreshes"))?;
        g.refresh = out
            .instance_refreshes()
            .first()
            .map(|f| ObservedGroupRefresh {
                id: f.instance_refresh_id().unwrap_or_default().into(),
                status: f
                    .status()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                reason: f.status_reason().map(str::to_string),
                percentage: f.percentage_complete().unwrap_or_default(),
                version: f
                    .desired_configuration()
                    .and_then(|d| d.launch_template())
                    .and_then(|t| t.version())
                    .map(str::to_string),
            });
        if let Some(f) = &g.refresh {
            if matches!(f.status.as_str(), "Pending" | "InProgress") {
                tracing::info!(group = %g.name, refresh = %f.id, status = %f.status, percent = f.percentage, "instance refresh under way");
            }
        }
    }
    Ok(groups)
}

/// The groups one `DescribeAutoScalingGroups` request finds, all pages, added to `groups`.
async fn read_groups(
    request: aws_sdk_autoscaling::operation::describe_auto_scaling_groups::builders::DescribeAutoScalingGroupsFluentBuilder,
    groups: &mut Vec<ObservedAsg>,
) -> Result<()> {
    let mut pages = request.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("autoscaling", "DescribeAutoScalingGroups"))?;
        for g in page.auto_scaling_groups() {
            groups.push(ObservedAsg {
                name: g.auto_scaling_group_name().unwrap_or_default().into(),
                min: g.min_size().unwrap_or_default(),
                max: g.max_size().unwrap_or_default(),
                desired: g.desired_capacity().unwrap_or_default(),
                template: g.launch_template().map(|t| {
                    (
                        t.launch_template_id().unwrap_or_default().to_string(),
                        t.version().unwrap_or_default().to_string(),
                    )
                }),
                subnets: g
                    .vpc_zone_identifier()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                health_check_type: g.health_check_type().unwrap_or_default().into(),
                grace: g.health_check_grace_period().unwrap_or_default(),
                target_groups: g.target_group_arns().iter().cloned().collect(),
                members: g
                    .instances()
                    .iter()
                    .map(|i| {
                        (
                            i.instance_id().unwrap_or_default().to_string(),
                            i.lifecycle_state()
                                .map(|s| s.as_str().to_string())
                                .unwrap_or_default(),
                        )
                    })
                    .collect(),
                tags: g
                    .tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap_or_default().to_string(),
                            t.value().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
                refresh: None,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writes

fn asg_tags(group: &str, tags: &Tags) -> Vec<AsgTag> {
    tags.iter()
        .map(|(k, v)| {
            AsgTag::builder()
                .resource_id(group)
                .resource_type("auto-scaling-group")
                .key(k)
                .value(v)
                // Bookkeeping stays on the group; everything else marks the instances too.
                .propagate_at_launch(k != TAG_VERSION)
                .build()
        })
        .collect()
}

/// Starts the refresh toward the version, or records it (pinning the group first when asked),
/// or is the error of the refresh toward it that ended without success.
async fn roll(ctx: &Context, r: &Roll) -> Result<()> {
    let spec = LaunchTemplateSpecification::builder()
        .launch_template_id(&r.template)
        .version(&r.version)
        .build();
    match &r.refresh {
        Refresh::Failed(f) => Err(Error::Failed(failure(
            &r.group,
            &r.template,
            &r.version,
            r.min_healthy,
            f,
        ))),
        Refresh::Start => {
            // The desired configuration pins the group once the refresh succeeds; a refresh
            // that fails leaves it on the version its instances run.
            let out = ctx
                .autoscaling
                .start_instance_refresh()
                .auto_scaling_group_name(&r.group)
                .strategy(RefreshStrategy::Rolling)
                .desired_configuration(
                    DesiredConfiguration::builder()
                        .launch_template(spec)
                        .build(),
                )
                .preferences(
                    RefreshPreferences::builder()
                        .min_healthy_percentage(r.min_healthy)
                        .skip_matching(true)
                        .build(),
                )
                .send()
                .await
                .map_err(aws_error("autoscaling", "StartInstanceRefresh"))?;
            tracing::info!(
                group = %r.group,
                version = %r.version,
                refresh = out.instance_refresh_id().unwrap_or_default(),
                "instance refresh started; the version is recorded once it succeeds"
            );
            Ok(())
        }
        Refresh::Record => {
            if r.repin {
                ctx.autoscaling
                    .update_auto_scaling_group()
                    .auto_scaling_group_name(&r.group)
                    .launch_template(spec)
                    .send()
                    .await
                    .map_err(aws_error("autoscaling", "UpdateAutoScalingGroup"))?;
            }
            ctx.autoscaling
                .create_or_update_tags()
                .set_tags(Some(asg_tags(
                    &r.group,
                    &Tags::from([(TAG_VERSION.into(), r.version.clone())]),
                )))
                .send()
                .await
                .map_err(aws_error("autoscaling", "CreateOrUpdateTags"))?;
            Ok(())
        }
    }
}

/// Creates the group, pinned to its template's latest version, recorded as the version its
/// instances run (the security groups, the template and the target group are nodes of their
/// own, made before; the provisioning, made after, reaches the instances once they run).
async fn create(ctx: &Context, c: &Create) -> Result<Outputs> {
    let (template, version) = &c.template;
    let spec = LaunchTemplateSpecification::builder()
        .launch_template_id(template)
        .version(version)
        .build();
    let mut tags = c.tags.clone();
    tags.insert(TAG_VERSION.into(), version.clone());
    let made = ctx
        .autoscaling
        .create_auto_scaling_group()
        .auto_scaling_group_name(&c.name)
        .launch_template(spec)
        .min_size(c.sizes.min)
        .max_size(c.sizes.max)
        .set_desired_capacity(c.sizes.desired)
        .vpc_zone_identifier(c.sizes.subnets.join(","))
        .health_check_type("ELB")
        .health_check_grace_period(c.sizes.grace)
        .target_group_arns(&c.target_group)
        .set_tags(Some(asg_tags(&c.name, &tags)))
        .send()
        .await
        .map_err(aws_error("autoscaling", "CreateAutoScalingGroup"));
    if let Err(e) = made {
        return Err(already_made(ctx, c, e).await);
    }
    tracing::info!(group = %c.name, "auto scaling group created");
    Ok(Outputs::from([("asg_name".into(), c.name.clone())]))
}

/// What a create answered `AlreadyExists` means ([`name_taken`]): the tags of the group of
/// the name decide.
async fn already_made(ctx: &Context, c: &Create, e: Error) -> Error {
    if !e.is_name_taken() {
        return e;
    }
    let mut found = Vec::new();
    let read = read_groups(
        ctx.autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&c.name),
        &mut found,
    )
    .await;
    let found = read
        .ok()
        .and_then(|()| found.into_iter().next())
        .map(|g| g.tags);
    name_taken(&format!("group {}", c.name), found.as_ref(), &c.tags, e)
}

async fn attach_target_group(ctx: &Context, group: &str, target_group: &str) -> Result<()> {
    ctx.autoscaling
        .attach_load_balancer_target_groups()
        .auto_scaling_group_name(group)
        .target_group_arns(target_group)
        .send()
        .await
        .map_err(aws_error("autoscaling", "AttachLoadBalancerTargetGroups"))?;
    Ok(())
}

/// Detaches target groups from the group before another is attached: a target group deleted
/// out of band may answer "not found", which leaves nothing to detach.
async fn detach_target_groups(
    ctx: &Context,
    group: &str,
    target_groups: Vec<String>,
) -> Result<()> {
    if target_groups.is_empty() {
        return Ok(());
    }
    match ctx
        .autoscaling
        .detach_load_balancer_target_groups()
        .auto_scaling_group_name(group)
        .set_target_group_arns(Some(target_groups))
        .send()
        .await
        .map_err(aws_error("autoscaling", "DetachLoadBalancerTargetGroups"))
    {
        Err(e) if is_gone(&e) => Ok(()),
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    fn spec() -> GrafanaSpec {
        toml::from_str(
            r#"
ami = "ami-1"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = { subnets = ["subnet-a", "subnet-b"] }
"#,
        )
        .unwrap()
    }

    /// A group converged on version 2 of template `lt-1`.
    fn group() -> ObservedAsg {
        ObservedAsg {
            name: "g".into(),
            template: Some(("lt-1".into(), "2".into())),
            tags: Tags::from([(TAG_VERSION.into(), "2".into())]),
            ..Default::default()
        }
    }

    /// The rollout of `group` when the template node says `template` is at `latest`: its
    /// operations, or the "waiting" it answers.
    fn rollout(group: &ObservedAsg, template: &str, latest: &str) -> Result<Vec<Op>> {
        rollout_change(group, template, latest).map(|c| c.ops)
    }

    fn rollout_change(group: &ObservedAsg, template: &str, latest: &str) -> Result<Change<Op>> {
        let live = Live {
            template: (template.into(), latest.into()),
            tg: "arn:tg".into(),
        };
        let mut c = Change::new(ResourceId::new(GRAFANA, "main"), Action::Update, "grafana");
        match diff_rollout(&mut c, &spec(), &live, group) {
            Some(waiting) => Err(waiting),
            None => Ok(c),
        }
    }

    fn the_roll(ops: &[Op]) -> &Roll {
        let [Op::Roll(r)] = ops else {
            panic!("{ops:?}")
        };
        r
    }

    fn refresh(status: &str, version: &str) -> Option<ObservedGroupRefresh> {
        Some(ObservedGroupRefresh {
            id: "r-1".into(),
            status: status.into(),
            reason: None,
            percentage: 40,
            version: Some(version.into()),
        })
    }

    #[test]
    fn a_converged_group_rolls_nothing() {
        assert!(rollout(&group(), "lt-1", "2").unwrap().is_empty());
    }

    /// The template node made version 3: one refresh toward it starts, the group not repinned
    /// (its desired configuration pins the group once it succeeds) and nothing recorded yet.
    #[test]
    fn a_new_template_version_is_one_refresh_toward_it_and_no_record_yet() {
        let ops = rollout(&group(), "lt-1", "3").unwrap();
        let r = the_roll(&ops);
        assert_eq!(
            (r.version.as_str(), r.repin, r.min_healthy),
            ("3", false, 90)
        );
        assert_eq!(r.refresh, Refresh::Start);
    }

    /// A template made anew (the old one lost): the group launches from it, its instances
    /// recorded as running it, none replaced.
    #[test]
    fn a_template_made_anew_is_pinned_and_recorded_without_a_refresh() {
        let ops = rollout(&group(), "lt-2", "1").unwrap();
        let r = the_roll(&ops);
        assert_eq!(
            (r.template.as_str(), r.version.as_str(), r.repin),
            ("lt-2", "1", true)
        );
        assert_eq!(r.refresh, Refresh::Record);
    }

    /// Every status of a refresh still running (the API reference's `InstanceRefreshStatus`
    /// values that are not an end): the pass waits, starts nothing and writes nothing to the
    /// group's launch template, whichever version the refresh rolls out.
    #[test]
    fn a_refresh_under_way_is_waited_for_never_doubled_and_never_repinned() {
        for status in [
            "Pending",
            "InProgress",
            "Cancelling",
            "RollbackInProgress",
            "Baking",
            "SomeStatusOfLater",
        ] {
            let mut g = group();
            g.refresh = refresh(status, "3");
            let e = rollout(&g, "lt-1", "3").unwrap_err();
            assert_eq!(e.class(), ErrorClass::Waiting, "{status}");
            assert_eq!(
                e.to_string(),
                format!("waiting: instance refresh r-1 of group g is {status} (40%) toward launch template version 3: the version is recorded once it succeeds")
            );
            // A newer version made meanwhile: still nothing, no repin while it runs.
            let e = rollout(&g, "lt-1", "4").unwrap_err();
            assert!(
                e.to_string()
                    .ends_with("version 4 is rolled out after it ends"),
                "{e}"
            );
            // A template made anew meanwhile: pinned once the refresh ends, not before.
            let e = rollout(&g, "lt-9", "1").unwrap_err();
            assert_eq!(e.class(), ErrorClass::Waiting, "{status}");
        }
    }

    /// Only `Successful` records the version; the group, pinned by the refresh's desired
    /// configuration, is not pinned again. One whose pin was undone meanwhile is repinned.
    #[test]
    fn a_successful_refresh_records_the_version_and_starts_nothing() {
        let mut g = group();
        g.template = Some(("lt-1".into(), "3".into()));
        g.refresh = refresh("Successful", "3");
        let ops = rollout(&g, "lt-1", "3").unwrap();
        let r = the_roll(&ops);
        assert_eq!((r.version.as_str(), r.repin), ("3", false));
        assert_eq!(r.refresh, Refresh::Record);
        g.template = Some(("lt-1".into(), "2".into()));
        let ops = rollout(&g, "lt-1", "3").unwrap();
        let r = the_roll(&ops);
        assert_eq!((r.repin, &r.refresh), (true, &Refresh::Record));
        // Recorded: converged.
        g.template = Some(("lt-1".into(), "3".into()));
        g.tags.insert(TAG_VERSION.into(), "3".into());
        assert!(rollout(&g, "lt-1", "3").unwrap().is_empty());
    }

    /// Each status a refresh ends in without success: the rollout stays pending (the version
    /// not recorded, the template change shown) and its apply is the error naming the
    /// refresh, its status and reason, and the group. Nothing is started again or repinned.
    #[test]
    fn a_refresh_that_ended_without_success_is_an_error_and_the_change_stays_pending() {
        for status in [
            "Failed",
            "Cancelled",
            "RollbackFailed",
            "RollbackSuccessful",
        ] {
            let mut g = group();
            g.refresh = refresh(status, "3");
            g.refresh.as_mut().unwrap().reason = Some("Instances failed health checks".into());
            let c = rollout_change(&g, "lt-1", "3").unwrap();
            let r = the_roll(&c.ops);
            assert!(!r.repin, "{status}");
            let Refresh::Failed(ended) = &r.refresh else {
                panic!("{status}: {:?}", r.refresh)
            };
            assert_eq!(
                (
                    ended.id.as_str(),
                    ended.status.as_str(),
                    ended.reason.as_deref()
                ),
                ("r-1", status, Some("Instances failed health checks"))
            );
            let fields: Vec<(String, Option<String>, Option<String>)> = c
                .fields
                .iter()
                .map(|f| (f.field.clone(), f.before.clone(), f.after.clone()))
                .collect();
            assert_eq!(
                fields,
                [
                    (
                        "launch_template.version".to_string(),
                        Some("2".to_string()),
                        Some("3".to_string())
                    ),
                    (
                        "instance_refresh".to_string(),
                        Some("2".to_string()),
                        Some("3".to_string())
                    ),
                ],
                "{status}"
            );
            let message = failure("g", "lt-1", "3", 90, ended);
            assert!(
                message.starts_with(&format!("instance refresh r-1 of Auto Scaling group g toward launch template lt-1 version 3 ended {status}: Instances failed health checks. ")),
                "{message}"
            );
            assert!(c.notes.contains(&message), "{status}: {:?}", c.notes);
        }
    }

    /// A refresh that failed toward an older version is history: the latest version gets a
    /// refresh of its own (a change of the desired state is how a failed rollout goes on).
    /// One the user starts again by hand toward the version is followed like the operator's.
    #[test]
    fn a_new_version_after_a_failed_refresh_starts_a_new_one() {
        let mut g = group();
        g.refresh = refresh("Failed", "3");
        let ops = rollout(&g, "lt-1", "4").unwrap();
        assert_eq!(the_roll(&ops).refresh, Refresh::Start);
        g.refresh = Some(ObservedGroupRefresh {
            id: "r-2".into(),
            version: None,
            ..refresh("InProgress", "3").unwrap()
        });
        g.template = Some(("lt-1".into(), "3".into()));
        assert_eq!(
            rollout(&g, "lt-1", "3").unwrap_err().class(),
            ErrorClass::Waiting,
            "a refresh without a desired configuration rolls out the group's own version"
        );
    }

    /// The record written by versions that tagged the group as the refresh started, with the
    /// refresh that then failed: the failure shows, the record does not hide it.
    #[test]
    fn a_record_written_before_a_failed_refresh_does_not_hide_it() {
        let mut g = group();
        g.template = Some(("lt-1".into(), "3".into()));
        g.tags.insert(TAG_VERSION.into(), "3".into());
        g.refresh = refresh("Failed", "3");
        let c = rollout_change(&g, "lt-1", "3").unwrap();
        assert!(matches!(the_roll(&c.ops).refresh, Refresh::Failed(_)));
        assert_eq!(
            c.fields
                .iter()
                .map(|f| (f.before.as_deref(), f.after.as_deref()))
                .collect::<Vec<_>>(),
            [(Some("3 (its refresh Failed)"), Some("3"))]
        );
    }
}
