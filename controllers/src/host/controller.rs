//! The host controller: an EC2 instance. Its security group, its data volumes and the
//! Prometheus config pushed to it are nodes of their own ([`crate::security_group`],
//! [`super::volume`], [`super::prometheus`]): the instance is put in its group, and moved back
//! into it if it left; the volumes are attached to it, and to a replacement when the instance
//! is gone, so the Prometheus TSDB on them survives.
//!
//! The instance is found by its ownership tags (the host's address) or adopted by id.
//!
//! # Guarantees
//! - User data is first-boot only: changing it never replaces an instance (plan says so), and
//!   neither does an AMI change.
//! - Nothing waits inside a pass: an instance starting or stopping answers "waiting, look
//!   again" ([`Error::Waiting`]), and the next pass takes the next step from what it observes
//!   (launch; a type change stops the instance, then sets the type and starts it).
//! - Every object is found by tag before anything is created, so a crash between two steps of
//!   a launch leaves objects the next pass completes. A launch repeated because the listing
//!   does not show the first instance yet carries the same client token, and EC2 answers the
//!   first instance. Should a second instance exist anyway, it is seen and terminated: the one
//!   the data volumes are attached to is kept.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataOptionsRequest, InstanceType, ResourceType, VolumeType,
};
use base64::Engine as _;

use super::volume::ObservedVolume;
use super::HostSpec;
use super::{HOST, SECURITY_GROUP};
use crate::ami::{Ami, Image};
use crate::change::{removal, Action, Change};
use crate::controller::{Context, Controller};
use crate::desired::{DesiredState, Resource};
use crate::ec2::{locate_subnet, tag_spec};
use crate::error::{aws_error, Error, Result};
use crate::instances::ObservedInstance;
use crate::model::{Kind, Outputs, Refs, ResourceId};
use crate::security_group;
use crate::tags::{self, owner_id, Tags};

/// How soon to look again at an instance changing state: EC2 takes seconds to tens of seconds.
const STATE_CHANGE: std::time::Duration = std::time::Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Observed state

#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub region: String,
    pub instances: Vec<ObservedInstance>,
    pub volumes: Vec<ObservedVolume>,
}

/// The digest of the user data an instance was launched with, set at launch and never after:
/// what it booted with, against which a changed `user_data` is told apart.
const TAG_USER_DATA: &str = "stackwarden:user-data";

fn owned(tags: &Tags, desired: &DesiredState, id: &ResourceId) -> bool {
    tags::owned_by(tags, desired.stack_name(), id)
}

impl Observed {
    /// The host's instance: the one it adopts by id, or the one carrying its tags. After an
    /// interrupted launch there can be two: the one its data volumes are attached to wins,
    /// then the one that carries a pushed config, then the first.
    pub fn instance(&self, desired: &DesiredState, r: &Resource) -> Option<&ObservedInstance> {
        if let Some(id) = &r.adopt {
            return self.instances.iter().find(|i| &i.id == id);
        }
        let mut owned_here: Vec<&ObservedInstance> = self
            .instances
            .iter()
            .filter(|i| owned(&i.tags, desired, &r.id))
            .collect();
        owned_here.sort_by_key(|i| {
            let has_volume = self
                .volumes
                .iter()
                .any(|v| v.attachment.as_ref().is_some_and(|(id, _)| id == &i.id));
            (
                !has_volume,
                !i.tags.contains_key(&super::prometheus::installed_tag()),
                i.id.clone(),
            )
        });
        owned_here.first().copied()
    }

