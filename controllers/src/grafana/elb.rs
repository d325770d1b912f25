//! The load balancing objects of the stack's Grafana groups, read once per observation for the
//! load balancer, listener and target group nodes ([`elb_objects`]), and the writes they share.
//!
//! Load balancers and target groups are listed by the stack's name prefix (and by the ARNs the
//! tables adopt), each such load balancer's listeners read, then the tags of all three in one
//! batch (20 a call); the attributes follow for the load balancers the stack owns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aws_sdk_elasticloadbalancingv2::types::{
    Action as ElbAction, ActionTypeEnum, Certificate, ProtocolEnum, RedirectActionConfig,
    RedirectActionStatusCodeEnum, Tag as ElbTag,
};

use super::controller::grafana_objects_possible;
use super::{seconds, tagged_node, GrafanaSpec, BALANCER, GRAFANA, LISTENER, TARGET_GROUP};
use crate::controller::Context;
use crate::desired::{DesiredState, TAG_ID, TAG_STACK};
use crate::error::{aws_error, Error, Result};
use crate::model::ResourceId;
use crate::tags::{owner_id, Tags};

/// Load balancer and target group names: AWS's limit.
pub(super) const MAX_ELB_NAME: usize = 32;

/// What a load balancer's name may not begin with (CreateLoadBalancer, `Name`).
pub(super) const INTERNAL: &str = "internal-";

/// Why ELB refuses `name` for an Application Load Balancer (`balancer`) or a target group:
/// both CreateLoadBalancer and CreateTargetGroup take at most 32 characters, only
/// alphanumerics and hyphens, not beginning or ending with a hyphen; a load balancer's name
/// may not begin with `internal-`. Consecutive hyphens are allowed (the ELBv2 reference says
/// nothing of them; VPC Lattice's target groups, another API, refuse them).
pub(super) fn name_problem(name: &str, balancer: bool) -> Option<String> {
    let count = name.chars().count();
    if count == 0 || count > MAX_ELB_NAME {
        Some(format!(
            "{count} characters, and AWS allows 1 to {MAX_ELB_NAME}"
        ))
    } else if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && *c != '-')
    {
        Some(format!(
            "and AWS allows only letters, digits and hyphens (not {c:?})"
        ))
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("and AWS refuses a hyphen at either end".into())
    } else if balancer && name.starts_with(INTERNAL) {
        Some(format!(
            "and AWS refuses load balancer names beginning with `{INTERNAL}`"
        ))
    } else {
        None
    }
}

