//! Grafana as an Auto Scaling Group behind an Application Load Balancer, with its provisioning
//! pushed over SSM: the schema and its offline checks here, what is pushed in
//! `provisioning.rs` and the node that pushes it in `provision.rs`, the group's controller in
//! `controller.rs`.

pub mod balancer;
mod controller;
mod elb;
pub mod listener;
pub mod provision;
pub mod provisioning;
pub mod target_group;
pub mod template;

pub use controller::GrafanaController;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use crate::desired::{
    check_duration, check_tags, parse_duration, DesiredState, KindSpec, Resource, Spec, Tagging,
    Validator,
};
use crate::diag::Diagnostics;
use crate::kind::{schema, Form, Kind, KindDef};
use crate::managed::Managed;
use crate::model::{references_in, ResourceId};
use crate::push::HostCommand;
use crate::security_group::{self, GroupPart, IngressPart, IngressRule, RuleSpec};
use crate::tags::{owner_id, Tags};

static GRAFANA_KIND: KindDef = KindDef {
    path: "grafana",
    attributes: &[
        "alb_dns_name",
        "alb_arn",
        "target_group_arn",
        "asg_name",
        "security_group_id",
    ],
    form: Form::Table {
        schema: schema::<GrafanaSpec>,
    },
    attribute_parts: &[
        ("alb_dns_name", Kind::new(&BALANCER_KIND), None, "dns_name"),
        ("alb_arn", Kind::new(&BALANCER_KIND), None, "arn"),
        (
            "security_group_id",
            Kind::new(&SECURITY_GROUP_KIND),
            Some(INSTANCES),
            "id",
        ),
        (
            "target_group_arn",
            Kind::new(&TARGET_GROUP_KIND),
            None,
            "arn",
        ),
    ],
    whole: Some(check_elb_names),
    controller: || Box::new(GrafanaController),
};
/// `[grafana.<name>]`: the group's Auto Scaling Group.
pub const GRAFANA: Kind = Kind::new(&GRAFANA_KIND);

static SECURITY_GROUP_KIND: KindDef = KindDef {
    path: "grafana.security_group",
    attributes: &["id", "name"],
    form: Form::Part {
        of: Kind::new(&GRAFANA_KIND),
        word: "security_group",
        keyed: true,
    },
    attribute_parts: &[],
    whole: Some(security_group::check_group_names),
    controller: || {
        Box::new(Managed(
            security_group::SecurityGroup::<OfGrafana>::default(),
        ))
    },
};
/// A security group of a Grafana group, keyed `alb` or `instances`.
pub const SECURITY_GROUP: Kind = Kind::new(&SECURITY_GROUP_KIND);

/// A Grafana group's two security groups and their rules, as the security group kinds see them.
pub struct OfGrafana;

impl security_group::Table for OfGrafana {
    const TABLE: Kind = GRAFANA;
    const GROUP: Kind = SECURITY_GROUP;
    const INGRESS: Kind = INGRESS;
}

static INGRESS_KIND: KindDef = KindDef {
    path: "grafana.ingress",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&GRAFANA_KIND),
        word: "ingress",
        keyed: true,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(security_group::Ingress::<OfGrafana>::default())),
};
/// The ingress rules of one of a Grafana group's security groups.
pub const INGRESS: Kind = Kind::new(&INGRESS_KIND);

static TARGET_GROUP_KIND: KindDef = KindDef {
    path: "grafana.target_group",
    attributes: &["arn"],
    form: Form::Part {
        of: Kind::new(&GRAFANA_KIND),
        word: "target_group",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(target_group::TargetGroup)),
};
/// The target group of a Grafana group.
pub const TARGET_GROUP: Kind = Kind::new(&TARGET_GROUP_KIND);

static BALANCER_KIND: KindDef = KindDef {
    path: "grafana.alb",
    attributes: &["arn", "dns_name"],
    form: Form::Part {
        of: Kind::new(&GRAFANA_KIND),
        word: "alb",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(balancer::LoadBalancer)),
};
/// The Application Load Balancer of a Grafana group.
pub const BALANCER: Kind = Kind::new(&BALANCER_KIND);

