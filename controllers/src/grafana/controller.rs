//! The Grafana controller: per `grafana` resource, a launch template and an Auto Scaling Group.
//! Its two security groups (the load balancer's, open to the allowed CIDRs; the instances',
//! open to the load balancer's), its target group, load balancer, listeners and provisioning
//! are nodes of their own ([`crate::security_group`], [`super::target_group`],
//! [`super::balancer`], [`super::listener`], [`super::provision`]).
//!
//! Both objects are found by their ownership tags, or adopted by id.
//!
//! # Guarantees
//! - A launch template change makes a new version of the same template, points the group at it
//!   and starts one rolling instance refresh. The version the group's instances were refreshed to
//!   is recorded on the group (tag `stackwarden:template-version`), and a refresh already under
//!   way is waited for, never doubled: a pass during a refresh starts nothing.
//! - `desired_capacity` is enforced only when given; otherwise scaling policies own it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_autoscaling::types::{
    DesiredConfiguration, Filter as AsgFilter, LaunchTemplateSpecification, RefreshPreferences,
    RefreshStrategy, Tag as AsgTag,
};
use aws_sdk_ec2::types::{
    Filter, InstanceType, LaunchTemplateBlockDeviceMappingRequest,
    LaunchTemplateEbsBlockDeviceRequest, LaunchTemplateHttpTokensState,
    LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataEndpointState, LaunchTemplateInstanceMetadataOptionsRequest,
    RequestLaunchTemplateData, ResourceType, VolumeType,
};
use base64::Engine as _;

use super::elb::HealthCheck;
use super::{GrafanaSpec, INSTANCES};
use super::{GRAFANA, SECURITY_GROUP, TARGET_GROUP};
use crate::change::{removal, Action, Change};
use crate::controller::{Context, Controller};
use crate::desired::{parse_duration, DesiredState, Resource, TAG_STACK};
use crate::ec2::{resolve_ami, tag_map, tag_spec};
use crate::error::{aws_error, Error, Result};
use crate::managed::is_gone;
use crate::model::{Kind, Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::security_group::group_id;
use crate::tags::{self, owner_id, Tags};

/// Auto Scaling Group tag: the launch template version its instances were refreshed to.
const TAG_VERSION: &str = "stackwarden:template-version";
/// Where the root volume of the AMIs stackwarden expects (Amazon Linux) is.
const ROOT_DEVICE: &str = "/dev/xvda";

// ---------------------------------------------------------------------------------------------
// Observed state

/// What a launch template version says, as far as stackwarden sets it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateData {
    pub ami: String,
    pub instance_type: String,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    /// Base64, as the API carries it.
    pub user_data: Option<String>,
    pub key_name: Option<String>,
    pub imdsv2: bool,
    /// Size, encrypted.
    pub root: Option<(i32, bool)>,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedTemplate {
    pub id: String,
    pub latest: i64,
    pub data: TemplateData,
    pub tags: Tags,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedGroupRefresh {
    pub id: String,
    pub status: String,
    pub percentage: i32,
    pub version: Option<String>,
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
    pub templates: Vec<ObservedTemplate>,
    pub groups: Vec<ObservedAsg>,
    /// `resolve:ssm:` AMIs, resolved.
    pub amis: BTreeMap<String, std::result::Result<String, Error>>,
}

fn owned(tags: &Tags, desired: &DesiredState, id: &ResourceId) -> bool {
    tags::owned_by(tags, desired.stack_name(), id)
}

/// The objects of one Grafana group that exist: each the one its part adopts by id, or the one
/// carrying the group's ownership tags.
#[derive(Debug, Clone, Copy)]
struct Parts<'o> {
    template: Option<&'o ObservedTemplate>,
    group: Option<&'o ObservedAsg>,
}

impl Parts<'_> {
    fn any(&self) -> bool {
        self.template.is_some() || self.group.is_some()
    }
}

/// The object adopted as `id`, or else the one owned by `r`.
fn pick<'o, O>(
    objects: &'o [O],
    adopt: Option<&str>,
    id: impl Fn(&O) -> &str,
    tags: impl Fn(&O) -> &Tags,
    desired: &DesiredState,
    r: &Resource,
) -> Option<&'o O> {
    match adopt {
        Some(a) => objects.iter().find(|o| id(o) == a),
        None => objects.iter().find(|o| owned(tags(o), desired, &r.id)),
    }
}

