//! A host's EBS data volumes, each a node of its own (`host.<name>.volume.<device>`, e.g.
//! `host.prometheus.volume.sdf`) on the managed-object layer.
//!
//! A volume outlives its instance: it is created in the instance's zone, attached at its device
//! once available, grown or retyped in place, and attached to a replacement instance when the
//! old one is gone, so the Prometheus TSDB on it survives. It carries its node's address and its
//! device (`stackwarden:device`). Volumes made by versions from before volumes were nodes carry
//! their host's address with the device tag: they are found so and retagged, never recreated.
//! The volume of an adopted instance is the one attached at the device until it carries the
//! stack's tags, and keeps the tags it had.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::types::{Filter, ResourceType, VolumeType};

use super::{HOST, VOLUME};
use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{DesiredState, Resource, TAG_STACK};
use crate::ec2::{remove_tags, set_tags, tag_map, tag_spec};
use crate::error::{aws_error, Error, Result};
use crate::managed::{Describe, ManagedObject, Readiness};
use crate::model::{Kind, Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::tags::{self, owned_by, Tags};

/// Volume tag: the device the volume belongs at.
pub const TAG_DEVICE: &str = "stackwarden:device";

/// How soon to look again at a volume being created or freed.
const STATE_CHANGE: Duration = Duration::from_secs(5);

/// One data volume of a host, as its table writes it (`volumes = [...]`).
#[derive(Debug, Clone)]
pub struct VolumePart {
    pub device: String,
    pub size: i32,
    pub volume_type: String,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

impl crate::desired::KindSpec for VolumePart {}

/// The key of a volume's node: its device's name (`/dev/sdf` is `sdf`).
pub fn key(device: &str) -> String {
    device.rsplit('/').next().unwrap_or(device).to_string()
}

/// What a volume node wants, with its instance's id and zone once the instance exists.
#[derive(Debug, Clone)]
pub struct VolumeWant {
    part: VolumePart,
    instance: Option<String>,
    zone: Option<String>,
    tags: Tags,
}

/// One in-place change of a volume.
#[derive(Debug, Clone)]
pub enum VolumeUpdate {
    /// Size, type, IOPS, throughput (one `ModifyVolume`).
    Modify { from: (i32, String), to: VolumePart },
    /// Attached at its device to the host's instance (after a replacement, or a detach).
    Attach { instance: String, device: String },
}

impl Describe for VolumeUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match self {
            VolumeUpdate::Modify { from, to } => vec![FieldChange::new(
                "size",
                Some(format!("{} GiB {}", from.0, from.1)),
                Some(format!("{} GiB {}", to.size, to.volume_type)),
            )],
            VolumeUpdate::Attach { instance, device } => vec![FieldChange::new(
                "attachment",
                None,
                Some(format!("{instance} at {device}")),
            )],
        }
    }
}

/// The volume node of `host` at `device` finds: the one carrying the node's tags, one an
/// earlier version tagged with the host's address and the device, or, for an adopted instance,
/// the one attached to it at the device that no other stack owns.
pub fn find<'o>(
    desired: &DesiredState,
    host: &Resource,
    device: &str,
    volumes: &'o [ObservedVolume],
) -> Option<&'o ObservedVolume> {
    let stack = desired.stack_name();
    let part = ResourceId::part(VOLUME, host.id.name.clone(), Some(key(device)));
    let at_device =
        |v: &&ObservedVolume| v.tags.get(TAG_DEVICE).map(String::as_str) == Some(device);
    // Should two carry the node's tags (an interrupted create), the attached one, then the
    // lowest id: always the same one, so the other is never attached too.
    volumes
        .iter()
        .filter(|v| owned_by(&v.tags, stack, &part))
        .min_by_key(|v| (v.attachment.is_none(), v.id.as_str()))
        .or_else(|| {
            volumes
                .iter()
                .filter(at_device)
                .find(|v| owned_by(&v.tags, stack, &host.id))
        })
        .or_else(|| {
            let instance = host.adopt.as_ref()?;
            volumes.iter().find(|v| {
                v.attachment.as_ref() == Some(&(instance.clone(), device.to_string()))
                    && tags::other_stack(&v.tags, stack).is_none()
            })
        })
}