    /// Instances the host owns besides [`Observed::instance`]: duplicates to terminate.
    pub fn extra_instances(&self, desired: &DesiredState, r: &Resource) -> Vec<&ObservedInstance> {
        let keep = self.instance(desired, r).map(|i| i.id.as_str());
        self.instances
            .iter()
            .filter(|i| owned(&i.tags, desired, &r.id) && Some(i.id.as_str()) != keep)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

/// A new (or replacement) instance. Its data volumes (their own nodes) and config follow once it
/// runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The host's security group (its own node).
    pub group: String,
    /// Resolved when launching.
    pub ami: Ami,
    pub instance_type: String,
    /// The encrypted gp3 root volume's size, at the image's root device.
    pub root_volume_size_gib: i32,
    /// None: the default VPC's default subnet in the region's first zone.
    pub subnet: Option<String>,
    pub instance_profile: Option<String>,
    pub user_data: Option<String>,
    pub key_name: Option<String>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Launch(Box<Launch>),
    Start {
        instance: String,
    },
    /// Stops a running instance whose type is to change (a type changes only while stopped).
    Stop {
        instance: String,
    },
    /// Changes a stopped instance's type.
    SetType {
        instance: String,
        instance_type: String,
    },
    /// Puts the instance in exactly these security groups.
    SetGroups {
        instance: String,
        groups: Vec<String>,
    },
    Tag {
        resource: String,
        tags: Tags,
    },
    Untag {
        resource: String,
        keys: Vec<String>,
    },
    Terminate {
        instance: String,
    },
    DeleteVolume {
        volume: String,
    },
}

// ---------------------------------------------------------------------------------------------
// The controller

pub struct HostController;

#[async_trait]
impl Controller for HostController {
    type Observed = Observed;
    type Op = Op;

    fn kind(&self) -> Kind {
        HOST
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        Ok(Observed {
            region: ctx.region.clone(),
            instances: crate::instances::instances(ctx, desired)
                .await?
                .as_ref()
                .clone(),
            volumes: super::volume::observe(ctx, desired).await?.as_ref().clone(),
        })
    }