/// The name of a group's load balancer and target group, `<stack>-<table name>`, or an error
/// when ELB would refuse it ([`name_problem`]): `validate` refuses those already (the
/// Grafana kind's whole-state check), so this holds for desired states made otherwise.
pub(super) fn elb_name(desired: &DesiredState, node: &ResourceId) -> Result<String> {
    let name = desired.default_name(&node.composite());
    match name_problem(&name, node.kind == BALANCER) {
        Some(why) => Err(Error::Invalid(format!(
            "{node}: its load balancer and target group would be named `{name}`, {why}; rename the table or the stack"
        ))),
        None => Ok(name),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: i32,
    pub timeout: i32,
    pub healthy: i32,
    pub unhealthy: i32,
}

impl HealthCheck {
    /// The target group's health check a Grafana table asks for, with its defaults.
    pub fn of(s: &GrafanaSpec) -> HealthCheck {
        let tg = &s.target_group;
        HealthCheck {
            path: tg.health_check_path.clone(),
            interval: seconds(&tg.health_check_interval, 30),
            timeout: seconds(&tg.health_check_timeout, 5),
            healthy: tg.healthy_threshold,
            unhealthy: tg.unhealthy_threshold,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ObservedTargetGroup {
    pub arn: String,
    pub port: i32,
    pub health: HealthCheck,
    pub tags: Tags,
}

/// What a listener does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    To(String),
    RedirectToHttps,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub port: i32,
    pub protocol: String,
    pub certificate: Option<String>,
    pub ssl_policy: Option<String>,
    pub action: Forward,
}

impl std::fmt::Display for ListenerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match &self.action {
            Forward::To(_) => "forward to the target group".to_string(),
            Forward::RedirectToHttps => "redirect to HTTPS 443".to_string(),
            Forward::Other(a) => a.clone(),
        };
        write!(f, "{} {}: {action}", self.protocol, self.port)?;
        if let Some(p) = &self.ssl_policy {
            write!(f, " ({p})")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct ObservedBalancer {
    pub arn: String,
    pub dns_name: String,
    pub scheme: String,
    pub subnets: BTreeSet<String>,
    pub security_groups: BTreeSet<String>,
    pub idle_timeout: i32,
    pub deletion_protection: bool,
    pub tags: Tags,
}

#[derive(Debug, Clone)]
pub struct ObservedListener {
    pub arn: String,
    /// The load balancer it is on.
    pub balancer: String,
    /// The load balancer node that manages that load balancer (by its tags or its `adopt`).
    pub balancer_node: Option<ResourceId>,
    pub spec: ListenerSpec,
    pub tags: Tags,
    /// For one without the stack's tags on the table's load balancer: the tags that make it its
    /// node's, set before it is deleted.
    pub claim: Option<Tags>,
}

#[derive(Debug, Default)]
pub(crate) struct ElbObjects {
    pub balancers: Vec<ObservedBalancer>,
    pub listeners: Vec<ObservedListener>,
    pub target_groups: Vec<ObservedTargetGroup>,
}

/// [`ElbObjects`], empty in a stack without Grafana (see [`grafana_objects_possible`]).
pub(crate) async fn elb_objects(ctx: &Context, desired: &DesiredState) -> Result<Arc<ElbObjects>> {
    if !grafana_objects_possible(ctx, desired).await? {
        return Ok(Arc::default());
    }
    ctx.shared("elbv2:DescribeLoadBalancers", || list_elb(ctx, desired))
        .await
}

/// The load balancer node that manages a load balancer: the one adopting it, or the one its
/// tags name (its own address, or its table's, made before load balancers were nodes).
fn balancer_node(desired: &DesiredState, b: &ObservedBalancer) -> Option<ResourceId> {
    let adopted = desired
        .of_kind(BALANCER)
        .find(|r| r.adopt.as_deref() == Some(b.arn.as_str()))
        .map(|r| r.id.clone());
    adopted.or_else(|| tagged_node(desired, &b.tags, BALANCER))
}

async fn list_elb(ctx: &Context, desired: &DesiredState) -> Result<ElbObjects> {
    let adopt: BTreeSet<String> = desired
        .of_kind(BALANCER)
        .chain(desired.of_kind(TARGET_GROUP))
        .filter_map(|r| r.adopt.clone())
        .collect();
    let prefix = format!("{}-", desired.stack_name());
    let elb = &ctx.elb;
    let mut balancers = Vec::new();
    let mut pages = elb.describe_load_balancers().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("elasticloadbalancing", "DescribeLoadBalancers"))?;
        for b in page.load_balancers() {
            let name = b.load_balancer_name().unwrap_or_default();
            let arn = b.load_balancer_arn().unwrap_or_default();
            if !name.starts_with(&prefix) && !adopt.contains(arn) {
                continue;
            }
            balancers.push(ObservedBalancer {
                arn: b.load_balancer_arn().unwrap_or_default().into(),
                dns_name: b.dns_name().unwrap_or_default().into(),
                scheme: b
                    .scheme()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                subnets: b
                    .availability_zones()
                    .iter()
                    .filter_map(|z| z.subnet_id().map(str::to_string))
                    .collect(),
                security_groups: b.security_groups().iter().cloned().collect(),
                ..Default::default()
            });
        }
    }
    let mut target_groups = Vec::new();
    let mut pages = elb.describe_target_groups().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("elasticloadbalancing", "DescribeTargetGroups"))?;
        for t in page.target_groups() {
            let name = t.target_group_name().unwrap_or_default();
            let arn = t.target_group_arn().unwrap_or_default();
            if !name.starts_with(&prefix) && !adopt.contains(arn) {
                continue;
            }
            target_groups.push(ObservedTargetGroup {
                arn: t.target_group_arn().unwrap_or_default().into(),
                port: t.port().unwrap_or_default(),
                health: HealthCheck {
                    path: t.health_check_path().unwrap_or_default().into(),
                    interval: t.health_check_interval_seconds().unwrap_or_default(),
                    timeout: t.health_check_timeout_seconds().unwrap_or_default(),
                    healthy: t.healthy_threshold_count().unwrap_or_default(),
                    unhealthy: t.unhealthy_threshold_count().unwrap_or_default(),
                },
                tags: Tags::new(),
            });
        }
    }
    // The listeners of every load balancer of the stack's names, so one `DescribeTags` reads
    // the tags of all three kinds (a load balancer of another stack sharing the name prefix
    // costs one listener read more; its listeners are dropped with it below).
    let mut listeners = Vec::new();
    for b in &balancers {
        listeners.extend(
            read_listeners(ctx, &b.arn)
                .await?
                .into_iter()
                .map(|(arn, spec)| ObservedListener {
                    arn,
                    balancer: b.arn.clone(),
                    balancer_node: None,
                    spec,
                    tags: Tags::new(),
                    claim: None,
                }),
        );
    }
    let arns: Vec<String> = balancers
        .iter()
        .map(|b| b.arn.clone())
        .chain(target_groups.iter().map(|t| t.arn.clone()))
        .chain(listeners.iter().map(|l| l.arn.clone()))
        .collect();
    let mut all_tags = elb_tags_of(ctx, &arns).await?;
    let stack = desired.stack_name();
    let ours = |tags: &Tags| {
        owner_id(tags, stack).is_some_and(|id| [GRAFANA, BALANCER, TARGET_GROUP].contains(&id.kind))
    };
    target_groups.retain_mut(|t| {
        t.tags = all_tags.remove(&t.arn).unwrap_or_default();
        ours(&t.tags) || adopt.contains(t.arn.as_str())
    });
    balancers.retain_mut(|b| {
        b.tags = all_tags.remove(&b.arn).unwrap_or_default();
        ours(&b.tags) || adopt.contains(b.arn.as_str())
    });
    for b in &mut balancers {
        read_attributes(ctx, b).await?;
    }
    listeners.retain_mut(|l| {
        let Some(b) = balancers.iter().find(|b| b.arn == l.balancer) else {
            return false;
        };
        l.balancer_node = balancer_node(desired, b);
        l.tags = all_tags.remove(&l.arn).unwrap_or_default();
        if !l.tags.contains_key(TAG_STACK) {
            l.claim = l.balancer_node.as_ref().map(|b| {
                Tags::from([
                    (TAG_STACK.to_string(), stack.to_string()),
                    (
                        TAG_ID.to_string(),
                        listener_node(b, l.spec.port).to_string(),
                    ),
                ])
            });
        }
        true
    });
    Ok(ElbObjects {
        balancers,
        listeners,
        target_groups,
    })
}

