//! The launch template of a Grafana group: the node `grafana.<name>.launch_template`, on the
//! managed-object layer. The Auto Scaling Group names it by its `id` and `latest_version` and
//! rolls its instances to a new version ([`super::controller`]).
//!
//! Found by its ownership tags, or adopted by id (`launch_template = { adopt = "lt-..." }`).
//! Templates made by versions from before the template was a node carry their table's address
//! in `stackwarden:id`: they are found so and retagged, never recreated.
//!
//! # Guarantees
//! - A change of what the template says makes a new version of the same template (never a new
//!   template) and makes it the default; the version's number is an attribute, so the group
//!   pins and rolls to it in the same pass.
//! - The AMI is resolved on every observation ([`crate::ami`]): a new image behind a
//!   `resolve:ssm:` parameter or an `{ owner, name }` pattern is a new version. The encrypted
//!   root volume is mapped at the image's own root device.
//! - Created with its tags in the same call.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    Filter, InstanceType, LaunchTemplateBlockDeviceMappingRequest,
    LaunchTemplateEbsBlockDeviceRequest, LaunchTemplateHttpTokensState,
    LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataEndpointState, LaunchTemplateInstanceMetadataOptionsRequest,
    RequestLaunchTemplateData, ResourceType, VolumeType,
};
use base64::Engine as _;

use super::controller::grafana_objects_possible;
use super::{tagged_node, INSTANCES, LAUNCH_TEMPLATE, SECURITY_GROUP};
use crate::ami::{Ami, Image};
use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{DesiredState, KindSpec, Resource, TAG_STACK};
use crate::ec2::{tag_map, tag_spec};
use crate::error::{aws_error, Error, Result};
use crate::kind::Kind;
use crate::managed::{is_gone, Describe, ManagedObject, Readiness};
use crate::model::{Outputs, Refs, ResourceId};
use crate::security_group::group_id;
use crate::tags::Tags;

/// The launch template node of a Grafana table.
#[derive(Debug, Clone)]
pub struct TemplatePart {
    pub ami: Ami,
    pub instance_type: String,
    pub instance_profile: Option<String>,
    /// The first-boot script's content.
    pub user_data: Option<String>,
    pub key_name: Option<String>,
    pub root_size: i32,
    /// The table's own tags (a `Name` among them, else `<stack>-<name>`).
    pub tags: Tags,
}

impl KindSpec for TemplatePart {}

/// What a launch template version says, as far as stackwarden sets it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateData {
    /// The image id (before it is resolved, the `ami` as written).
    pub ami: String,
    pub instance_type: String,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    /// Base64, as the API carries it.
    pub user_data: Option<String>,
    pub key_name: Option<String>,
    pub imdsv2: bool,
    /// EBS mappings: stackwarden's templates have one, the encrypted root volume.
    pub block_devices: Vec<BlockDevice>,
}

impl TemplateData {
    /// The data for this image: its id, the root volume at its root device.
    fn on(&self, image: &Image) -> Result<TemplateData> {
        let mut data = self.clone();
        data.ami = image.id.clone();
        for d in data
            .block_devices
            .iter_mut()
            .filter(|d| d.device.is_empty())
        {
            image.check_root_size(d.size_gib)?;
            d.device = image.root_device.clone();
        }
        Ok(data)
    }
}

/// One EBS block device mapping of a template version.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockDevice {
    /// Empty until the image, whose root device it is, is resolved.
    pub device: String,
    pub size_gib: i32,
    pub encrypted: bool,
}

impl std::fmt::Display for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let device = if self.device.is_empty() {
            "(the image's root device)"
        } else {
            &self.device
        };
        let encrypted = if self.encrypted { " encrypted" } else { "" };
        write!(f, "{device} {} GiB{encrypted}", self.size_gib)
    }
}

/// The desired templates' AMIs, resolved by the observation.
pub type Amis = BTreeMap<Ami, std::result::Result<Image, Error>>;

#[derive(Debug, Clone, Default)]
pub struct ObservedTemplate {
    pub id: String,
    pub latest: i64,
    /// Its latest version's.
    pub data: TemplateData,
    pub tags: Tags,
    /// The images the desired templates' AMIs resolve to, read with them.
    pub amis: Arc<Amis>,
}

#[derive(Debug, Clone)]
pub struct TemplateWant {
    /// `<stack>-<table name>`.
    pub name: String,
    pub ami: Ami,
    /// Before its image is resolved ([`TemplateData::on`]): against the observation, or, for a
    /// create, by the create.
    pub data: TemplateData,
    pub tags: Tags,
}

