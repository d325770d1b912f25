//! The Application Load Balancer of a Grafana group: the node `grafana.<name>.alb`, on the
//! managed-object layer. Its listeners are nodes of their own ([`super::listener`]) that name
//! it by its `arn`; the Auto Scaling Group does not use it (it registers its instances in the
//! target group), so a load balancer lost out of band is made again alone, the group running
//! on.
//!
//! Found by its ownership tags, or adopted by ARN (`alb = { adopt = "arn:..." }`). Load
//! balancers made by versions from before the load balancer was a node carry their table's
//! address in `stackwarden:id`: they are found so and retagged, never recreated.
//!
//! # Guarantees
//! - Created with its tags in the same call, so a crash right after leaves one the next pass
//!   finds; its attributes follow (a crash between leaves them to the next pass's diff).
//! - Its security group, subnets, idle timeout and deletion protection are corrected in place;
//!   its scheme cannot change (AWS fixes it at creation): an error says so.

use std::collections::BTreeSet;

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2::types::{
    LoadBalancerAttribute, LoadBalancerSchemeEnum, LoadBalancerTypeEnum,
};

use super::elb::{
    elb_name, elb_objects, elb_tags, named_balancer_tags, remove_elb_tags, set_elb_tags,
    ObservedBalancer,
};
use super::{tagged_node, ALB, BALANCER, SECURITY_GROUP};
use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{DesiredState, KindSpec, Resource};
use crate::error::{aws_error, Error, Result};
use crate::kind::Kind;
use crate::managed::{Describe, ManagedObject, Readiness};
use crate::model::{Outputs, Refs, ResourceId};
use crate::security_group::group_id;
use crate::tags::Tags;

/// The load balancer node of a Grafana table.
#[derive(Debug, Clone)]
pub struct BalancerPart {
    pub scheme: String,
    pub subnets: Vec<String>,
    pub idle_timeout: i32,
    pub deletion_protection: bool,
    /// The table's own tags (a `Name` among them, else `<stack>-<name>`).
    pub tags: Tags,
}

impl KindSpec for BalancerPart {}

#[derive(Debug, Clone)]
pub struct BalancerWant {
    /// `<stack>-<table name>`.
    pub name: String,
    pub scheme: String,
    pub subnets: BTreeSet<String>,
    /// The load balancer's security group, from its node.
    pub security_group: String,
    pub attributes: Attributes,
    pub tags: Tags,
}

/// The attributes stackwarden sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub idle_timeout: i32,
    pub deletion_protection: bool,
}

impl Attributes {
    fn of(b: &ObservedBalancer) -> Self {
        Attributes {
            idle_timeout: b.idle_timeout,
            deletion_protection: b.deletion_protection,
        }
    }

    /// As the API names them.
    fn pairs(&self) -> [(&'static str, String); 2] {
        [
            (
                "idle_timeout.timeout_seconds",
                self.idle_timeout.to_string(),
            ),
            (
                "deletion_protection.enabled",
                self.deletion_protection.to_string(),
            ),
        ]
    }

    /// AWS's values for a new load balancer.
    const DEFAULT: Attributes = Attributes {
        idle_timeout: super::elb::DEFAULT_IDLE_TIMEOUT,
        deletion_protection: false,
    };
}

#[derive(Debug, Clone)]
pub enum BalancerUpdate {
    SecurityGroups {
        from: BTreeSet<String>,
        to: String,
    },
    Subnets {
        from: BTreeSet<String>,
        to: BTreeSet<String>,
    },
    Attributes {
        from: Attributes,
        to: Attributes,
    },
}

fn joined(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(",")
}

impl Describe for BalancerUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match self {
            BalancerUpdate::SecurityGroups { from, to } => vec![FieldChange::new(
                "security_groups",
                Some(joined(from)),
                Some(to.clone()),
            )],
            BalancerUpdate::Subnets { from, to } => vec![FieldChange::new(
                "subnets",
                Some(joined(from)),
                Some(joined(to)),
            )],
            BalancerUpdate::Attributes { from, to } => from
                .pairs()
                .into_iter()
                .zip(to.pairs())
                .filter(|((_, a), (_, b))| a != b)
                .map(|((k, a), (_, b))| FieldChange::new(k, Some(a), Some(b)))
                .collect(),
        }
    }
}

