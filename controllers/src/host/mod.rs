//! Generic EC2 hosts (the Prometheus host is one, with a `prometheus` table): the schema and its
//! offline checks here, the instance's controller in `controller.rs`, its data volumes in
//! `volume.rs`, its Prometheus config node in `prometheus.rs` and that config's files (the
//! bundle pushed to the host) in `config.rs`.

pub mod config;
pub(crate) mod controller;
pub mod prometheus;
pub mod volume;

pub use controller::HostController;
pub use prometheus::PrometheusPart;
pub use volume::VolumePart;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use crate::ami::Ami;
use crate::desired::{
    check_duration, check_tags, DesiredState, KindSpec, Resource, Spec, Tagging, Validator,
};
use crate::kind::{schema, Form, Kind, KindDef};
use crate::managed::Managed;
use crate::model::{references_in, ResourceId};
use crate::push::HostCommand;
use crate::security_group::{self, GroupPart, IngressPart, IngressRule};

static HOST_KIND: KindDef = KindDef {
    path: "host",
    attributes: &[
        "instance_id",
        "availability_zone",
        "private_ip",
        "public_ip",
        "private_dns",
        "security_group_id",
    ],
    form: Form::Table {
        schema: schema::<HostSpec>,
    },
    attribute_parts: &[(
        "security_group_id",
        Kind::new(&SECURITY_GROUP_KIND),
        None,
        "id",
    )],
    whole: None,
    controller: || Box::new(HostController),
};
/// `[host.<name>]`: the instance itself.
pub const HOST: Kind = Kind::new(&HOST_KIND);

static SECURITY_GROUP_KIND: KindDef = KindDef {
    path: "host.security_group",
    attributes: &["id", "name"],
    form: Form::Part {
        of: Kind::new(&HOST_KIND),
        word: "security_group",
        keyed: false,
    },
    attribute_parts: &[],
    whole: Some(security_group::check_group_names),
    controller: || Box::new(Managed(security_group::SecurityGroup::<OfHost>::default())),
};
/// The security group of a host.
pub const SECURITY_GROUP: Kind = Kind::new(&SECURITY_GROUP_KIND);

/// A host's security group and its rules, as the security group kinds see them.
pub struct OfHost;

impl security_group::Table for OfHost {
    const TABLE: Kind = HOST;
    const GROUP: Kind = SECURITY_GROUP;
    const INGRESS: Kind = INGRESS;
}

static INGRESS_KIND: KindDef = KindDef {
    path: "host.ingress",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&HOST_KIND),
        word: "ingress",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(security_group::Ingress::<OfHost>::default())),
};
/// The ingress rules of a host's security group.
pub const INGRESS: Kind = Kind::new(&INGRESS_KIND);

static VOLUME_KIND: KindDef = KindDef {
    path: "host.volume",
    attributes: &["id"],
    form: Form::Part {
        of: Kind::new(&HOST_KIND),
        word: "volume",
        keyed: true,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(volume::Volume)),
};
/// An EBS data volume of a host, keyed by its device's name (`sdf`).
pub const VOLUME: Kind = Kind::new(&VOLUME_KIND);

static PROMETHEUS_KIND: KindDef = KindDef {
    path: "host.prometheus",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&HOST_KIND),
        word: "prometheus",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(prometheus::PrometheusController),
};
/// The Prometheus config pushed to a host with a `prometheus` table.
pub const PROMETHEUS: Kind = Kind::new(&PROMETHEUS_KIND);

/// `[host.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// An AMI id, `resolve:ssm:<parameter>` or `{ owner, name }` ([`crate::ami`]).
    pub ami: Ami,
    pub instance_type: String,
    /// Size of the encrypted gp3 root volume, at the image's root device.
    #[serde(default = "crate::ami::default_root_size")]
    pub root_volume_size_gib: i32,
    /// Defaults to the default subnet of the region's default VPC in its first zone.
    pub subnet: Option<String>,
    /// Instance profile name, usually `${iam.instance_profile.<name>.name}`.
    pub instance_profile: Option<String>,
    /// First-boot script (file); changing it never recreates the instance.
    pub user_data: Option<Spanned<String>>,
    pub key_name: Option<String>,
    #[serde(default)]
    pub security_group: SecurityGroupSpec,
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    pub prometheus: Option<PrometheusSpec>,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
    /// The user data file's content, read by `validate`.
    #[serde(skip)]
    pub loaded_user_data: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupSpec {
    /// The id of an existing group to take over (`sg-...`) instead of creating one.
    pub adopt: Option<String>,
    pub vpc: Option<String>,
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
}

/// An EBS data volume, kept when the instance is replaced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub device: String,
    pub size_gib: Spanned<i64>,
    #[serde(default = "gp3")]
    pub r#type: String,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
    #[serde(default = "yes")]
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

