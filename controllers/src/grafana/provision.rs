//! The provisioning of a Grafana group: the node `grafana.<name>.provisioning`, the bundle of
//! [`super::provisioning`] pushed over SSM Run Command to the group's running instances.
//!
//! It depends on the group (its name) and on what the provisioning references (a Prometheus
//! host's address, an AMP workspace's endpoint); the group depends on neither, so a data source
//! naming a workspace still being created never holds up the load balancer or the group.
//!
//! # Guarantees
//! - The bundle is pushed only to instances whose recorded hash (tag `stackwarden:grafana`)
//!   differs from the desired bundle's, half the group at a time so it keeps serving; the tag
//!   is written only after the push succeeded on the instance.
//! - Nothing waits inside a pass: while the group has instances launching, or a push runs, the
//!   node answers "waiting, look again" ([`Error::Waiting`]).
//! - Only the admin password's version is read (SSM or Secrets Manager metadata); each instance
//!   fetches that version itself with its own role, so the value never passes through here.
//! - Dropping the group leaves nothing to remove: its instances go with it.
//!
//! # Caveats
//! - Instances of an adopted group launched before the adoption do not carry the stack's tags
//!   (Auto Scaling tags an instance at launch only), so they are provisioned once the group
//!   replaces them (a launch template change rolls them).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ssm::types::ParameterStringFilter;

