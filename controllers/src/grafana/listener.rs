//! The listeners of a Grafana group's load balancer: the nodes `grafana.<name>.listener.<port>`
//! (`80`, and `443` with a certificate), on the managed-object layer. Each names its load
//! balancer and its target group by their nodes' `arn`, so a listener lost out of band is made
//! again alone on the load balancer that lost it.
//!
//! Found by their ownership tags. A listener stackwarden did not make (on an adopted load
//! balancer, or made by a version from before listeners were tagged) is the node's of its
//! port when its load balancer is the table's: it gets the node's tags, beside its own, before
//! it is changed, and one on a port no longer desired gets them before it is deleted (the
//! operator's own policy lets it change only tagged listeners).
//!
//! # Guarantees
//! - Created with its tags in the same call.
//! - Protocol, certificate, SSL policy and default action are corrected in place.

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2::types::ProtocolEnum;

use super::elb::{
    certificates, elb_action, elb_objects, elb_tags, listener_node, remove_elb_tags, set_elb_tags,
    Forward, ListenerSpec, ObservedListener,
};
use super::{BALANCER, GRAFANA, LISTENER, TARGET_GROUP};
use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{DesiredState, KindSpec, Resource};
use crate::error::{aws_error, Result};
use crate::kind::Kind;
use crate::managed::{Describe, ManagedObject};
use crate::model::{Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::tags::{self, owner_id, Tags};

/// A listener node of a Grafana table.
#[derive(Debug, Clone)]
pub struct ListenerPart {
    pub port: i32,
    pub protocol: String,
    pub certificate: Option<String>,
    pub ssl_policy: Option<String>,
    /// Redirects to HTTPS 443 instead of forwarding to the target group.
    pub redirect: bool,
}

impl KindSpec for ListenerPart {}

#[derive(Debug, Clone)]
pub struct ListenerWant {
    /// The load balancer's ARN, from its node.
    pub balancer: String,
    pub spec: ListenerSpec,
}

#[derive(Debug, Clone)]
pub enum ListenerUpdate {
    Modify {
        from: ListenerSpec,
        to: ListenerSpec,
    },
}

impl Describe for ListenerUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        let ListenerUpdate::Modify { from, to } = self;
        vec![FieldChange::new(
            "listener",
            Some(from.to_string()),
            Some(to.to_string()),
        )]
    }
}

/// An attribute of one of the table's other nodes, or [`KNOWN_AFTER_APPLY`].
fn attribute(refs: &Refs, node: ResourceId, name: &str) -> String {
    refs.outputs
        .get(&node)
        .and_then(|o| o.get(name))
        .cloned()
        .unwrap_or_else(|| KNOWN_AFTER_APPLY.into())
}

pub struct Listener;

#[async_trait]
impl ManagedObject for Listener {
    type Desired = ListenerWant;
    type Observed = ObservedListener;
    type Update = ListenerUpdate;

    const KIND: Kind = LISTENER;
    const NOUN: &'static str = "listener";