/// An Application Load Balancer's idle timeout when none is set, in seconds.
pub const DEFAULT_IDLE_TIMEOUT: i32 = 60;

/// The attributes stackwarden sets on a load balancer.
async fn read_attributes(ctx: &Context, b: &mut ObservedBalancer) -> Result<()> {
    let attrs = ctx
        .elb
        .describe_load_balancer_attributes()
        .load_balancer_arn(&b.arn)
        .send()
        .await
        .map_err(aws_error(
            "elasticloadbalancing",
            "DescribeLoadBalancerAttributes",
        ))?;
    // An attribute left out of the answer has AWS's default, never zero.
    b.idle_timeout = DEFAULT_IDLE_TIMEOUT;
    b.deletion_protection = false;
    for a in attrs.attributes() {
        match (a.key().unwrap_or_default(), a.value().unwrap_or_default()) {
            ("idle_timeout.timeout_seconds", v) => {
                b.idle_timeout = v.parse().unwrap_or(DEFAULT_IDLE_TIMEOUT)
            }
            ("deletion_protection.enabled", v) => b.deletion_protection = v == "true",
            _ => {}
        }
    }
    Ok(())
}

/// A load balancer's listeners: ARN and what each is.
async fn read_listeners(ctx: &Context, balancer: &str) -> Result<Vec<(String, ListenerSpec)>> {
    let listeners = ctx
        .elb
        .describe_listeners()
        .load_balancer_arn(balancer)
        .into_paginator()
        .items()
        .send()
        .collect::<std::result::Result<Vec<_>, _>>()
        .await
        .map_err(aws_error("elasticloadbalancing", "DescribeListeners"))?;
    Ok(listeners
        .iter()
        .map(|l| {
            let action = l.default_actions().first();
            let forward = match action.and_then(|a| a.r#type()) {
                Some(ActionTypeEnum::Forward) => Forward::To(
                    action
                        .and_then(|a| a.target_group_arn())
                        .unwrap_or_default()
                        .into(),
                ),
                Some(ActionTypeEnum::Redirect) => {
                    let r = action.and_then(|a| a.redirect_config());
                    let https = r.is_some_and(|r| {
                        r.protocol() == Some("HTTPS")
                            && r.port() == Some("443")
                            && r.status_code() == Some(&RedirectActionStatusCodeEnum::Http301)
                    });
                    if https {
                        Forward::RedirectToHttps
                    } else {
                        Forward::Other("redirect elsewhere".into())
                    }
                }
                other => Forward::Other(other.map_or("no action", |t| t.as_str()).to_string()),
            };
            let https = l.protocol() == Some(&ProtocolEnum::Https);
            (
                l.listener_arn().unwrap_or_default().into(),
                ListenerSpec {
                    port: l.port().unwrap_or_default(),
                    protocol: l
                        .protocol()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                    certificate: l
                        .certificates()
                        .first()
                        .and_then(|c| c.certificate_arn())
                        .map(str::to_string),
                    ssl_policy: l.ssl_policy().filter(|_| https).map(str::to_string),
                    action: forward,
                },
            )
        })
        .collect())
}