pub struct LoadBalancer;

#[async_trait]
impl ManagedObject for LoadBalancer {
    type Desired = BalancerWant;
    type Observed = ObservedBalancer;
    type Update = BalancerUpdate;

    const KIND: Kind = BALANCER;
    const NOUN: &'static str = "load balancer";

    fn desired(
        &self,
        desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<BalancerWant> {
        let part = node.spec.expect::<BalancerPart>();
        let name = elb_name(desired, &node.id)?;
        let mut tags = part.tags.clone();
        tags.entry("Name".into()).or_insert_with(|| name.clone());
        Ok(BalancerWant {
            name,
            scheme: part.scheme.clone(),
            subnets: part.subnets.iter().map(|s| refs.render(s).value).collect(),
            security_group: group_id(refs, SECURITY_GROUP, &node.id.name, Some(ALB)),
            attributes: Attributes {
                idle_timeout: part.idle_timeout,
                deletion_protection: part.deletion_protection,
            },
            tags,
        })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedBalancer>> {
        Ok(elb_objects(ctx, desired).await?.balancers.clone())
    }

    fn id(&self, o: &ObservedBalancer) -> String {
        o.arn.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedBalancer) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    /// Its node by its tags: its own address, or (made before it was a node) its table's.
    fn owner(&self, desired: &DesiredState, o: &ObservedBalancer) -> Option<ResourceId> {
        tagged_node(desired, &o.tags, BALANCER)
    }

    fn outputs(&self, o: &ObservedBalancer) -> Outputs {
        Outputs::from([
            ("arn".into(), o.arn.clone()),
            ("dns_name".into(), o.dns_name.clone()),
        ])
    }

    fn readiness(&self, want: &BalancerWant, have: &ObservedBalancer) -> Result<Readiness> {
        if have.scheme != want.scheme {
            return Err(Error::Invalid(format!(
                "load balancer {} is {} and the desired scheme is {}; a scheme cannot change in place",
                have.arn, have.scheme, want.scheme
            )));
        }
        Ok(Readiness::Ready)
    }

    fn diff(&self, want: &BalancerWant, have: &ObservedBalancer) -> Vec<BalancerUpdate> {
        let mut out = Vec::new();
        if have.security_groups != BTreeSet::from([want.security_group.clone()]) {
            out.push(BalancerUpdate::SecurityGroups {
                from: have.security_groups.clone(),
                to: want.security_group.clone(),
            });
        }
        if have.subnets != want.subnets {
            out.push(BalancerUpdate::Subnets {
                from: have.subnets.clone(),
                to: want.subnets.clone(),
            });
        }
        let attributes = Attributes::of(have);
        if attributes != want.attributes {
            out.push(BalancerUpdate::Attributes {
                from: attributes,
                to: want.attributes.clone(),
            });
        }
        out
    }

    fn own_tags(&self, want: &BalancerWant) -> Tags {
        want.tags.clone()
    }

    fn create_fields(&self, want: &BalancerWant) -> Vec<FieldChange> {
        let mut fields = vec![
            FieldChange::new("scheme", None, Some(want.scheme.clone())),
            FieldChange::new("subnets", None, Some(joined(&want.subnets))),
            FieldChange::new("security_groups", None, Some(want.security_group.clone())),
        ];
        fields.extend(
            want.attributes
                .pairs()
                .into_iter()
                .map(|(k, v)| FieldChange::new(k, None, Some(v))),
        );
        fields
    }

    fn label(&self, want: &BalancerWant) -> String {
        want.name.clone()
    }

    async fn named_tags(&self, ctx: &Context, want: &BalancerWant) -> Result<Option<Tags>> {
        named_balancer_tags(ctx, &want.name).await
    }

    async fn create(&self, ctx: &Context, want: &BalancerWant, tags: &Tags) -> Result<Outputs> {
        let out = ctx
            .elb
            .create_load_balancer()
            .name(&want.name)
            .r#type(LoadBalancerTypeEnum::Application)
            .scheme(LoadBalancerSchemeEnum::from(want.scheme.as_str()))
            .set_subnets(Some(want.subnets.iter().cloned().collect()))
            .security_groups(&want.security_group)
            .set_tags(Some(elb_tags(tags)))
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "CreateLoadBalancer"))?;
        let lb = out.load_balancers().first();
        let arn = lb
            .and_then(|l| l.load_balancer_arn())
            .unwrap_or_default()
            .to_string();
        if want.attributes != Attributes::DEFAULT {
            set_attributes(ctx, &arn, &want.attributes).await?;
        }
        Ok(Outputs::from([
            ("arn".into(), arn),
            (
                "dns_name".into(),
                lb.and_then(|l| l.dns_name()).unwrap_or_default().into(),
            ),
        ]))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedBalancer,
        change: &BalancerUpdate,
    ) -> Result<Option<Outputs>> {
        let elb = &ctx.elb;
        match change {
            BalancerUpdate::SecurityGroups { to, .. } => {
                elb.set_security_groups()
                    .load_balancer_arn(&have.arn)
                    .security_groups(to)
                    .send()
                    .await
                    .map_err(aws_error("elasticloadbalancing", "SetSecurityGroups"))?;
            }
            BalancerUpdate::Subnets { to, .. } => {
                elb.set_subnets()
                    .load_balancer_arn(&have.arn)
                    .set_subnets(Some(to.iter().cloned().collect()))
                    .send()
                    .await
                    .map_err(aws_error("elasticloadbalancing", "SetSubnets"))?;
            }
            BalancerUpdate::Attributes { to, .. } => set_attributes(ctx, &have.arn, to).await?,
        }
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedBalancer, set: &Tags) -> Result<()> {
        set_elb_tags(ctx, &have.arn, set).await
    }