use super::controller::{stack_groups, ObservedAsg};
use super::provisioning::{self, PasswordVersion, ProvisioningPart};
use super::{PasswordSource, GRAFANA, PROVISIONING};
use crate::change::{Action, Change};
use crate::controller::{Context, Controller, Pushed};
use crate::desired::{DesiredState, Resource};
use crate::error::{aws_error, Error, ErrorClass, Result};
use crate::instances::{instances, ObservedInstance};
use crate::kind::Kind;
use crate::model::{Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::push;
use crate::push::send::{track_tag, Controls, Op, Rollout, Tracked};

/// How soon to look again at a group whose instances are launching.
const LAUNCHING: Duration = Duration::from_secs(10);

/// Instance tag: the sha256 of the provisioning installed on the instance.
pub(crate) fn installed_tag() -> String {
    push::hash_tag(provisioning::NAME)
}

#[derive(Debug, Default)]
pub struct Observed {
    pub region: String,
    /// The stack's Auto Scaling Groups (the shared read), for their members.
    pub groups: Vec<ObservedAsg>,
    pub instances: Vec<ObservedInstance>,
    /// The verdicts of the pushes running on them.
    pub tracked: Tracked,
    pub passwords: BTreeMap<ResourceId, std::result::Result<PasswordVersion, Error>>,
}

pub struct ProvisioningController;

#[async_trait]
impl Controller for ProvisioningController {
    type Observed = Observed;
    type Op = Op;

    fn kind(&self) -> Kind {
        PROVISIONING
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        if desired.of_kind(PROVISIONING).next().is_none() {
            // Nothing is removed with a group: nothing to read.
            return Ok(Observed::default());
        }
        let (groups, instances) =
            futures::join!(stack_groups(ctx, desired), instances(ctx, desired));
        let instances = instances?.as_ref().clone();
        let tracked = track_tag(ctx, &instances, &installed_tag()).await?;
        let mut passwords = BTreeMap::new();
        for (r, part) in desired.specs::<ProvisioningPart>(PROVISIONING) {
            if let Some(source) = part.provisioning.password_source() {
                passwords.insert(r.id.clone(), read_password(ctx, &source).await);
            }
        }
        Ok(Observed {
            region: ctx.region.clone(),
            groups: groups?.map(|g| g.as_ref().clone()).unwrap_or_default(),
            instances,
            tracked,
            passwords,
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
        let part = r.spec.expect::<ProvisioningPart>();
        let password = match obs.passwords.get(&r.id) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Err(e.clone()),
            None => None,
        };
        let p = provisioning::bundle(part, refs, &obs.region, password).prepare()?;
        let commands = provisioning::Commands::of(part).describe(password.is_some());
        let table = ResourceId::new(GRAFANA, r.id.name.clone());
        let name = desired.default_name(&table);
        let password_field = |c: &mut Change<Op>| {
            if let Some(source) = part.provisioning.password_source() {
                c.field("admin_password", None, Some(source.describe()));
            }
        };
        // The group's name exists once it is made.
        let Some(group) = refs.outputs.get(&table).and_then(|o| o.get("asg_name")) else {
            let mut c = Change::new(
                r.id.clone(),
                Action::Create,
                format!("provisioning of grafana {name}"),
            );
            c.field("instances", None, Some(KNOWN_AFTER_APPLY.into()));
            c.field("provisioning", None, Some(p.short_hash()));
            password_field(&mut c);
            c.notes.push(commands);
            c.op(Op::Push {
                push: p,
                instances: None,
                controls: controls(),
            });
            return Ok(Some(c));
        };
        let fleet: Vec<(&str, Option<&str>)> = obs
            .instances
            .iter()
            .filter(|i| i.is_running())
            .filter(|i| i.tags.get("aws:autoscaling:groupName") == Some(group))
            .map(|i| (i.id.as_str(), i.tags.get(&p.hash_tag()).map(String::as_str)))
            .collect();
        let rollout = Rollout::of(&p, fleet.iter().copied(), &obs.tracked);
        let action = if fleet.iter().any(|(_, installed)| installed.is_some()) {
            Action::Update
        } else {
            Action::Create
        };
        let mut c = Change::new(
            r.id.clone(),
            action,
            format!("provisioning of grafana {name} (group {group})"),
        );
        c.notes
            .extend(crate::verify::drift_note(fleet.iter().copied()));
        if !rollout.record.is_empty() {
            c.field(
                "provisioning",
                Some(format!("being installed on {}", rollout.record.len())),
                Some(format!("installed {}", p.short_hash())),
            );
            c.op(Op::Record {
                push: p.clone(),
                instances: rollout.record.clone(),
            });
        }
        if !rollout.send.is_empty() {
            c.field(
                "provisioning",
                Some(format!(
                    "{} of {} instances lack {}",
                    rollout.send.len(),
                    fleet.len(),
                    p.short_hash()
                )),
                Some(format!("all {} ({})", fleet.len(), rollout.send.join(", "))),
            );
            password_field(&mut c);
            c.notes.push(commands);
            c.op(Op::Push {
                push: p,
                instances: Some(rollout.send),
                controls: controls(),
            });
            return Ok(Some(c));
        }
        if !c.ops.is_empty() {
            return Ok(Some(c));
        }
        if let Some(e) = rollout
            .failure(&p, fleet.len())
            .or_else(|| rollout.waiting(&p))
        {
            return Err(e);
        }
        match obs.groups.iter().find(|g| &g.name == group) {
            None => Err(Error::waiting(
                format!("group {group} was just made: its instances are provisioned once they run"),
                LAUNCHING,
            )),
            Some(g) => match launching(g) {
                Some(why) => Err(Error::waiting(
                    format!("{why}: each is provisioned once it runs"),
                    LAUNCHING,
                )),
                None => Ok(None),
            },
        }
    }

    fn removed(&self, _desired: &DesiredState, _obs: &Observed, _prune: bool) -> Vec<Change<Op>> {
        Vec::new()
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        op.apply(ctx).await.map(|()| None)
    }

    fn pushes(&self, desired: &DesiredState) -> Vec<Pushed> {
        if desired.of_kind(PROVISIONING).next().is_none() {
            return Vec::new();
        }
        vec![Pushed {
            tag: installed_tag(),
            bundle: super::provisioning::NAME.into(),
            per_stack: false,
        }]
    }
}

/// Grafana restarts as it is provisioned: half the group at a time keeps it serving.
fn controls() -> Controls {
    Controls {
        max_concurrency: "50%".into(),
        max_errors: "0".into(),
    }
}

/// Why a group has instances still to come: some launching, or fewer than it wants.
fn launching(g: &ObservedAsg) -> Option<String> {
    let pending = g
        .members
        .iter()
        .filter(|(_, state)| state.starts_with("Pending"))
        .count();
    let members = i32::try_from(g.members.len()).unwrap_or(i32::MAX);
    if pending > 0 {
        Some(format!(
            "group {} has {pending} instance(s) launching",
            g.name
        ))
    } else if members < g.desired {
        Some(format!(
            "group {} has {members} of its {} instances",
            g.name, g.desired
        ))
    } else {
        None
    }
}

/// The admin password's current version, read without its value: SSM `DescribeParameters`
/// (the parameter's metadata) or Secrets Manager `DescribeSecret` (the `AWSCURRENT` version).
/// The hosts fetch that version themselves.
async fn read_password(ctx: &Context, source: &PasswordSource) -> Result<PasswordVersion> {
    let missing = |service, operation, code: &str, what: String| Error::Aws {
        service,
        operation,
        code: Some(code.into()),
        class: ErrorClass::Retryable,
        message: format!("{what} does not exist; create it, and the admin password is pushed then"),
    };
    let version = match source {
        PasswordSource::SsmParameter(name) => {
            // DescribeParameters filters after paging: a page may hold nothing and still
            // have a next one, so every page is read until the name turns up.
            let mut pages = ctx
                .ssm
                .describe_parameters()
                .parameter_filters(
                    ParameterStringFilter::builder()
                        .key("Name")
                        .option("Equals")
                        .values(name)
                        .build()
                        .map_err(|e| Error::Invalid(e.to_string()))?,
                )
                .max_results(50)
                .into_paginator()
                .send();
            let mut found = None;
            while let Some(page) = pages.next().await {
                let page = page.map_err(aws_error("ssm", "DescribeParameters"))?;
                found = page
                    .parameters()
                    .iter()
                    .find(|p| p.name() == Some(name.as_str()))
                    .cloned();
                if found.is_some() {
                    break;
                }
            }
            let p = found.ok_or_else(|| {
                missing(
                    "ssm",
                    "DescribeParameters",
                    "ParameterNotFound",
                    format!("the SSM parameter {name}"),
                )
            })?;
            p.version().to_string()
        }
        PasswordSource::Secret(name) => {
            let out = ctx
                .secrets
                .describe_secret()
                .secret_id(name)
                .send()
                .await
                .map_err(aws_error("secretsmanager", "DescribeSecret"))?;
            out.version_ids_to_stages()
                .into_iter()
                .flatten()
                .find(|(_, stages)| stages.iter().any(|s| s == "AWSCURRENT"))
                .map(|(id, _)| id.clone())
                .ok_or_else(|| {
                    missing(
                        "secretsmanager",
                        "DescribeSecret",
                        "ResourceNotFoundException",
                        format!("a current (AWSCURRENT) version of the secret {name}"),
                    )
                })?
        }
    };
    Ok(PasswordVersion {
        source: source.clone(),
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Spec;
    use crate::testing::{desired, resource};

    const GRAFANA_TOML: &str = r#"
ami = "ami-1"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 2
max_size = 3
alb = { subnets = ["subnet-a", "subnet-b"] }
provisioning = { cloudwatch = true }
"#;

    fn node() -> Resource {
        let spec: super::super::GrafanaSpec = toml::from_str(GRAFANA_TOML).unwrap();
        let mut r = resource(PROVISIONING, "main", Spec::new(ProvisioningPart::of(&spec)));
        r.id = ResourceId::part(PROVISIONING, "main", None);
        r
    }

    fn instance(id: &str, state: &str, tags: &[(&str, &str)]) -> ObservedInstance {
        let mut all: crate::tags::Tags =
            [("aws:autoscaling:groupName".into(), "stack-main".into())].into();
        all.extend(tags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        ObservedInstance {
            id: id.into(),
            state: state.into(),
            tags: all,
            ..Default::default()
        }
    }

    fn observed(members: &[(&str, &str)], instances: Vec<ObservedInstance>) -> Observed {
        Observed {
            region: "us-east-1".into(),
            groups: vec![ObservedAsg {
                name: "stack-main".into(),
                desired: 2,
                members: members
                    .iter()
                    .map(|(i, s)| (i.to_string(), s.to_string()))
                    .collect(),
                ..Default::default()
            }],
            instances,
            ..Default::default()
        }
    }

    fn refs() -> Refs {
        Refs {
            outputs: [(
                ResourceId::new(GRAFANA, "main"),
                Outputs::from([("asg_name".into(), "stack-main".into())]),
            )]
            .into(),
            ..Default::default()
        }
    }

    fn diff(o: &Observed, refs: &Refs) -> Result<Option<Change<Op>>> {
        let r = node();
        ProvisioningController.diff(&desired(vec![r.clone()]), &r, o, refs)
    }

    /// The desired bundle's hash, in the observed region.
    fn hash() -> String {
        let o = Observed {
            region: "us-east-1".into(),
            ..Default::default()
        };
        let Op::Push { push, .. } = &diff(&o, &Refs::default()).unwrap().unwrap().ops[0] else {
            unreachable!()
        };
        push.hash.clone()
    }

    #[test]
    fn only_the_instances_lacking_the_bundle_get_it() {
        let tag = installed_tag();
        let hash = hash();
        let o = observed(
            &[("i-1", "InService"), ("i-2", "InService")],
            vec![
                instance("i-1", "running", &[(&tag, &hash)]),
                instance("i-2", "running", &[(&tag, &"0".repeat(64))]),
                // Another group's instance is not this one's.
                ObservedInstance {
                    id: "i-9".into(),
                    state: "running".into(),
                    ..Default::default()
                },
            ],
        );
        let c = diff(&o, &refs()).unwrap().unwrap();
        assert_eq!(c.action, Action::Update);
        let [Op::Push {
            instances: Some(instances),
            ..
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(instances, &["i-2".to_string()]);

        let o = observed(
            &[("i-1", "InService"), ("i-2", "InService")],
            vec![
                instance("i-1", "running", &[(&tag, &hash)]),
                instance("i-2", "running", &[(&tag, &hash)]),
            ],
        );
        assert!(diff(&o, &refs()).unwrap().is_none());
    }

    /// Before the group exists the plan shows the push; applied, it waits.
    #[test]
    fn before_the_group_is_made_the_push_is_planned_and_waits() {
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
        // Made in this pass, not yet observed: waiting.
        let e = diff(&Observed::default(), &refs()).unwrap_err();
        assert!(matches!(e, Error::Waiting { .. }), "{e:?}");
    }

    #[test]
    fn a_group_with_instances_launching_is_waited_for() {
        let tag = installed_tag();
        let hash = hash();
        let done = instance("i-1", "running", &[(&tag, &hash)]);
        for members in [
            &[("i-1", "InService"), ("i-2", "Pending")][..],
            &[("i-1", "InService")][..],
        ] {
            let e = diff(&observed(members, vec![done.clone()]), &refs()).unwrap_err();
            assert!(matches!(e, Error::Waiting { .. }), "{e:?}");
        }
        // A launching instance does not hold up the push to one that runs.
        let c = diff(
            &observed(
                &[("i-1", "InService"), ("i-2", "Pending")],
                vec![instance("i-1", "running", &[])],
            ),
            &refs(),
        )
        .unwrap()
        .unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Push { instances: Some(i), .. }] if i == &["i-1".to_string()]),
            "{:?}",
            c.ops
        );
    }
}