impl Observed {
    fn parts(&self, desired: &DesiredState, r: &Resource, s: &GrafanaSpec) -> Parts<'_> {
        let adopts = s.adopts(r);
        Parts {
            template: pick(
                &self.templates,
                adopts.template,
                |t| &t.id,
                |t| &t.tags,
                desired,
                r,
            ),
            group: pick(
                &self.groups,
                adopts.group,
                |g| &g.name,
                |g| &g.tags,
                desired,
                r,
            ),
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

/// Everything missing of one resource, created in dependency order in one operation (each step
/// needs the ids the earlier ones create). Objects that exist are named and kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    pub name: String,
    /// An existing template with its latest version.
    pub template: Option<(String, i64)>,
    pub template_data: TemplateData,
    /// The target group's ARN, from its node.
    pub target_group: String,
    /// An existing Auto Scaling Group and the target groups attached to it: kept (AWS refuses a
    /// second group of a name), the target group made here attached to it.
    pub group: Option<(String, BTreeSet<String>)>,
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
    Build(Box<Build>),
    /// Tags a launch template (one being adopted).
    TemplateTag {
        template: String,
        tags: Tags,
    },
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
    DeleteTemplate {
        template: String,
    },
}

/// A new template version when `data` is given (else `version`), the group pointed at it
/// (when `repin`), then the instance refresh as `refresh` says.
#[derive(Debug, Clone, PartialEq)]
pub struct Roll {
    pub group: String,
    pub template: String,
    pub data: Option<TemplateData>,
    pub version: i64,
    pub repin: bool,
    pub min_healthy: i32,
    pub refresh: Refresh,
}

/// What a rollout does about the instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Start a rolling instance refresh toward the version, then record the version.
    Start,
    /// A refresh toward the version already ran (the record was not written): record it.
    Record,
    /// A refresh is under way: the next pass after it ends starts one.
    Later,
}

// ---------------------------------------------------------------------------------------------
// Desired values

pub(super) fn seconds(d: &Option<toml::Spanned<String>>, default: u64) -> i32 {
    d.as_ref()
        .and_then(|d| parse_duration(d.get_ref()).ok())
        .map_or(default, |d| d.as_secs()) as i32
}

pub(super) fn health(s: &GrafanaSpec) -> HealthCheck {
    let tg = &s.target_group;
    HealthCheck {
        path: tg.health_check_path.clone(),
        interval: seconds(&tg.health_check_interval, 30),
        timeout: seconds(&tg.health_check_timeout, 5),
        healthy: tg.healthy_threshold,
        unhealthy: tg.unhealthy_threshold,
    }
}

fn sizes(s: &GrafanaSpec, refs: &Refs) -> Sizes {
    Sizes {
        min: s.min_size,
        max: s.max_size,
        desired: s.desired_capacity,
        subnets: s.subnets.iter().map(|n| refs.render(n).value).collect(),
        grace: seconds(&s.health_check_grace_period, 300),
    }
}

fn template_data(s: &GrafanaSpec, refs: &Refs, ami: String, group: &str) -> TemplateData {
    TemplateData {
        ami,
        instance_type: s.instance_type.clone(),
        security_groups: vec![group.to_string()],
        instance_profile: s.instance_profile.as_ref().map(|p| refs.render(p).value),
        user_data: s
            .loaded_user_data
            .as_ref()
            .map(|u| base64::engine::general_purpose::STANDARD.encode(u)),
        key_name: s.key_name.clone(),
        imdsv2: true,
        root: Some((s.root_volume_size_gib, true)),
    }
}

