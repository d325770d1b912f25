//! The target group of a Grafana group: the node `grafana.<name>.target_group`, on the
//! managed-object layer. The load balancer's listeners forward to it and the Auto Scaling
//! Group registers its instances in it; both name it by its `arn`, so they wait for it alone.
//!
//! Found by its ownership tags, or adopted by ARN (`target_group = { adopt = "arn:..." }`).
//! Target groups made by versions from before the target group was a node carry their table's
//! address in `stackwarden:id`: they are found so and retagged, never recreated.
//!
//! # Guarantees
//! - Created with its tags in the same call, so a crash right after leaves one the next pass
//!   finds.
//! - Its health check is corrected in place; its port cannot change (AWS fixes it at creation):
//!   an error says so.
//! - Deleted only when no node manages it, after the load balancer that forwards to it (a
//!   target group still in use is waiting, not failed).

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2::types::{Matcher, ProtocolEnum, TargetTypeEnum};

use super::elb::{
    elb_name, elb_objects, elb_tags, named_target_group_tags, remove_elb_tags, set_elb_tags,
    HealthCheck, ObservedTargetGroup,
};
use super::{tagged_node, TARGET_GROUP};
use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{DesiredState, KindSpec, Resource};
use crate::ec2::locate_subnet;
use crate::error::{aws_error, Error, Result};
use crate::kind::Kind;
use crate::managed::{Describe, ManagedObject, Readiness};
use crate::model::{Outputs, Refs, ResourceId};
use crate::tags::Tags;

/// The target group node of a Grafana table.
#[derive(Debug, Clone)]
pub struct TargetGroupPart {
    pub port: i32,
    pub health: HealthCheck,
    /// The VPC, when the table names one; else the first load balancer subnet's.
    pub vpc: Option<String>,
    pub subnet: Option<String>,
}

impl KindSpec for TargetGroupPart {}

#[derive(Debug, Clone)]
pub struct TargetGroupWant {
    /// `<stack>-<table name>`, as the load balancer and the group.
    pub name: String,
    pub port: i32,
    pub health: HealthCheck,
    pub vpc: Option<String>,
    pub subnet: Option<String>,
}

#[derive(Debug, Clone)]
pub enum TargetGroupUpdate {
    Health { from: HealthCheck, to: HealthCheck },
}

impl Describe for TargetGroupUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match self {
            TargetGroupUpdate::Health { from, to } => vec![FieldChange::new(
                "health_check",
                Some(format!("{from:?}")),
                Some(format!("{to:?}")),
            )],
        }
    }
}

pub struct TargetGroup;

#[async_trait]
impl ManagedObject for TargetGroup {
    type Desired = TargetGroupWant;
    type Observed = ObservedTargetGroup;
    type Update = TargetGroupUpdate;

    const KIND: Kind = TARGET_GROUP;
    const NOUN: &'static str = "target group";

    fn desired(
        &self,
        desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<TargetGroupWant> {
        let part = node.spec.expect::<TargetGroupPart>();
        Ok(TargetGroupWant {
            name: elb_name(desired, &node.id)?,
            port: part.port,
            health: part.health.clone(),
            vpc: part.vpc.as_ref().map(|v| refs.render(v).value),
            subnet: part.subnet.as_ref().map(|s| refs.render(s).value),
        })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedTargetGroup>> {
        Ok(elb_objects(ctx, desired).await?.target_groups.clone())
    }

    fn id(&self, o: &ObservedTargetGroup) -> String {
        o.arn.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedTargetGroup) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    /// Its node by its tags: its own address, or (made before it was a node) its table's.
    fn owner(&self, desired: &DesiredState, o: &ObservedTargetGroup) -> Option<ResourceId> {
        tagged_node(desired, &o.tags, TARGET_GROUP)
    }

    fn outputs(&self, o: &ObservedTargetGroup) -> Outputs {
        Outputs::from([("arn".into(), o.arn.clone())])
    }

    fn readiness(&self, want: &TargetGroupWant, have: &ObservedTargetGroup) -> Result<Readiness> {
        if have.port != want.port {
            return Err(Error::Invalid(format!(
                "target group {} listens on {} and the desired port is {}; a target group's port cannot change in place (remove the table with --prune, then add it again)",
                have.arn, have.port, want.port
            )));
        }
        Ok(Readiness::Ready)
    }

    fn diff(&self, want: &TargetGroupWant, have: &ObservedTargetGroup) -> Vec<TargetGroupUpdate> {
        if have.health == want.health {
            return Vec::new();
        }
        vec![TargetGroupUpdate::Health {
            from: have.health.clone(),
            to: want.health.clone(),
        }]
    }

    fn create_fields(&self, want: &TargetGroupWant) -> Vec<FieldChange> {
        vec![
            FieldChange::new("port", None, Some(want.port.to_string())),
            FieldChange::new("health_check", None, Some(format!("{:?}", want.health))),
        ]
    }

    fn label(&self, want: &TargetGroupWant) -> String {
        want.name.clone()
    }

    async fn named_tags(&self, ctx: &Context, want: &TargetGroupWant) -> Result<Option<Tags>> {
        named_target_group_tags(ctx, &want.name).await
    }

    async fn create(&self, ctx: &Context, want: &TargetGroupWant, tags: &Tags) -> Result<Outputs> {
        let vpc = match &want.vpc {
            Some(v) => v.clone(),
            None => locate_subnet(ctx, want.subnet.as_deref()).await?.1,
        };
        let h = &want.health;
        let out = ctx
            .elb
            .create_target_group()
            .name(&want.name)
            .protocol(ProtocolEnum::Http)
            .port(want.port)
            .vpc_id(vpc)
            .target_type(TargetTypeEnum::Instance)
            .health_check_path(&h.path)
            .health_check_interval_seconds(h.interval)
            .health_check_timeout_seconds(h.timeout)
            .healthy_threshold_count(h.healthy)
            .unhealthy_threshold_count(h.unhealthy)
            .matcher(Matcher::builder().http_code("200").build())
            .set_tags(Some(elb_tags(tags)))
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "CreateTargetGroup"))?;
        let arn = out
            .target_groups()
            .first()
            .and_then(|t| t.target_group_arn())
            .unwrap_or_default();
        Ok(Outputs::from([("arn".into(), arn.to_string())]))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedTargetGroup,
        change: &TargetGroupUpdate,
    ) -> Result<Option<Outputs>> {
        let TargetGroupUpdate::Health { to, .. } = change;
        ctx.elb
            .modify_target_group()
            .target_group_arn(&have.arn)
            .health_check_path(&to.path)
            .health_check_interval_seconds(to.interval)
            .health_check_timeout_seconds(to.timeout)
            .healthy_threshold_count(to.healthy)
            .unhealthy_threshold_count(to.unhealthy)
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "ModifyTargetGroup"))?;
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedTargetGroup, set: &Tags) -> Result<()> {
        set_elb_tags(ctx, &have.arn, set).await
    }

    async fn untag(
        &self,
        ctx: &Context,
        have: &ObservedTargetGroup,
        keys: &[String],
    ) -> Result<()> {
        remove_elb_tags(ctx, &have.arn, keys).await
    }

    async fn delete(&self, ctx: &Context, have: &ObservedTargetGroup) -> Result<()> {
        ctx.elb
            .delete_target_group()
            .target_group_arn(&have.arn)
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "DeleteTargetGroup"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Action, Change};
    use crate::controller::Controller;

    use crate::grafana::GrafanaSpec;
    use crate::managed::{Managed, Op};
    use crate::testing::owned_tags;

    const GRAFANA_TOML: &str = r#"
