//! Where moto is laxer than AWS, the emulator answers as AWS does (each behaviour checked
//! against the AWS API reference, each with a conformance test in `tests/emulator.rs`):
//!
//! - `CreateAutoScalingGroup` on a name that exists fails with `AlreadyExists` ("You already
//!   have an Auto Scaling group or launch configuration with this name"); moto silently
//!   replaces the group.
//! - `DeleteSecurityGroup` of a group still in use (by an instance not yet terminated, a load
//!   balancer, or another group's rule) fails with `DependencyViolation`, as on AWS; moto
//!   deletes it.
//! - `CreateRuleGroupsNamespace` on a name the workspace has fails with `ConflictException`
//!   (409): the operation "creates new rule groups namespaces" only, updates are
//!   `PutRuleGroupsNamespace`; moto silently replaces the namespace.
//! - IAM is eventually consistent: for `profile_propagation` after `CreateInstanceProfile`,
//!   `RunInstances` naming the new profile fails with `InvalidParameterValue` ("Invalid IAM
//!   Instance Profile name"), as the first cold run of any stack with a host meets on AWS, and
//!   `CreateAutoScalingGroup` / `UpdateAutoScalingGroup` with a launch template naming it fail
//!   with `ValidationError` ("You must use a valid fully-formed launch template. ... Invalid
//!   IAM Instance Profile name"). For `principal_propagation` after `CreateRole` or
//!   `CreateUser`, a trust policy (`CreateRole`, `UpdateAssumeRolePolicy`) naming the new ARN
//!   as an `AWS` principal fails with `MalformedPolicyDocument` ("Invalid principal in
//!   policy: "AWS":"arn:...""), as IAM answers until the principal has propagated, and for a
//!   role or user of the account that does not exist at all.
//! - `CreateLoadBalancer` is idempotent on AWS: with the name and settings (scheme, type,
//!   subnets, security groups) of a load balancer that exists it answers that load balancer,
//!   with other settings `DuplicateLoadBalancerName`; moto makes a second load balancer of the
//!   name.
//! - IAM stores a trust policy in its own form: an account id as an `AWS` principal
//!   (`"123456789012"`) is kept as `arn:aws:iam::123456789012:root`; moto keeps what it was
//!   given. `CreateRole` and `UpdateAssumeRolePolicy` documents are rewritten before moto sees
//!   them, so what the operator reads back is what AWS would answer.
//! - `CreateLoadBalancer` without `Scheme` or `Type` makes an internet-facing Application Load
//!   Balancer, and `DescribeLoadBalancers` says so; moto leaves the scheme out.
//! - `DescribeLaunchTemplates` answers a template's tags as they are now (`CreateTags` and
//!   `DeleteTags` on its `lt-` id included); moto answers the tags it was created with.
//! - `AttachVolume` at a device the instance already uses fails with `InvalidParameterValue`
//!   ("Attachment point /dev/sdf is already in use"), and of a volume already attached with
//!   `VolumeInUse`; moto replaces the instance's device mapping, leaving two volumes attached at
//!   one device.
//! - `DescribeLoadBalancerAttributes` answers every attribute of an Application Load Balancer,
//!   those never set with AWS's default (`idle_timeout.timeout_seconds` 60, ...); moto leaves
//!   some out.
//! - `UpdateAutoScalingGroup` changing the launch template (or launch configuration, or mixed
//!   instances policy) while an instance refresh with a desired configuration is active fails
//!   with `ValidationError` ("An active instance refresh with a desired configuration
//!   exists. ..."), as the Auto Scaling user guide says; moto knows no refreshes.
//! - `GetAccountAuthorizationDetails` pages, at most `MaxItems` entries a page (default 100)
//!   with `IsTruncated` and a `Marker`; moto answers everything at once.
//! - `AuthorizeSecurityGroupIngress` and `AuthorizeSecurityGroupEgress` naming a prefix list
//!   that does not exist fail with `InvalidPrefixListID.NotFound` ("The prefix list ID
//!   'pl-...' does not exist"); moto stores the rule.
//! - EC2 keeps a rule's IPv6 range in one spelling (RFC 5952: lower case, `::` for the longest
//!   run of zero fields), whatever was sent: `::0/0` is read back as `::/0`, which is why
//!   terraform-provider-aws (issue 15982) cannot find a rule written otherwise. Authorize and
//!   revoke requests reach moto with their ranges so written; moto keeps what it was given.
//!
//! - `RunInstances` naming an image that does not exist fails with `InvalidAMIID.NotFound`, and
//!   one mapping the image's root device to a volume smaller than its snapshot with
//!   `InvalidBlockDeviceMapping` (`images.rs`); moto launches either.
//! - `AssumeRole` of a role that does not exist, or whose trust policy does not admit the
//!   caller (its `sts:ExternalId` condition included), is `AccessDenied`; moto hands out
//!   credentials for any ARN (`assume.rs`).
//!
//! Checks run before a request is served or forwarded; what they need to remember (when a
//! profile was created, when an instance launched) is recorded from moto's answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::moto::BalancerSettings;
use crate::route::Incoming;
use crate::wire::ApiError;
use crate::{lock, State};