/// The tags of the load balancer of this name, if there is one
/// ([`ManagedObject::named_tags`](crate::managed::ManagedObject::named_tags); a "not found"
/// answer is an error there, which keeps the create's own).
pub(crate) async fn named_balancer_tags(ctx: &Context, name: &str) -> Result<Option<Tags>> {
    let out = ctx
        .elb
        .describe_load_balancers()
        .names(name)
        .send()
        .await
        .map_err(aws_error("elasticloadbalancing", "DescribeLoadBalancers"))?;
    let arn = out
        .load_balancers()
        .first()
        .and_then(|b| b.load_balancer_arn());
    tags_of_one(ctx, arn).await
}

/// The tags of the target group of this name, if there is one.
pub(crate) async fn named_target_group_tags(ctx: &Context, name: &str) -> Result<Option<Tags>> {
    let out = ctx
        .elb
        .describe_target_groups()
        .names(name)
        .send()
        .await
        .map_err(aws_error("elasticloadbalancing", "DescribeTargetGroups"))?;
    let arn = out
        .target_groups()
        .first()
        .and_then(|t| t.target_group_arn());
    tags_of_one(ctx, arn).await
}

async fn tags_of_one(ctx: &Context, arn: Option<&str>) -> Result<Option<Tags>> {
    let Some(arn) = arn else { return Ok(None) };
    Ok(elb_tags_of(ctx, &[arn.to_string()]).await?.remove(arn))
}