/// What differs between two template versions, by field name, for the plan.
fn template_fields(
    have: &TemplateData,
    want: &TemplateData,
) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let mut cmp = |name: &'static str, a: String, b: String| {
        if a != b {
            out.push((name, a, b));
        }
    };
    cmp("ami", have.ami.clone(), want.ami.clone());
    cmp(
        "instance_type",
        have.instance_type.clone(),
        want.instance_type.clone(),
    );
    cmp(
        "security_groups",
        have.security_groups.join(","),
        want.security_groups.join(","),
    );
    cmp(
        "instance_profile",
        have.instance_profile.clone().unwrap_or_default(),
        want.instance_profile.clone().unwrap_or_default(),
    );
    if have.user_data != want.user_data {
        cmp("user_data", "(changed)".into(), "(new)".into());
    }
    cmp(
        "key_name",
        have.key_name.clone().unwrap_or_default(),
        want.key_name.clone().unwrap_or_default(),
    );
    cmp("imdsv2", have.imdsv2.to_string(), want.imdsv2.to_string());
    let root = |r: &Option<(i32, bool)>| {
        r.map(|(size, enc)| format!("{size} GiB{}", if enc { " encrypted" } else { "" }))
            .unwrap_or_default()
    };
    cmp("root_volume", root(&have.root), root(&want.root));
    out
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
        let stack = desired.stack_name();
        let mut obs = Observed::default();
        // What the groups adopt carries no tag of the stack until adopted: read by id too, and
        // only then (a converged pass reads nothing more).
        let adopts: Vec<super::Adopts> = desired
            .specs::<GrafanaSpec>(GRAFANA)
            .map(|(r, s)| s.adopts(r))
            .collect();
        let Some(groups) = stack_groups(ctx, desired).await? else {
            // Nothing desired and no group left: no call for the rest.
            return Ok(obs);
        };
        obs.groups = groups.as_ref().clone();
        let stack_filter = Filter::builder()
            .name(format!("tag:{TAG_STACK}"))
            .values(stack)
            .build();
        obs.templates = observe_templates(
            ctx,
            stack_filter,
            adopts.iter().filter_map(|a| a.template).collect(),
        )
        .await?;
        for (_, s) in desired.specs::<GrafanaSpec>(GRAFANA) {
            if s.ami.starts_with("resolve:ssm:") && !obs.amis.contains_key(&s.ami) {
                obs.amis
                    .insert(s.ami.clone(), resolve_ami(ctx, &s.ami).await);
            }
        }
        Ok(obs)
    }

    fn outputs(&self, desired: &DesiredState, obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        desired
            .specs::<GrafanaSpec>(GRAFANA)
            .filter_map(|(r, s)| {
                let parts = obs.parts(desired, r, s);
                let group = parts.group?;
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
        let ami = match obs.amis.get(&s.ami) {
            Some(Ok(a)) => a.clone(),
            Some(Err(e)) => return Err(e.clone()),
            None => refs.render(&s.ami).value,
        };
        let mut tags = desired.tags_for(
            &r.id,
            &s.tags
                .as_ref()
                .map(|t| t.get_ref().clone())
                .unwrap_or_default(),
        );
        tags.entry("Name".into()).or_insert_with(|| name.clone());

        let parts = obs.parts(desired, r, s);
        let adopts = s.adopts(r);
        check_adopted(
            desired,
            "launch template",
            adopts.template,
            parts.template.map(|t| &t.tags),
        )?;
        check_adopted(
            desired,
            "Auto Scaling Group",
            adopts.group,
            parts.group.map(|g| &g.tags),
        )?;
        // The target group is a node of its own: the group attaches it by its ARN.
        let tg = refs
            .outputs
            .get(&ResourceId::part(TARGET_GROUP, r.id.name.clone(), None))
            .and_then(|o| o.get("arn"))
            .cloned()
            .unwrap_or_else(|| KNOWN_AFTER_APPLY.to_string());
        let Parts {
            template: Some(template),
            group: Some(group),
        } = parts
        else {
            return Ok(Some(build_change(r, s, parts, refs, &name, ami, tags, tg)));
        };

        let mut c = Change::new(r.id.clone(), Action::Update, format!("grafana {name}"));
        // Parts taken over get the group's tags before anything else changes them; the tags
        // their previous owner gave them stay.
        if adopts.template.is_some() {
            c.tags_added(&template.id, &template.tags, &tags, |tags| {
                Op::TemplateTag {
                    template: template.id.clone(),
                    tags,
                }
            });
        }
        if adopts.group.is_some() {
            c.tags_added(&group.name, &group.tags, &tags, |tags| Op::AsgTag {
                group: group.name.clone(),
                tags,
            });
        }
        if c.ops
            .iter()
            .any(|o| matches!(o, Op::TemplateTag { .. } | Op::AsgTag { .. }))
        {
            c.notes.push(
                "taking over the objects it adopts: they are tagged the stack's and managed from now on, never recreated; the tags they have besides the desired ones are kept".into(),
            );
        }

        let live = Live {
            inst_sg: group_id(refs, SECURITY_GROUP, &r.id.name, Some(INSTANCES)),
            template,
            tg: &tg,
            group,
        };
        diff_group(&mut c, s, refs, &live, &tags, adopts.group.is_none());
        diff_rollout(&mut c, s, refs, &live, ami);
        if c.ops.is_empty() {
            return Ok(None);
        }
        Ok(Some(c))
    }

    fn removed(&self, desired: &DesiredState, obs: &Observed, prune: bool) -> Vec<Change<Op>> {
        // Per resource no longer desired, in the order it can be deleted: the group (and its
        // instances), the template. Its other objects are nodes of their own.
        let mut by_id: BTreeMap<ResourceId, (Vec<(u8, Op)>, Tags)> = BTreeMap::new();
        let mut add = |tags: &Tags, order: u8, op: Op| {
            if let Some(id) = owner_id(tags, desired.stack_name()) {
                by_id
                    .entry(id)
                    .or_insert_with(|| (Vec::new(), tags.clone()))
                    .0
                    .push((order, op));
            }
        };
        for g in &obs.groups {
            add(
                &g.tags,
                0,
                Op::DeleteGroup {
                    group: g.name.clone(),
                },
            );
        }
        for t in &obs.templates {
            add(
                &t.tags,
                3,
                Op::DeleteTemplate {
                    template: t.id.clone(),
                },
            );
        }
        by_id
            .into_iter()
            .filter_map(|(id, (mut ops, tags))| {
                ops.sort_by_key(|(o, _)| *o);
                let label = format!("grafana {}", desired.default_name(&id));
                removal(
                    desired,
                    GRAFANA,
                    &tags,
                    |r| r.id == id,
                    label,
                    prune,
                    || ops.into_iter().map(|(_, op)| op).collect(),
                )
            })
            .collect()
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        let (ec2, asg) = (&ctx.ec2, &ctx.autoscaling);
        match op {
            Op::Build(b) => return build(ctx, b).await.map(Some),
            Op::TemplateTag { template, tags } => crate::ec2::set_tags(ctx, template, tags).await?,
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
            Op::DeleteTemplate { template } => {
                ec2.delete_launch_template()
                    .launch_template_id(template)
                    .send()
                    .await
                    .map_err(aws_error("ec2", "DeleteLaunchTemplate"))?;
            }
        }
        Ok(None)
    }
}

/// The objects of one resource that all exist, for the update path of `diff`.
struct Live<'a> {
    /// The instances' security group's id, from its node.
    inst_sg: String,
    template: &'a ObservedTemplate,
    /// The target group's ARN, from its node.
    tg: &'a str,
    group: &'a ObservedAsg,
}