/// When each instance profile (by name) was created and each instance launched.
#[derive(Default)]
pub struct Store {
    profiles: BTreeMap<String, Instant>,
    /// Roles and users by ARN, when created: trust policies naming them wait for IAM.
    principals: BTreeMap<String, Instant>,
    instances: BTreeMap<String, Instant>,
}

impl Store {
    /// Whether `instance` was launched (through this emulator) less than `age` ago.
    pub fn launched_within(&self, instance: &str, age: std::time::Duration) -> bool {
        self.instances
            .get(instance)
            .is_some_and(|t| t.elapsed() < age)
    }
}

fn param(form: &[(String, String)], key: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Refuses a request AWS would refuse where moto would not.
pub async fn check(state: &Arc<State>, req: &Incoming) -> Result<(), ApiError> {
    match (req.service.as_str(), req.operation.as_str()) {
        ("autoscaling", "CreateAutoScalingGroup") => {
            let form = req.form();
            let Some(group) = param(&form, "AutoScalingGroupName") else {
                return Ok(());
            };
            if state.moto.group_instances(req, &group).await?.is_some() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "AlreadyExists",
                    format!("AutoScalingGroup by this name already exists - A group with the name {group} already exists"),
                ));
            }
            template_profile_propagated(state, req).await?;
        }
        ("autoscaling", "UpdateAutoScalingGroup") => {
            crate::refresh::blocks_launch_template_update(state, req, &req.form())?;
            template_profile_propagated(state, req).await?;
        }
        ("aps", "CreateRuleGroupsNamespace") => {
            let workspace = req.segments().get(1).cloned().unwrap_or_default();
            let name = req.json()?["name"].as_str().unwrap_or_default().to_string();
            let probe = Incoming::internal(
                req,
                "aps",
                "GET",
                &format!("/workspaces/{workspace}/rulegroupsnamespaces/{name}"),
                Default::default(),
            );
            if state.moto.forward(&probe).await?.status().is_success() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "ConflictException",
                    format!("A rule groups namespace named {name} already exists in workspace {workspace}"),
                ));
            }
        }
        ("ec2", "AuthorizeSecurityGroupIngress" | "AuthorizeSecurityGroupEgress") => {
            let named: Vec<String> = req
                .form()
                .into_iter()
                .filter(|(k, _)| k.starts_with("IpPermissions.") && k.ends_with(".PrefixListId"))
                .map(|(_, v)| v)
                .collect();
            let known = state.moto.prefix_lists(req, &named).await?;
            if let Some(missing) = named.iter().find(|id| !known.contains(*id)) {
                return Err(ApiError::bad_request(
                    "InvalidPrefixListID.NotFound",
                    format!("The prefix list ID '{missing}' does not exist"),
                ));
            }
        }
        ("elasticloadbalancing", "DeleteLoadBalancer") => {
            crate::consistency::deleting_balancer(state, req).await?;
        }
        ("ec2", "DeleteSecurityGroup") => {
            let Some(group) = param(&req.form(), "GroupId") else {
                return Ok(());
            };
            let mut dependents = state.moto.group_dependents(req, &group).await?;
            if crate::consistency::interfaces_in(state, &group) {
                dependents.push("the network interfaces of a deleted load balancer".into());
            }
            if !dependents.is_empty() {
                return Err(ApiError::bad_request(
                    "DependencyViolation",
                    format!(
                        "resource {group} has a dependent object ({})",
                        dependents.join(", ")
                    ),
                ));
            }
        }
        ("ec2", "AttachVolume") => {
            let form = req.form();
            let (Some(volume), Some(instance), Some(device)) = (
                param(&form, "VolumeId"),
                param(&form, "InstanceId"),
                param(&form, "Device"),
            ) else {
                return Ok(());
            };
            if let Some(other) = state.moto.volume_instance(req, &volume).await? {
                return Err(ApiError::bad_request(
                    "VolumeInUse",
                    format!("{volume} is already attached to an instance ({other})"),
                ));
            }
            let devices = state.moto.instance_devices(req, &instance).await?;
            if devices.iter().any(|(d, _)| same_device(d, &device)) {
                return Err(ApiError::bad_request(
                    "InvalidParameterValue",
                    format!("Invalid value '{device}' for unixDevice. Attachment point {device} is already in use"),
                ));
            }
        }
        ("iam", "CreateRole" | "UpdateAssumeRolePolicy") => {
            let field = if req.operation == "CreateRole" {
                "AssumeRolePolicyDocument"
            } else {
                "PolicyDocument"
            };
            let Some(document) = param(&req.form(), field) else {
                return Ok(());
            };
            let young = state.settings().principal_propagation;
            let named = principal_arns(&document);
            let mut unknown = {
                let store = lock(&state.strict);
                named
                    .iter()
                    .find(|arn| {
                        store
                            .principals
                            .get(*arn)
                            .is_some_and(|t| t.elapsed() < young)
                    })
                    .cloned()
            };
            // A role or user of the account that does not exist is refused alike.
            for arn in &named {
                if unknown.is_some() {
                    break;
                }
                if !state.moto.principal_exists(req, arn).await? {
                    unknown = Some(arn.clone());
                }
            }
            if let Some(arn) = unknown {
                return Err(ApiError::bad_request(
                    "MalformedPolicyDocument",
                    format!("Invalid principal in policy: \"AWS\":\"{arn}\""),
                ));
            }
        }
        ("sts", "AssumeRole") => crate::assume::check(state, req).await?,
        ("ec2", "RunInstances") => {
            crate::images::check_launch(state, req).await?;
            let form = req.form();
            let named = param(&form, "IamInstanceProfile.Name").or_else(|| {
                param(&form, "IamInstanceProfile.Arn")
                    .and_then(|arn| arn.rsplit('/').next().map(str::to_string))
            });
            let Some(profile) = named else {
                return Ok(());
            };
            if young_profile(state, &profile) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValue",
                    format!("Value ({profile}) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Auto Scaling's refusal of a launch template naming an instance profile IAM has not
/// propagated yet (`CreateAutoScalingGroup`, `UpdateAutoScalingGroup`).
async fn template_profile_propagated(state: &Arc<State>, req: &Incoming) -> Result<(), ApiError> {
    let form = req.form();
    let template = param(&form, "LaunchTemplate.LaunchTemplateId")
        .map(|id| ("LaunchTemplateId", id))
        .or_else(|| {
            param(&form, "LaunchTemplate.LaunchTemplateName")
                .map(|name| ("LaunchTemplateName", name))
        });
    let Some((key, template)) = template else {
        return Ok(());
    };
    let version = param(&form, "LaunchTemplate.Version").unwrap_or_else(|| "$Default".into());
    let Some(profile) = state
        .moto
        .template_profile(req, (key, &template), &version)
        .await?
    else {
        return Ok(());
    };
    if young_profile(state, &profile) {
        return Err(ApiError::bad_request(
            "ValidationError",
            format!("You must use a valid fully-formed launch template. Value ({profile}) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"),
        ));
    }
    Ok(())
}

/// Whether the instance profile `name` was created less than `profile_propagation` ago.
fn young_profile(state: &State, name: &str) -> bool {
    let young = state.settings().profile_propagation;
    let created = lock(&state.strict).profiles.get(name).copied();
    created.is_some_and(|t| t.elapsed() < young)
}

/// The role and user ARNs a policy document names as `AWS` principals.
fn principal_arns(document: &str) -> Vec<String> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(document) else {
        return Vec::new();
    };
    let statements = match doc.get("Statement") {
        Some(serde_json::Value::Array(list)) => list.iter().collect::<Vec<_>>(),
        Some(one) => vec![one],
        None => Vec::new(),
    };
    let mut arns = Vec::new();
    for statement in statements {
        match statement.get("Principal").and_then(|p| p.get("AWS")) {
            Some(serde_json::Value::String(one)) => arns.push(one.clone()),
            Some(serde_json::Value::Array(list)) => {
                arns.extend(list.iter().filter_map(|v| v.as_str().map(str::to_string)))
            }
            _ => {}
        }
    }
    arns
}

/// Whether two device names are one attachment point: `/dev/sdf` and `sdf` are.
fn same_device(a: &str, b: &str) -> bool {
    a.trim_start_matches("/dev/") == b.trim_start_matches("/dev/")
}

/// `CreateLoadBalancer` on a name that exists, answered as AWS does; `None` for a new name,
/// which moto creates.
pub async fn create_load_balancer(
    state: &Arc<State>,
    req: &Incoming,
) -> Option<Result<Response, ApiError>> {
    let form = req.form();
    let name = param(&form, "Name")?;
    let (have, member) = match state.moto.load_balancer(req, &name).await {
        Ok(found) => found?,
        Err(e) => return Some(Err(e)),
    };
    let list = |prefix: &str| -> BTreeSet<String> {
        form.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    };
    let want = BalancerSettings {
        scheme: param(&form, "Scheme").unwrap_or_else(|| "internet-facing".into()),
        kind: param(&form, "Type").unwrap_or_else(|| "application".into()),
        subnets: list("Subnets.member."),
        security_groups: list("SecurityGroups.member."),
    };
    if want != have {
        return Some(Err(ApiError::bad_request(
            "DuplicateLoadBalancerName",
            format!(
                "A load balancer with the same name '{name}' exists, but with different settings"
            ),
        )));
    }
    Some(Ok(crate::wire::query(
        "CreateLoadBalancer",
        "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/",
        &format!("<LoadBalancers>{member}</LoadBalancers>"),
    )))
}

/// The request moto should see instead of `req`, when AWS would store something other than
/// what was sent (see the module's list); `None` to forward `req` as it is.
pub fn rewrite(req: &Incoming) -> Option<Incoming> {
    let mut form = req.form();
    match (req.service.as_str(), req.operation.as_str()) {
        ("elasticloadbalancing", "CreateLoadBalancer") => {
            let defaults = [("Scheme", "internet-facing"), ("Type", "application")];
            let missing: Vec<(String, String)> = defaults
                .iter()
                .filter(|(k, _)| param(&form, k).is_none())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if missing.is_empty() {
                return None;
            }
            form.extend(missing);
        }
        (
            "ec2",
            "AuthorizeSecurityGroupIngress"
            | "AuthorizeSecurityGroupEgress"
            | "RevokeSecurityGroupIngress"
            | "RevokeSecurityGroupEgress",
        ) => {
            let mut changed = false;
            for (k, v) in &mut form {
                if k.starts_with("IpPermissions.") && k.ends_with(".CidrIpv6") {
                    if let Some(stored) = stored_ipv6_cidr(v).filter(|s| s != v) {
                        *v = stored;
                        changed = true;
                    }
                }
            }
            if !changed {
                return None;
            }
        }
        ("iam", "CreateRole" | "UpdateAssumeRolePolicy") => {
            let field = if req.operation == "CreateRole" {
                "AssumeRolePolicyDocument"
            } else {
                "PolicyDocument"
            };
            let stored = stored_trust_policy(&param(&form, field)?)?;
            for (k, v) in &mut form {
                if k == field {
                    *v = stored.clone();
                }
            }
        }
        _ => return None,
    }
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish();
    Some(Incoming {
        method: req.method.clone(),
        uri: req.uri.clone(),
        headers: req.headers.clone(),
        body: body.into(),
        service: req.service.clone(),
        region: req.region.clone(),
        protocol: req.protocol,
        operation: req.operation.clone(),
    })
}

/// A trust policy as IAM stores it: every account id given as an `AWS` principal becomes the
/// account's root ARN. `None` when nothing changes (or the document is not JSON: moto says so).
fn stored_trust_policy(document: &str) -> Option<String> {
    let mut doc: serde_json::Value = serde_json::from_str(document).ok()?;
    let mut changed = false;
    let statements = match doc.get_mut("Statement")? {
        serde_json::Value::Array(list) => list.iter_mut().collect::<Vec<_>>(),
        one => vec![one],
    };
    for statement in statements {
        let Some(aws) = statement
            .get_mut("Principal")
            .and_then(|p| p.get_mut("AWS"))
        else {
            continue;
        };
        let values = match aws {
            serde_json::Value::Array(list) => list.iter_mut().collect::<Vec<_>>(),
            one => vec![one],
        };
        for v in values {
            if let Some(id) = v.as_str().filter(|s| is_account_id(s)) {
                *v = serde_json::Value::String(format!("arn:aws:iam::{id}:root"));
                changed = true;
            }
        }
    }
    changed.then(|| doc.to_string())
}

/// An IPv6 CIDR as EC2 writes it (the address in RFC 5952's form, as Rust's `Ipv6Addr`
/// displays it); `None` for what is not one (moto refuses it as AWS does).
fn stored_ipv6_cidr(cidr: &str) -> Option<String> {
    let (ip, bits) = cidr.split_once('/')?;
    let ip: std::net::Ipv6Addr = ip.parse().ok()?;
    Some(format!("{ip}/{bits}"))
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Remembers what a later check needs from a successful answer of moto.
pub fn record(state: &Arc<State>, req: &Incoming, body: &[u8]) {
    match (req.service.as_str(), req.operation.as_str()) {
        ("iam", "CreateInstanceProfile") => {
            if let Some(name) = param(&req.form(), "InstanceProfileName") {
                lock(&state.strict).profiles.insert(name, Instant::now());
            }
        }
        ("iam", "CreateRole" | "CreateUser") => {
            // The ARN IAM answers, as a trust policy names the new principal.
            let text = String::from_utf8_lossy(body);
            if let Some((_, rest)) = text.split_once("<Arn>") {
                if let Some((arn, _)) = rest.split_once("</Arn>") {
                    lock(&state.strict)
                        .principals
                        .insert(arn.to_string(), Instant::now());
                }
            }
        }
        ("ec2", "RunInstances") => {
            let text = String::from_utf8_lossy(body);
            let mut store = lock(&state.strict);
            for id in text.split("<instanceId>").skip(1) {
                if let Some((id, _)) = id.split_once("</instanceId>") {
                    store.instances.insert(id.to_string(), Instant::now());
                }
            }
        }
        _ => {}
    }
}

/// An Application Load Balancer's attributes as AWS sets them on a new one (those moto may
/// leave out of `DescribeLoadBalancerAttributes`).
const BALANCER_DEFAULTS: [(&str, &str); 8] = [
    ("access_logs.s3.enabled", "false"),
    ("deletion_protection.enabled", "false"),
    ("idle_timeout.timeout_seconds", "60"),
    ("routing.http2.enabled", "true"),
    ("routing.http.drop_invalid_header_fields.enabled", "false"),
    ("routing.http.desync_mitigation_mode", "defensive"),
    ("client_keep_alive.seconds", "3600"),
    ("load_balancing.cross_zone.enabled", "true"),
];

/// `DescribeLoadBalancerAttributes` with every attribute: moto's answer, and AWS's default for
/// each attribute it leaves out.
pub async fn load_balancer_attributes(
    state: &Arc<State>,
    req: &Incoming,
) -> Result<Response, ApiError> {
    let answer = state.moto.forward(req).await?;
    let (parts, body) = answer.into_parts();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !parts.status.is_success() {
        return Ok(Response::from_parts(parts, Body::from(text)));
    }
    let missing: String = BALANCER_DEFAULTS
        .iter()
        .filter(|(k, _)| !text.contains(&format!("<Key>{k}</Key>")))
        .map(|(k, v)| format!("<member><Key>{k}</Key><Value>{v}</Value></member>"))
        .collect();
    let text = match text.rfind("</Attributes>") {
        Some(at) => format!("{}{missing}{}", &text[..at], &text[at..]),
        None => text,
    };
    let mut response = Response::from_parts(parts, Body::from(text));
    response
        .headers_mut()
        .remove(axum::http::header::CONTENT_LENGTH);
    Ok(response)
}

/// The lists of a `GetAccountAuthorizationDetails` answer.
const DETAIL_LISTS: [&str; 4] = [
    "UserDetailList",
    "GroupDetailList",
    "RoleDetailList",
    "Policies",
];

/// `GetAccountAuthorizationDetails` as AWS pages it: moto's whole answer cut into pages of
/// `MaxItems` entries (default 100) counted across the four lists, `Marker` the offset.
pub async fn authorization_details(
    state: &Arc<State>,
    req: &Incoming,
) -> Result<Response, ApiError> {
    let form = req.form();
    let max: usize = match param(&form, "MaxItems") {
        Some(m) => m
            .parse()
            .ok()
            .filter(|m| (1..=1000).contains(m))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "ValidationError",
                    format!("MaxItems {m} is not between 1 and 1000"),
                )
            })?,
        None => 100,
    };
    let offset: usize = match param(&form, "Marker") {
        Some(m) => m
            .strip_prefix("page-")
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| {
                ApiError::bad_request("ValidationError", "the Marker is not one this API returned")
            })?,
        None => 0,
    };
    let whole = state.moto.forward(req).await?;
    if !whole.status().is_success() {
        return Ok(whole.map(Body::from).into_response());
    }
    let text = String::from_utf8_lossy(whole.body()).into_owned();
    let doc = roxmltree::Document::parse(&text)
        .map_err(|e| ApiError::internal(format!("moto's answer is not XML: {e}")))?;
    // (list element range, the ranges of its entries), in document order.
    let mut lists = Vec::new();
    let mut total = 0;
    for name in DETAIL_LISTS {
        let Some(list) = doc.descendants().find(|n| n.tag_name().name() == name) else {
            continue;
        };
        // In a stable order (moto's varies between calls), so pages neither repeat nor skip.
        let mut members: Vec<std::ops::Range<usize>> = list
            .children()
            .filter(|n| n.is_element())
            .map(|n| n.range())
            .collect();
        members.sort_by(|a, b| text[a.clone()].cmp(&text[b.clone()]));
        total += members.len();
        lists.push((name, list.range(), members));
    }
    // Entries are counted, and the text edited, in the order the answer has them.
    lists.sort_by_key(|(_, range, _)| range.start);
    let end = (offset + max).min(total);
    let mut page = text.clone();
    let mut seen = 0;
    let mut edits = Vec::new();
    for (name, range, members) in &lists {
        let kept: String = members
            .iter()
            .enumerate()
            .filter(|(i, _)| (offset..end).contains(&(seen + i)))
            .map(|(_, r)| &text[r.clone()])
            .collect();
        seen += members.len();
        edits.push((range.clone(), format!("<{name}>{kept}</{name}>")));
    }
    for (range, replacement) in edits.into_iter().rev() {
        page.replace_range(range, &replacement);
    }
    if end < total {
        let truncated = format!("<IsTruncated>true</IsTruncated><Marker>page-{end}</Marker>");
        page = page.replacen("<IsTruncated>false</IsTruncated>", &truncated, 1);
    }
    let mut response = whole.map(|_| Body::from(page)).into_response();
    response
        .headers_mut()
        .remove(axum::http::header::CONTENT_LENGTH);
    Ok(response)
}

