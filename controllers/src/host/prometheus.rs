//! The Prometheus config of a host with a `prometheus` table: the node
//! `host.<name>.prometheus`, a bundle pushed over SSM Run Command to the host's instance.
//!
//! It depends on the host's instance and on what the config references; the instance depends
//! on neither, so a config naming an AMP workspace or a Grafana load balancer never holds up
//! the launch.
//!
//! # Guarantees
//! - The bundle is pushed only when the hash recorded on the instance (tag
//!   `stackwarden:prometheus`) differs from the desired bundle's, so a converged pass sends no
//!   SSM command. The tag is written only after the push succeeded on the host.
//! - Nothing waits inside a pass: while the instance is not running, or a push runs, the node
//!   answers "waiting, look again" ([`Error::Waiting`]).
//! - Dropping the table leaves the files on the host: nothing is removed.

use async_trait::async_trait;

use super::{config, PrometheusSpec, HOST, PROMETHEUS};
use crate::change::{Action, Change};
use crate::controller::{Context, Controller, Pushed};
use crate::desired::{DesiredState, KindSpec, Resource};
use crate::error::{Error, Result};
use crate::instances::{instances, ObservedInstance};
use crate::kind::Kind;
use crate::model::{Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::push;
use crate::push::send::{track_tag, Controls, Op, Rollout, Tracked};

/// How soon to look again at an instance that is not running yet.
const STARTING: std::time::Duration = std::time::Duration::from_secs(5);

/// The node of a host's `prometheus` table.
#[derive(Debug, Clone)]
pub struct PrometheusPart {
    pub spec: PrometheusSpec,
}

impl KindSpec for PrometheusPart {}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub region: String,
    pub instances: Vec<ObservedInstance>,
    /// The verdicts of the pushes running on the instances.
    pub tracked: Tracked,
}

/// Instance tag: the sha256 of the bundle installed on the host.
pub(crate) fn installed_tag() -> String {
    push::hash_tag(config::NAME)
}

pub struct PrometheusController;

#[async_trait]
impl Controller for PrometheusController {
    type Observed = Observed;
    type Op = Op;

    fn kind(&self) -> Kind {
        PROMETHEUS
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        if desired.of_kind(PROMETHEUS).next().is_none() {
            // Nothing is removed when a config is dropped: nothing to read.
            return Ok(Observed::default());
        }
        let instances = instances(ctx, desired).await?.as_ref().clone();
        let tracked = track_tag(ctx, &instances, &installed_tag()).await?;
        Ok(Observed {
            region: ctx.region.clone(),
            instances,
            tracked,
        })
    }

    fn outputs(&self, _desired: &DesiredState, _obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        Vec::new()
    }

    fn diff(
        &self,
        desired: &DesiredState,
        r: &Resource,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let part = r.spec.expect::<PrometheusPart>();
        let p = config::bundle(&part.spec, refs, &obs.region).prepare()?;
        let commands = config::Commands::of(&part.spec).describe();
        let host = ResourceId::new(HOST, r.id.name.clone());
        let name = desired.default_name(&host);
        // The host's attributes exist once its instance runs (or is stopped).
        let Some(instance) = refs.outputs.get(&host).and_then(|o| o.get("instance_id")) else {
            let mut c = Change::new(
                r.id.clone(),
                Action::Create,
                format!("prometheus config of host {name}"),
            );
            c.field("instance", None, Some(KNOWN_AFTER_APPLY.into()));
            c.field("prometheus", None, Some(p.short_hash()));
            c.notes.push(commands);
            c.op(Op::Push {
                push: p,
                instances: None,
                controls: Controls::default(),
            });
            return Ok(Some(c));
        };
        let inst = obs.instances.iter().find(|i| &i.id == instance);
        if let Some(state) = inst.map(|i| i.state.as_str()).filter(|s| *s != "running") {
            return Err(Error::waiting(
                format!("instance {instance} is {state}; its config is pushed once it runs"),
                STARTING,
            ));
        }
        let installed = inst.and_then(|i| i.tags.get(&p.hash_tag()).map(String::as_str));
        let rollout = Rollout::of(&p, [(instance.as_str(), installed)], &obs.tracked);
        let action = if installed.is_some() {
            Action::Update
        } else {
            Action::Create
        };
        let mut c = Change::new(
            r.id.clone(),
            action,
            format!("prometheus config of host {name} ({instance})"),
        );
        let shown = crate::verify::show_installed(installed);
        if !rollout.record.is_empty() {
            c.field("prometheus", shown, Some(p.short_hash()));
            c.op(Op::Record {
                push: p,
                instances: vec![instance.clone()],
            });
        } else if !rollout.send.is_empty() {
            c.field("prometheus", shown, Some(p.short_hash()));
            c.notes.push(commands);
            c.op(Op::Push {
                push: p,
                instances: Some(vec![instance.clone()]),
                controls: Controls::default(),
            });
        } else if let Some(e) = rollout.failure(&p, 1).or_else(|| rollout.waiting(&p)) {
            return Err(e);
        }
        Ok((!c.ops.is_empty()).then_some(c))
    }