static LISTENER_KIND: KindDef = KindDef {
    path: "grafana.listener",
    attributes: &["arn"],
    form: Form::Part {
        of: Kind::new(&GRAFANA_KIND),
        word: "listener",
        keyed: true,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(listener::Listener)),
};
/// A listener of a Grafana group's load balancer, keyed by its port.
pub const LISTENER: Kind = Kind::new(&LISTENER_KIND);

static LAUNCH_TEMPLATE_KIND: KindDef = KindDef {
    path: "grafana.launch_template",
    attributes: &["id", "latest_version"],
    form: Form::Part {
        of: Kind::new(&GRAFANA_KIND),
        word: "launch_template",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(Managed(template::LaunchTemplate)),
};
/// The launch template of a Grafana group.
pub const LAUNCH_TEMPLATE: Kind = Kind::new(&LAUNCH_TEMPLATE_KIND);

static PROVISIONING_KIND: KindDef = KindDef {
    path: "grafana.provisioning",
    attributes: &[],
    form: Form::Part {
        of: Kind::new(&GRAFANA_KIND),
        word: "provisioning",
        keyed: false,
    },
    attribute_parts: &[],
    whole: None,
    controller: || Box::new(provision::ProvisioningController),
};
/// What is pushed to a Grafana group's instances.
pub const PROVISIONING: Kind = Kind::new(&PROVISIONING_KIND);

/// The name each Grafana group's load balancer and target group take, `<stack>-<table>`,
/// checked offline as ELB checks it ([`elb::name_problem`]), adopted or not (the nodes name
/// them so either way). Reported at the stack's name when it alone is the cause (31 or more
/// characters, or beginning with `internal`), at the table's name otherwise.
fn check_elb_names(kind: Kind, desired: &mut DesiredState, diags: &mut Diagnostics) {
    let stack = desired.stack_name();
    for r in desired.of_kind(kind) {
        let name = desired.default_name(&r.id);
        let Some(why) = elb::name_problem(&name, true) else {
            continue;
        };
        let message = format!(
            "{}: its load balancer and target group would be named `{name}` (`<stack>-<table>`), {why}",
            r.id
        );
        let by_stack = stack.chars().count() + 2 > elb::MAX_ELB_NAME
            || format!("{stack}-").starts_with(elb::INTERNAL);
        if by_stack {
            let span = desired.stack.name.span();
            desired.error_at_stack(diags, span, r, format!("{message}; rename the stack"));
        } else {
            diags.at_origin(&r.origin, format!("{message}; rename the table"));
        }
    }
}

/// The node an object of a group belongs to by its tags: its own address (of `kind`), or, for
/// one made before that object was a node, its table's.
fn tagged_node(desired: &DesiredState, tags: &Tags, kind: Kind) -> Option<ResourceId> {
    let id = owner_id(tags, desired.stack_name())?;
    if id.kind == kind {
        Some(id)
    } else if id.kind == GRAFANA {
        Some(ResourceId::part(kind, id.name, None))
    } else {
        None
    }
}

/// The key of the load balancer's security group (`grafana.<name>.security_group.alb`).
pub const ALB: &str = "alb";
/// The key of the instances' security group.
pub const INSTANCES: &str = "instances";

/// What plan says of a load balancer without a certificate.
pub const HTTP_ONLY: &str = "no alb.certificate_arn: Grafana is served over plain HTTP on port 80 (set certificate_arn for HTTPS on 443 with 80 redirecting, or require_https to make this an error)";

/// `[grafana.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrafanaSpec {
    /// An AMI id, `resolve:ssm:<parameter>` or `{ owner, name }` ([`crate::ami`]).
    pub ami: crate::ami::Ami,
    pub instance_type: String,
    /// Where the instances run: one subnet per availability zone.
    pub subnets: Vec<String>,
    /// Instance profile name, usually `${iam.instance_profile.<name>.name}`.
    pub instance_profile: Option<String>,
    /// First-boot script (file), part of the launch template.
    pub user_data: Option<Spanned<String>>,
    /// Size of the encrypted gp3 root volume.
    #[serde(default = "crate::ami::default_root_size")]
    pub root_volume_size_gib: i32,
    pub key_name: Option<String>,
    pub min_size: i32,
    pub max_size: i32,
    /// Unset: left to scaling policies.
    pub desired_capacity: Option<i32>,
    /// How long a new instance has before ELB health checks count (default 5m).
    pub health_check_grace_period: Option<Spanned<String>>,
    /// Instance refresh: the share of the group kept in service while it rolls.
    #[serde(default = "ninety")]
    pub min_healthy_percentage: i32,
    /// `launch_template = { adopt = "lt-..." }`: take over an existing template.
    #[serde(default)]
    pub launch_template: Adopt,
    pub alb: AlbSpec,
    #[serde(default)]
    pub target_group: TargetGroupSpec,
    #[serde(default)]
    pub provisioning: ProvisioningSpec,
    /// Rules the instances' security group has besides the load balancer's.
    #[serde(default)]
    pub security_group: InstanceIngress,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
    /// The user data file's content, read by `validate`.
    #[serde(skip)]
    pub loaded_user_data: Option<String>,
}