/// The stack's data volumes, and those attached to the instances its hosts adopt while one of
/// their devices has no volume of the stack: read once per observation, for the hosts and
/// their volume nodes.
pub async fn observe(ctx: &Context, desired: &DesiredState) -> Result<Arc<Vec<ObservedVolume>>> {
    ctx.shared("ec2:DescribeVolumes", || async {
        let mut volumes = read(
            ctx,
            Filter::builder()
                .name(format!("tag:{TAG_STACK}"))
                .values(desired.stack_name())
                .build(),
        )
        .await?;
        let untagged: Vec<String> = desired
            .specs::<super::HostSpec>(HOST)
            .filter_map(|(r, s)| {
                let id = r.adopt.as_ref()?;
                s.volumes
                    .iter()
                    .any(|v| find(desired, r, &v.device, &volumes).is_none())
                    .then(|| id.clone())
            })
            .collect();
        if !untagged.is_empty() {
            let attached = Filter::builder()
                .name("attachment.instance-id")
                .set_values(Some(untagged))
                .build();
            for v in read(ctx, attached).await? {
                if !volumes.iter().any(|have| have.id == v.id) {
                    volumes.push(v);
                }
            }
        }
        Ok(volumes)
    })
    .await
}

/// The volumes `filter` selects.
/// One data volume as read.
#[derive(Debug, Clone, Default)]
pub struct ObservedVolume {
    pub id: String,
    /// `creating`, `available`, `in-use`, ...
    pub state: String,
    pub size: i32,
    pub volume_type: String,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
    /// (instance, device) while attached.
    pub attachment: Option<(String, String)>,
    pub tags: Tags,
    /// Seconds since it was created, when it was read.
    pub age: u64,
}

fn observed_volume(v: &aws_sdk_ec2::types::Volume) -> ObservedVolume {
    let attachment = v.attachments().iter().find(|a| {
        !matches!(
            a.state().map(|s| s.as_str()),
            Some("detaching" | "detached")
        )
    });
    ObservedVolume {
        id: v.volume_id().unwrap_or_default().into(),
        state: v
            .state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        size: v.size().unwrap_or_default(),
        volume_type: v
            .volume_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        iops: v.iops(),
        throughput: v.throughput(),
        attachment: attachment.map(|a| {
            (
                a.instance_id().unwrap_or_default().into(),
                a.device().unwrap_or_default().into(),
            )
        }),
        tags: tag_map(v.tags()),
        age: v
            .create_time()
            .and_then(|t| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs() as i64;
                u64::try_from(now - t.secs()).ok()
            })
            .unwrap_or(u64::MAX),
    }
}

async fn read(ctx: &Context, filter: Filter) -> Result<Vec<ObservedVolume>> {
    let mut volumes = Vec::new();
    let mut pages = ctx
        .ec2
        .describe_volumes()
        .filters(filter)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("ec2", "DescribeVolumes"))?;
        volumes.extend(page.volumes().iter().map(observed_volume));
    }
    Ok(volumes)
}

/// `host.<name>.volume.<device>`.
pub struct Volume;

impl Volume {
    async fn attach(ctx: &Context, volume: &str, instance: &str, device: &str) -> Result<()> {
        ctx.ec2
            .attach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .device(device)
            .send()
            .await
            .map_err(aws_error("ec2", "AttachVolume"))?;
        Ok(())
    }
}

#[async_trait]
impl ManagedObject for Volume {
    type Desired = VolumeWant;
    type Observed = ObservedVolume;
    type Update = VolumeUpdate;
    const KIND: Kind = VOLUME;
    const NOUN: &'static str = "volume";
    const DELETES_DROPPED: bool = false;