/// `DescribeLaunchTemplates` with each template's current tags in place of those moto kept from
/// its creation.
pub async fn describe_launch_templates(
    state: &Arc<State>,
    req: &Incoming,
) -> Result<Response, ApiError> {
    let whole = state.moto.forward(req).await?;
    if !whole.status().is_success() {
        return Ok(whole.map(Body::from).into_response());
    }
    let text = String::from_utf8_lossy(whole.body()).into_owned();
    let doc = crate::moto::xml(&text)?;
    // Each template: its id, and the range its tag set takes (or where one goes).
    let mut templates: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    for item in doc
        .descendants()
        .filter(|n| n.has_tag_name("launchTemplates"))
        .flat_map(|l| l.children().filter(|n| n.has_tag_name("item")))
    {
        let Some(id) = crate::moto::child_text(item, "launchTemplateId") else {
            continue;
        };
        let range = match item.children().find(|n| n.has_tag_name("tagSet")) {
            Some(set) => set.range(),
            None => {
                let at = item.range().end - "</item>".len();
                at..at
            }
        };
        templates.push((id, range));
    }
    if templates.is_empty() {
        return Ok(whole.map(Body::from).into_response());
    }
    let ids: Vec<&str> = templates.iter().map(|(id, _)| id.as_str()).collect();
    let tags = state
        .moto
        .query(
            req,
            "ec2",
            &crate::moto::ec2_query("DescribeTags", &[("resource-id", ids.as_slice())]),
        )
        .await?;
    let tags = crate::moto::xml(&tags)?;
    let mut current: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for t in tags.descendants().filter(|n| n.has_tag_name("item")) {
        if let (Some(id), Some(key)) = (
            crate::moto::child_text(t, "resourceId"),
            crate::moto::child_text(t, "key"),
        ) {
            let value = crate::moto::child_text(t, "value").unwrap_or_default();
            current.entry(id).or_default().push((key, value));
        }
    }
    let mut page = text.clone();
    for (id, range) in templates.iter().rev() {
        let items: String = current
            .get(id)
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                format!(
                    "<item><key>{}</key><value>{}</value></item>",
                    crate::wire::escape(k),
                    crate::wire::escape(v)
                )
            })
            .collect();
        page.replace_range(range.clone(), &format!("<tagSet>{items}</tagSet>"));
    }
    let mut response = whole.map(|_| Body::from(page)).into_response();
    response
        .headers_mut()
        .remove(axum::http::header::CONTENT_LENGTH);
    Ok(response)
}