    fn outputs(&self, desired: &DesiredState, obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        desired
            .of_kind(HOST)
            .filter_map(|r| {
                // A starting instance has no public address yet: its outputs wait for it.
                let i = obs.instance(desired, r).filter(|i| i.state != "pending")?;
                let out = Outputs::from([
                    ("instance_id".into(), i.id.clone()),
                    ("availability_zone".into(), i.zone.clone()),
                    ("private_ip".into(), i.private_ip.clone()),
                    ("public_ip".into(), i.public_ip.clone()),
                    ("private_dns".into(), i.private_dns.clone()),
                ]);
                Some((r.id.clone(), out))
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
        let s = r.spec.expect::<HostSpec>();
        let name = desired.default_name(&r.id);
        let tags = s.instance_tags(desired, &r.id);
        let group = security_group::group_id(refs, SECURITY_GROUP, &r.id.name, None);

        if let Some(id) = &r.adopt {
            let Some(inst) = obs.instance(desired, r) else {
                return Err(Error::Invalid(format!(
                    "{}: instance `{id}` to adopt does not exist (or is terminated); remove `adopt` to have a new one launched",
                    r.id
                )));
            };
            if let Some(owner) = tags::other_stack(&inst.tags, desired.stack_name()) {
                return Err(tags::owned_elsewhere("instance", id, owner));
            }
        }
        let Some(inst) = obs.instance(desired, r) else {
            // New, or replacing a terminated instance: the volumes it had are attached again
            // by their nodes. Subnet and VPC are looked up when launching: a converged pass
            // needs neither.
            let subnet = s.subnet.as_ref().map(|sn| refs.render(sn).value);
            let replacing = s
                .volumes
                .iter()
                .any(|v| super::volume::find(desired, r, &v.device, &obs.volumes).is_some());
            let mut c = Change::new(r.id.clone(), Action::Create, format!("host {name}"));
            if replacing {
                c.notes.push("the instance is gone: a new one is launched and the existing data volumes are attached to it".into());
            }
            c.field("instance_type", None, Some(s.instance_type.clone()));
            c.field("ami", None, Some(s.ami.to_string()));
            c.field(
                "root_volume",
                None,
                Some(format!("{} GiB encrypted", s.root_volume_size_gib)),
            );
            c.field(
                "subnet",
                None,
                Some(
                    subnet
                        .clone()
                        .unwrap_or_else(|| "(the default VPC's, first zone)".into()),
                ),
            );
            c.field("security_group", None, Some(group.clone()));
            c.op(Op::Launch(Box::new(Launch {
                group,
                ami: s.ami.clone(),
                instance_type: s.instance_type.clone(),
                root_volume_size_gib: s.root_volume_size_gib,
                subnet,
                instance_profile: s.instance_profile.as_ref().map(|p| refs.render(p).value),
                user_data: s.loaded_user_data.clone(),
                key_name: s.key_name.clone(),
                tags: {
                    let mut tags = tags;
                    if let Some(u) = &s.loaded_user_data {
                        tags.insert(TAG_USER_DATA.into(), crate::change::digest(u));
                    }
                    tags
                },
            })));
            return Ok(Some(c));
        };
        if matches!(inst.state.as_str(), "pending" | "stopping") {
            return Err(Error::waiting(
                format!("instance {} is {}", inst.id, inst.state),
                STATE_CHANGE,
            ));
        }

        let mut c = Change::new(
            r.id.clone(),
            Action::Update,
            format!("host {name} ({})", inst.id),
        );
        for extra in obs.extra_instances(desired, r) {
            c.notes.push(format!(
                "{} is a second instance of this host (left by an interrupted launch): terminated",
                extra.id
            ));
            c.field(
                format!("instance {}", extra.id),
                Some("duplicate".into()),
                None,
            );
            c.op(Op::Terminate {
                instance: extra.id.clone(),
            });
        }
        let adopting = r.adopt.is_some() && !owned(&inst.tags, desired, &r.id);
        if adopting {
            c.notes.push(format!(
                "adopting existing instance {}: it is tagged the stack's and managed from now on, never recreated; the tags it has besides the desired ones are kept",
                inst.id
            ));
        }
        // Said even when nothing is to be written: the one place a reviewer learns that a
        // user data change does nothing to a running instance.
        let mut user_data_changed = false;
        if let (Some(u), Some(booted)) = (&s.loaded_user_data, inst.tags.get(TAG_USER_DATA)) {
            let now = crate::change::digest(u);
            if *booted != now {
                user_data_changed = true;
                c.notes.push(format!(
                    "user data changed ({booted} → {now}): it runs at first boot only, so {} keeps what it booted with and is not replaced for it",
                    inst.id
                ));
            }
        }
        if matches!(&s.ami, Ami::Id(id) if *id != inst.image_id) {
            c.notes.push(format!(
                "the instance runs {}; an AMI change does not replace it",
                inst.image_id
            ));
        }
        let stopped = inst.state == "stopped";
        if inst.instance_type != s.instance_type {
            c.field(
                "instance_type",
                Some(inst.instance_type.clone()),
                Some(s.instance_type.clone()),
            );
            if stopped {
                c.op(Op::SetType {
                    instance: inst.id.clone(),
                    instance_type: s.instance_type.clone(),
                });
            } else {
                c.notes.push(
                    "the type changes while the instance is stopped: it is stopped, then started with the new type".into(),
                );
                c.op(Op::Stop {
                    instance: inst.id.clone(),
                });
            }
        }
        if stopped {
            c.field("state", Some(inst.state.clone()), Some("running".into()));
            c.op(Op::Start {
                instance: inst.id.clone(),
            });
        }
        if r.adopt.is_some() {
            // An adopted instance's other tags are its previous owner's: kept.
            c.tags_added(&inst.id, &inst.tags, &tags, |tags| Op::Tag {
                resource: inst.id.clone(),
                tags,
            });
        } else {
            c.tags(
                &inst.tags,
                &tags,
                |tags| Op::Tag {
                    resource: inst.id.clone(),
                    tags,
                },
                |keys| Op::Untag {
                    resource: inst.id.clone(),
                    keys,
                },
            );
        }
        if inst.security_groups != [group.clone()] {
            c.field(
                "security_groups",
                Some(inst.security_groups.join(",")),
                Some(group.clone()),
            );
            c.op(Op::SetGroups {
                instance: inst.id.clone(),
                groups: vec![group],
            });
        }
        if c.ops.is_empty() && !user_data_changed {
            return Ok(None);
        }
        Ok(Some(c))
    }

    fn removed(&self, desired: &DesiredState, obs: &Observed, prune: bool) -> Vec<Change<Op>> {
        // Everything the stack owns for a host no longer desired, grouped by the host, in the
        // order it can be deleted: instances, then their volumes (the security group is a node
        // of its own, deleted after them).
        let owned = obs
            .instances
            .iter()
            .map(|i| {
                (
                    &i.tags,
                    Op::Terminate {
                        instance: i.id.clone(),
                    },
                )
            })
            .chain(obs.volumes.iter().map(|v| {
                (
                    &v.tags,
                    Op::DeleteVolume {
                        volume: v.id.clone(),
                    },
                )
            }));
        let mut by_host: BTreeMap<ResourceId, (Vec<Op>, Tags)> = BTreeMap::new();
        for (tags, op) in owned {
            if let Some(id) = owner_id(tags, desired.stack_name()) {
                by_host
                    .entry(id)
                    .or_insert_with(|| (Vec::new(), tags.clone()))
                    .0
                    .push(op);
            }
        }
        by_host
            .into_iter()
            .filter_map(|(id, (ops, tags))| {
                let label = format!("host {}", desired.default_name(&id));
                removal(desired, HOST, &tags, |r| r.id == id, label, prune, || ops)
            })
            .collect()
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        let ec2 = &ctx.ec2;
        match op {
            Op::Launch(l) => launch(ctx, l).await?,
            // A state change is under way when the call returns: the host answers waiting, and
            // the pass that sees the new state takes the next step.
            Op::Start { instance } => {
                ec2.start_instances()
                    .instance_ids(instance)
                    .send()
                    .await
                    .map_err(aws_error("ec2", "StartInstances"))?;
                return Err(Error::waiting(
                    format!("instance {instance} is starting"),
                    STATE_CHANGE,
                ));
            }
            Op::Stop { instance } => {
                ec2.stop_instances()
                    .instance_ids(instance)
                    .send()
                    .await
                    .map_err(aws_error("ec2", "StopInstances"))?;
                return Err(Error::waiting(
                    format!("instance {instance} is stopping to change its type"),
                    STATE_CHANGE,
                ));
            }
            Op::SetType {
                instance,
                instance_type,
            } => {
                ec2.modify_instance_attribute()
                    .instance_id(instance)
                    .instance_type(
                        aws_sdk_ec2::types::AttributeValue::builder()
                            .value(instance_type)
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(aws_error("ec2", "ModifyInstanceAttribute"))?;
            }
            Op::SetGroups { instance, groups } => {
                ec2.modify_instance_attribute()
                    .instance_id(instance)
                    .set_groups(Some(groups.clone()))
                    .send()
                    .await
                    .map_err(aws_error("ec2", "ModifyInstanceAttribute"))?;
            }
            Op::Tag { resource, tags } => crate::ec2::set_tags(ctx, resource, tags).await?,
            Op::Untag { resource, keys } => crate::ec2::remove_tags(ctx, resource, keys).await?,
            Op::Terminate { instance } => {
                ec2.terminate_instances()
                    .instance_ids(instance)
                    .send()
                    .await
                    .map_err(aws_error("ec2", "TerminateInstances"))?;
            }
            Op::DeleteVolume { volume } => {
                // Still attached to an instance being terminated: EC2 frees it shortly.
                let state = volume_state(ctx, volume).await?;
                if state == "in-use" {
                    return Err(Error::waiting(
                        format!("volume {volume} is still attached; it is deleted once free"),
                        STATE_CHANGE,
                    ));
                }
                ec2.delete_volume()
                    .volume_id(volume)
                    .send()
                    .await
                    .map_err(aws_error("ec2", "DeleteVolume"))?;
            }
        }
        Ok(None)
    }
}

/// A volume's state (`creating`, `available`, `in-use`, ...).
async fn volume_state(ctx: &Context, volume: &str) -> Result<String> {
    let out = ctx
        .ec2
        .describe_volumes()
        .volume_ids(volume)
        .send()
        .await
        .map_err(aws_error("ec2", "DescribeVolumes"))?;
    Ok(out
        .volumes()
        .first()
        .and_then(|v| v.state())
        .map(|s| s.as_str().to_string())
        .unwrap_or_default())
}

/// Launches the instance; its volumes and config follow once it runs, in later passes.
///
/// The client token is derived from the request ([`crate::managed::client_token`]), so a
/// launch repeated because DescribeInstances does not list the first instance yet answers
/// that instance instead of launching a second. A token outlives its instance (EC2 keeps it
/// at least a day after the termination): when the answer is an instance already terminated
/// or terminating, the token is stale and the launch is made again with a token of its own.
async fn launch(ctx: &Context, l: &Launch) -> Result<()> {
    let (subnet, _) = locate_subnet(ctx, l.subnet.as_deref()).await?;
    let image = l.ami.resolve(ctx).await?;
    image.check_root_size(l.root_volume_size_gib)?;
    let request = format!(
        "{}\n{}\n{} {}\n{subnet}\n{}\n{:?}\n{:?}\n{:?}\n{:?}",
        image.id,
        l.instance_type,
        image.root_device,
        l.root_volume_size_gib,
        l.group,
        l.instance_profile,
        l.user_data,
        l.key_name,
        l.tags
    );
    // Each stale answer names an instance the next token must differ by.
    let mut stale: Vec<String> = Vec::new();
    let id = loop {
        let mut parts = vec![request.as_str()];
        parts.extend(stale.iter().map(String::as_str));
        let token = crate::managed::client_token(&parts);
        let (id, state) = run_instance(ctx, l, &image, &subnet, &token).await?;
        if !matches!(state.as_str(), "shutting-down" | "terminated") {
            break id;
        }
        if stale.len() >= crate::managed::STALE_TOKENS {
            return Err(Error::Invalid(format!(
                "RunInstances answered terminated instances for {} client tokens in a row ({})",
                stale.len() + 1,
                stale.join(", ")
            )));
        }
        tracing::info!(instance = %id, "client token answered a terminated instance: launching with another");
        stale.push(id);
    };
    tracing::info!(instance = %id, "launched instance");
    Err(Error::waiting(
        format!("instance {id} launched; its data volumes and config follow once it runs"),
        STATE_CHANGE,
    ))
}

/// One RunInstances call: the instance it answers, with its state.
async fn run_instance(
    ctx: &Context,
    l: &Launch,
    image: &Image,
    subnet: &str,
    token: &str,
) -> Result<(String, String)> {
    let out = ctx
        .ec2
        .run_instances()
        .client_token(token)
        .image_id(&image.id)
        .instance_type(InstanceType::from(l.instance_type.as_str()))
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(&image.root_device)
                .ebs(
                    EbsBlockDevice::builder()
                        .volume_size(l.root_volume_size_gib)
                        .volume_type(VolumeType::Gp3)
                        .encrypted(true)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet)
        .security_group_ids(&l.group)
        .set_iam_instance_profile(
            l.instance_profile
                .as_ref()
                .map(|p| IamInstanceProfileSpecification::builder().name(p).build()),
        )
        .set_user_data(
            l.user_data
                .as_ref()
                .map(|u| base64::engine::general_purpose::STANDARD.encode(u)),
        )
        .set_key_name(l.key_name.clone())
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .build(),
        )
        .tag_specifications(tag_spec(ResourceType::Instance, &l.tags))
        .send()
        .await
        .map_err(aws_error("ec2", "RunInstances"))?;
    let inst = out
        .instances()
        .first()
        .ok_or_else(|| Error::Invalid("RunInstances returned no instance".into()))?;
    Ok((
        inst.instance_id().unwrap_or_default().to_string(),
        inst.state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Spec;
    use crate::testing::{desired, owned_tags, resource};

    fn spec(text: &str) -> HostSpec {
        toml::from_str(text).unwrap()
    }

    const HOST_TOML: &str = r#"
ami = "ami-1"
instance_type = "t3.medium"
subnet = "subnet-1"
security_group = { ingress = [{ port = 9090, cidrs = ["10.0.0.0/16"] }] }
volumes = [{ device = "/dev/sdf", size_gib = 100 }]
"#;

    fn observed() -> Observed {
        let tags = owned_tags("host.prom");
        let mut vol_tags = owned_tags("host.prom.volume.sdf");
        vol_tags.insert(super::super::volume::TAG_DEVICE.into(), "/dev/sdf".into());
        vol_tags.insert("Name".into(), "s-prom-dev-sdf".into());
        let mut inst_tags = tags.clone();
        inst_tags.insert("Name".into(), "s-prom".into());
        Observed {
            region: "us-east-1".into(),
            instances: vec![ObservedInstance {
                id: "i-1".into(),
                state: "running".into(),
                instance_type: "t3.medium".into(),
                image_id: "ami-1".into(),
                zone: "us-east-1a".into(),
                security_groups: vec!["sg-1".into()],
                tags: inst_tags,
                ..Default::default()
            }],
            volumes: vec![ObservedVolume {
                id: "vol-1".into(),
                state: "in-use".into(),
                size: 100,
                volume_type: "gp3".into(),
                attachment: Some(("i-1".into(), "/dev/sdf".into())),
                tags: vol_tags,
                ..Default::default()
            }],
        }
    }

    fn diff(s: HostSpec, o: &Observed) -> Result<Option<Change<Op>>> {
        let r = resource(HOST, "prom", Spec::new(s));
        let mut refs = Refs::default();
        refs.outputs.insert(
            ResourceId::part(SECURITY_GROUP, "prom", None),
            Outputs::from([("id".into(), "sg-1".into())]),
        );
        HostController.diff(&desired(vec![r.clone()]), &r, o, &refs)
    }

    #[test]
    fn a_host_as_desired_has_no_change() {
        assert_eq!(
            diff(spec(HOST_TOML), &observed()).unwrap().map(|c| c.ops),
            None
        );
    }

    #[test]
    fn a_missing_host_is_launched_in_its_group() {
        let c = diff(spec(HOST_TOML), &Observed::default())
            .unwrap()
            .unwrap();
        let [Op::Launch(l)] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(l.group, "sg-1", "its security group node's");
        assert_eq!(l.subnet.as_deref(), Some("subnet-1"));
        assert_eq!(l.tags.get("Name").map(String::as_str), Some("s-prom"));
        let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "instance_type",
                "ami",
                "root_volume",
                "subnet",
                "security_group"
            ],
            "the data volume is a node of its own"
        );
        assert_eq!(
            c.fields[2].after.as_deref(),
            Some("20 GiB encrypted"),
            "at the root device of the image resolved when launching"
        );
        assert_eq!(
            (l.ami.to_string(), l.root_volume_size_gib),
            ("ami-1".into(), 20)
        );
    }

    #[test]
    fn a_terminated_host_is_replaced_keeping_its_volume() {
        let mut o = observed();
        o.instances.clear();
        o.volumes[0].attachment = None;
        let c = diff(spec(HOST_TOML), &o).unwrap().unwrap();
        let [Op::Launch(l)] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(l.group, "sg-1");
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("the existing data volumes are attached to it")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn stopped_resized_and_regrouped_hosts_are_corrected() {
        let mut o = observed();
        o.instances[0].state = "stopped".into();
        o.instances[0].instance_type = "t3.small".into();
        o.instances[0].security_groups = vec!["sg-1".into(), "sg-open".into()];
        o.volumes[0].attachment = None;
        let c = diff(spec(HOST_TOML), &o).unwrap().unwrap();
        assert!(
            matches!(
                &c.ops[..],
                [Op::SetType { instance_type, .. }, Op::Start { .. }, Op::SetGroups { groups, .. }]
                    if instance_type == "t3.medium" && groups == &["sg-1".to_string()]
            ),
            "the volume waits for the instance to run: {:?}",
            c.ops
        );
    }

    /// An instance made by another tool (Terraform, say), adopted by id: tagged the host's,
    /// never launched, terminated or moved; its own tags kept (its volume is its node's).
    #[test]
    fn an_adopted_instance_is_tagged_and_kept() {
        let mut o = observed();
        o.instances[0].id = "i-tf".into();
        o.instances[0].tags = Tags::from([("Name".into(), "prometheus-server".into())]);
        o.volumes[0].tags = Tags::from([("Name".into(), "prometheus-data".into())]);
        o.volumes[0].attachment = Some(("i-tf".into(), "/dev/sdf".into()));
        let mut r = resource(HOST, "prom", Spec::new(spec(HOST_TOML)));
        r.adopt = Some("i-tf".into());
        let mut refs = Refs::default();
        refs.outputs.insert(
            ResourceId::part(SECURITY_GROUP, "prom", None),
            Outputs::from([("id".into(), "sg-1".into())]),
        );
        let d = desired(vec![r.clone()]);
        let c = HostController.diff(&d, &r, &o, &refs).unwrap().unwrap();
        let [Op::Tag {
            resource: i,
            tags: it,
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(i, "i-tf");
        assert!(owned(it, &d, &r.id), "{it:?}");
        assert!(c
            .notes
            .iter()
            .any(|n| n.contains("adopting existing instance i-tf")));
        // Once tagged, nothing more; the tags it had besides the desired ones stay.
        o.instances[0].tags.extend(it.clone());
        o.instances[0]
            .tags
            .insert("terraform".into(), "true".into());
        assert_eq!(
            HostController
                .diff(&d, &r, &o, &refs)
                .unwrap()
                .map(|c| c.ops),
            None
        );

        // Gone, or another stack's: an error, nothing launched.
        let gone = Observed::default();
        assert!(matches!(
            HostController.diff(&d, &r, &gone, &refs),
            Err(Error::Invalid(m)) if m.contains("`i-tf` to adopt does not exist")
        ));
        o.instances[0]
            .tags
            .insert(crate::desired::TAG_STACK.into(), "other".into());
        assert!(matches!(
            HostController.diff(&d, &r, &o, &refs),
            Err(Error::NotOwned(_))
        ));
    }

    /// A type change goes one state at a time, each pass taking the next step from what it
    /// sees; nothing waits inside a pass.
    #[test]
    fn a_type_change_stops_then_sets_the_type_and_starts_and_transitions_wait() {
        let mut o = observed();
        o.instances[0].instance_type = "t3.small".into();
        let c = diff(spec(HOST_TOML), &o).unwrap().unwrap();
        assert!(matches!(&c.ops[..], [Op::Stop { .. }]), "{:?}", c.ops);
        for state in ["stopping", "pending"] {
            o.instances[0].state = state.into();
            let Err(e) = diff(spec(HOST_TOML), &o) else {
                panic!("{state}: not waiting")
            };
            assert_eq!(e.class(), crate::error::ErrorClass::Waiting, "{state}");
            assert_eq!(e.to_string(), format!("waiting: instance i-1 is {state}"));
        }
        o.instances[0].state = "stopped".into();
        let c = diff(spec(HOST_TOML), &o).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::SetType { .. }, Op::Start { .. }]),
            "{:?}",
            c.ops
        );
    }

    #[test]
    fn a_duplicate_instance_from_an_interrupted_launch_is_terminated() {
        let mut o = observed();
        let mut twin = o.instances[0].clone();
        twin.id = "i-0".into();
        o.instances.push(twin);
        let c = diff(spec(HOST_TOML), &o).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Terminate { instance }] if instance == "i-0"),
            "the instance with the volume stays: {:?}",
            c.ops
        );
    }