/// `{ adopt = "<id>" }`: an existing object a part of the group takes over instead of making
/// one (its id, as AWS names it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adopt {
    pub adopt: Option<String>,
}

fn ninety() -> i32 {
    90
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlbSpec {
    /// The ARN of an existing Application Load Balancer to take over.
    pub adopt: Option<String>,
    /// `security_group = { adopt = "sg-..." }`: take over the load balancer's group.
    #[serde(default)]
    pub security_group: Adopt,
    #[serde(default = "internet_facing")]
    pub scheme: String,
    /// At least two, in different availability zones.
    pub subnets: Vec<String>,
    /// The VPC of the load balancer's and the instances' security groups; default: the subnets'.
    pub vpc: Option<String>,
    /// Who may reach the load balancer.
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
    /// Default 60s.
    pub idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub deletion_protection: bool,
    /// HTTPS on 443 with HTTP 80 redirecting to it; without it, HTTP only (plan warns).
    pub certificate_arn: Option<String>,
    #[serde(default = "ssl_policy")]
    pub ssl_policy: String,
    /// Makes a missing `certificate_arn` an error instead of an HTTP-only warning.
    #[serde(default)]
    pub require_https: bool,
}

fn internet_facing() -> String {
    "internet-facing".into()
}
fn ssl_policy() -> String {
    "ELBSecurityPolicy-TLS13-1-2-2021-06".into()
}

/// `security_group = { ingress = [...] }`: who else may reach the instances (a Prometheus
/// host scraping node_exporter, say).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceIngress {
    /// The id of an existing group to take over as the instances' (`sg-...`).
    pub adopt: Option<String>,
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
}

/// The target group the load balancer forwards to: Grafana's port and health endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroupSpec {
    /// The ARN of an existing target group to take over.
    pub adopt: Option<String>,
    #[serde(default = "grafana_port")]
    pub port: u16,
    #[serde(default = "health_path")]
    pub health_check_path: String,
    /// Default 30s.
    pub health_check_interval: Option<Spanned<String>>,
    /// Default 5s.
    pub health_check_timeout: Option<Spanned<String>>,
    #[serde(default = "three")]
    pub healthy_threshold: i32,
    #[serde(default = "three")]
    pub unhealthy_threshold: i32,
}

impl Default for TargetGroupSpec {
    fn default() -> Self {
        TargetGroupSpec {
            adopt: None,
            port: grafana_port(),
            health_check_path: health_path(),
            health_check_interval: None,
            health_check_timeout: None,
            healthy_threshold: three(),
            unhealthy_threshold: three(),
        }
    }
}

fn grafana_port() -> u16 {
    3000
}
fn health_path() -> String {
    "/api/health".into()
}
fn three() -> i32 {
    3
}

/// A duration of the table in whole seconds (validated offline), or the default.
fn seconds(d: &Option<Spanned<String>>, default: u64) -> i32 {
    d.as_ref()
        .and_then(|d| parse_duration(d.get_ref()).ok())
        .map_or(default, |d| d.as_secs()) as i32
}