#[derive(Debug, Clone)]
pub enum TemplateUpdate {
    /// A new version, made the default.
    NewVersion {
        from: TemplateData,
        to: TemplateData,
        version: i64,
    },
}

impl Describe for TemplateUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        let TemplateUpdate::NewVersion { from, to, version } = self;
        let mut fields = template_fields(Some(from), to);
        fields.push(FieldChange::new(
            "version",
            Some((version - 1).to_string()),
            Some(version.to_string()),
        ));
        fields
    }

    /// The group's plan shows its repin and refresh toward the version made.
    fn outputs(&self) -> Outputs {
        let TemplateUpdate::NewVersion { version, .. } = self;
        Outputs::from([("latest_version".into(), version.to_string())])
    }
}

/// What differs between two template versions (or, with no `have`, what a new template
/// says), by field name, for the plan.
fn template_fields(have: Option<&TemplateData>, want: &TemplateData) -> Vec<FieldChange> {
    let creating = have.is_none();
    let none = TemplateData::default();
    let have = have.unwrap_or(&none);
    let mut out = Vec::new();
    let mut cmp = |name: &'static str, a: String, b: String| {
        if a != b {
            let before = (!creating).then_some(a);
            out.push(FieldChange::new(name, before, Some(b)));
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
    cmp(
        "key_name",
        have.key_name.clone().unwrap_or_default(),
        want.key_name.clone().unwrap_or_default(),
    );
    cmp("imdsv2", have.imdsv2.to_string(), want.imdsv2.to_string());
    let devices = |d: &[BlockDevice]| {
        d.iter()
            .map(BlockDevice::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    cmp(
        "block_devices",
        devices(&have.block_devices),
        devices(&want.block_devices),
    );
    if have.user_data != want.user_data {
        // The script's lines, as the instances will run it.
        let script = |u: &Option<String>| {
            u.as_ref().map(|u| {
                base64::engine::general_purpose::STANDARD
                    .decode(u)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|_| u.clone())
            })
        };
        let (a, b) = (script(&have.user_data), script(&want.user_data));
        out.push(FieldChange::document(
            "user_data",
            a.as_deref(),
            b.as_deref(),
        ));
    }
    out
}

/// The desired data on the image the observation resolved its AMI to.
fn resolved(want: &TemplateWant, amis: &Amis) -> Result<TemplateData> {
    match amis.get(&want.ami) {
        Some(Ok(image)) => want.data.on(image),
        Some(Err(e)) => Err(e.clone()),
        None => Err(Error::waiting(
            format!("AMI {} is not resolved yet", want.ami),
            crate::managed::LOOK_AGAIN,
        )),
    }
}

pub struct LaunchTemplate;

#[async_trait]
impl ManagedObject for LaunchTemplate {
    type Desired = TemplateWant;
    type Observed = ObservedTemplate;
    type Update = TemplateUpdate;

    const KIND: Kind = LAUNCH_TEMPLATE;
    const NOUN: &'static str = "launch template";

    fn desired(
        &self,
        desired: &DesiredState,
        node: &Resource,
        refs: &Refs,
    ) -> Result<TemplateWant> {
        let part = node.spec.expect::<TemplatePart>();
        let name = desired.default_name(&node.id.composite());
        let mut tags = part.tags.clone();
        tags.entry("Name".into()).or_insert_with(|| name.clone());
        Ok(TemplateWant {
            name,
            ami: part.ami.clone(),
            data: TemplateData {
                ami: part.ami.to_string(),
                instance_type: refs.render(&part.instance_type).value,
                security_groups: vec![group_id(
                    refs,
                    SECURITY_GROUP,
                    &node.id.name,
                    Some(INSTANCES),
                )],
                instance_profile: part.instance_profile.as_ref().map(|p| refs.render(p).value),
                user_data: part
                    .user_data
                    .as_ref()
                    .map(|u| base64::engine::general_purpose::STANDARD.encode(u)),
                key_name: part.key_name.as_ref().map(|k| refs.render(k).value),
                imdsv2: true,
                block_devices: vec![BlockDevice {
                    device: String::new(),
                    size_gib: part.root_size,
                    encrypted: true,
                }],
            },
            tags,
        })
    }

    async fn observe(
        &self,
        ctx: &Context,
        desired: &DesiredState,
    ) -> Result<Vec<ObservedTemplate>> {
        let wanted = desired.of_kind(LAUNCH_TEMPLATE).next().is_some();
        if !wanted && !grafana_objects_possible(ctx, desired).await? {
            // A stack without Grafana: no template to look for.
            return Ok(Vec::new());
        }
        let stack = Filter::builder()
            .name(format!("tag:{TAG_STACK}"))
            .values(desired.stack_name())
            .build();
        let adopt: Vec<&str> = desired
            .of_kind(LAUNCH_TEMPLATE)
            .filter_map(|r| r.adopt.as_deref())
            .collect();
        let mut templates = read_templates(ctx, stack, adopt).await?;
        let mut amis = Amis::new();
        for (_, part) in desired.specs::<TemplatePart>(LAUNCH_TEMPLATE) {
            if !amis.contains_key(&part.ami) {
                amis.insert(part.ami.clone(), part.ami.resolve(ctx).await);
            }
        }
        let amis = Arc::new(amis);
        for t in &mut templates {
            t.amis = amis.clone();
        }
        Ok(templates)
    }

    fn id(&self, o: &ObservedTemplate) -> String {
        o.id.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedTemplate) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    /// Its node by its tags: its own address, or (made before it was a node) its table's.
    fn owner(&self, desired: &DesiredState, o: &ObservedTemplate) -> Option<ResourceId> {
        tagged_node(desired, &o.tags, LAUNCH_TEMPLATE)
    }

    fn outputs(&self, o: &ObservedTemplate) -> Outputs {
        Outputs::from([
            ("id".into(), o.id.clone()),
            ("latest_version".into(), o.latest.to_string()),
        ])
    }

    fn readiness(&self, want: &TemplateWant, have: &ObservedTemplate) -> Result<Readiness> {
        resolved(want, &have.amis)?;
        Ok(Readiness::Ready)
    }

    fn diff(&self, want: &TemplateWant, have: &ObservedTemplate) -> Vec<TemplateUpdate> {
        // Readiness has checked the AMI resolves.
        let Ok(to) = resolved(want, &have.amis) else {
            return Vec::new();
        };
        if to == have.data {
            return Vec::new();
        }
        vec![TemplateUpdate::NewVersion {
            from: have.data.clone(),
            to,
            version: have.latest + 1,
        }]
    }

    fn own_tags(&self, want: &TemplateWant) -> Tags {
        want.tags.clone()
    }

    fn create_fields(&self, want: &TemplateWant) -> Vec<FieldChange> {
        template_fields(None, &want.data)
    }

    fn label(&self, want: &TemplateWant) -> String {
        want.name.clone()
    }

    async fn named_tags(&self, ctx: &Context, want: &TemplateWant) -> Result<Option<Tags>> {
        let name = Filter::builder()
            .name("launch-template-name")
            .values(&want.name)
            .build();
        let templates = ctx
            .ec2
            .describe_launch_templates()
            .filters(name)
            .into_paginator()
            .items()
            .send()
            .collect::<std::result::Result<Vec<_>, _>>()
            .await
            .map_err(aws_error("ec2", "DescribeLaunchTemplates"))?;
        Ok(templates.first().map(|t| tag_map(t.tags())))
    }

    async fn create(&self, ctx: &Context, want: &TemplateWant, tags: &Tags) -> Result<Outputs> {
        let data = want.data.on(&want.ami.resolve(ctx).await?)?;
        let out = ctx
            .ec2
            .create_launch_template()
            .launch_template_name(&want.name)
            .launch_template_data(request_data(&data))
            .tag_specifications(tag_spec(ResourceType::LaunchTemplate, tags))
            .send()
            .await
            .map_err(aws_error("ec2", "CreateLaunchTemplate"))?;
        let t = out.launch_template();
        Ok(Outputs::from([
            (
                "id".into(),
                t.and_then(|t| t.launch_template_id())
                    .unwrap_or_default()
                    .to_string(),
            ),
            (
                "latest_version".into(),
                t.and_then(|t| t.latest_version_number())
                    .unwrap_or(1)
                    .to_string(),
            ),
        ]))
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedTemplate,
        change: &TemplateUpdate,
    ) -> Result<Option<Outputs>> {
        let TemplateUpdate::NewVersion { to, version, .. } = change;
        let out = ctx
            .ec2
            .create_launch_template_version()
            .launch_template_id(&have.id)
            .launch_template_data(request_data(to))
            .send()
            .await
            .map_err(aws_error("ec2", "CreateLaunchTemplateVersion"))?;
        let v = out
            .launch_template_version()
            .and_then(|v| v.version_number())
            .unwrap_or(*version);
        ctx.ec2
            .modify_launch_template()
            .launch_template_id(&have.id)
            .default_version(v.to_string())
            .send()
            .await
            .map_err(aws_error("ec2", "ModifyLaunchTemplate"))?;
        Ok(Some(Outputs::from([
            ("id".into(), have.id.clone()),
            ("latest_version".into(), v.to_string()),
        ])))
    }

    async fn tag(&self, ctx: &Context, have: &ObservedTemplate, set: &Tags) -> Result<()> {
        crate::ec2::set_tags(ctx, &have.id, set).await
    }

    async fn untag(&self, ctx: &Context, have: &ObservedTemplate, keys: &[String]) -> Result<()> {
        crate::ec2::remove_tags(ctx, &have.id, keys).await
    }

    async fn delete(&self, ctx: &Context, have: &ObservedTemplate) -> Result<()> {
        ctx.ec2
            .delete_launch_template()
            .launch_template_id(&have.id)
            .send()
            .await
            .map_err(aws_error("ec2", "DeleteLaunchTemplate"))?;
        Ok(())
    }
}

/// The stack's launch templates, and those named in `adopt` that are not yet its, each with
/// its latest version's data.
async fn read_templates(
    ctx: &Context,
    stack: Filter,
    adopt: Vec<&str>,
) -> Result<Vec<ObservedTemplate>> {
    let mut templates = Vec::new();
    list_templates(
        ctx.ec2.describe_launch_templates().filters(stack),
        &mut templates,
    )
    .await?;
    for id in adopt {
        if templates.iter().any(|t| t.id == id) {
            continue;
        }
        // One at a time: a template that does not exist fails the whole request.
        match list_templates(
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
            block_devices: d
                .block_device_mappings()
                .iter()
                .filter_map(|m| {
                    let ebs = m.ebs()?;
                    Some(BlockDevice {
                        device: m.device_name().unwrap_or_default().to_string(),
                        size_gib: ebs.volume_size().unwrap_or_default(),
                        encrypted: ebs.encrypted().unwrap_or_default(),
                    })
                })
                .collect(),
        };
    }
    Ok(templates)
}

/// The templates one `DescribeLaunchTemplates` request finds, all pages, added to `templates`.
async fn list_templates(
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
                tags: tag_map(t.tags()),
                ..Default::default()
            });
        }
    }
    Ok(())
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
    for device in &d.block_devices {
        b = b.block_device_mappings(
            LaunchTemplateBlockDeviceMappingRequest::builder()
                .device_name(&device.device)
                .ebs(
                    LaunchTemplateEbsBlockDeviceRequest::builder()
                        .volume_size(device.size_gib)
                        .volume_type(VolumeType::Gp3)
                        .encrypted(device.encrypted)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Action, Change};
    use crate::controller::Controller;
    use crate::desired::TAG_ID;
    use crate::grafana::GrafanaSpec;
    use crate::managed::{Managed, Op};
    use crate::testing::owned_tags;

    const GRAFANA_TOML: &str = r#"
ami = "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = { subnets = ["subnet-a", "subnet-b"] }
"#;

    fn nodes() -> DesiredState {
        crate::grafana::expanded(toml::from_str(GRAFANA_TOML).unwrap())
    }

    fn node() -> ResourceId {
        ResourceId::part(LAUNCH_TEMPLATE, "main", None)
    }

    fn refs() -> Refs {
        Refs {
            outputs: [(
                ResourceId::part(SECURITY_GROUP, "main", Some(INSTANCES.into())),
                Outputs::from([("id".into(), "sg-i".into())]),
            )]
            .into(),
            ..Default::default()
        }
    }

    fn amis(ami: std::result::Result<&str, Error>) -> Arc<Amis> {
        let spec: GrafanaSpec = toml::from_str(GRAFANA_TOML).unwrap();
        let image = |id: &str| Image {
            id: id.into(),
            root_device: "/dev/sda1".into(),
            root_size_gib: Some(8),
        };
        Arc::new(Amis::from([(spec.ami, ami.map(image))]))
    }

    /// The template as desired, on version 2, its AMI resolving to `ami-1`.
    fn observed(id: &str) -> ObservedTemplate {
        let d = nodes();
        let want = LaunchTemplate
            .desired(&d, &d.resources[&node()], &refs())
            .unwrap();
        let data = want
            .data
            .on(&amis(Ok("ami-1"))[&want.ami].clone().unwrap())
            .unwrap();
        let mut tags = owned_tags(id);
        tags.insert("Name".into(), "s-main".into());
        ObservedTemplate {
            id: "lt-1".into(),
            latest: 2,
            data,
            tags,
            amis: amis(Ok("ami-1")),
        }
    }

    fn diff(have: Vec<ObservedTemplate>) -> Result<Option<Change<Op<LaunchTemplate>>>> {
        let d = nodes();
        Managed(LaunchTemplate).diff(&d, &d.resources[&node()], &have, &refs())
    }

    #[test]
    fn a_template_as_desired_has_no_change_and_gives_its_latest_version() {
        let have = observed("grafana.main.launch_template");
        assert!(diff(vec![have.clone()]).unwrap().is_none());
        let out = Managed(LaunchTemplate).outputs(&nodes(), &vec![have]);
        assert_eq!(
            out,
            [(
                node(),
                Outputs::from([
                    ("id".into(), "lt-1".into()),
                    ("latest_version".into(), "2".into())
                ])
            )]
        );
    }

    /// A new AMI behind the parameter, or any other change, is one new version.
    #[test]
    fn a_changed_template_is_a_new_version_with_the_fields_that_differ() {
        let mut have = observed("grafana.main.launch_template");
        have.amis = amis(Ok("ami-2"));
        let c = diff(vec![have]).unwrap().unwrap();
        assert_eq!(c.action, Action::Update);
        let [Op::Update {
            change: TemplateUpdate::NewVersion { to, version, .. },
            ..
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!((to.ami.as_str(), *version), ("ami-2", 3));
        let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["ami", "version"]);
        assert_eq!(
            c.outputs,
            Outputs::from([("latest_version".into(), "3".into())]),
            "the group plans its repin toward the version made"
        );
    }

    /// A template made with the root volume at another device than the image's root (the
    /// `/dev/xvda` of Amazon Linux, the image being Ubuntu's) gets a version that maps it right.
    #[test]
    fn the_root_volume_moves_to_the_images_root_device() {
        let mut have = observed("grafana.main.launch_template");
        have.data.block_devices[0].device = "/dev/xvda".into();
        let c = diff(vec![have]).unwrap().unwrap();
        let [Op::Update {
            change: TemplateUpdate::NewVersion { to, .. },
            ..
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(to.block_devices.len(), 1);
        assert_eq!(to.block_devices[0].device, "/dev/sda1");
        let field = c
            .fields
            .iter()
            .find(|f| f.field == "block_devices")
            .unwrap();
        assert_eq!(
            (field.before.as_deref(), field.after.as_deref()),
            (
                Some("/dev/xvda 20 GiB encrypted"),
                Some("/dev/sda1 20 GiB encrypted")
            )
        );
    }

    #[test]
    fn a_root_volume_smaller_than_the_images_snapshot_is_the_nodes_error() {
        let mut have = observed("grafana.main.launch_template");
        let spec: GrafanaSpec = toml::from_str(GRAFANA_TOML).unwrap();
        let big = Image {
            id: "ami-1".into(),
            root_device: "/dev/sda1".into(),
            root_size_gib: Some(30),
        };
        have.amis = Arc::new(Amis::from([(spec.ami, Ok(big))]));
        let e = diff(vec![have]).unwrap_err();
        assert!(
            e.to_string().contains("smaller than the root snapshot"),
            "{e}"
        );
    }

    #[test]
    fn an_ami_that_does_not_resolve_is_the_nodes_error() {
        let mut have = observed("grafana.main.launch_template");
        have.amis = amis(Err(Error::Invalid("no such parameter".into())));
        let e = diff(vec![have]).unwrap_err();
        assert!(e.to_string().contains("no such parameter"), "{e}");
    }

    #[test]
    fn a_missing_template_is_created_and_one_of_an_earlier_version_retagged() {
        let c = diff(vec![]).unwrap().unwrap();
        assert_eq!(c.action, Action::Create);
        let [Op::Create { want, tags }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(want.name, "s-main");
        assert!(
            want.data.ami.starts_with("resolve:ssm:"),
            "resolved by the create"
        );
        assert_eq!(
            want.data.block_devices,
            [BlockDevice {
                device: String::new(),
                size_gib: 20,
                encrypted: true
            }],
            "at the root device of the image the create resolves"
        );
        assert_eq!(want.data.security_groups, ["sg-i"]);
        assert_eq!(
            tags.get(TAG_ID).map(String::as_str),
            Some("grafana.main.launch_template")
        );
        // Made before templates were nodes: its table's address, retagged.
        let c = diff(vec![observed("grafana.main")]).unwrap().unwrap();
        let [Op::Tag { set, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(
            set.get(TAG_ID).map(String::as_str),
            Some("grafana.main.launch_template")
        );
    }
}