    fn desired(&self, desired: &DesiredState, node: &Resource, refs: &Refs) -> Result<VolumeWant> {
        let part = node.spec.expect::<VolumePart>();
        let host = refs.outputs.get(&node.id.composite());
        let mut own = Tags::from([(TAG_DEVICE.to_string(), part.device.clone())]);
        own.insert(
            "Name".into(),
            format!(
                "{}{}",
                desired.default_name(&node.id.composite()),
                part.device.replace('/', "-")
            ),
        );
        let mut part = part.clone();
        // A key may be named by reference (`${...}`): its node depends on what it names.
        part.kms_key_id = part.kms_key_id.map(|k| refs.render(&k).value);
        Ok(VolumeWant {
            part,
            instance: host.and_then(|h| h.get("instance_id")).cloned(),
            zone: host.and_then(|h| h.get("availability_zone")).cloned(),
            tags: own,
        })
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<ObservedVolume>> {
        Ok(observe(ctx, desired).await?.as_ref().clone())
    }

    fn id(&self, o: &ObservedVolume) -> String {
        o.id.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedVolume) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedVolume],
    ) -> Option<&'o ObservedVolume> {
        let part = node.spec.expect::<VolumePart>();
        let host = desired.resources.get(&node.id.composite())?;
        find(desired, host, &part.device, observed)
    }

    fn keeps_other_tags(&self, desired: &DesiredState, node: &Resource) -> bool {
        // The volume of an adopted instance keeps its previous owner's tags, as the instance.
        desired
            .resources
            .get(&node.id.composite())
            .is_some_and(|host| host.adopt.is_some())
    }

    fn outputs(&self, o: &ObservedVolume) -> Outputs {
        Outputs::from([("id".into(), o.id.clone())])
    }

    fn readiness(&self, want: &VolumeWant, have: &ObservedVolume) -> Result<Readiness> {
        if want.part.size < have.size {
            return Err(Error::Invalid(format!(
                "volume {} is {} GiB and the desired state says {} GiB; EBS volumes cannot shrink",
                have.id, have.size, want.part.size
            )));
        }
        let elsewhere = have
            .attachment
            .as_ref()
            .is_some_and(|(i, _)| Some(i) != want.instance.as_ref());
        Ok(match have.state.as_str() {
            "creating" => Readiness::Waiting("still creating".into(), STATE_CHANGE),
            "in-use" if elsewhere => Readiness::Waiting(
                format!(
                    "attached to {}; it is attached to the host's instance once free",
                    have.attachment.as_ref().map(|a| a.0.as_str()).unwrap_or("")
                ),
                STATE_CHANGE,
            ),
            _ => Readiness::Ready,
        })
    }

    fn diff(&self, want: &VolumeWant, have: &ObservedVolume) -> Vec<VolumeUpdate> {
        let mut out = Vec::new();
        let p = &want.part;
        if p.size != have.size
            || p.volume_type != have.volume_type
            || (p.iops.is_some() && p.iops != have.iops)
            || (p.throughput.is_some() && p.throughput != have.throughput)
        {
            out.push(VolumeUpdate::Modify {
                from: (have.size, have.volume_type.clone()),
                to: p.clone(),
            });
        }
        if let Some(instance) = &want.instance {
            if have.attachment.is_none() && have.state == "available" {
                out.push(VolumeUpdate::Attach {
                    instance: instance.clone(),
                    device: p.device.clone(),
                });
            }
        }
        out
    }

    fn own_tags(&self, want: &VolumeWant) -> Tags {
        want.tags.clone()
    }

    fn create_fields(&self, want: &VolumeWant) -> Vec<FieldChange> {
        let p = &want.part;
        vec![
            FieldChange::new(
                "size",
                None,
                Some(format!("{} GiB {}", p.size, p.volume_type)),
            ),
            FieldChange::new(
                "attachment",
                None,
                Some(format!(
                    "{} at {}",
                    want.instance.as_deref().unwrap_or(KNOWN_AFTER_APPLY),
                    p.device
                )),
            ),
        ]
    }

    fn label(&self, want: &VolumeWant) -> String {
        want.part.device.clone()
    }

    /// Made in the instance's zone; attached at once when EBS has it available already, else
    /// by a later pass.
    async fn create(&self, ctx: &Context, want: &VolumeWant, tags: &Tags) -> Result<Outputs> {
        let (Some(instance), Some(zone)) = (&want.instance, &want.zone) else {
            return Err(Error::waiting(
                format!("volume {} waits for its instance to run", want.part.device),
                STATE_CHANGE,
            ));
        };
        let p = &want.part;
        // A token of its own: should an answer be lost, the SDK's retry carries the same one,
        // and EBS answers the volume it made instead of making a second.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let token = format!("{}-{}", key(&p.device), now.as_nanos());
        let out = ctx
            .ec2
            .create_volume()
            .client_token(token)
            .availability_zone(zone)
            .size(p.size)
            .volume_type(VolumeType::from(p.volume_type.as_str()))
            .set_iops(p.iops)
            .set_throughput(p.throughput)
            .encrypted(p.encrypted)
            .set_kms_key_id(p.kms_key_id.clone())
            .tag_specifications(tag_spec(ResourceType::Volume, tags))
            .send()
            .await
            .map_err(aws_error("ec2", "CreateVolume"))?;
        let id = out.volume_id().unwrap_or_default().to_string();
        if out.state().map(|s| s.as_str()) != Some("available") {
            return Err(Error::waiting(
                format!(
                    "volume {id} ({}) created; it is attached once available",
                    p.device
                ),
                STATE_CHANGE,
            ));
        }
        Volume::attach(ctx, &id, instance, &p.device).await?;
        Ok(Outputs::from([("id".into(), id)]))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedVolume,
        change: &VolumeUpdate,
    ) -> Result<Option<Outputs>> {
        match change {
            VolumeUpdate::Modify { to, .. } => {
                ctx.ec2
                    .modify_volume()
                    .volume_id(&have.id)
                    .size(to.size)
                    .volume_type(VolumeType::from(to.volume_type.as_str()))
                    .set_iops(to.iops)
                    .set_throughput(to.throughput)
                    .send()
                    .await
                    .map_err(aws_error("ec2", "ModifyVolume"))?;
            }
            VolumeUpdate::Attach { instance, device } => {
                Volume::attach(ctx, &have.id, instance, device).await?
            }
        }
        Ok(None)
    }

    async fn tag(&self, ctx: &Context, have: &ObservedVolume, set: &Tags) -> Result<()> {
        set_tags(ctx, &have.id, set).await
    }

    async fn untag(&self, ctx: &Context, have: &ObservedVolume, keys: &[String]) -> Result<()> {
        remove_tags(ctx, &have.id, keys).await
    }

    /// A second volume of a node, unattached and made within the hour: what an interrupted
    /// create left (its node chose the other one, see [`find`]). An older one may hold data
    /// someone detached on purpose: it is reported as orphaned, never deleted.
    fn is_stray_duplicate(&self, o: &ObservedVolume) -> bool {
        o.attachment.is_none() && o.state == "available" && o.age < 3600
    }

    /// A volume still attached is detached first (its instance may be terminating already, so
    /// a refused detach is no error): it is deleted by a later pass, once free.
    async fn delete(&self, ctx: &Context, have: &ObservedVolume) -> Result<()> {
        if let Some((instance, _)) = &have.attachment {
            let detached = ctx
                .ec2
                .detach_volume()
                .volume_id(&have.id)
                .instance_id(instance)
                .send()
                .await;
            if let Err(e) = detached {
                tracing::debug!(volume = %have.id, error = %e, "detach before delete refused");
            }
            return Err(Error::waiting(
                format!(
                    "volume {} is still attached; it is deleted once free",
                    have.id
                ),
                STATE_CHANGE,
            ));
        }
        ctx.ec2
            .delete_volume()
            .volume_id(&have.id)
            .send()
            .await
            .map_err(aws_error("ec2", "DeleteVolume"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Action, Change};
    use crate::controller::Controller;
    use crate::desired::{KindSpec, Spec};
    use crate::managed::{Managed, Op};
    use crate::testing::{desired, owned_tags, resource};

    const HOST_TOML: &str = r#"
ami = "ami-1"
instance_type = "t3.medium"
volumes = [{ device = "/dev/sdf", size_gib = 100 }]
"#;

    /// The host table and its nodes, as loading expands them.
    fn nodes(adopt: Option<&str>) -> DesiredState {
        let spec: super::super::HostSpec = toml::from_str(HOST_TOML).unwrap();
        let mut host = resource(HOST, "prom", Spec::new(spec.clone()));
        host.adopt = adopt.map(String::from);
        let (mut all, _) = spec.parts(&host).unwrap();
        all.push(host);
        desired(all)
    }

    fn node_id() -> ResourceId {
        ResourceId::part(VOLUME, "prom", Some("sdf".into()))
    }

    /// The host's instance, running in us-east-1a.
    fn refs(instance: &str) -> Refs {
        Refs {
            outputs: [(
                ResourceId::new(HOST, "prom"),
                Outputs::from([
                    ("instance_id".into(), instance.to_string()),
                    ("availability_zone".into(), "us-east-1a".into()),
                ]),
            )]
            .into(),
            ..Default::default()
        }
    }

    /// The volume as stackwarden leaves it: attached to `i-1` at its device.
    fn volume() -> ObservedVolume {
        let mut tags = owned_tags("host.prom.volume.sdf");
        tags.insert(TAG_DEVICE.into(), "/dev/sdf".into());
        tags.insert("Name".into(), "s-prom-dev-sdf".into());
        ObservedVolume {
            id: "vol-1".into(),
            state: "in-use".into(),
            size: 100,
            volume_type: "gp3".into(),
            attachment: Some(("i-1".into(), "/dev/sdf".into())),
            tags,
            ..Default::default()
        }
    }

    fn diff(
        d: &DesiredState,
        have: Vec<ObservedVolume>,
        refs: &Refs,
    ) -> Result<Option<Change<Op<Volume>>>> {
        Managed(Volume).diff(d, &d.resources[&node_id()], &have, refs)
    }

    #[test]
    fn a_volume_as_desired_has_no_change() {
        assert!(diff(&nodes(None), vec![volume()], &refs("i-1"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_missing_volume_is_created_in_its_instances_zone_with_its_device_tag() {
        let c = diff(&nodes(None), vec![], &refs("i-1")).unwrap().unwrap();
        assert_eq!(c.action, Action::Create);
        assert_eq!(c.id.to_string(), "host.prom.volume.sdf");
        let [Op::Create { want, tags }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(want.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(want.instance.as_deref(), Some("i-1"));
        assert_eq!(tags.get(TAG_DEVICE).map(String::as_str), Some("/dev/sdf"));
        assert_eq!(
            tags.get(crate::desired::TAG_ID).map(String::as_str),
            Some("host.prom.volume.sdf")
        );
        // Before the instance exists, its plan says where it goes once it does.
        let c = diff(&nodes(None), vec![], &Refs::default())
            .unwrap()
            .unwrap();
        let attachment = c.fields.iter().find(|f| f.field == "attachment").unwrap();
        assert_eq!(
            attachment.after.as_deref(),
            Some(format!("{KNOWN_AFTER_APPLY} at /dev/sdf").as_str())
        );
    }

    #[test]
    fn a_volume_not_yet_available_is_waited_for_then_attached() {
        let mut v = volume();
        v.attachment = None;
        v.state = "creating".into();
        let e = diff(&nodes(None), vec![v.clone()], &refs("i-1")).unwrap_err();
        assert_eq!(e.class(), crate::error::ErrorClass::Waiting);
        v.state = "available".into();
        let c = diff(&nodes(None), vec![v], &refs("i-1")).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Update { change: VolumeUpdate::Attach { instance, device }, .. }] if instance == "i-1" && device == "/dev/sdf"),
            "{:?}",
            c.ops
        );
    }

    #[test]
    fn volumes_grow_follow_a_replacement_and_never_shrink() {
        // The old instance still holds it: waiting; once free, attached to the replacement.
        let e = diff(&nodes(None), vec![volume()], &refs("i-2")).unwrap_err();
        assert_eq!(e.class(), crate::error::ErrorClass::Waiting);
        assert!(e.to_string().contains("attached to i-1"), "{e}");
        let mut v = volume();
        v.size = 50;
        v.attachment = None;
        v.state = "available".into();
        let c = diff(&nodes(None), vec![v], &refs("i-2")).unwrap().unwrap();
        assert!(
            matches!(
                &c.ops[..],
                [
                    Op::Update { change: VolumeUpdate::Modify { to, .. }, .. },
                    Op::Update { change: VolumeUpdate::Attach { instance, .. }, .. },
                ] if to.size == 100 && instance == "i-2"
            ),
            "{:?}",
            c.ops
        );
        let mut v = volume();
        v.size = 200;
        assert!(matches!(
            diff(&nodes(None), vec![v], &refs("i-1")),
            Err(Error::Invalid(m)) if m.contains("cannot shrink")
        ));
    }

    #[test]
    fn of_two_volumes_of_a_node_the_attached_one_is_kept_and_the_other_never_attached() {
        let mut spare = volume();
        spare.id = "vol-0".into();
        spare.attachment = None;
        spare.state = "available".into();
        for order in [vec![spare.clone(), volume()], vec![volume(), spare.clone()]] {
            assert!(diff(&nodes(None), order, &refs("i-1")).unwrap().is_none());
        }
        // Neither attached: always the same one, the lowest id.
        let mut other = spare.clone();
        other.id = "vol-2".into();
        for order in [
            vec![other.clone(), spare.clone()],
            vec![spare.clone(), other.clone()],
        ] {
            let c = diff(&nodes(None), order, &refs("i-1")).unwrap().unwrap();
            assert!(
                matches!(&c.ops[..], [Op::Update { have, change: VolumeUpdate::Attach { .. } }] if have.id == "vol-0"),
                "{:?}",
                c.ops
            );
        }
    }

    #[test]
    fn a_fresh_unattached_second_volume_of_a_node_is_deleted_an_old_one_orphaned() {
        let mut spare = volume();
        spare.id = "vol-9".into();
        spare.attachment = None;
        spare.state = "available".into();
        spare.age = 60;
        let d = nodes(None);
        let removed = Managed(Volume).removed(&d, &vec![volume(), spare.clone()], false);
        assert_eq!(removed.len(), 1, "the attached one stays the node's");
        assert_eq!(removed[0].action, Action::Delete);
        assert_eq!(removed[0].object, "volume vol-9");
        spare.age = 7200;
        let removed = Managed(Volume).removed(&d, &vec![volume(), spare], false);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].action, Action::Orphan);
    }

    #[test]
    fn a_volume_tagged_with_its_hosts_address_is_found_and_retagged_never_recreated() {
        let mut v = volume();
        v.tags = owned_tags("host.prom");
        v.tags.insert(TAG_DEVICE.into(), "/dev/sdf".into());
        let c = diff(&nodes(None), vec![v], &refs("i-1")).unwrap().unwrap();
        assert!(
            matches!(&c.ops[..], [Op::Tag { set, .. }] if set.get(crate::desired::TAG_ID).map(String::as_str) == Some("host.prom.volume.sdf")),
            "{:?}",
            c.ops
        );
    }

    #[test]
    fn an_adopted_instances_volume_is_tagged_and_keeps_its_tags() {
        let mut v = volume();
        v.attachment = Some(("i-tf".into(), "/dev/sdf".into()));
        v.tags = Tags::from([("Name".into(), "prometheus-data".into())]);
        let d = nodes(Some("i-tf"));
        let c = diff(&d, vec![v.clone()], &refs("i-tf")).unwrap().unwrap();
        let [Op::Tag { set, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(set.get(TAG_DEVICE).map(String::as_str), Some("/dev/sdf"));
        // Tagged: nothing more, its other tags stay.
        v.tags.extend(set.clone());
        v.tags.insert("terraform".into(), "true".into());
        assert!(diff(&d, vec![v.clone()], &refs("i-tf")).unwrap().is_none());
        // Another stack's volume at the device is not taken.
        v.tags = Tags::from([(TAG_STACK.into(), "other".into())]);
        assert!(matches!(
            diff(&d, vec![v], &refs("i-tf")).unwrap().unwrap().ops[..],
            [Op::Create { .. }]
        ));
    }

    #[test]
    fn a_dropped_volume_is_orphaned_unless_pruned_and_a_removed_hosts_is_deleted() {
        // Dropped from a host still desired: it holds data, so it is kept unless pruned.
        let spec: super::super::HostSpec =
            toml::from_str("ami = \"ami-1\"\ninstance_type = \"t3.medium\"\n").unwrap();
        let host = resource(HOST, "prom", Spec::new(spec));
        let d = desired(vec![host]);
        let kept = Managed(Volume).removed(&d, &vec![volume()], false);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].action, Action::Orphan);
        let pruned = Managed(Volume).removed(&d, &vec![volume()], true);
        assert_eq!(pruned[0].action, Action::Delete);
        assert!(matches!(&pruned[0].ops[..], [Op::Delete { .. }]));
    }
}