fn gp3() -> String {
    "gp3".into()
}
fn yes() -> bool {
    true
}

/// The Prometheus role of a host: a raw `config` file, or one rendered from these fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusSpec {
    pub config: Option<Spanned<String>>,
    pub scrape_interval: Option<Spanned<String>>,
    pub evaluation_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub external_labels: BTreeMap<String, String>,
    /// Prometheus rule files from the desired directory.
    #[serde(default)]
    pub rule_files: Vec<Spanned<String>>,
    #[serde(default)]
    pub alertmanagers: Vec<String>,
    #[serde(default)]
    pub scrape: Vec<ScrapeJob>,
    pub remote_write: Option<RemoteWrite>,
    /// The command prefix that runs promtool on the host (`docker exec prometheus promtool`);
    /// default `promtool` on the host's PATH.
    pub promtool: Option<HostCommand>,
    /// The command that makes Prometheus read its files (`docker kill --signal HUP prometheus`);
    /// default `POST <url>/-/reload`, which needs `--web.enable-lifecycle`.
    pub reload: Option<HostCommand>,
    /// Where Prometheus answers on the host, for the reload and its check; default
    /// `http://localhost:9090`.
    pub url: Option<HostCommand>,
    #[serde(skip)]
    pub loaded: PrometheusFiles,
}

/// The files a Prometheus host's spec names, read by `validate`.
#[derive(Debug, Clone, Default)]
pub struct PrometheusFiles {
    /// The raw `config`, when given.
    pub config: Option<String>,
    /// Rule files: path in the desired directory → content.
    pub rules: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeJob {
    pub job: String,
    #[serde(default)]
    pub targets: Vec<String>,
    pub ec2_port: Option<u16>,
    #[serde(default)]
    pub ec2_tags: BTreeMap<String, String>,
    pub metrics_path: Option<String>,
    pub interval: Option<Spanned<String>>,
}

/// `remote_write` to AMP, signed with SigV4.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWrite {
    /// Usually `${amp.workspace.<name>.remote_write_url}`.
    pub url: String,
    pub region: Option<String>,
}

/// `family.size`: letters and digits, a dot, letters and digits (`t3.medium`, `m7g.2xlarge`).
pub fn valid_instance_type(t: &str) -> bool {
    let Some((family, size)) = t.split_once('.') else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    ok(family) && ok(size) && family.starts_with(|c: char| c.is_ascii_lowercase())
}

/// Data volumes take `/dev/sd[f-p]` or `/dev/xvd[f-p]`, the names EC2 recommends for EBS.
pub fn valid_device(d: &str) -> bool {
    let letter = d
        .strip_prefix("/dev/sd")
        .or_else(|| d.strip_prefix("/dev/xvd"));
    matches!(letter, Some(l) if l.len() == 1 && ('f'..='p').contains(&l.chars().next().unwrap_or('a')))
}