    fn removed(&self, _desired: &DesiredState, _obs: &Observed, _prune: bool) -> Vec<Change<Op>> {
        Vec::new()
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        op.apply(ctx).await.map(|()| None)
    }

    fn pushes(&self, desired: &DesiredState) -> Vec<Pushed> {
        if desired.of_kind(PROMETHEUS).next().is_none() {
            return Vec::new();
        }
        vec![Pushed {
            tag: installed_tag(),
            bundle: config::NAME.into(),
            per_stack: false,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Spec;
    use crate::testing::{desired, resource};

    const HOST_TOML: &str = r#"
ami = "ami-1"
instance_type = "t3.small"
prometheus = { scrape_interval = "30s" }
"#;

    fn node() -> Resource {
        let spec: super::super::HostSpec = toml::from_str(HOST_TOML).unwrap();
        let mut r = resource(
            PROMETHEUS,
            "prom",
            Spec::new(PrometheusPart {
                spec: spec.prometheus.unwrap(),
            }),
        );
        r.id = ResourceId::part(PROMETHEUS, "prom", None);
        r
    }

    fn running(tags: crate::tags::Tags) -> Observed {
        Observed {
            region: "us-east-1".into(),
            instances: vec![ObservedInstance {
                id: "i-1".into(),
                state: "running".into(),
                tags,
                ..Default::default()
            }],
            tracked: Tracked::default(),
        }
    }

    fn refs() -> Refs {
        Refs {
            outputs: [(
                ResourceId::new(HOST, "prom"),
                Outputs::from([("instance_id".into(), "i-1".into())]),
            )]
            .into(),
            ..Default::default()
        }
    }

    fn diff(o: &Observed, refs: &Refs) -> Result<Option<Change<Op>>> {
        let r = node();
        PrometheusController.diff(&desired(vec![r.clone()]), &r, o, refs)
    }

    #[test]
    fn the_config_is_pushed_when_its_hash_differs_only() {
        let c = diff(&running(Default::default()), &refs())
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create);
        let [Op::Push {
            instances: Some(instances),
            push,
            ..
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(instances, &["i-1"]);
        let installed = running([(installed_tag(), push.hash.clone())].into());
        assert!(diff(&installed, &refs()).unwrap().is_none());
        let older = running([(installed_tag(), "0".repeat(64))].into());
        let c = diff(&older, &refs()).unwrap().unwrap();
        assert_eq!(c.action, Action::Update);
        assert!(matches!(&c.ops[..], [Op::Push { .. }]), "{:?}", c.ops);
    }

    /// Before the host's instance exists the plan shows the push; applied, it waits.
    #[test]
    fn before_the_instance_runs_the_push_is_planned_and_waits() {
        let c = diff(&Observed::default(), &Refs::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create);
        assert!(
            matches!(
                &c.ops[..],
                [Op::Push {
                    instances: None,
                    ..
                }]
            ),
            "{:?}",
            c.ops
        );
        let mut pending = running(Default::default());
        pending.instances[0].state = "pending".into();
        let e = diff(&pending, &refs()).unwrap_err();
        assert!(matches!(e, Error::Waiting { .. }), "{e:?}");
    }
}