    fn desired(
        &self,
        _desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<ListenerWant> {
        let part = node.spec.expect::<ListenerPart>();
        let table = &node.id.name;
        let action = if part.redirect {
            Forward::RedirectToHttps
        } else {
            Forward::To(attribute(
                refs,
                ResourceId::part(TARGET_GROUP, table.clone(), None),
                "arn",
            ))
        };
        Ok(ListenerWant {
            balancer: attribute(refs, ResourceId::part(BALANCER, table.clone(), None), "arn"),
            spec: ListenerSpec {
                port: part.port,
                protocol: part.protocol.clone(),
                certificate: part.certificate.as_ref().map(|c| refs.render(c).value),
                ssl_policy: part.ssl_policy.clone(),
                action,
            },
        })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedListener>> {
        Ok(elb_objects(ctx, desired).await?.listeners.clone())
    }

    fn id(&self, o: &ObservedListener) -> String {
        o.arn.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedListener) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    /// Its node by its tags (its own address, or its table's when made before listeners were
    /// nodes); an untagged listener on the table's load balancer is the node's of its port.
    fn owner(&self, desired: &DesiredState, o: &ObservedListener) -> Option<ResourceId> {
        match owner_id(&o.tags, desired.stack_name()) {
            Some(id) if id.kind == LISTENER => Some(id),
            Some(id) if id.kind == GRAFANA || id.kind == BALANCER => {
                Some(listener_node(&id, o.spec.port))
            }
            Some(_) => None,
            None if tags::other_stack(&o.tags, desired.stack_name()).is_some() => None,
            None => o
                .balancer_node
                .as_ref()
                .map(|b| listener_node(b, o.spec.port)),
        }
    }

    fn keeps_other_tags(&self, _desired: &DesiredState, _node: &Resource) -> bool {
        // A claimed listener keeps what its maker tagged it with.
        true
    }

    fn diff(&self, want: &ListenerWant, have: &ObservedListener) -> Vec<ListenerUpdate> {
        if have.spec == want.spec {
            return Vec::new();
        }
        vec![ListenerUpdate::Modify {
            from: have.spec.clone(),
            to: want.spec.clone(),
        }]
    }

    fn create_fields(&self, want: &ListenerWant) -> Vec<FieldChange> {
        vec![FieldChange::new(
            "listener",
            None,
            Some(want.spec.to_string()),
        )]
    }

    fn label(&self, want: &ListenerWant) -> String {
        want.spec.port.to_string()
    }

    async fn create(&self, ctx: &Context, want: &ListenerWant, tags: &Tags) -> Result<Outputs> {
        let l = &want.spec;
        let out = ctx
            .elb
            .create_listener()
            .load_balancer_arn(&want.balancer)
            .port(l.port)
            .protocol(ProtocolEnum::from(l.protocol.as_str()))
            .set_ssl_policy(l.ssl_policy.clone())
            .set_certificates(certificates(l))
            .default_actions(elb_action(&l.action))
            .set_tags(Some(elb_tags(tags)))
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "CreateListener"))?;
        let arn = out
            .listeners()
            .first()
            .and_then(|l| l.listener_arn())
            .unwrap_or_default();
        Ok(Outputs::from([("arn".into(), arn.to_string())]))
    }