/// The group's sizes, placement, health checks, target group and tags.
fn diff_group(
    c: &mut Change<Op>,
    s: &GrafanaSpec,
    refs: &Refs,
    live: &Live,
    tags: &Tags,
    all_tags: bool,
) {
    let Live { tg, group, .. } = *live;
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

/// The launch template's latest version against the desired one, and the rollout: the group's
/// pinned version and the instance refresh toward it.
fn diff_rollout(c: &mut Change<Op>, s: &GrafanaSpec, refs: &Refs, live: &Live, ami: String) {
    let Live {
        inst_sg,
        template,
        group,
        ..
    } = live;
    let want_data = template_data(s, refs, ami, inst_sg);
    let fields = template_fields(&template.data, &want_data);
    let pinned = group.template.as_ref().map(|(_, v)| v.clone());
    let refreshed = group.tags.get(TAG_VERSION).cloned();
    let active = group.refresh.as_ref().filter(|f| {
        matches!(
            f.status.as_str(),
            "Pending" | "InProgress" | "Cancelling" | "RollbackInProgress"
        )
    });
    if !fields.is_empty() {
        for (f, before, after) in &fields {
            c.field(
                format!("launch_template.{f}"),
                Some(before.clone()),
                Some(after.clone()),
            );
        }
        c.field(
            "launch_template.version",
            Some(template.latest.to_string()),
            Some((template.latest + 1).to_string()),
        );
        if let Some(f) = active {
            c.notes.push(format!(
                "instance refresh {} is {} ({}%): the new version is rolled out after it",
                f.id, f.status, f.percentage
            ));
        } else {
            c.notes.push(format!(
                "a rolling instance refresh replaces the instances, keeping {}% healthy",
                s.min_healthy_percentage
            ));
        }
        c.op(Op::Roll(Box::new(Roll {
            group: group.name.clone(),
            template: template.id.clone(),
            data: Some(want_data),
            version: template.latest + 1,
            min_healthy: s.min_healthy_percentage,
            repin: true,
            refresh: if active.is_some() {
                Refresh::Later
            } else {
                Refresh::Start
            },
        })));
    } else {
        let latest = template.latest.to_string();
        let behind = pinned.as_deref() != Some(latest.as_str());
        let unrefreshed = refreshed.as_deref() != Some(latest.as_str());
        // A refresh toward this very version already started (the tag was not written).
        let started = group.refresh.as_ref().is_some_and(|f| {
            f.version.as_deref() == Some(latest.as_str())
                && !matches!(
                    f.status.as_str(),
                    "Failed" | "Cancelled" | "RollbackSuccessful"
                )
        });
        if behind || (unrefreshed && active.is_none()) {
            if behind {
                c.field(
                    "launch_template.version",
                    pinned.clone(),
                    Some(latest.clone()),
                );
            }
            let refresh = match (active, started) {
                (Some(_), _) => Refresh::Later,
                (None, true) => Refresh::Record,
                (None, false) => Refresh::Start,
            };
            if refresh == Refresh::Start {
                c.field("instance_refresh", refreshed.clone(), Some(latest.clone()));
            }
            c.op(Op::Roll(Box::new(Roll {
                group: group.name.clone(),
                template: template.id.clone(),
                data: None,
                version: template.latest,
                repin: behind,
                min_healthy: s.min_healthy_percentage,
                refresh,
            })));
        }
    }
}

/// The change that creates what is missing of a resource.
#[allow(clippy::too_many_arguments)]
fn build_change(
    r: &Resource,
    s: &GrafanaSpec,
    parts: Parts,
    refs: &Refs,
    name: &str,
    ami: String,
    tags: Tags,
    target_group: String,
) -> Change<Op> {
    let Parts { template, group } = parts;
    let mut c = Change::new(r.id.clone(), Action::Create, format!("grafana {name}"));
    if parts.any() {
        c.notes.push("part of it exists (an interrupted create, or a part lost out of band): the rest is created and the existing parts kept".into());
    }
    let sizes = sizes(s, refs);
    c.field("instance_type", None, Some(s.instance_type.clone()));
    c.field("ami", None, Some(s.ami.clone()));
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
    let instance_group = group_id(refs, SECURITY_GROUP, &r.id.name, Some(INSTANCES));
    c.op(Op::Build(Box::new(Build {
        name: name.to_string(),
        template: template.map(|t| (t.id.clone(), t.latest)),
        template_data: template_data(s, refs, ami, &instance_group),
        target_group,
        group: group.map(|g| (g.name.clone(), g.target_groups.clone())),
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
            let adopts: Vec<super::Adopts> = desired
                .specs::<GrafanaSpec>(GRAFANA)
                .map(|(r, s)| s.adopts(r))
                .collect();
            observe_groups(
                ctx,
                desired.stack_name(),
                adopts.iter().filter_map(|a| a.group).collect(),
            )
            .await
        })
        .await?;
    let wanted = desired.of_kind(GRAFANA).next().is_some();
    Ok((wanted || !groups.is_empty()).then_some(groups))
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

/// The stack's launch templates, and those named in `adopt` that are not yet its, each with
/// its latest version's data.
async fn observe_templates(
    ctx: &Context,
    stack: Filter,
    adopt: Vec<&str>,
) -> Result<Vec<ObservedTemplate>> {
    let mut templates = Vec::new();
    read_templates(
        ctx.ec2.describe_launch_templates().filters(stack),
        &mut templates,
    )
    .await?;
    for id in adopt {
        if templates.iter().any(|t| t.id == id) {
            continue;
        }
        // One at a time: a template that does not exist fails the whole request.
        match read_templates(
            ctx.ec2.describe_launch_templates().launch_template_ids(id),
            &mut templates,
        )
        .await
        {
            Err(e) if is_gone(&e) || e.code() == Some("InvalidLaunchTemplateId.Malformed") => {}
            other => other?,
        }
    }
    for t in &mut templates {
        let out = ctx
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(&t.id)
            .versions(t.latest.to_string())
            .send()
            .await
            .map_err(aws_error("ec2", "DescribeLaunchTemplateVersions"))?;
        let Some(d) = out
            .launch_template_versions()
            .first()
            .and_then(|v| v.launch_template_data())
        else {
            continue;
        };
        let mut groups: Vec<String> = d.security_group_ids().to_vec();
        groups.sort();
        t.data = TemplateData {
            ami: d.image_id().unwrap_or_default().into(),
            instance_type: d
                .instance_type()
                .map(|i| i.as_str().to_string())
                .unwrap_or_default(),
            security_groups: groups,
            instance_profile: d
                .iam_instance_profile()
                .and_then(|p| p.name().or(p.arn()))
                .map(str::to_string),
            user_data: d.user_data().map(str::to_string),
            key_name: d.key_name().map(str::to_string),
            imdsv2: d
                .metadata_options()
                .and_then(|m| m.http_tokens())
                .is_some_and(|t| *t == LaunchTemplateHttpTokensState::Required),
            root: d
                .block_device_mappings()
                .iter()
                .find(|m| m.device_name() == Some(ROOT_DEVICE))
                .and_then(|m| m.ebs())
                .map(|e| {
                    (
                        e.volume_size().unwrap_or_default(),
                        e.encrypted().unwrap_or_default(),
                    )
                }),
        };
    }
    Ok(templates)
}

/// The templates one `DescribeLaunchTemplates` request finds, all pages, added to `templates`.
async fn read_templates(
    request: aws_sdk_ec2::operation::describe_launch_templates::builders::DescribeLaunchTemplatesFluentBuilder,
    templates: &mut Vec<ObservedTemplate>,
) -> Result<()> {
    let mut pages = request.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("ec2", "DescribeLaunchTemplates"))?;
        for t in page.launch_templates() {
            templates.push(ObservedTemplate {
                id: t.launch_template_id().unwrap_or_default().into(),
                latest: t.latest_version_number().unwrap_or_default(),
                data: TemplateData::default(),
                tags: tag_map(t.tags()),
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

fn request_data(d: &TemplateData) -> RequestLaunchTemplateData {
    let mut b = RequestLaunchTemplateData::builder()
        .image_id(&d.ami)
        .instance_type(InstanceType::from(d.instance_type.as_str()))
        .set_security_group_ids(Some(d.security_groups.clone()))
        .set_user_data(d.user_data.clone())
        .set_key_name(d.key_name.clone())
        .metadata_options(
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_tokens(if d.imdsv2 {
                    LaunchTemplateHttpTokensState::Required
                } else {
                    LaunchTemplateHttpTokensState::Optional
                })
                .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
                .build(),
        );
    if let Some(p) = &d.instance_profile {
        let spec = LaunchTemplateIamInstanceProfileSpecificationRequest::builder();
        b = b.iam_instance_profile(if p.starts_with("arn:") {
            spec.arn(p).build()
        } else {
            spec.name(p).build()
        });
    }
    if let Some((size, encrypted)) = d.root {
        b = b.block_device_mappings(
            LaunchTemplateBlockDeviceMappingRequest::builder()
                .device_name(ROOT_DEVICE)
                .ebs(
                    LaunchTemplateEbsBlockDeviceRequest::builder()
                        .volume_size(size)
                        .volume_type(VolumeType::Gp3)
                        .encrypted(encrypted)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
    }
    b.build()
}

async fn roll(ctx: &Context, r: &Roll) -> Result<()> {
    let Roll {
        group,
        template,
        version,
        min_healthy,
        ..
    } = r;
    let (group, template, version, min_healthy) =
        (group.as_str(), template.as_str(), *version, *min_healthy);
    let version = match &r.data {
        Some(d) => {
            let out = ctx
                .ec2
                .create_launch_template_version()
                .launch_template_id(template)
                .launch_template_data(request_data(d))
                .send()
                .await
                .map_err(aws_error("ec2", "CreateLaunchTemplateVersion"))?;
            let v = out
                .launch_template_version()
                .and_then(|v| v.version_number())
                .unwrap_or(version);
            ctx.ec2
                .modify_launch_template()
                .launch_template_id(template)
                .default_version(v.to_string())
                .send()
                .await
                .map_err(aws_error("ec2", "ModifyLaunchTemplate"))?;
            v
        }
        None => version,
    }
    .to_string();
    let spec = LaunchTemplateSpecification::builder()
        .launch_template_id(template)
        .version(&version)
        .build();
    if r.repin {
        ctx.autoscaling
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_template(spec.clone())
            .send()
            .await
            .map_err(aws_error("autoscaling", "UpdateAutoScalingGroup"))?;
    }
    if r.refresh == Refresh::Later {
        return Ok(());
    }
    if r.refresh == Refresh::Start {
        ctx.autoscaling
            .start_instance_refresh()
            .auto_scaling_group_name(group)
            .strategy(RefreshStrategy::Rolling)
            .desired_configuration(
                DesiredConfiguration::builder()
                    .launch_template(spec)
                    .build(),
            )
            .preferences(
                RefreshPreferences::builder()
                    .min_healthy_percentage(min_healthy)
                    .skip_matching(true)
                    .build(),
            )
            .send()
            .await
            .map_err(aws_error("autoscaling", "StartInstanceRefresh"))?;
        tracing::info!(group, version, "instance refresh started");
    }
    ctx.autoscaling
        .create_or_update_tags()
        .set_tags(Some(asg_tags(
            group,
            &Tags::from([(TAG_VERSION.into(), version)]),
        )))
        .send()
        .await
        .map_err(aws_error("autoscaling", "CreateOrUpdateTags"))?;
    Ok(())
}

/// Creates what is missing, in order: the launch template, then the group (the security groups
/// and the target group are nodes of their own, made before; the provisioning, made after,
/// reaches the instances once they run).
async fn build(ctx: &Context, b: &Build) -> Result<Outputs> {
    let ec2 = &ctx.ec2;
    let data = &b.template_data;
    let (template, version) = match &b.template {
        Some((t, latest)) => (t.clone(), latest.to_string()),
        None => {
            let out = ec2
                .create_launch_template()
                .launch_template_name(&b.name)
                .launch_template_data(request_data(data))
                .tag_specifications(tag_spec(ResourceType::LaunchTemplate, &b.tags))
                .send()
                .await
                .map_err(aws_error("ec2", "CreateLaunchTemplate"))?;
            let t = out.launch_template();
            (
                t.and_then(|t| t.launch_template_id())
                    .unwrap_or_default()
                    .to_string(),
                t.and_then(|t| t.latest_version_number())
                    .unwrap_or(1)
                    .to_string(),
            )
        }
    };
    let target_group = b.target_group.clone();
    let spec = LaunchTemplateSpecification::builder()
        .launch_template_id(&template)
        .version(&version)
        .build();
    if let Some((group, attached)) = &b.group {
        // The group runs on: its instances keep serving once the target group is attached.
        let stale: Vec<String> = attached
            .iter()
            .filter(|t| **t != target_group)
            .cloned()
            .collect();
        detach_target_groups(ctx, group, stale).await?;
        if !attached.contains(&target_group) {
            attach_target_group(ctx, group, &target_group).await?;
        }
        if b.template.is_none() {
            // The template was lost and made again from the desired state: the group launches
            // from it. Its instances run on, recorded as refreshed to it (nothing says they
            // differ from it), so no refresh replaces them.
            ctx.autoscaling
                .update_auto_scaling_group()
                .auto_scaling_group_name(group)
                .launch_template(spec)
                .send()
                .await
                .map_err(aws_error("autoscaling", "UpdateAutoScalingGroup"))?;
            let recorded = Tags::from([(TAG_VERSION.to_string(), version.clone())]);
            ctx.autoscaling
                .create_or_update_tags()
                .set_tags(Some(asg_tags(group, &recorded)))
                .send()
                .await
                .map_err(aws_error("autoscaling", "CreateOrUpdateTags"))?;
        }
        return Ok(Outputs::from([("asg_name".into(), group.clone())]));
    }
    let mut group_tags = b.tags.clone();
    group_tags.insert(TAG_VERSION.into(), version.clone());
    ctx.autoscaling
        .create_auto_scaling_group()
        .auto_scaling_group_name(&b.name)
        .launch_template(spec)
        .min_size(b.sizes.min)
        .max_size(b.sizes.max)
        .set_desired_capacity(b.sizes.desired)
        .vpc_zone_identifier(b.sizes.subnets.join(","))
        .health_check_type("ELB")
        .health_check_grace_period(b.sizes.grace)
        .target_group_arns(&target_group)
        .set_tags(Some(asg_tags(&b.name, &group_tags)))
        .send()
        .await
        .map_err(aws_error("autoscaling", "CreateAutoScalingGroup"))?;
    tracing::info!(group = %b.name, "auto scaling group created");
    Ok(Outputs::from([("asg_name".into(), b.name.clone())]))
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

    struct World {
        template: ObservedTemplate,
        group: ObservedAsg,
    }

    impl World {
        /// Converged on version 2 of the template.
        fn new(s: &GrafanaSpec) -> World {
            World {
                template: ObservedTemplate {
                    id: "lt-1".into(),
                    latest: 2,
                    data: template_data(s, &Refs::default(), "ami-1".into(), "sg-i"),
                    ..Default::default()
                },
                group: ObservedAsg {
                    name: "g".into(),
                    template: Some(("lt-1".into(), "2".into())),
                    tags: Tags::from([(TAG_VERSION.into(), "2".into())]),
                    ..Default::default()
                },
            }
        }

        fn rollout(&self, s: &GrafanaSpec) -> Vec<Op> {
            let live = Live {
                inst_sg: "sg-i".into(),
                template: &self.template,
                tg: "arn:tg",
                group: &self.group,
            };
            let mut c = Change::new(ResourceId::new(GRAFANA, "main"), Action::Update, "grafana");
            diff_rollout(&mut c, s, &Refs::default(), &live, "ami-1".into());
            c.ops
        }
    }

    fn refresh(status: &str, version: &str) -> Option<ObservedGroupRefresh> {
        Some(ObservedGroupRefresh {
            id: "r-1".into(),
            status: status.into(),
            percentage: 40,
            version: Some(version.into()),
        })
    }

    #[test]
    fn a_converged_group_rolls_nothing() {
        let s = spec();
        assert!(World::new(&s).rollout(&s).is_empty());
    }

    #[test]
    fn a_template_change_is_one_new_version_and_one_refresh() {
        let s = spec();
        let mut changed = spec();
        changed.instance_type = "t3.medium".into();
        let ops = World::new(&s).rollout(&changed);
        let [Op::Roll(r)] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(r.data.as_ref().unwrap().instance_type, "t3.medium");
        assert_eq!((r.version, r.repin, r.min_healthy), (3, true, 90));
        assert_eq!(r.refresh, Refresh::Start);
    }

    #[test]
    fn a_refresh_under_way_is_waited_for_never_doubled() {
        let s = spec();
        // Version 3 made and a refresh toward it running: the pass starts nothing.
        let mut w = World::new(&s);
        w.template.latest = 3;
        w.group.template = Some(("lt-1".into(), "3".into()));
        w.group.refresh = refresh("InProgress", "3");
        w.group.tags.insert(TAG_VERSION.into(), "3".into());
        assert!(w.rollout(&s).is_empty());
        // The operator died after starting the refresh, before recording it: still nothing new.
        w.group.tags.insert(TAG_VERSION.into(), "2".into());
        assert!(w.rollout(&s).is_empty());
        // Once it succeeded, the missing record alone is not a reason for another refresh.
        w.group.refresh = refresh("Successful", "3");
        let ops = w.rollout(&s);
        let [Op::Roll(r)] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!((r.data.is_none(), r.repin), (true, false));
        assert_eq!(
            r.refresh,
            Refresh::Record,
            "the version is recorded, nothing restarted"
        );
        // A template change during a refresh makes the version; the refresh comes after.
        w.group.refresh = refresh("InProgress", "3");
        let mut changed = spec();
        changed.root_volume_size_gib = 30;
        let ops = w.rollout(&changed);
        let [Op::Roll(r)] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert!(r.data.is_some());
        assert_eq!(r.refresh, Refresh::Later);
    }
}