    async fn untag(&self, ctx: &Context, have: &ObservedBalancer, keys: &[String]) -> Result<()> {
        remove_elb_tags(ctx, &have.arn, keys).await
    }

    async fn delete(&self, ctx: &Context, have: &ObservedBalancer) -> Result<()> {
        ctx.elb
            .delete_load_balancer()
            .load_balancer_arn(&have.arn)
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "DeleteLoadBalancer"))?;
        Ok(())
    }
}

async fn set_attributes(ctx: &Context, balancer: &str, attributes: &Attributes) -> Result<()> {
    ctx.elb
        .modify_load_balancer_attributes()
        .load_balancer_arn(balancer)
        .set_attributes(Some(
            attributes
                .pairs()
                .into_iter()
                .map(|(k, v)| LoadBalancerAttribute::builder().key(k).value(v).build())
                .collect(),
        ))
        .send()
        .await
        .map_err(aws_error(
            "elasticloadbalancing",
            "ModifyLoadBalancerAttributes",
        ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Action, Change};
    use crate::controller::Controller;

    use crate::managed::{Managed, Op};
    use crate::testing::owned_tags;

    const GRAFANA_TOML: &str = r#"
ami = "ami-1"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = { subnets = ["subnet-a", "subnet-b"], idle_timeout = "120s" }
"#;

    /// The Grafana table and its nodes, as loading expands them.
    fn nodes() -> DesiredState {
        crate::grafana::expanded(toml::from_str(GRAFANA_TOML).unwrap())
    }

    fn node() -> ResourceId {
        ResourceId::part(BALANCER, "main", None)
    }

    #[test]
    fn a_load_balancer_name_aws_would_refuse_is_an_error_before_any_call() {
        let d = nodes();
        assert_eq!(
            super::super::elb::elb_name(&d, &node()).unwrap(),
            format!("{}-main", crate::testing::STACK)
        );
        let e = super::super::elb::elb_name(&d, &ResourceId::part(BALANCER, "main_ui", None))
            .unwrap_err();
        assert!(
            e.to_string().contains("only letters, digits and hyphens"),
            "{e}"
        );
        let long = ResourceId::part(BALANCER, "x".repeat(40), None);
        assert!(super::super::elb::elb_name(&d, &long)
            .unwrap_err()
            .to_string()
            .contains("42 characters, and AWS allows 1 to 32"));
    }

    fn refs() -> Refs {
        Refs {
            outputs: [(
                ResourceId::part(SECURITY_GROUP, "main", Some(ALB.into())),
                Outputs::from([("id".into(), "sg-alb".into())]),
            )]
            .into(),
            ..Default::default()
        }
    }

    fn observed(id: &str) -> ObservedBalancer {
        ObservedBalancer {
            arn: "arn:lb-1".into(),
            dns_name: "lb-1.elb".into(),
            scheme: "internet-facing".into(),
            subnets: ["subnet-a".into(), "subnet-b".into()].into(),
            security_groups: ["sg-alb".into()].into(),
            idle_timeout: 120,
            deletion_protection: false,
            tags: owned_tags(id),
        }
    }

    fn diff(have: Vec<ObservedBalancer>) -> Result<Option<Change<Op<LoadBalancer>>>> {
        let d = nodes();
        Managed(LoadBalancer).diff(&d, &d.resources[&node()], &have, &refs())
    }

    #[test]
    fn a_load_balancer_as_desired_has_no_change_and_gives_its_attributes() {
        let have = observed("grafana.main.alb");
        let mut tagged = have.clone();
        tagged.tags.insert("Name".into(), "s-main".into());
        assert!(diff(vec![tagged.clone()]).unwrap().is_none());
        let out = Managed(LoadBalancer).outputs(&nodes(), &vec![tagged]);
        assert_eq!(
            out,
            [(
                node(),
                Outputs::from([
                    ("arn".into(), "arn:lb-1".into()),
                    ("dns_name".into(), "lb-1.elb".into())
                ])
            )]
        );
    }

    #[test]
    fn a_missing_load_balancer_is_created_with_its_group_and_attributes() {
        let c = diff(vec![]).unwrap().unwrap();
        assert_eq!(c.action, Action::Create);
        let [Op::Create { want, tags }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(
            (want.name.as_str(), want.security_group.as_str()),
            ("s-main", "sg-alb")
        );
        assert_eq!(want.attributes.idle_timeout, 120);
        assert_eq!(
            tags.get(crate::desired::TAG_ID).map(String::as_str),
            Some("grafana.main.alb")
        );
        assert_eq!(tags.get("Name").map(String::as_str), Some("s-main"));
    }

    #[test]
    fn drift_is_corrected_in_place_field_by_field_and_a_scheme_is_an_error() {
        let mut have = observed("grafana.main.alb");
        have.tags.insert("Name".into(), "s-main".into());
        have.security_groups.insert("sg-open".into());
        have.subnets.remove("subnet-b");
        have.deletion_protection = true;
        let c = diff(vec![have.clone()]).unwrap().unwrap();
        assert_eq!(c.action, Action::Update);
        assert_eq!(c.ops.len(), 3, "{:?}", c.ops);
        let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            ["security_groups", "subnets", "deletion_protection.enabled"]
        );
        have.scheme = "internal".into();
        let e = diff(vec![have]).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    }

    /// A load balancer made before it was a node carries its table's address: it is the node's,
    /// retagged, never made again.
    #[test]
    fn a_load_balancer_of_an_earlier_version_is_found_and_retagged() {
        let mut have = observed("grafana.main");
        have.tags.insert("Name".into(), "s-main".into());
        let c = diff(vec![have]).unwrap().unwrap();
        let [Op::Tag { set, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(
            set.get(crate::desired::TAG_ID).map(String::as_str),
            Some("grafana.main.alb")
        );
    }
}