    fn outputs(&self, o: &ObservedListener) -> Outputs {
        Outputs::from([("arn".into(), o.arn.clone())])
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedListener,
        change: &ListenerUpdate,
    ) -> Result<Option<Outputs>> {
        let ListenerUpdate::Modify { to, .. } = change;
        ctx.elb
            .modify_listener()
            .listener_arn(&have.arn)
            .port(to.port)
            .protocol(ProtocolEnum::from(to.protocol.as_str()))
            .set_ssl_policy(to.ssl_policy.clone())
            .set_certificates(certificates(to))
            .default_actions(elb_action(&to.action))
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "ModifyListener"))?;
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedListener, set: &Tags) -> Result<()> {
        set_elb_tags(ctx, &have.arn, set).await
    }

    async fn untag(&self, ctx: &Context, have: &ObservedListener, keys: &[String]) -> Result<()> {
        remove_elb_tags(ctx, &have.arn, keys).await
    }

    async fn delete(&self, ctx: &Context, have: &ObservedListener) -> Result<()> {
        // One stackwarden did not make is claimed first: the operator may delete only its own.
        if let Some(claim) = &have.claim {
            set_elb_tags(ctx, &have.arn, claim).await?;
        }
        ctx.elb
            .delete_listener()
            .listener_arn(&have.arn)
            .send()
            .await
            .map_err(aws_error("elasticloadbalancing", "DeleteListener"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Action, Change};
    use crate::controller::Controller;
    use crate::desired::{TAG_ID, TAG_STACK};

    use crate::managed::{Managed, Op};
    use crate::testing::owned_tags;

    const GRAFANA_TOML: &str = r#"
ami = "ami-1"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = { subnets = ["subnet-a", "subnet-b"], certificate_arn = "arn:cert" }
"#;

    fn nodes() -> DesiredState {
        crate::grafana::expanded(toml::from_str(GRAFANA_TOML).unwrap())
    }

    fn node(port: i32) -> ResourceId {
        ResourceId::part(LISTENER, "main", Some(port.to_string()))
    }

    fn refs() -> Refs {
        Refs {
            outputs: [
                (
                    ResourceId::part(BALANCER, "main", None),
                    Outputs::from([("arn".into(), "arn:lb-1".into())]),
                ),
                (
                    ResourceId::part(TARGET_GROUP, "main", None),
                    Outputs::from([("arn".into(), "arn:tg-1".into())]),
                ),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn https(tags: Tags) -> ObservedListener {
        ObservedListener {
            arn: "arn:l-443".into(),
            balancer: "arn:lb-1".into(),
            balancer_node: Some(ResourceId::part(BALANCER, "main", None)),
            spec: ListenerSpec {
                port: 443,
                protocol: "HTTPS".into(),
                certificate: Some("arn:cert".into()),
                ssl_policy: Some("ELBSecurityPolicy-TLS13-1-2-2021-06".into()),
                action: Forward::To("arn:tg-1".into()),
            },
            tags,
            claim: None,
        }
    }

    fn diff(
        d: &DesiredState,
        port: i32,
        have: Vec<ObservedListener>,
    ) -> Result<Option<Change<Op<Listener>>>> {
        Managed(Listener).diff(d, &d.resources[&node(port)], &have, &refs())
    }

    #[test]
    fn a_certificate_makes_two_listeners_80_redirecting_to_443() {
        let d = nodes();
        let c = diff(&d, 80, vec![]).unwrap().unwrap();
        assert_eq!(c.action, Action::Create);
        let [Op::Create { want, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(want.balancer, "arn:lb-1");
        assert_eq!(want.spec.action, Forward::RedirectToHttps);
        let have = https(owned_tags("grafana.main.listener.443"));
        assert!(diff(&d, 443, vec![have]).unwrap().is_none());
    }

    #[test]
    fn a_changed_listener_is_modified_in_place() {
        let mut have = https(owned_tags("grafana.main.listener.443"));
        have.spec.action = Forward::To("arn:other".into());
        let c = diff(&nodes(), 443, vec![have]).unwrap().unwrap();
        assert_eq!(c.action, Action::Update);
        let [Op::Update {
            change: ListenerUpdate::Modify { to, .. },
            ..
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(to.action, Forward::To("arn:tg-1".into()));
    }

    /// A listener of an earlier version (its table's address), or one nobody tagged on the
    /// table's load balancer, is the node's of its port: tagged, kept; another stack's is not.
    #[test]
    fn untagged_and_earlier_listeners_are_claimed_and_another_stacks_are_not() {
        let d = nodes();
        for tags in [
            owned_tags("grafana.main"),
            Tags::from([("Name".into(), "terraform".into())]),
        ] {
            let c = diff(&d, 443, vec![https(tags)]).unwrap().unwrap();
            assert_eq!(c.action, Action::Update);
            let [Op::Tag { set, .. }] = &c.ops[..] else {
                panic!("{:?}", c.ops)
            };
            assert_eq!(
                set.get(TAG_ID).map(String::as_str),
                Some("grafana.main.listener.443")
            );
        }
        let theirs = https(Tags::from([(TAG_STACK.into(), "other".into())]));
        assert_eq!(Listener.owner(&d, &theirs), None);
        // Not the node's, so never written: the node makes its own.
        let c = diff(&d, 443, vec![theirs]).unwrap().unwrap();
        assert_eq!(c.action, Action::Create);
    }
}