    /// A launch records the user data's digest; a later change of the file is said in plain
    /// words (the instance keeps what it booted with), a note only: nothing is written for it.
    #[test]
    fn user_data_changes_are_said_and_never_replace_the_instance() {
        let v1 = "#!/bin/bash\necho v1\n";
        let mut s = spec(HOST_TOML);
        s.loaded_user_data = Some(v1.into());
        let c = diff(s.clone(), &Observed::default()).unwrap().unwrap();
        let [Op::Launch(l)] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(l.tags.get(TAG_USER_DATA), Some(&crate::change::digest(v1)));

        let mut o = observed();
        o.instances[0]
            .tags
            .insert(TAG_USER_DATA.into(), crate::change::digest(v1));
        assert_eq!(
            diff(s.clone(), &o).unwrap().map(|c| c.notes),
            None,
            "the user data it booted with: nothing to say"
        );

        s.loaded_user_data = Some("#!/bin/bash\necho v2\n".into());
        let c = diff(s, &o).unwrap().unwrap();
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        assert!(
            c.notes[0].starts_with("user data changed (sha256:"),
            "{}",
            c.notes[0]
        );
        assert!(
            c.notes[0].contains("i-1 keeps what it booted with"),
            "{}",
            c.notes[0]
        );
        assert!(c.ops.is_empty() && c.fields.is_empty(), "{:?}", c.ops);
    }

    #[test]
    fn removed_hosts_are_orphaned_or_terminated_with_their_legacy_volumes() {
        let d = desired(vec![]);
        let mut o = observed();
        assert_eq!(
            HostController.removed(&d, &o, false)[0].action,
            Action::Orphan
        );
        // The volume is its node's (removed by the volume kind).
        let pruned = HostController.removed(&d, &o, true);
        assert!(
            matches!(&pruned[0].ops[..], [Op::Terminate { .. }]),
            "{:?}",
            pruned[0].ops
        );
        // One an earlier version tagged with the host's address goes with the host.
        o.volumes[0].tags = owned_tags("host.prom");
        let pruned = HostController.removed(&d, &o, true);
        assert!(matches!(
            &pruned[0].ops[..],
            [Op::Terminate { .. }, Op::DeleteVolume { .. }]
        ));
    }
}