/// The tags of these load balancing objects, read 20 at a time (`DescribeTags`' limit).
async fn elb_tags_of(ctx: &Context, arns: &[String]) -> Result<BTreeMap<String, Tags>> {
    let mut all = BTreeMap::new();
    for batch in arns.chunks(20) {
        let out = ctx
            .elb
            .describe_tags()
            .set_resource_arns(Some(batch.to_vec()))
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "DescribeTags"))?;
        for d in out.tag_descriptions() {
            all.insert(
                d.resource_arn().unwrap_or_default().into(),
                d.tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap_or_default().to_string(),
                            t.value().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
            );
        }
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------------
// Writes

/// Sets tags on a load balancing object (`AddTags` adds and overwrites).
pub(super) async fn set_elb_tags(ctx: &Context, arn: &str, tags: &Tags) -> Result<()> {
    ctx.elb
        .add_tags()
        .resource_arns(arn)
        .set_tags(Some(elb_tags(tags)))
        .send()
        .await
        .map_err(aws_error("elasticloadbalancing", "AddTags"))?;
    Ok(())
}

/// Removes tags from a load balancing object.
pub(super) async fn remove_elb_tags(ctx: &Context, arn: &str, keys: &[String]) -> Result<()> {
    ctx.elb
        .remove_tags()
        .resource_arns(arn)
        .set_tag_keys(Some(keys.to_vec()))
        .send()
        .await
        .map_err(aws_error("elasticloadbalancing", "RemoveTags"))?;
    Ok(())
}

pub(super) fn elb_tags(tags: &Tags) -> Vec<ElbTag> {
    tags.iter()
        .map(|(k, v)| ElbTag::builder().key(k).value(v).build())
        .collect()
}

/// A listener's default action.
pub(super) fn elb_action(f: &Forward) -> ElbAction {
    match f {
        Forward::To(tg) => ElbAction::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(tg)
            .build(),
        Forward::RedirectToHttps | Forward::Other(_) => ElbAction::builder()
            .r#type(ActionTypeEnum::Redirect)
            .redirect_config(
                RedirectActionConfig::builder()
                    .protocol("HTTPS")
                    .port("443")
                    .status_code(RedirectActionStatusCodeEnum::Http301)
                    .build(),
            )
            .build(),
    }
}

/// A listener's certificate, as the API takes it.
pub(super) fn certificates(l: &ListenerSpec) -> Option<Vec<Certificate>> {
    l.certificate
        .as_ref()
        .map(|c| vec![Certificate::builder().certificate_arn(c).build()])
}

/// The listener node of a table's load balancer (`balancer`, its node) for a port.
pub(super) fn listener_node(balancer: &ResourceId, port: i32) -> ResourceId {
    ResourceId::part(LISTENER, balancer.name.clone(), Some(port.to_string()))
}

#[cfg(test)]
mod name_tests {
    use super::name_problem;

    #[test]
    fn elb_names_follow_create_load_balancer_and_create_target_group() {
        assert_eq!(name_problem("monitoring-grafana", true), None);
        assert_eq!(name_problem(&"a".repeat(32), true), None);
        // ELBv2 says nothing of consecutive hyphens: they are taken.
        assert_eq!(name_problem("mon--grafana", true), None);
        assert!(name_problem(&"a".repeat(33), true)
            .unwrap()
            .contains("33 characters, and AWS allows 1 to 32"));
        assert!(name_problem("mon-main_ui", true)
            .unwrap()
            .contains("only letters, digits and hyphens (not '_')"));
        assert!(name_problem("mon-main-", true)
            .unwrap()
            .contains("hyphen at either end"));
        assert!(name_problem("-mon", false).is_some());
        assert!(name_problem("internal-main", true)
            .unwrap()
            .contains("beginning with `internal-`"));
        // Only a load balancer's name may not begin with `internal-`.
        assert_eq!(name_problem("internal-main", false), None);
    }
}
