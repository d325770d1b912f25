//! Security groups and their ingress rules, each a node of its own.
//!
//! A `host` has one security group, a `grafana` group two (the load balancer's and the
//! instances'). Each group is a node (`host.prometheus.security_group`,
//! `grafana.main.security_group.alb`) and its ingress rules another (`host.prometheus.ingress`,
//! `grafana.main.ingress.alb`), as Terraform keeps `aws_security_group` apart from its rules.
//! A group needs nothing but its VPC, so two groups whose rules admit each other form no
//! reference cycle, and what uses a group (an instance, a launch template, a load balancer)
//! waits for the group alone, never for the rules or for another table.
//!
//! A group is found by its ownership tags. Groups made before groups were nodes carry their
//! table's address (`stackwarden:id = host.prometheus`, and `stackwarden:role` for Grafana's
//! two): they are found too, and retagged with their own address on the next pass.

use std::collections::BTreeSet;
use std::marker::PhantomData;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    Filter, IpPermission, IpRange, Ipv6Range, PrefixListId, ResourceType, UserIdGroupPair,
};
use serde::Deserialize;
use toml::Spanned;

use crate::change::FieldChange;
use crate::controller::Context;
use crate::desired::{
    ipv6_network, is_ipv4_cidr, DesiredState, Resource, Spec, Validator, TAG_STACK,
};
use crate::diag::Diagnostics;
use crate::ec2::{locate_subnet, remove_tags, set_tags, tag_map, tag_spec};
use crate::error::{aws_error, Result};
use crate::managed::{Describe, ManagedObject};
use crate::model::{references_in, Kind, Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::tags::{owned_by, owner_id, Tags};

/// Tag on the Grafana groups made before groups were nodes: which of the two a group is.
pub const TAG_ROLE: &str = "stackwarden:role";

/// What EC2 refuses a security group name to begin with (CreateSecurityGroup, `GroupName`:
/// "Can't start with sg-"; the error is `InvalidParameterValue`, "Group names may not be in
/// the format sg-*").
const RESERVED_GROUP_PREFIX: &str = "sg-";

/// The name of a table's security group: `<stack>-<table>`, and `-<key>` for one of several
/// (a Grafana group's `alb` and `instances`).
pub fn group_name(desired: &DesiredState, id: &ResourceId) -> String {
    let table = desired.default_name(&id.composite());
    match &id.key {
        Some(key) => format!("{table}-{key}"),
        None => table,
    }
}

/// A security group kind's whole-state check: no group it makes is named as EC2 refuses.
/// Every name begins with the stack's, so the stack's name (`sg`, `sg-...`) is the cause, and
/// the error is there; an adopted group keeps its name and is not checked.
pub fn check_group_names(kind: Kind, desired: &mut DesiredState, diags: &mut Diagnostics) {
    let stack = desired.stack_name();
    let Some(r) = desired
        .of_kind(kind)
        .filter(|r| r.adopt.is_none())
        .find(|r| group_name(desired, &r.id).starts_with(RESERVED_GROUP_PREFIX))
    else {
        return;
    };
    desired.error_at_stack(
        diags,
        desired.stack.name.span(),
        r,
        format!(
            "stack name `{stack}`: its security groups would be named `{stack}-...`, and EC2 refuses group names beginning with `{RESERVED_GROUP_PREFIX}` (CreateSecurityGroup: \"Group names may not be in the format sg-*\"); rename the stack"
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Schema

/// One ingress rule as users write it: a port (or range) from IPv4 or IPv6 CIDRs, managed
/// prefix lists or security groups.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    pub port: u16,
    pub to_port: Option<u16>,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    pub ipv6_cidrs: Vec<Spanned<String>>,
    /// Managed prefix list ids (`pl-...`), or references to them.
    #[serde(default)]
    pub prefix_lists: Vec<Spanned<String>>,
    /// Security group ids, usually `${host.<name>.security_group_id}`.
    #[serde(default)]
    pub security_groups: Vec<String>,
    pub description: Option<String>,
}

fn tcp() -> String {
    "tcp".into()
}

/// Whether `s` has the shape of a managed prefix list's id: `pl-` and 8 or 17 hexadecimal
/// digits, the two lengths EC2 gives resource ids.
fn is_prefix_list_id(s: &str) -> bool {
    s.strip_prefix("pl-").is_some_and(|hex| {
        [8, 17].contains(&hex.len())
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// Checks a table's ingress rules: port ranges, CIDRs and prefix list ids.
pub fn check_ingress(v: &mut Validator<'_>, rules: &[IngressRule]) {
    for rule in rules {
        if rule.to_port.is_some_and(|to| to < rule.port) {
            v.here(format!(
                "ingress: to_port {} is below port {}",
                rule.to_port.unwrap_or_default(),
                rule.port
            ));
        }
        for c in &rule.cidrs {
            if !is_ipv4_cidr(c.get_ref()) {
                v.error(
                    &c.span(),
                    format!(
                        "ingress: `{}` is not an IPv4 CIDR such as 10.0.0.0/16",
                        c.get_ref()
                    ),
                );
            }
        }
        for c in &rule.ipv6_cidrs {
            if let Err(message) = ipv6_network(c.get_ref()) {
                v.error(&c.span(), format!("ingress: {message}"));
            }
        }
        for p in &rule.prefix_lists {
            let id = p.get_ref();
            if !id.contains("${") && !is_prefix_list_id(id) {
                v.error(
                    &p.span(),
                    format!("ingress: `{id}` is not a managed prefix list id such as pl-0123456789abcdef0"),
                );
            }
        }
    }
}

/// The rules of an ingress node as written (group sources may hold references).
pub fn rule_specs(rules: &[IngressRule]) -> Vec<RuleSpec> {
    rules
        .iter()
        .map(|r| RuleSpec {
            protocol: r.protocol.clone(),
            from: i32::from(r.port),
            to: i32::from(r.to_port.unwrap_or(r.port)),
            cidrs: r.cidrs.iter().map(|c| c.get_ref().clone()).collect(),
            // As EC2 keeps them (`::/0`, not `::0/0`), so that the rule read back is this one.
            ipv6_cidrs: r
                .ipv6_cidrs
                .iter()
                .map(|c| ipv6_network(c.get_ref()).unwrap_or_else(|_| c.get_ref().clone()))
                .collect(),
            prefix_lists: r.prefix_lists.iter().map(|p| p.get_ref().clone()).collect(),
            groups: r.security_groups.clone(),
        })
        .collect()
}

/// One rule of an ingress node before references are rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub protocol: String,
    pub from: i32,
    pub to: i32,
    pub cidrs: Vec<String>,
    /// In the form EC2 answers them ([`ipv6_network`]).
    pub ipv6_cidrs: Vec<String>,
    /// Prefix list ids or references to them.
    pub prefix_lists: Vec<String>,
    /// Security group ids or references to them.
    pub groups: Vec<String>,
}

/// A security group node: where it lives. Its name is its table's AWS name, followed by its
/// key for tables with several groups (`<stack>-grafana-alb`).
#[derive(Debug, Clone)]
pub struct GroupPart {
    /// The VPC; none: the VPC of `subnet`.
    pub vpc: Option<String>,
    /// None: the region's default subnet.
    pub subnet: Option<String>,
}

impl crate::desired::KindSpec for GroupPart {}

/// An ingress node: every rule its group should have, and no other.
#[derive(Debug, Clone)]
pub struct IngressPart {
    pub rules: Vec<RuleSpec>,
}

impl crate::desired::KindSpec for IngressPart {}

/// The group node and the ingress node of one security group of `table`; `adopt` is the id of
/// an existing group the group node takes over (its ingress node then manages its rules).
pub fn nodes(
    table: &Resource,
    (group_kind, ingress_kind): (Kind, Kind),
    key: Option<&str>,
    adopt: Option<String>,
    group: GroupPart,
    ingress: IngressPart,
) -> [Resource; 2] {
    let group_id = ResourceId::part(group_kind, table.id.name.clone(), key.map(String::from));
    let node = |id: ResourceId, adopt, spec, depends_on| Resource {
        id,
        origin: table.origin.clone(),
        adopt,
        observe_only: table.observe_only,
        spec,
        depends_on,
    };
    let group_refs = group
        .vpc
        .iter()
        .chain(&group.subnet)
        .flat_map(|s| references_in(s))
        .collect();
    let mut ingress_refs: BTreeSet<ResourceId> = ingress
        .rules
        .iter()
        .flat_map(|r| r.groups.iter().chain(&r.prefix_lists))
        .flat_map(|g| references_in(g))
        .collect();
    ingress_refs.insert(group_id.clone());
    [
        node(group_id, adopt, Spec::new(group), group_refs),
        node(
            ResourceId::part(ingress_kind, table.id.name.clone(), key.map(String::from)),
            None,
            Spec::new(ingress),
            ingress_refs,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Observed

/// One ingress rule as EC2 keeps it: protocol, port range, one source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub protocol: String,
    pub from: i32,
    pub to: i32,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Cidr(String),
    Ipv6Cidr(String),
    PrefixList(String),
    Group(String),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports = if self.from == self.to {
            self.from.to_string()
        } else {
            format!("{}-{}", self.from, self.to)
        };
        let source = match &self.source {
            Source::Cidr(c) | Source::Ipv6Cidr(c) => c,
            Source::PrefixList(p) => p,
            Source::Group(g) => g,
        };
        write!(f, "{}/{ports} from {source}", self.protocol)
    }
}

fn show_rules(r: &BTreeSet<Rule>) -> String {
    if r.is_empty() {
        return "(none)".into();
    }
    r.iter().map(Rule::to_string).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, Clone, Default)]
pub struct ObservedGroup {
    pub id: String,
    pub name: String,
    pub vpc: String,
    pub tags: Tags,
    pub ingress: BTreeSet<Rule>,
}

/// Every security group the stack owns, read once per observation for the four kinds.
pub(crate) async fn stack_groups(
    ctx: &Context,
    desired: &DesiredState,
) -> Result<Vec<ObservedGroup>> {
    let stack = desired.stack_name().to_string();
    // Groups to adopt carry no tag of the stack yet: read by id too (one more call, only while
    // one is not yet adopted).
    let adopted: Vec<String> = desired
        .resources
        .values()
        .filter(|r| r.spec.get::<GroupPart>().is_some())
        .filter_map(|r| r.adopt.clone())
        .collect();
    let groups = ctx
        .shared("ec2:DescribeSecurityGroups", || async move {
            let filter = Filter::builder()
                .name(format!("tag:{TAG_STACK}"))
                .values(stack)
                .build();
            let mut groups = read_groups(ctx, vec![filter]).await?;
            // Once adopted, a group carries the stack's tag: no read by id any more.
            let adopted: Vec<String> = adopted
                .into_iter()
                .filter(|id| !groups.iter().any(|g| &g.id == id))
                .collect();
            if !adopted.is_empty() {
                let by_id = Filter::builder()
                    .name("group-id")
                    .set_values(Some(adopted))
                    .build();
                for g in read_groups(ctx, vec![by_id]).await? {
                    if !groups.iter().any(|have| have.id == g.id) {
                        groups.push(g);
                    }
                }
            }
            Ok(groups)
        })
        .await?;
    Ok(groups.as_ref().clone())
}

/// The security groups `filter` selects, with their ingress rules one source per rule: every
/// kind of source EC2 has (IPv4 and IPv6 ranges, prefix lists, groups), so that no rule added
/// out of band goes unseen.
async fn read_groups(ctx: &Context, filters: Vec<Filter>) -> Result<Vec<ObservedGroup>> {
    let mut groups = Vec::new();
    let mut pages = ctx
        .ec2
        .describe_security_groups()
        .set_filters(Some(filters))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("ec2", "DescribeSecurityGroups"))?;
        for g in page.security_groups() {
            let mut ingress = BTreeSet::new();
            for p in g.ip_permissions() {
                let protocol = p.ip_protocol().unwrap_or_default().to_string();
                let (from, to) = (p.from_port().unwrap_or(-1), p.to_port().unwrap_or(-1));
                let sources =
                    p.ip_ranges()
                        .iter()
                        .map(|r| Source::Cidr(r.cidr_ip().unwrap_or_default().into()))
                        .chain(
                            p.ipv6_ranges().iter().map(|r| {
                                Source::Ipv6Cidr(r.cidr_ipv6().unwrap_or_default().into())
                            }),
                        )
                        .chain(p.prefix_list_ids().iter().map(|l| {
                            Source::PrefixList(l.prefix_list_id().unwrap_or_default().into())
                        }))
                        .chain(
                            p.user_id_group_pairs().iter().map(|pair| {
                                Source::Group(pair.group_id().unwrap_or_default().into())
                            }),
                        );
                ingress.extend(sources.map(|source| Rule {
                    protocol: protocol.clone(),
                    from,
                    to,
                    source,
                }));
            }
            groups.push(ObservedGroup {
                id: g.group_id().unwrap_or_default().into(),
                name: g.group_name().unwrap_or_default().into(),
                vpc: g.vpc_id().unwrap_or_default().into(),
                tags: tag_map(g.tags()),
                ingress,
            });
        }
    }
    Ok(groups)
}

fn permissions(rules: &[Rule]) -> Vec<IpPermission> {
    rules
        .iter()
        .map(|r| {
            let p = IpPermission::builder()
                .ip_protocol(&r.protocol)
                .from_port(r.from)
                .to_port(r.to);
            match &r.source {
                Source::Cidr(c) => p.ip_ranges(IpRange::builder().cidr_ip(c).build()),
                Source::Ipv6Cidr(c) => p.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(c).build()),
                Source::PrefixList(l) => {
                    p.prefix_list_ids(PrefixListId::builder().prefix_list_id(l).build())
                }
                Source::Group(g) => {
                    p.user_id_group_pairs(UserIdGroupPair::builder().group_id(g).build())
                }
            }
            .build()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Which tables have security groups

/// A table kind with security groups: the kinds of its group and ingress nodes (declared by the
/// table's module: `host::OfHost`, `grafana::OfGrafana`).
pub trait Table: Send + Sync + 'static {
    const TABLE: Kind;
    const GROUP: Kind;
    const INGRESS: Kind;
}

/// The group node an observed group belongs to, by its tags: its own address, or (for groups
/// made before groups were nodes) its table's address and role.
fn group_owner<T: Table>(desired: &DesiredState, o: &ObservedGroup) -> Option<ResourceId> {
    let id = owner_id(&o.tags, desired.stack_name())?;
    if id.kind == T::GROUP {
        return Some(id);
    }
    if id.kind != T::TABLE {
        return None;
    }
    let keyed = T::GROUP.part_of().is_some_and(|(_, _, keyed)| keyed);
    let key = o.tags.get(TAG_ROLE).cloned();
    (keyed == key.is_some()).then(|| ResourceId::part(T::GROUP, id.name, key))
}

/// The group of the group node `group`.
fn find_group<'o, T: Table>(
    desired: &DesiredState,
    group: &ResourceId,
    observed: &'o [ObservedGroup],
) -> Option<&'o ObservedGroup> {
    let adopted = desired
        .resources
        .get(group)
        .and_then(|r| r.adopt.as_deref());
    if let Some(id) = adopted {
        return observed.iter().find(|o| o.id == id);
    }
    observed
        .iter()
        .find(|o| owned_by(&o.tags, desired.stack_name(), group))
        .or_else(|| {
            observed
                .iter()
                .find(|o| group_owner::<T>(desired, o).as_ref() == Some(group))
        })
}

/// The group node beside an ingress node (or the group node itself).
fn group_node<T: Table>(id: &ResourceId) -> ResourceId {
    ResourceId::part(T::GROUP, id.name.clone(), id.key.clone())
}

// ---------------------------------------------------------------------------------------------
// The group

/// The security group node of a host or a Grafana group.
pub struct SecurityGroup<T>(PhantomData<T>);

impl<T> Default for SecurityGroup<T> {
    fn default() -> Self {
        SecurityGroup(PhantomData)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupWant {
    pub name: String,
    pub description: String,
    pub vpc: Option<String>,
    pub subnet: Option<String>,
}

/// A security group changes nothing in place: its name, description and VPC are fixed.
#[derive(Debug, Clone)]
pub enum GroupUpdate {}

impl Describe for GroupUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        match *self {}
    }
}

#[async_trait]
impl<T: Table> ManagedObject for SecurityGroup<T> {
    type Desired = GroupWant;
    type Observed = ObservedGroup;
    type Update = GroupUpdate;
    const KIND: Kind = T::GROUP;
    const NOUN: &'static str = "security group";

    fn desired(&self, desired: &DesiredState, node: &Resource, refs: &Refs) -> Result<GroupWant> {
        let s = node.spec.expect::<GroupPart>();
        let name = group_name(desired, &node.id);
        Ok(GroupWant {
            description: format!("stackwarden {}", node.id),
            name,
            vpc: s.vpc.as_ref().map(|v| refs.render(v).value),
            subnet: s.subnet.as_ref().map(|v| refs.render(v).value),
        })
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<ObservedGroup>> {
        stack_groups(ctx, desired).await
    }

    fn id(&self, o: &ObservedGroup) -> String {
        o.id.clone()
    }

    fn tags<'o>(&self, o: &'o ObservedGroup) -> Option<&'o Tags> {
        Some(&o.tags)
    }

    fn owner(&self, desired: &DesiredState, o: &ObservedGroup) -> Option<ResourceId> {
        group_owner::<T>(desired, o)
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedGroup],
    ) -> Option<&'o ObservedGroup> {
        find_group::<T>(desired, &node.id, observed)
    }

    fn outputs(&self, o: &ObservedGroup) -> Outputs {
        Outputs::from([("id".into(), o.id.clone()), ("name".into(), o.name.clone())])
    }

    fn diff(&self, _want: &GroupWant, _have: &ObservedGroup) -> Vec<GroupUpdate> {
        Vec::new()
    }

    fn notes(&self, want: &GroupWant, have: &ObservedGroup) -> Vec<String> {
        match &want.vpc {
            Some(vpc) if vpc != &have.vpc && vpc != KNOWN_AFTER_APPLY => vec![format!(
                "the group is in {} and the desired VPC is {vpc}; a group cannot move (remove the table with --prune, then add it again)",
                have.vpc
            )],
            _ => Vec::new(),
        }
    }

    fn own_tags(&self, want: &GroupWant) -> Tags {
        Tags::from([("Name".into(), want.name.clone())])
    }

    fn create_fields(&self, want: &GroupWant) -> Vec<FieldChange> {
        let vpc = want.vpc.clone().unwrap_or_else(|| match &want.subnet {
            Some(subnet) => format!("(the VPC of {subnet})"),
            None => "(the default VPC)".into(),
        });
        vec![FieldChange::new("vpc", None, Some(vpc))]
    }

    fn label(&self, want: &GroupWant) -> String {
        want.name.clone()
    }

    /// A group's name is unique in its VPC.
    async fn named_tags(&self, ctx: &Context, want: &GroupWant) -> Result<Option<Tags>> {
        let vpc = match &want.vpc {
            Some(vpc) => vpc.clone(),
            None => locate_subnet(ctx, want.subnet.as_deref()).await?.1,
        };
        let filters = [("group-name", &want.name), ("vpc-id", &vpc)]
            .map(|(name, value)| Filter::builder().name(name).values(value).build());
        let groups = read_groups(ctx, filters.to_vec()).await?;
        Ok(groups.into_iter().next().map(|g| g.tags))
    }

    async fn create(&self, ctx: &Context, want: &GroupWant, tags: &Tags) -> Result<Outputs> {
        let vpc = match &want.vpc {
            Some(vpc) => vpc.clone(),
            None => locate_subnet(ctx, want.subnet.as_deref()).await?.1,
        };
        let out = ctx
            .ec2
            .create_security_group()
            .group_name(&want.name)
            .description(&want.description)
            .vpc_id(vpc)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, tags))
            .send()
            .await
            .map_err(aws_error("ec2", "CreateSecurityGroup"))?;
        Ok(Outputs::from([
            ("id".into(), out.group_id().unwrap_or_default().to_string()),
            ("name".into(), want.name.clone()),
        ]))
    }

    async fn update(
        &self,
        _: &Context,
        _: &ObservedGroup,
        change: &GroupUpdate,
    ) -> Result<Option<Outputs>> {
        match *change {}
    }

    async fn tag(&self, ctx: &Context, have: &ObservedGroup, set: &Tags) -> Result<()> {
        set_tags(ctx, &have.id, set).await
    }

    async fn untag(&self, ctx: &Context, have: &ObservedGroup, keys: &[String]) -> Result<()> {
        remove_tags(ctx, &have.id, keys).await
    }

    /// Fails with DependencyViolation (retried) while an instance, a load balancer or another
    /// group's rule still uses the group.
    async fn delete(&self, ctx: &Context, have: &ObservedGroup) -> Result<()> {
        ctx.ec2
            .delete_security_group()
            .group_id(&have.id)
            .send()
            .await
            .map_err(aws_error("ec2", "DeleteSecurityGroup"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Its ingress rules

/// The ingress rules of a security group: exactly the desired ones.
pub struct Ingress<T>(PhantomData<T>);

impl<T> Default for Ingress<T> {
    fn default() -> Self {
        Ingress(PhantomData)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct IngressWant {
    /// The group's id ([`KNOWN_AFTER_APPLY`] before it exists).
    pub group: String,
    pub rules: BTreeSet<Rule>,
}

/// Rules to revoke, then rules to authorize: a rule that only changed its source never
/// doubles access.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressUpdate {
    pub from: BTreeSet<Rule>,
    pub to: BTreeSet<Rule>,
}

impl Describe for IngressUpdate {
    fn fields(&self) -> Vec<FieldChange> {
        vec![FieldChange::new(
            "rules",
            Some(show_rules(&self.from)),
            Some(show_rules(&self.to)),
        )]
    }
}

async fn authorize(ctx: &Context, group: &str, rules: Vec<Rule>) -> Result<()> {
    if rules.is_empty() {
        return Ok(());
    }
    ctx.ec2
        .authorize_security_group_ingress()
        .group_id(group)
        .set_ip_permissions(Some(permissions(&rules)))
        .send()
        .await
        .map_err(aws_error("ec2", "AuthorizeSecurityGroupIngress"))?;
    Ok(())
}

async fn revoke(ctx: &Context, group: &str, rules: Vec<Rule>) -> Result<()> {
    if rules.is_empty() {
        return Ok(());
    }
    ctx.ec2
        .revoke_security_group_ingress()
        .group_id(group)
        .set_ip_permissions(Some(permissions(&rules)))
        .send()
        .await
        .map_err(aws_error("ec2", "RevokeSecurityGroupIngress"))?;
    Ok(())
}

#[async_trait]
impl<T: Table> ManagedObject for Ingress<T> {
    type Desired = IngressWant;
    type Observed = ObservedGroup;
    type Update = IngressUpdate;
    const KIND: Kind = T::INGRESS;
    const NOUN: &'static str = "ingress of security group";

    fn desired(&self, _: &DesiredState, node: &Resource, refs: &Refs) -> Result<IngressWant> {
        let s = node.spec.expect::<IngressPart>();
        let group = refs
            .outputs
            .get(&group_node::<T>(&node.id))
            .and_then(|o| o.get("id"))
            .cloned()
            .unwrap_or_else(|| KNOWN_AFTER_APPLY.into());
        let mut rules = BTreeSet::new();
        for r in &s.rules {
            let sources = r
                .cidrs
                .iter()
                .map(|c| Source::Cidr(c.clone()))
                .chain(r.ipv6_cidrs.iter().map(|c| Source::Ipv6Cidr(c.clone())))
                .chain(
                    r.prefix_lists
                        .iter()
                        .map(|p| Source::PrefixList(refs.render(p).value)),
                )
                .chain(r.groups.iter().map(|g| Source::Group(refs.render(g).value)));
            rules.extend(sources.map(|source| Rule {
                protocol: r.protocol.clone(),
                from: r.from,
                to: r.to,
                source,
            }));
        }
        Ok(IngressWant { group, rules })
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Vec<ObservedGroup>> {
        stack_groups(ctx, desired).await
    }

    fn id(&self, o: &ObservedGroup) -> String {
        o.id.clone()
    }

    /// Rules carry no tags: they belong to their group.
    fn tags<'o>(&self, _: &'o ObservedGroup) -> Option<&'o Tags> {
        None
    }

    fn owner(&self, desired: &DesiredState, o: &ObservedGroup) -> Option<ResourceId> {
        let group = group_owner::<T>(desired, o)?;
        Some(ResourceId::part(T::INGRESS, group.name, group.key))
    }

    fn find<'o>(
        &self,
        desired: &DesiredState,
        node: &Resource,
        observed: &'o [ObservedGroup],
    ) -> Option<&'o ObservedGroup> {
        find_group::<T>(desired, &group_node::<T>(&node.id), observed)
    }

    fn diff(&self, want: &IngressWant, have: &ObservedGroup) -> Vec<IngressUpdate> {
        if want.rules == have.ingress {
            return Vec::new();
        }
        vec![IngressUpdate {
            from: have.ingress.clone(),
            to: want.rules.clone(),
        }]
    }

    fn create_fields(&self, want: &IngressWant) -> Vec<FieldChange> {
        vec![FieldChange::new(
            "rules",
            None,
            Some(show_rules(&want.rules)),
        )]
    }

    fn label(&self, want: &IngressWant) -> String {
        want.group.clone()
    }

    /// The rules of a group made in this pass: it has none yet.
    async fn create(&self, ctx: &Context, want: &IngressWant, _: &Tags) -> Result<Outputs> {
        authorize(ctx, &want.group, want.rules.iter().cloned().collect()).await?;
        Ok(Outputs::new())
    }

    async fn update(
        &self,
        ctx: &Context,
        have: &ObservedGroup,
        c: &IngressUpdate,
    ) -> Result<Option<Outputs>> {
        revoke(ctx, &have.id, c.from.difference(&c.to).cloned().collect()).await?;
        authorize(ctx, &have.id, c.to.difference(&c.from).cloned().collect()).await?;
        Ok(None)
    }

    /// Revokes every rule, so the groups they name can be deleted.
    async fn delete(&self, ctx: &Context, have: &ObservedGroup) -> Result<()> {
        revoke(ctx, &have.id, have.ingress.iter().cloned().collect()).await
    }
}

/// The id a table's group node has now, or [`KNOWN_AFTER_APPLY`].
pub fn group_id(refs: &Refs, kind: Kind, name: &str, key: Option<&str>) -> String {
    refs.outputs
        .get(&ResourceId::part(kind, name, key.map(String::from)))
        .and_then(|o| o.get("id"))
        .cloned()
        .unwrap_or_else(|| KNOWN_AFTER_APPLY.into())
}

/// Ingress rules of one port from one source group, for a table's own rules (Grafana's
/// instances admit its load balancer).
pub fn from_group(port: i32, group: String) -> RuleSpec {
    RuleSpec {
        protocol: "tcp".into(),
        from: port,
        to: port,
        cidrs: Vec::new(),
        ipv6_cidrs: Vec::new(),
        prefix_lists: Vec::new(),
        groups: vec![group],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Action;
    use crate::controller::Controller;
    use crate::desired::{KindSpec, Spec};
    use crate::grafana::{GrafanaSpec, OfGrafana};
    use crate::host::{HostSpec, OfHost};
    use crate::managed::{Managed, Op};
    use crate::testing::{desired, owned_tags, resource};

    const HOST: &str = r#"
ami = "ami-1"
instance_type = "t3.medium"
subnet = "subnet-1"
security_group = { ingress = [
  { port = 9090, cidrs = ["10.0.0.0/16"] },
  { port = 9090, security_groups = ["${grafana.main.security_group_id}"] },
] }
"#;

    const GRAFANA: &str = r#"
ami = "ami-1"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = { subnets = ["subnet-a", "subnet-b"], allowed_cidrs = ["0.0.0.0/0"] }
security_group = { ingress = [{ port = 9100, security_groups = ["${host.prom.security_group_id}"] }] }
provisioning = { prometheus_url = "http://${host.prom.private_ip}:9090" }
"#;

    /// A host and a Grafana group, expanded as the loader expands them.
    fn stack() -> DesiredState {
        let host: HostSpec = toml::from_str(HOST).unwrap();
        let grafana: GrafanaSpec = toml::from_str(GRAFANA).unwrap();
        let mut h = resource(crate::host::HOST, "prom", Spec::new(host.clone()));
        h.depends_on = references_in("${grafana.main.security_group_id}");
        let mut g = resource(crate::grafana::GRAFANA, "main", Spec::new(grafana.clone()));
        g.depends_on = references_in("${host.prom.security_group_id} ${host.prom.private_ip}");
        let (mut nodes, own) = host.parts(&h).unwrap();
        h.depends_on = own;
        let (more, own) = grafana.parts(&g).unwrap();
        g.depends_on = own;
        nodes.extend(more);
        nodes.extend([h, g]);
        desired(nodes)
    }

    fn id(s: &str) -> ResourceId {
        ResourceId::parse(s).unwrap_or_else(|| panic!("{s} parses"))
    }

    fn group(id: &str, tags: Tags, rules: &[(i32, Source)]) -> ObservedGroup {
        ObservedGroup {
            id: id.into(),
            name: "n".into(),
            vpc: "vpc-1".into(),
            tags,
            ingress: rules
                .iter()
                .map(|(port, source)| Rule {
                    protocol: "tcp".into(),
                    from: *port,
                    to: *port,
                    source: source.clone(),
                })
                .collect(),
        }
    }

    fn refs(ids: &[(&str, &str)]) -> Refs {
        let mut refs = Refs::default();
        for (node, group) in ids {
            refs.outputs
                .insert(id(node), Outputs::from([("id".into(), group.to_string())]));
        }
        refs
    }

    #[test]
    fn groups_admitting_each_other_form_no_cycle() {
        let d = stack();
        let deps = |node: &str| -> BTreeSet<String> {
            d.resources[&id(node)]
                .depends_on
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(deps("host.prom.security_group"), BTreeSet::new());
        assert_eq!(
            deps("host.prom.ingress"),
            BTreeSet::from([
                "host.prom.security_group".to_string(),
                "grafana.main.security_group.instances".to_string()
            ])
        );
        assert_eq!(
            deps("grafana.main.ingress.instances"),
            BTreeSet::from([
                "grafana.main.security_group.instances".to_string(),
                "grafana.main.security_group.alb".to_string(),
                "host.prom.security_group".to_string()
            ])
        );
        // The instance needs its own group, not the groups its group's rules admit.
        assert_eq!(
            deps("host.prom"),
            BTreeSet::from(["host.prom.security_group".to_string()])
        );
        // The group needs its template and its target group; its template, the instances'
        // security group; its load balancer, its own security group; its provisioning, the
        // host it names.
        assert_eq!(
            deps("grafana.main"),
            BTreeSet::from([
                "grafana.main.launch_template".to_string(),
                "grafana.main.target_group".to_string()
            ])
        );
        assert_eq!(
            deps("grafana.main.launch_template"),
            BTreeSet::from(["grafana.main.security_group.instances".to_string()])
        );
        assert_eq!(
            deps("grafana.main.alb"),
            BTreeSet::from(["grafana.main.security_group.alb".to_string()])
        );
        assert_eq!(
            deps("grafana.main.provisioning"),
            BTreeSet::from(["grafana.main".to_string(), "host.prom".to_string()])
        );
        // Every node comes after what it references: no loop.
        let order: Vec<String> = d.apply_order().iter().map(|i| i.to_string()).collect();
        assert_eq!(order.len(), 13, "{order:?}");
        for (i, node) in order.iter().enumerate() {
            for dep in deps(node) {
                let at = order.iter().position(|o| *o == dep).unwrap();
                assert!(at < i, "{dep} comes before {node} in {order:?}");
            }
        }
    }

    #[test]
    fn ingress_is_kept_exactly_as_desired_revoking_first() {
        let d = stack();
        let node = &d.resources[&id("host.prom.ingress")];
        let refs = refs(&[
            ("host.prom.security_group", "sg-h"),
            ("grafana.main.security_group.instances", "sg-g"),
        ]);
        let tags = owned_tags("host.prom.security_group");
        let exact = group(
            "sg-h",
            tags.clone(),
            &[
                (9090, Source::Cidr("10.0.0.0/16".into())),
                (9090, Source::Group("sg-g".into())),
            ],
        );
        let k = Managed(Ingress::<OfHost>::default());
        assert!(k.diff(&d, node, &vec![exact], &refs).unwrap().is_none());

        let opened = group(
            "sg-h",
            tags,
            &[
                (22, Source::Cidr("0.0.0.0/0".into())),
                (9090, Source::Cidr("10.0.0.0/16".into())),
            ],
        );
        let c = k.diff(&d, node, &vec![opened], &refs).unwrap().unwrap();
        let [Op::Update { change, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        let revoked: Vec<_> = change.from.difference(&change.to).collect();
        let authorized: Vec<_> = change.to.difference(&change.from).collect();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].from, 22);
        assert_eq!(authorized.len(), 1);
        assert_eq!(authorized[0].source, Source::Group("sg-g".into()));
        assert_eq!(c.fields[0].field, "rules");
    }

    /// The host's rules as observed exactly, plus `extra`.
    fn host_group_with(extra: &[(i32, Source)]) -> ObservedGroup {
        let mut rules = vec![
            (9090, Source::Cidr("10.0.0.0/16".into())),
            (9090, Source::Group("sg-g".into())),
        ];
        rules.extend_from_slice(extra);
        group("sg-h", owned_tags("host.prom.security_group"), &rules)
    }

    /// What the ingress node of `d`'s host would revoke and authorize, by the rules' display.
    fn host_ingress_change(d: &DesiredState, have: ObservedGroup) -> (Vec<String>, Vec<String>) {
        let refs = refs(&[
            ("host.prom.security_group", "sg-h"),
            ("grafana.main.security_group.instances", "sg-g"),
        ]);
        let k = Managed(Ingress::<OfHost>::default());
        let node = &d.resources[&id("host.prom.ingress")];
        let Some(c) = k.diff(d, node, &vec![have], &refs).unwrap() else {
            return (Vec::new(), Vec::new());
        };
        let [Op::Update { change, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        let show = |r: std::collections::btree_set::Difference<'_, Rule>| {
            r.map(Rule::to_string).collect::<Vec<_>>()
        };
        (
            show(change.from.difference(&change.to)),
            show(change.to.difference(&change.from)),
        )
    }

    #[test]
    fn an_ipv6_range_opened_out_of_band_is_drift_and_revoked_alone() {
        let d = stack();
        let opened = host_group_with(&[(9090, Source::Ipv6Cidr("::/0".into()))]);
        let (revoked, authorized) = host_ingress_change(&d, opened);
        assert_eq!(revoked, ["tcp/9090 from ::/0"]);
        assert_eq!(authorized, Vec::<String>::new());
    }

    #[test]
    fn a_prefix_list_admitted_out_of_band_is_drift_and_revoked_alone() {
        let d = stack();
        let opened = host_group_with(&[(22, Source::PrefixList("pl-0123456789abcdef0".into()))]);
        let (revoked, authorized) = host_ingress_change(&d, opened);
        assert_eq!(revoked, ["tcp/22 from pl-0123456789abcdef0"]);
        assert_eq!(authorized, Vec::<String>::new());
    }

    /// The default stack's host with IPv6 ranges written in other spellings than EC2's, and
    /// prefix lists by id and by reference (no kind makes prefix lists yet: an attribute of
    /// the Grafana group stands in for one, rendered like any reference).
    fn stack_with_ipv6_and_prefix_list() -> DesiredState {
        let host = HOST.replace(
            "{ port = 9090, cidrs = [\"10.0.0.0/16\"] },",
            "{ port = 9090, cidrs = [\"10.0.0.0/16\"] },\n  { port = 9100, ipv6_cidrs = [\"2001:DB8::/32\", \"::0/0\"], prefix_lists = [\"pl-63a5400a\", \"${grafana.main.asg_name}\"] },",
        );
        let host: HostSpec = toml::from_str(&host).unwrap();
        let mut h = resource(crate::host::HOST, "prom", Spec::new(host.clone()));
        let (mut nodes, _) = host.parts(&h).unwrap();
        h.depends_on = BTreeSet::new();
        nodes.push(h);
        desired(nodes)
    }

    #[test]
    fn desired_ipv6_ranges_and_prefix_lists_are_authorized_as_ec2_keeps_them() {
        let d = stack_with_ipv6_and_prefix_list();
        assert!(
            d.resources[&id("host.prom.ingress")]
                .depends_on
                .contains(&id("grafana.main")),
            "a prefix list named by reference is waited for"
        );
        let mut refs = refs(&[
            ("host.prom.security_group", "sg-h"),
            ("grafana.main.security_group.instances", "sg-g"),
        ]);
        refs.outputs.insert(
            id("grafana.main"),
            Outputs::from([("asg_name".into(), "pl-0aaaaaaaaaaaaaaaa".into())]),
        );
        let k = Managed(Ingress::<OfHost>::default());
        let node = &d.resources[&id("host.prom.ingress")];
        let c = k
            .diff(&d, node, &vec![host_group_with(&[])], &refs)
            .unwrap()
            .unwrap();
        let [Op::Update { change, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        let authorized: Vec<String> = change
            .to
            .difference(&change.from)
            .map(Rule::to_string)
            .collect();
        assert_eq!(
            authorized,
            [
                "tcp/9100 from 2001:db8::/32",
                "tcp/9100 from ::/0",
                "tcp/9100 from pl-0aaaaaaaaaaaaaaaa",
                "tcp/9100 from pl-63a5400a",
            ]
        );
        assert_eq!(change.from.difference(&change.to).count(), 0);

        // Once EC2 has them (in its spelling), nothing is left to do.
        let exact = host_group_with(&[
            (9100, Source::Ipv6Cidr("2001:db8::/32".into())),
            (9100, Source::Ipv6Cidr("::/0".into())),
            (9100, Source::PrefixList("pl-63a5400a".into())),
            (9100, Source::PrefixList("pl-0aaaaaaaaaaaaaaaa".into())),
        ]);
        assert!(k.diff(&d, node, &vec![exact], &refs).unwrap().is_none());
    }

    #[test]
    fn each_source_is_sent_in_its_own_field() {
        let rule = |source| Rule {
            protocol: "tcp".into(),
            from: 443,
            to: 443,
            source,
        };
        let sent = permissions(&[
            rule(Source::Ipv6Cidr("::/0".into())),
            rule(Source::PrefixList("pl-63a5400a".into())),
        ]);
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].ipv6_ranges()[0].cidr_ipv6(), Some("::/0"));
        assert!(sent[0].ip_ranges().is_empty() && sent[0].prefix_list_ids().is_empty());
        assert_eq!(
            sent[1].prefix_list_ids()[0].prefix_list_id(),
            Some("pl-63a5400a")
        );
        assert!(sent[1].ip_ranges().is_empty() && sent[1].ipv6_ranges().is_empty());
    }

    #[test]
    fn prefix_list_ids_have_ec2s_shape() {
        for good in ["pl-63a5400a", "pl-0123456789abcdef0"] {
            assert!(is_prefix_list_id(good), "{good}");
        }
        for bad in [
            "pl-",
            "pl-63A5400A",
            "pl-0123456789",
            "sg-63a5400a",
            "63a5400a",
        ] {
            assert!(!is_prefix_list_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_missing_group_is_created_alone_and_its_rules_follow() {
        let d = stack();
        let k = Managed(SecurityGroup::<OfHost>::default());
        let node = &d.resources[&id("host.prom.security_group")];
        let c = k
            .diff(&d, node, &vec![], &Refs::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create);
        let [Op::Create { want, tags }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(want.name, "s-prom");
        assert_eq!(want.subnet.as_deref(), Some("subnet-1"));
        assert_eq!(
            tags.get(crate::desired::TAG_ID).map(String::as_str),
            Some("host.prom.security_group")
        );
        let ingress = Managed(Ingress::<OfHost>::default());
        let c = ingress
            .diff(
                &d,
                &d.resources[&id("host.prom.ingress")],
                &vec![],
                &Refs::default(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create);
        let [Op::Create { want, .. }] = &c.ops[..] else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(want.group, KNOWN_AFTER_APPLY);
        assert_eq!(want.rules.len(), 2);
    }

    #[test]
    fn grafana_groups_made_before_groups_were_nodes_are_found_and_retagged() {
        let d = stack();
        let k = Managed(SecurityGroup::<OfGrafana>::default());
        let legacy = |role: &str| {
            let mut tags = owned_tags("grafana.main");
            tags.insert(TAG_ROLE.into(), role.into());
            group(&format!("sg-{role}"), tags, &[])
        };
        let observed = vec![legacy("alb"), legacy("instances")];
        for key in ["alb", "instances"] {
            let node = &d.resources[&id(&format!("grafana.main.security_group.{key}"))];
            let c = k
                .diff(&d, node, &observed, &Refs::default())
                .unwrap()
                .unwrap();
            assert_eq!(c.action, Action::Update);
            assert_eq!(c.object, format!("security group sg-{key}"));
            let [Op::Tag { set, .. }] = &c.ops[..] else {
                panic!("{:?}", c.ops)
            };
            assert_eq!(
                set.get(crate::desired::TAG_ID),
                Some(&format!("grafana.main.security_group.{key}"))
            );
        }
        assert!(
            k.removed(&d, &observed, true).is_empty(),
            "both are managed"
        );
        let gone = desired(vec![]);
        let removed = k.removed(&gone, &observed, true);
        let ids: Vec<String> = removed.iter().map(|c| c.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "grafana.main.security_group.alb",
                "grafana.main.security_group.instances"
            ]
        );
        assert!(removed.iter().all(|c| c.action == Action::Delete));
    }

    #[test]
    fn groups_of_other_stacks_and_kinds_are_never_ours() {
        let d = stack();
        let mut theirs = owned_tags("host.prom.security_group");
        theirs.insert(TAG_STACK.into(), "other".into());
        let observed = vec![
            group("sg-1", theirs, &[]),
            group("sg-2", owned_tags("grafana.main.security_group.alb"), &[]),
        ];
        let k = Managed(SecurityGroup::<OfHost>::default());
        assert!(k.removed(&desired(vec![]), &observed, true).is_empty());
        let node = &d.resources[&id("host.prom.security_group")];
        let c = k
            .diff(&d, node, &observed, &Refs::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.action, Action::Create, "neither is this host's group");
    }
}