/// What is pushed to the instances over SSM.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningSpec {
    /// Dashboard JSON files.
    #[serde(default)]
    pub dashboards: Vec<Spanned<String>>,
    /// grafana.ini overrides: section → key → value.
    #[serde(default)]
    pub ini: BTreeMap<String, BTreeMap<String, String>>,
    /// Prometheus data source URL, e.g. `http://${host.prometheus.private_ip}:9090`.
    pub prometheus_url: Option<String>,
    /// AMP data source (queried with SigV4 as the instance role), e.g.
    /// `${amp.workspace.main.prometheus_endpoint}`.
    pub amp_url: Option<String>,
    /// A CloudWatch data source (the instance role's credentials, the stack's region).
    #[serde(default)]
    pub cloudwatch: bool,
    /// Admin password: the name of an SSM SecureString parameter or a Secrets Manager secret,
    /// never the password itself.
    pub admin_password_ssm_parameter: Option<String>,
    pub admin_password_secret: Option<String>,
    /// The command that restarts Grafana on an instance (`docker restart grafana`); default
    /// `systemctl restart grafana-server`.
    pub restart: Option<HostCommand>,
    /// What answers once Grafana is back after the restart; default
    /// `http://localhost:<target group port><health check path>`.
    pub health_url: Option<HostCommand>,
    /// The command prefix of Grafana's CLI, which sets the admin password
    /// (`docker exec -i grafana grafana cli`; `-i`: the password arrives on stdin); default
    /// `grafana cli`.
    pub cli: Option<HostCommand>,
    /// Dashboard files' contents by path, read by `validate`.
    #[serde(skip)]
    pub loaded_dashboards: BTreeMap<String, String>,
}

/// Where the admin password is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    SsmParameter(String),
    Secret(String),
}

impl ProvisioningSpec {
    pub fn password_source(&self) -> Option<PasswordSource> {
        match (
            &self.admin_password_ssm_parameter,
            &self.admin_password_secret,
        ) {
            (Some(p), _) => Some(PasswordSource::SsmParameter(p.clone())),
            (None, Some(s)) => Some(PasswordSource::Secret(s.clone())),
            (None, None) => None,
        }
    }
}

impl GrafanaSpec {
    /// Its load balancer's listeners: with a certificate, HTTP 80 redirecting to HTTPS 443,
    /// which forwards to the target group; without one, HTTP 80 forwarding.
    fn listener_parts(&self) -> Vec<listener::ListenerPart> {
        let http = |redirect| listener::ListenerPart {
            port: 80,
            protocol: "HTTP".into(),
            certificate: None,
            ssl_policy: None,
            redirect,
        };
        match &self.alb.certificate_arn {
            Some(cert) => vec![
                http(true),
                listener::ListenerPart {
                    port: 443,
                    protocol: "HTTPS".into(),
                    certificate: Some(cert.clone()),
                    ssl_policy: Some(self.alb.ssl_policy.clone()),
                    redirect: false,
                },
            ],
            None => vec![http(false)],
        }
    }
}