impl KindSpec for HostSpec {
    /// Its instance: `Name`, the hash of its Prometheus config, and the record of each of the
    /// stack's host_configs targeting it.
    fn tagging(&self, desired: &DesiredState, id: &ResourceId) -> Option<Tagging<'_>> {
        let mut added = vec!["Name".to_string()];
        if self.prometheus.is_some() {
            added.push(prometheus::installed_tag());
        }
        added.extend(
            desired
                .specs::<crate::host_config::HostConfigSpec>(crate::host_config::HOST_CONFIG)
                .filter(|(_, c)| c.targeted_hosts(desired).any(|h| h == id))
                .map(|(c, _)| crate::host_config::record_tag(desired.stack_name(), &c.id.name)),
        );
        Some(Tagging {
            own: self.tags.as_ref(),
            added,
            ec2: true,
        })
    }

    fn adopts_an_instance(&self) -> bool {
        true
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
        self.ami.check(v);
        crate::ami::check_root_size(v, self.root_volume_size_gib);
        if !valid_instance_type(&self.instance_type) && !self.instance_type.contains("${") {
            v.here(format!(
                "instance_type `{}` is not an EC2 instance type (family.size, such as t3.medium)",
                self.instance_type
            ));
        }
        if let Some(u) = &self.user_data {
            if let Some(file) = v.read(u) {
                self.loaded_user_data = Some(file.text().to_string());
            }
        }
        security_group::check_ingress(v, &self.security_group.ingress);
        let mut devices = std::collections::BTreeSet::new();
        for vol in &self.volumes {
            if !valid_device(&vol.device) {
                v.here(format!(
                    "volume device `{}` is not a data device name (/dev/sdf to /dev/sdp, or /dev/xvdf to /dev/xvdp)",
                    vol.device
                ));
            }
            if !devices.insert(vol.device.as_str()) {
                v.here(format!("two volumes use the device `{}`", vol.device));
            }
            let size = *vol.size_gib.get_ref();
            if !(1..=16384).contains(&size) {
                v.error(
                    &vol.size_gib.span(),
                    format!("volume size {size} GiB is outside 1..=16384"),
                );
            }
            if !["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"]
                .contains(&vol.r#type.as_str())
            {
                v.here(format!(
                    "volume type `{}` is not an EBS volume type",
                    vol.r#type
                ));
            }
        }
        if let Some(p) = &mut self.prometheus {
            crate::push::check_commands(
                v,
                "prometheus",
                &[
                    ("promtool", &p.promtool),
                    ("reload", &p.reload),
                    ("url", &p.url),
                ],
            );
            if let Some(url) = &p.url {
                url.check_url(v, "prometheus.url", &["http://", "https://"]);
            }
            for d in [&p.scrape_interval, &p.evaluation_interval]
                .into_iter()
                .flatten()
            {
                check_duration(v, d, "interval");
            }
            if let Some(c) = &p.config {
                if let Some(file) = v.read(c) {
                    // Rendered with references before it is pushed, so they order the work.
                    v.scan_host_file_refs(&file);
                    config::check_rule_files(v, &file, &p.rule_files);
                    p.loaded.config = Some(file.text().to_string());
                }
            }
            for f in &p.rule_files {
                if let Some(file) = v.read(f) {
                    crate::rules::check_rule_file(&file.file, v.diags);
                    p.loaded
                        .rules
                        .insert(f.get_ref().clone(), file.text().to_string());
                }
            }
            for job in &p.scrape {
                if let Some(i) = &job.interval {
                    check_duration(v, i, "interval");
                }
            }
        }
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }

    /// Its security group and the group's ingress rules, and each data volume, nodes of their
    /// own; the host's instance depends on the group, each volume on the instance.
    fn parts(&self, host: &Resource) -> Option<(Vec<Resource>, BTreeSet<ResourceId>)> {
        let [group, ingress] = security_group::nodes(
            host,
            (SECURITY_GROUP, INGRESS),
            None,
            self.security_group.adopt.clone(),
            GroupPart {
                vpc: self.security_group.vpc.clone(),
                subnet: self.subnet.clone(),
            },
            IngressPart {
                rules: security_group::rule_specs(&self.security_group.ingress),
            },
        );
        // The instance references what its own values name; its Prometheus config, everything
        // else the table names (its files included).
        let mut own: BTreeSet<ResourceId> = [&self.instance_type]
            .into_iter()
            .chain(&self.subnet)
            .chain(&self.instance_profile)
            .chain(&self.key_name)
            .chain(self.tags.iter().flat_map(|t| t.get_ref().values()))
            .flat_map(|s| references_in(s))
            .collect();
        own.insert(group.id.clone());
        let mut parts = vec![group, ingress];
        if let Some(p) = &self.prometheus {
            parts.push(Resource {
                id: ResourceId::part(PROMETHEUS, host.id.name.clone(), None),
                origin: host.origin.clone(),
                adopt: None,
                observe_only: host.observe_only,
                spec: Spec::new(PrometheusPart { spec: p.clone() }),
                depends_on: host
                    .depends_on
                    .iter()
                    .cloned()
                    .chain([host.id.clone()])
                    .collect(),
            });
        }
        parts.extend(self.volumes.iter().map(|v| {
            Resource {
                id: ResourceId::part(VOLUME, host.id.name.clone(), Some(volume::key(&v.device))),
                origin: host.origin.clone(),
                adopt: None,
                observe_only: host.observe_only,
                spec: Spec::new(VolumePart {
                    device: v.device.clone(),
                    size: *v.size_gib.get_ref() as i32,
                    volume_type: v.r#type.clone(),
                    iops: v.iops,
                    throughput: v.throughput,
                    encrypted: v.encrypted,
                    kms_key_id: v.kms_key_id.clone(),
                }),
                depends_on: v
                    .kms_key_id
                    .iter()
                    .flat_map(|k| references_in(k))
                    .chain([host.id.clone()])
                    .collect(),
            }
        }));
        Some((parts, own))
    }
}

impl HostSpec {
    /// The tags its instance carries: the stack's, its own, the ownership tags, and `Name`
    /// (`<stack>-<name>` unless its own tags set one).
    pub fn instance_tags(
        &self,
        desired: &DesiredState,
        id: &ResourceId,
    ) -> BTreeMap<String, String> {
        let own = self
            .tags
            .as_ref()
            .map(|t| t.get_ref().clone())
            .unwrap_or_default();
        let mut tags = desired.tags_for(id, &own);
        tags.entry("Name".into())
            .or_insert_with(|| desired.default_name(id));
        tags
    }
}