ami = "ami-1"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = { subnets = ["subnet-a", "subnet-b"] }
"#;

    /// The Grafana table and its nodes, as loading expands them.
    fn nodes(adopt: Option<&str>) -> DesiredState {
        let mut spec: GrafanaSpec = toml::from_str(GRAFANA_TOML).unwrap();
        spec.target_group.adopt = adopt.map(String::from);
        crate::grafana::expanded(spec)
    }

    fn node() -> ResourceId {
        ResourceId::part(TARGET_GROUP, "main", None)
    }

    fn observed(id: &str) -> ObservedTargetGroup {
        let d = nodes(None);
        let want = d.resources[&node()].spec.expect::<TargetGroupPart>();
        ObservedTargetGroup {
            arn: "arn:tg-1".into(),
            port: 3000,
            health: want.health.clone(),
            tags: owned_tags(id),
        }
    }

    fn diff(
        d: &DesiredState,
        have: Vec<ObservedTargetGroup>,
    ) -> Result<Option<Change<Op<TargetGroup>>>> {
        Managed(TargetGroup).diff(d, &d.resources[&node()], &have, &Refs::default())
    }

    #[test]
    fn a_target_group_as_desired_has_no_change_and_gives_its_arn() {
        let have = observed("grafana.main.target_group");
        assert!(diff(&nodes(None), vec![have.clone()]).unwrap().is_none());
        let out = Managed(TargetGroup).outputs(&nodes(None), &vec![have]);
        assert_eq!(
            out,
            [(node(), Outputs::from([("arn".into(), "arn:tg-1".into())]))]
        );
    }

    #[test]
    fn a_missing_target_group_is_created_named_as_its_table_with_its_tags() {
        let c = diff(&nodes(None), vec![]).unwrap().unwrap();
        assert_eq!(c.action, Action::Create);
        let [Op::Create { want, tags }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!((want.name.as_str(), want.port), ("s-main", 3000));
        assert_eq!(want.subnet.as_deref(), Some("subnet-a"));
        assert_eq!(
            tags.get(crate::desired::TAG_ID).map(String::as_str),
            Some("grafana.main.target_group")
        );
    }

    #[test]
    fn a_changed_health_check_is_corrected_in_place_and_a_port_is_an_error() {
        let mut have = observed("grafana.main.target_group");
        have.health.path = "/".into();
        let c = diff(&nodes(None), vec![have.clone()]).unwrap().unwrap();
        assert_eq!(c.action, Action::Update);
        assert!(
            matches!(
                &c.ops[..],
                [Op::Update {
                    change: TargetGroupUpdate::Health { .. },
                    ..
                }]
            ),
            "{:?}",
            c.ops
        );
        have.port = 8080;
        let e = diff(&nodes(None), vec![have]).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    }

    /// A target group made before it was a node carries its table's address: it is the node's,
    /// retagged, never made again.
    #[test]
    fn a_target_group_of_an_earlier_version_is_found_and_retagged() {
        let c = diff(&nodes(None), vec![observed("grafana.main")])
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Update);
        let [Op::Tag { set, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(
            set.get(crate::desired::TAG_ID).map(String::as_str),
            Some("grafana.main.target_group")
        );
    }

    /// Adopted by ARN: found without the stack's tags, which are added.
    #[test]
    fn an_adopted_target_group_is_tagged_and_kept() {
        let mut have = observed("x");
        have.tags = Tags::from([("Name".into(), "terraform".into())]);
        let c = diff(&nodes(Some("arn:tg-1")), vec![have]).unwrap().unwrap();
        assert_eq!(c.action, Action::Update);
        assert!(
            c.ops.iter().all(|o| matches!(o, Op::Tag { .. })),
            "{:?}",
            c.ops
        );
        assert_eq!(
            diff(&nodes(Some("arn:tg-2")), vec![]).unwrap_err().class(),
            crate::ErrorClass::Terminal
        );
    }
}