impl KindSpec for GrafanaSpec {
    /// Its instances: `Name` and the hash of their provisioning (the Auto Scaling Group
    /// carries as many: `Name` and its template version).
    fn tagging(&self, _: &DesiredState, _: &ResourceId) -> Option<Tagging<'_>> {
        Some(Tagging {
            own: self.tags.as_ref(),
            added: vec!["Name".to_string(), provision::installed_tag()],
            ec2: true,
        })
    }

    fn warnings(&self) -> Vec<String> {
        if self.alb.certificate_arn.is_some() {
            return Vec::new();
        }
        vec![HTTP_ONLY.to_string()]
    }

    /// Its two security groups (`alb`, `instances`) and their ingress rules, nodes of their
    /// own: the load balancer's admits `alb.allowed_cidrs` on its listeners' ports, the
    /// instances' admit the load balancer's group on the target port, and `security_group`'s
    /// rules. The group's other objects depend on both groups.
    fn parts(&self, table: &Resource) -> Option<(Vec<Resource>, BTreeSet<ResourceId>)> {
        let kinds = (SECURITY_GROUP, INGRESS);
        let place = || GroupPart {
            vpc: self.alb.vpc.clone(),
            subnet: self.alb.subnets.first().cloned(),
        };
        let mut ports = vec![80];
        if self.alb.certificate_arn.is_some() {
            ports.push(443);
        }
        let alb_rules = ports
            .into_iter()
            .map(|port| RuleSpec {
                protocol: "tcp".into(),
                from: port,
                to: port,
                cidrs: self.alb.allowed_cidrs.clone(),
                ipv6_cidrs: Vec::new(),
                prefix_lists: Vec::new(),
                groups: Vec::new(),
            })
            .collect();
        let alb = ResourceId::part(SECURITY_GROUP, table.id.name.clone(), Some(ALB.into()));
        let mut instance_rules = vec![security_group::from_group(
            i32::from(self.target_group.port),
            format!("${{{alb}.id}}"),
        )];
        instance_rules.extend(security_group::rule_specs(&self.security_group.ingress));
        let [alb_group, alb_ingress] = security_group::nodes(
            table,
            kinds,
            Some(ALB),
            self.alb.security_group.adopt.clone(),
            place(),
            IngressPart { rules: alb_rules },
        );
        let [instance_group, instance_ingress] = security_group::nodes(
            table,
            kinds,
            Some(INSTANCES),
            self.security_group.adopt.clone(),
            place(),
            IngressPart {
                rules: instance_rules,
            },
        );
        let tg = &self.target_group;
        let target_group = Resource {
            id: ResourceId::part(TARGET_GROUP, table.id.name.clone(), None),
            origin: table.origin.clone(),
            adopt: tg.adopt.clone(),
            observe_only: table.observe_only,
            spec: Spec::new(target_group::TargetGroupPart {
                port: i32::from(tg.port),
                health: elb::HealthCheck::of(self),
                vpc: self.alb.vpc.clone(),
                subnet: self.alb.subnets.first().cloned(),
            }),
            depends_on: self
                .alb
                .vpc
                .iter()
                .chain(self.alb.subnets.first())
                .flat_map(|s| references_in(s))
                .collect(),
        };
        // The provisioning references what its data sources and ini name, and the group.
        let p = &self.provisioning;
        let provisioning = Resource {
            id: ResourceId::part(PROVISIONING, table.id.name.clone(), None),
            origin: table.origin.clone(),
            adopt: None,
            observe_only: table.observe_only,
            spec: Spec::new(provisioning::ProvisioningPart::of(self)),
            depends_on: p
                .prometheus_url
                .iter()
                .chain(&p.amp_url)
                .chain(p.ini.values().flat_map(|keys| keys.values()))
                .flat_map(|s| references_in(s))
                .chain([table.id.clone()])
                .collect(),
        };
        let node = |id: ResourceId, adopt: Option<String>, spec: Spec, depends_on| Resource {
            id,
            origin: table.origin.clone(),
            adopt,
            observe_only: table.observe_only,
            spec,
            depends_on,
        };
        let tags = self
            .tags
            .as_ref()
            .map(|t| t.get_ref().clone())
            .unwrap_or_default();
        let balancer = node(
            ResourceId::part(BALANCER, table.id.name.clone(), None),
            self.alb.adopt.clone(),
            Spec::new(balancer::BalancerPart {
                scheme: self.alb.scheme.clone(),
                subnets: self.alb.subnets.clone(),
                idle_timeout: seconds(&self.alb.idle_timeout, 60),
                deletion_protection: self.alb.deletion_protection,
                tags: tags.clone(),
            }),
            self.alb
                .subnets
                .iter()
                .flat_map(|s| references_in(s))
                .chain([alb_group.id.clone()])
                .collect(),
        );
        let listeners = self.listener_parts().into_iter().map(|l| {
            let mut deps: BTreeSet<ResourceId> = l
                .certificate
                .iter()
                .flat_map(|c| references_in(c))
                .chain([balancer.id.clone()])
                .collect();
            if !l.redirect {
                deps.insert(target_group.id.clone());
            }
            node(
                ResourceId::part(LISTENER, table.id.name.clone(), Some(l.port.to_string())),
                None,
                Spec::new(l),
                deps,
            )
        });
        let listeners: Vec<Resource> = listeners.collect();
        // The template references what its values name, and the instances' security group.
        let template = node(
            ResourceId::part(LAUNCH_TEMPLATE, table.id.name.clone(), None),
            self.launch_template.adopt.clone(),
            Spec::new(template::TemplatePart {
                ami: self.ami.clone(),
                instance_type: self.instance_type.clone(),
                instance_profile: self.instance_profile.clone(),
                user_data: self.loaded_user_data.clone(),
                key_name: self.key_name.clone(),
                root_size: self.root_volume_size_gib,
                tags: tags.clone(),
            }),
            [&self.instance_type]
                .into_iter()
                .chain(&self.instance_profile)
                .chain(&self.key_name)
                .chain(tags.values())
                .flat_map(|s| references_in(s))
                .chain([instance_group.id.clone()])
                .collect(),
        );
        // The group references what its own values name, its template and its target group.
        let mut own: BTreeSet<ResourceId> = self
            .subnets
            .iter()
            .chain(&table.adopt)
            .chain(tags.values())
            .flat_map(|s| references_in(s))
            .collect();
        own.extend([template.id.clone(), target_group.id.clone()]);
        let mut nodes = vec![
            alb_group,
            alb_ingress,
            instance_group,
            instance_ingress,
            target_group,
            balancer,
        ];
        nodes.extend(listeners);
        nodes.extend([template, provisioning]);
        Some((nodes, own))
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
        if self.min_size < 0 || self.max_size < self.min_size {
            v.here(format!(
                "sizes must satisfy 0 <= min_size ({}) <= max_size ({})",
                self.min_size, self.max_size
            ));
        }
        if let Some(d) = self.desired_capacity {
            if d < self.min_size || d > self.max_size {
                v.here(format!(
                    "desired_capacity {d} is outside min_size..=max_size ({}..={})",
                    self.min_size, self.max_size
                ));
            }
        }
        let ids = [
            ("launch_template.adopt", &self.launch_template.adopt, "lt-"),
            ("alb.adopt", &self.alb.adopt, "arn:"),
            (
                "alb.security_group.adopt",
                &self.alb.security_group.adopt,
                "sg-",
            ),
            ("target_group.adopt", &self.target_group.adopt, "arn:"),
            ("security_group.adopt", &self.security_group.adopt, "sg-"),
        ];
        for (key, id, prefix) in ids {
            if let Some(id) = id.as_deref().filter(|id| !id.starts_with(prefix)) {
                v.here(format!(
                    "{key} `{id}` is not an id AWS gives such an object (`{prefix}...`)"
                ));
            }
        }
        let arn_of = |id: &Option<String>, kind: &str| {
            id.as_deref()
                .filter(|a| a.starts_with("arn:") && !a.contains(&format!(":{kind}/")))
                .map(str::to_string)
        };
        if let Some(a) = arn_of(&self.alb.adopt, "loadbalancer") {
            v.here(format!("alb.adopt `{a}` is not a load balancer's ARN"));
        }
        if let Some(a) = arn_of(&self.target_group.adopt, "targetgroup") {
            v.here(format!(
                "target_group.adopt `{a}` is not a target group's ARN"
            ));
        }
        if !(0..=100).contains(&self.min_healthy_percentage) {
            v.here("min_healthy_percentage is a percentage (0 to 100)");
        }
        self.ami.check(v);
        crate::ami::check_root_size(v, self.root_volume_size_gib);
        if self.subnets.is_empty() {
            v.here("`subnets` is empty: the group needs at least one subnet to launch into");
        }
        if self.alb.subnets.len() < 2 {
            v.here("alb.subnets: an Application Load Balancer needs subnets in at least two availability zones");
        }
        if !["internet-facing", "internal"].contains(&self.alb.scheme.as_str()) {
            v.here(format!(
                "alb.scheme `{}` is not internet-facing or internal",
                self.alb.scheme
            ));
        }
        if self.alb.certificate_arn.is_none() && self.alb.require_https {
            v.here("alb.require_https is set but no alb.certificate_arn is given: an HTTPS listener on 443 needs a certificate");
        }
        for c in &self.alb.allowed_cidrs {
            if !crate::desired::is_ipv4_cidr(c) {
                v.here(format!(
                    "alb.allowed_cidrs: `{c}` is not an IPv4 CIDR such as 10.0.0.0/8"
                ));
            }
        }
        security_group::check_ingress(v, &self.security_group.ingress);
        let tg = &self.target_group;
        if tg.port == 0 {
            v.here("target_group.port must be a port number (1 to 65535)");
        }
        if !tg.health_check_path.starts_with('/') {
            v.here(format!(
                "target_group.health_check_path `{}` must start with /",
                tg.health_check_path
            ));
        }
        for (what, n) in [
            ("healthy_threshold", tg.healthy_threshold),
            ("unhealthy_threshold", tg.unhealthy_threshold),
        ] {
            if !(2..=10).contains(&n) {
                v.here(format!("target_group.{what} must be between 2 and 10"));
            }
        }
        let durations = [
            (&self.health_check_grace_period, "health_check_grace_period"),
            (&self.alb.idle_timeout, "alb.idle_timeout"),
            (
                &tg.health_check_interval,
                "target_group.health_check_interval",
            ),
            (
                &tg.health_check_timeout,
                "target_group.health_check_timeout",
            ),
        ];
        for (d, what) in durations {
            if let Some(d) = d {
                check_duration(v, d, what);
            }
        }
        if let Some(u) = &self.user_data {
            if let Some(file) = v.read(u) {
                self.loaded_user_data = Some(file.text().to_string());
            }
        }
        let sources = provisioning::defined(&self.provisioning);
        for d in &self.provisioning.dashboards {
            if let Some(file) = v.read(d) {
                crate::dashboard::check_dashboard(&file.file, &sources, v.diags);
                self.provisioning
                    .loaded_dashboards
                    .insert(d.get_ref().clone(), file.text().to_string());
            }
        }
        let names: Vec<String> = self
            .provisioning
            .dashboards
            .iter()
            .map(|d| provisioning::dashboard_file_name(d.get_ref()))
            .collect();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                v.error(
                    &self.provisioning.dashboards[i].span(),
                    format!("two dashboards would be installed as `{name}`: rename one file"),
                );
            }
        }
        let p = &self.provisioning;
        crate::push::check_commands(
            v,
            "provisioning",
            &[
                ("restart", &p.restart),
                ("health_url", &p.health_url),
                ("cli", &p.cli),
            ],
        );
        if let Some(url) = &p.health_url {
            url.check_url(
                v,
                "provisioning.health_url",
                &["http://", "https://", "file://"],
            );
        }
        if self.provisioning.admin_password_ssm_parameter.is_some()
            && self.provisioning.admin_password_secret.is_some()
        {
            v.here("give the admin password as an SSM parameter or a secret, not both");
        }
        if let Some(name) = &self.provisioning.admin_password_ssm_parameter {
            let first = name.trim_start_matches('/').to_ascii_lowercase();
            if first.starts_with("aws") || first.starts_with("ssm") {
                v.here(format!(
                    "admin_password_ssm_parameter `{name}`: SSM reserves names beginning with `aws` or `ssm`, so no such parameter can be created; choose another name"
                ));
            }
        }
        for (section, keys) in &self.provisioning.ini {
            if section == "security" && keys.contains_key("admin_password") {
                v.here("provisioning.ini: the admin password never goes in the desired state; name an SSM SecureString parameter (admin_password_ssm_parameter) or a Secrets Manager secret (admin_password_secret)");
            }
            let bad = |s: &str| s.is_empty() || s.contains(['[', ']', '\n', '=']);
            if bad(section)
                || keys.keys().any(|k| bad(k))
                || keys.values().any(|v| v.contains('\n'))
            {
                v.here(format!(
                    "provisioning.ini.{section}: section and key names are words without `[`, `]` or `=`, values one line"
                ));
            }
        }
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

/// The Grafana table `main` of a spec and the nodes loading expands it into, for the parts'
/// unit tests.
#[cfg(test)]
pub(crate) fn expanded(spec: GrafanaSpec) -> DesiredState {
    let table = crate::testing::resource(GRAFANA, "main", Spec::new(spec.clone()));
    let (mut all, _) = spec.parts(&table).expect("a Grafana table has parts");
    all.push(table);
    crate::testing::desired(all)
}
