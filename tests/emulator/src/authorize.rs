//! IAM for one principal: the emulator can hold the calls signed with one access key to an
//! identity-based policy, evaluated as IAM evaluates it, and answer what AWS answers when the
//! policy does not allow a call (`UnauthorizedOperation` for EC2, `AccessDenied` for the other
//! query protocols, `AccessDeniedException` for the JSON ones). moto checks no permission.
//!
//! Each call becomes the authorizations AWS makes for it (the Service Authorization Reference:
//! an action on each resource the call touches, with the request's condition keys):
//! - the action `<service>:<Operation>` on the ARN of each resource it names (`*` for calls
//!   on no resource, such as the Describe and List calls);
//! - `aws:RequestTag/<key>` and `aws:TagKeys` from the tags in the request;
//! - `aws:ResourceTag/<key>` from the tags the resource has when the call arrives (read from
//!   moto: EC2 instances, volumes, security groups and launch templates; load balancers,
//!   target groups and listeners; Auto Scaling groups; IAM roles, policies and instance
//!   profiles);
//! - the authorizations a call implies: tags given at creation are also `ec2:CreateTags` with
//!   `ec2:CreateAction` (or `elasticloadbalancing:AddTags` with
//!   `elasticloadbalancing:CreateAction`, for load balancers, target groups and listeners), and
//!   an instance profile or role handed to a service
//!   is `iam:PassRole` on the role with `iam:PassedToService` (RunInstances, and
//!   CreateAutoScalingGroup or UpdateAutoScalingGroup with a launch template that names one;
//!   a Managed Grafana workspace's role), and tags given to an IAM create are also its Tag
//!   action (`iam:TagRole`, ...; AWS does not document whether IAM checks it: assumed so).
//!
//! Not modelled (unknown or out of the operator's path): the `ec2:RunInstances` that EC2 Auto
//! Scaling checks for the caller of CreateAutoScalingGroup (AWS does not document the request
//! context of that check) and service-linked role creation.
//!
//! Policies are evaluated as IAM does: a call is allowed when a statement allows every one of
//! its authorizations and none denies it; conditions AND across operators and keys and OR
//! across values; `ForAllValues:` holds when the key is absent or every value matches,
//! `ForAnyValue:` when one does; an operator other than `Null` (and `...IfExists`) fails on an
//! absent key.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::moto::{child_text, ec2_query, xml};
use crate::route::Incoming;
use crate::wire::{ApiError, Protocol};
use crate::State;

/// moto's account.
const ACCOUNT: &str = "123456789012";

/// The calls signed with `access_key` are allowed only as `policy` (an IAM policy document)
/// allows them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Enforce {
    pub access_key: String,
    pub policy: Value,
}

/// One authorization: an action on a resource, with the request's condition keys.
#[derive(Clone, Debug, PartialEq)]
pub struct Authorization {
    pub action: String,
    pub resource: String,
    pub context: BTreeMap<String, Vec<String>>,
}

/// Refuses the call as AWS would when the enforced policy does not allow it.
pub async fn check(state: &Arc<State>, req: &Incoming) -> Result<(), ApiError> {
    let Some(enforce) = state.settings().enforce else {
        return Ok(());
    };
    if req.access_key() != enforce.access_key || req.operation.is_empty() {
        return Ok(());
    }
    for a in authorizations(state, req).await? {
        if !allowed(&enforce.policy, &a) {
            let message = format!(
                "User: arn:aws:iam::{ACCOUNT}:user/{} is not authorized to perform: {} on resource: {} because no identity-based policy allows the {} action",
                enforce.access_key, a.action, a.resource, a.action
            );
            let code = match (req.service.as_str(), req.protocol) {
                ("ec2", _) => "UnauthorizedOperation",
                (_, Protocol::Query) => "AccessDenied",
                _ => "AccessDeniedException",
            };
            return Err(ApiError::new(StatusCode::FORBIDDEN, code, message));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// Whether `policy` allows `a`: an Allow statement matches it and no Deny statement does.
pub fn allowed(policy: &Value, a: &Authorization) -> bool {
    let statements = match &policy["Statement"] {
        Value::Array(list) => list.clone(),
        one @ Value::Object(_) => vec![one.clone()],
        _ => Vec::new(),
    };
    let matching = |effect: &str| {
        statements
            .iter()
            .filter(|s| s["Effect"] == effect)
            .any(|s| statement_matches(s, a))
    };
    matching("Allow") && !matching("Deny")
}

pub(crate) fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(list) => list.iter().flat_map(strings).collect(),
        Value::Bool(b) => vec![b.to_string()],
        Value::Number(n) => vec![n.to_string()],
        _ => Vec::new(),
    }
}

fn statement_matches(s: &Value, a: &Authorization) -> bool {
    let actions = strings(&s["Action"]);
    let resources = if s["Resource"].is_null() {
        vec!["*".to_string()]
    } else {
        strings(&s["Resource"])
    };
    actions.iter().any(|p| wildcard(p, &a.action, true))
        && resources.iter().any(|p| wildcard(p, &a.resource, false))
        && conditions_hold(&s["Condition"], &a.context)
}

/// IAM's `*` and `?` matching; actions ignore case, resources do not.
pub fn wildcard(pattern: &str, text: &str, ignore_case: bool) -> bool {
    fn go(p: &[char], t: &[char], ic: bool) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], t, ic) || (!t.is_empty() && go(p, &t[1..], ic)),
            (Some('?'), Some(_)) => go(&p[1..], &t[1..], ic),
            (Some(x), Some(y)) if x == y || (ic && x.eq_ignore_ascii_case(y)) => {
                go(&p[1..], &t[1..], ic)
            }
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t, ignore_case)
}

pub(crate) fn conditions_hold(conditions: &Value, context: &BTreeMap<String, Vec<String>>) -> bool {
    let Value::Object(operators) = conditions else {
        return true;
    };
    operators.iter().all(|(operator, keys)| {
        let Value::Object(keys) = keys else {
            return false;
        };
        keys.iter().all(|(key, wanted)| {
            // Condition keys are case-insensitive; tag keys in them keep their case.
            let have = context
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_slice());
            condition(operator, have, &strings(wanted))
        })
    })
}

fn condition(operator: &str, have: Option<&[String]>, wanted: &[String]) -> bool {
    if operator == "Null" {
        let absent = have.is_none_or(|v| v.is_empty());
        return wanted.iter().any(|w| (w == "true") == absent);
    }
    let (set, operator) = match operator.split_once(':') {
        Some((set, op)) => (Some(set), op),
        None => (None, operator),
    };
    let (operator, if_exists) = match operator.strip_suffix("IfExists") {
        Some(op) => (op, true),
        None => (operator, false),
    };
    let negated = operator.contains("Not");
    let matches = |value: &str| {
        wanted.iter().any(|w| match operator {
            "StringEquals" | "StringNotEquals" | "ArnEquals" | "ArnNotEquals" | "Bool" => {
                w == value
            }
            "StringEqualsIgnoreCase" | "StringNotEqualsIgnoreCase" => w.eq_ignore_ascii_case(value),
            "StringLike" | "StringNotLike" | "ArnLike" | "ArnNotLike" => wildcard(w, value, false),
            _ => false,
        })
    };
    let values = have.unwrap_or_default();
    match set {
        Some("ForAllValues") => values.iter().all(|v| matches(v) != negated),
        Some("ForAnyValue") => values.iter().any(|v| matches(v) != negated),
        _ if values.is_empty() => if_exists || negated,
        _ if negated => values.iter().all(|v| !matches(v)),
        _ => values.iter().any(|v| matches(v)),
    }
}

// ---------------------------------------------------------------------------------------------
// What a call authorizes

fn param(form: &[(String, String)], key: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// `Prefix.1`, `Prefix.2`, ... (and `Prefix` alone), in order.
fn list(form: &[(String, String)], prefix: &str) -> Vec<String> {
    let mut out: Vec<(u32, String)> = form
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix(prefix)?.strip_prefix('.')?;
            Some((n.parse().ok()?, v.clone()))
        })
        .collect();
    out.sort();
    let mut values: Vec<String> = out.into_iter().map(|(_, v)| v).collect();
    values.extend(param(form, prefix));
    values
}

/// Tags given as `<prefix>.N.Key` / `<prefix>.N.Value`.
fn tags(form: &[(String, String)], prefix: &str) -> Vec<(String, String)> {
    let mut out = BTreeMap::new();
    for (k, v) in form {
        let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        let Some((n, field)) = rest.split_once('.') else {
            continue;
        };
        let Ok(n) = n.parse::<u32>() else { continue };
        let entry = out.entry(n).or_insert((String::new(), String::new()));
        match field {
            "Key" => entry.0 = v.clone(),
            "Value" => entry.1 = v.clone(),
            _ => {}
        }
    }
    out.into_values().filter(|(k, _)| !k.is_empty()).collect()
}

/// EC2's tags on create: `TagSpecification.N.Tag.M.*` of every resource type.
fn tag_specifications(form: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for n in 1.. {
        let prefix = format!("TagSpecification.{n}");
        if param(form, &format!("{prefix}.ResourceType")).is_none() {
            break;
        }
        out.extend(tags(form, &format!("{prefix}.Tag")));
    }
    out
}

/// The condition keys of tags in a request.
fn request_tags(tags: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    let mut context = BTreeMap::new();
    if tags.is_empty() {
        return context;
    }
    for (k, v) in tags {
        context.insert(format!("aws:RequestTag/{k}"), vec![v.clone()]);
    }
    context.insert(
        "aws:TagKeys".into(),
        tags.iter().map(|(k, _)| k.clone()).collect(),
    );
    context
}

fn resource_tags(tags: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    tags.iter()
        .map(|(k, v)| (format!("aws:ResourceTag/{k}"), vec![v.clone()]))
        .collect()
}

fn on(action: &str, resource: String, context: BTreeMap<String, Vec<String>>) -> Authorization {
    Authorization {
        action: action.to_string(),
        resource,
        context,
    }
}

fn pass_role(role: &str, service: &str) -> Authorization {
    let resource = if role.starts_with("arn:") {
        role.to_string()
    } else {
        format!("arn:aws:iam::{ACCOUNT}:role/{role}")
    };
    on(
        "iam:PassRole",
        resource,
        BTreeMap::from([("iam:PassedToService".into(), vec![service.into()])]),
    )
}

/// Everything AWS authorizes for one call.
pub async fn authorizations(
    state: &Arc<State>,
    req: &Incoming,
) -> Result<Vec<Authorization>, ApiError> {
    let action = format!("{}:{}", req.service, req.operation);
    let region = req.region.as_str();
    let ec2_arn = |kind: &str, id: &str| format!("arn:aws:ec2:{region}:{ACCOUNT}:{kind}/{id}");
    let mut out = Vec::new();
    match req.service.as_str() {
        "ec2" => {
            let form = req.form();
            let requested = request_tags(&tag_specifications(&form));
            let created = |kinds: &[&str], out: &mut Vec<Authorization>| {
                if requested.is_empty() {
                    return;
                }
                let mut context = requested.clone();
                context.insert("ec2:CreateAction".into(), vec![req.operation.clone()]);
                for kind in kinds {
                    out.push(on("ec2:CreateTags", ec2_arn(kind, "*"), context.clone()));
                }
            };
            match req.operation.as_str() {
                "RunInstances" => {
                    for (kind, id) in [
                        ("instance", "*".to_string()),
                        ("volume", "*".into()),
                        ("network-interface", "*".into()),
                    ] {
                        out.push(on(&action, ec2_arn(kind, &id), requested.clone()));
                    }
                    if let Some(subnet) = param(&form, "SubnetId") {
                        out.push(on(&action, ec2_arn("subnet", &subnet), requested.clone()));
                    }
                    for group in list(&form, "SecurityGroupId") {
                        out.push(on(
                            &action,
                            ec2_arn("security-group", &group),
                            requested.clone(),
                        ));
                    }
                    if let Some(image) = param(&form, "ImageId") {
                        out.push(on(
                            &action,
                            format!("arn:aws:ec2:{region}::image/{image}"),
                            requested.clone(),
                        ));
                    }
                    created(&["instance", "volume"], &mut out);
                    let profile = param(&form, "IamInstanceProfile.Name").or_else(|| {
                        param(&form, "IamInstanceProfile.Arn")
                            .and_then(|a| a.rsplit('/').next().map(str::to_string))
                    });
                    if let Some(profile) = profile {
                        for role in state.moto.profile_roles(req, &profile).await? {
                            out.push(pass_role(&role, "ec2.amazonaws.com"));
                        }
                    }
                }
                "CreateVolume" => {
                    out.push(on(&action, ec2_arn("volume", "*"), requested.clone()));
                    created(&["volume"], &mut out);
                }
                "CreateSecurityGroup" => {
                    out.push(on(
                        &action,
                        ec2_arn("security-group", "*"),
                        requested.clone(),
                    ));
                    if let Some(vpc) = param(&form, "VpcId") {
                        out.push(on(&action, ec2_arn("vpc", &vpc), requested.clone()));
                    }
                    created(&["security-group"], &mut out);
                }
                "CreateLaunchTemplate" => {
                    out.push(on(
                        &action,
                        ec2_arn("launch-template", "*"),
                        requested.clone(),
                    ));
                    created(&["launch-template"], &mut out);
                }
                "CreateTags" | "DeleteTags" => {
                    let context = request_tags(&tags(&form, "Tag"));
                    for id in list(&form, "ResourceId") {
                        let mut context = context.clone();
                        context.extend(resource_tags(&state.moto.ec2_tags(req, &id).await?));
                        out.push(on(&action, ec2_arn(ec2_kind(&id), &id), context));
                    }
                }
                op if op.starts_with("Describe") => {
                    out.push(on(&action, "*".into(), BTreeMap::new()))
                }
                _ => {
                    let mut ids = list(&form, "InstanceId");
                    ids.extend(param(&form, "VolumeId"));
                    ids.extend(param(&form, "GroupId"));
                    ids.extend(list(&form, "GroupId"));
                    ids.extend(param(&form, "LaunchTemplateId"));
                    if let Some(name) = param(&form, "LaunchTemplateName") {
                        ids.extend(state.moto.launch_template_id(req, &name).await?);
                    }
                    ids.sort();
                    ids.dedup();
                    for id in ids {
                        let context = resource_tags(&state.moto.ec2_tags(req, &id).await?);
                        out.push(on(&action, ec2_arn(ec2_kind(&id), &id), context));
                    }
                }
            }
        }
        "elasticloadbalancing" => {
            let form = req.form();
            let requested = request_tags(&tags(&form, "Tags.member"));
            let elb_arn = |kind: &str, name: &str| {
                format!("arn:aws:elasticloadbalancing:{region}:{ACCOUNT}:{kind}/{name}/*")
            };
            match req.operation.as_str() {
                "CreateLoadBalancer" | "CreateTargetGroup" => {
                    let name = param(&form, "Name").unwrap_or_default();
                    let resource = if req.operation == "CreateLoadBalancer" {
                        elb_arn("loadbalancer/app", &name)
                    } else {
                        elb_arn("targetgroup", &name)
                    };
                    out.push(on(&action, resource.clone(), requested.clone()));
                    if !requested.is_empty() {
                        let mut context = requested.clone();
                        context.insert(
                            "elasticloadbalancing:CreateAction".into(),
                            vec![req.operation.clone()],
                        );
                        out.push(on("elasticloadbalancing:AddTags", resource, context));
                    }
                }
                "AddTags" | "RemoveTags" => {
                    let mut context = requested.clone();
                    let removed = list(&form, "TagKeys.member");
                    if !removed.is_empty() {
                        context.insert("aws:TagKeys".into(), removed);
                    }
                    for arn in list(&form, "ResourceArns.member") {
                        let mut context = context.clone();
                        context.extend(resource_tags(&state.moto.elb_tags(req, &arn).await?));
                        out.push(on(&action, arn, context));
                    }
                }
                op if op.starts_with("Describe") => {
                    out.push(on(&action, "*".into(), BTreeMap::new()))
                }
                _ => {
                    let arn = ["ListenerArn", "TargetGroupArn", "LoadBalancerArn"]
                        .iter()
                        .find_map(|k| param(&form, k));
                    match arn {
                        Some(arn) => {
                            let mut context = requested.clone();
                            context.extend(resource_tags(&state.moto.elb_tags(req, &arn).await?));
                            out.push(on(&action, arn, context));
                        }
                        None => out.push(on(&action, "*".into(), requested.clone())),
                    }
                    if req.operation == "CreateListener" && !requested.is_empty() {
                        let mut context = requested.clone();
                        context.insert(
                            "elasticloadbalancing:CreateAction".into(),
                            vec![req.operation.clone()],
                        );
                        out.push(on(
                            "elasticloadbalancing:AddTags",
                            format!(
                                "arn:aws:elasticloadbalancing:{region}:{ACCOUNT}:listener/app/*"
                            ),
                            context,
                        ));
                    }
                }
            }
        }
        "autoscaling" => {
            let form = req.form();
            let group_arn = |name: &str| {
                format!("arn:aws:autoscaling:{region}:{ACCOUNT}:autoScalingGroup:*:autoScalingGroupName/{name}")
            };
            match req.operation.as_str() {
                "CreateOrUpdateTags" | "DeleteTags" => {
                    let given = tags(&form, "Tags.member");
                    let context = request_tags(&given);
                    let mut groups: Vec<String> = form
                        .iter()
                        .filter(|(k, _)| {
                            k.starts_with("Tags.member.") && k.ends_with(".ResourceId")
                        })
                        .map(|(_, v)| v.clone())
                        .collect();
                    groups.sort();
                    groups.dedup();
                    for g in groups {
                        let mut context = context.clone();
                        context.extend(resource_tags(&state.moto.group_tags(req, &g).await?));
                        out.push(on(&action, group_arn(&g), context));
                    }
                }
                op if op.starts_with("Describe") => {
                    out.push(on(&action, "*".into(), BTreeMap::new()))
                }
                op => {
                    let group = param(&form, "AutoScalingGroupName").unwrap_or_default();
                    let mut context = request_tags(&tags(&form, "Tags.member"));
                    if op != "CreateAutoScalingGroup" {
                        context.extend(resource_tags(&state.moto.group_tags(req, &group).await?));
                    }
                    out.push(on(&action, group_arn(&group), context));
                    if matches!(op, "CreateAutoScalingGroup" | "UpdateAutoScalingGroup") {
                        let template = param(&form, "LaunchTemplate.LaunchTemplateId")
                            .or(param(&form, "LaunchTemplate.LaunchTemplateName"));
                        if let Some(template) = template {
                            let version = param(&form, "LaunchTemplate.Version")
                                .unwrap_or_else(|| "$Default".into());
                            for role in state.moto.template_roles(req, &template, &version).await? {
                                out.push(pass_role(&role, "ec2.amazonaws.com"));
                            }
                        }
                    }
                }
            }
        }
        "iam" => {
            let form = req.form();
            let op = req.operation.as_str();
            let iam_arn = |kind: &str, name: &str| format!("arn:aws:iam::{ACCOUNT}:{kind}/{name}");
            // (the resource's ARN, how to read its tags)
            let target = param(&form, "PolicyArn")
                .filter(|_| !op.contains("RolePolic"))
                .map(|arn| (arn.clone(), Some(IamObject::Policy(arn))))
                .or_else(|| {
                    param(&form, "InstanceProfileName").map(|n| {
                        (
                            iam_arn("instance-profile", &n),
                            Some(IamObject::InstanceProfile(n)),
                        )
                    })
                })
                .or_else(|| {
                    param(&form, "RoleName")
                        .map(|n| (iam_arn("role", &n), Some(IamObject::Role(n))))
                })
                .or_else(|| {
                    param(&form, "PolicyName")
                        .filter(|_| op == "CreatePolicy")
                        .map(|n| (iam_arn("policy", &n), None))
                });
            let requested = request_tags(&tags(&form, "Tags.member"));
            let Some((resource, object)) = target else {
                out.push(on(&action, "*".into(), requested));
                return Ok(out);
            };
            let mut context = requested.clone();
            let creates = matches!(op, "CreateRole" | "CreatePolicy" | "CreateInstanceProfile");
            if let Some(object) = object.filter(|_| !creates) {
                context.extend(resource_tags(&state.moto.iam_tags(req, &object).await?));
            }
            out.push(on(&action, resource.clone(), context));
            // Tags given at creation are also the Tag action (modelled as required: AWS's
            // documentation does not say whether IAM checks it).
            if creates && !requested.is_empty() {
                let tag_action = format!("iam:Tag{}", &op["Create".len()..]);
                out.push(on(&tag_action, resource, requested));
            }
        }
        "ssm" if req.operation == "SendCommand" => {
            let body = req.json()?;
            let document = body["DocumentName"].as_str().unwrap_or_default();
            out.push(on(
                &action,
                format!("arn:aws:ssm:{region}::document/{document}"),
                BTreeMap::new(),
            ));
            for id in strings(&body["InstanceIds"]) {
                let context = resource_tags(&state.moto.ec2_tags(req, &id).await?);
                out.push(on(&action, ec2_arn("instance", &id), context));
            }
        }
        "sts" if req.operation == "AssumeRole" => {
            let role = param(&req.form(), "RoleArn").unwrap_or_else(|| "*".into());
            out.push(on(&action, role, BTreeMap::new()));
        }
        "dynamodb" => {
            let body = req.json()?;
            let table = body["TableName"].as_str().unwrap_or("*");
            out.push(on(
                &action,
                format!("arn:aws:dynamodb:{region}:{ACCOUNT}:table/{table}"),
                BTreeMap::new(),
            ));
        }
        "grafana" => {
            out.push(on(&action, "*".into(), BTreeMap::new()));
            if matches!(
                req.operation.as_str(),
                "CreateWorkspace" | "UpdateWorkspace"
            ) {
                if let Some(role) = req.json()?["workspaceRoleArn"].as_str() {
                    out.push(pass_role(role, "grafana.amazonaws.com"));
                }
            }
        }
        _ => out.push(on(&action, "*".into(), BTreeMap::new())),
    }
    Ok(out)
}

/// The (key, value) of each `item` element in these tag sets, as the query protocols list tags.
fn pairs<'a, 'i: 'a>(
    sets: impl Iterator<Item = roxmltree::Node<'a, 'i>>,
    item: &str,
    (key, value): (&str, &str),
) -> Vec<(String, String)> {
    sets.flat_map(|n| n.children().filter(move |c| c.has_tag_name(item)))
        .filter_map(|t| {
            Some((
                child_text(t, key)?,
                child_text(t, value).unwrap_or_default(),
            ))
        })
        .collect()
}

/// An IAM object whose tags a condition may read.
enum IamObject {
    Role(String),
    Policy(String),
    InstanceProfile(String),
}

/// The ARN resource type of an EC2 id.
fn ec2_kind(id: &str) -> &'static str {
    match id.split('-').next().unwrap_or_default() {
        "i" => "instance",
        "vol" => "volume",
        "sg" => "security-group",
        "lt" => "launch-template",
        "subnet" => "subnet",
        "vpc" => "vpc",
        "eni" => "network-interface",
        _ => "*",
    }
}

impl crate::moto::Moto {
    /// The roles in an instance profile.
    pub(crate) async fn profile_roles(
        &self,
        caller: &Incoming,
        profile: &str,
    ) -> Result<Vec<String>, ApiError> {
        let params = [
            ("Action", "GetInstanceProfile"),
            ("Version", "2010-05-08"),
            ("InstanceProfileName", profile),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let Ok(text) = self.query(caller, "iam", &params).await else {
            // No such profile: RunInstances fails on its own, with no role passed.
            return Ok(Vec::new());
        };
        let doc = xml(&text)?;
        Ok(doc
            .root()
            .descendants()
            .filter(|n| n.has_tag_name("Roles"))
            .flat_map(|n| n.children().filter(|n| n.has_tag_name("member")))
            .filter_map(|m| child_text(m, "RoleName"))
            .collect())
    }

    /// The roles of the instance profile a launch template version names.
    pub(crate) async fn template_roles(
        &self,
        caller: &Incoming,
        template: &str,
        version: &str,
    ) -> Result<Vec<String>, ApiError> {
        let by = if template.starts_with("lt-") {
            "LaunchTemplateId"
        } else {
            "LaunchTemplateName"
        };
        let params = [
            ("Action", "DescribeLaunchTemplateVersions"),
            ("Version", "2016-11-15"),
            (by, template),
            ("LaunchTemplateVersion.1", version),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let text = self.query(caller, "ec2", &params).await?;
        let doc = xml(&text)?;
        let profile = doc
            .root()
            .descendants()
            .find(|n| n.has_tag_name("iamInstanceProfile"))
            .and_then(|p| {
                child_text(p, "name").or_else(|| {
                    child_text(p, "arn").and_then(|a| a.rsplit('/').next().map(str::to_string))
                })
            });
        match profile {
            Some(p) => self.profile_roles(caller, &p).await,
            None => Ok(Vec::new()),
        }
    }

    /// The id of a launch template by name.
    pub(crate) async fn launch_template_id(
        &self,
        caller: &Incoming,
        name: &str,
    ) -> Result<Option<String>, ApiError> {
        let params = [
            ("Action", "DescribeLaunchTemplates"),
            ("Version", "2016-11-15"),
            ("LaunchTemplateName.1", name),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let Ok(text) = self.query(caller, "ec2", &params).await else {
            return Ok(None);
        };
        let doc = xml(&text)?;
        Ok(doc
            .root()
            .descendants()
            .find(|n| n.has_tag_name("launchTemplateId"))
            .and_then(|n| n.text())
            .map(str::to_string))
    }

    /// An EC2 resource's tags.
    pub(crate) async fn ec2_tags(
        &self,
        caller: &Incoming,
        id: &str,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let params = ec2_query("DescribeTags", &[("resource-id", &[id])]);
        let text = self.query(caller, "ec2", &params).await?;
        let doc = xml(&text)?;
        Ok(pairs(
            doc.root()
                .descendants()
                .filter(|n| n.has_tag_name("tagSet")),
            "item",
            ("key", "value"),
        ))
    }

    /// A load balancer's, target group's or listener's tags (none when it does not exist).
    pub(crate) async fn elb_tags(
        &self,
        caller: &Incoming,
        arn: &str,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let params = [
            ("Action", "DescribeTags"),
            ("Version", "2015-12-01"),
            ("ResourceArns.member.1", arn),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let Ok(text) = self.query(caller, "elasticloadbalancing", &params).await else {
            return Ok(Vec::new());
        };
        let doc = xml(&text)?;
        Ok(pairs(
            doc.root().descendants().filter(|n| n.has_tag_name("Tags")),
            "member",
            ("Key", "Value"),
        ))
    }

    /// An IAM role's, policy's or instance profile's tags (none when it does not exist).
    async fn iam_tags(
        &self,
        caller: &Incoming,
        object: &IamObject,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let (action, key, value) = match object {
            IamObject::Role(n) => ("GetRole", "RoleName", n),
            IamObject::Policy(arn) => ("GetPolicy", "PolicyArn", arn),
            IamObject::InstanceProfile(n) => ("GetInstanceProfile", "InstanceProfileName", n),
        };
        let params = [
            ("Action", action),
            ("Version", "2010-05-08"),
            (key, value.as_str()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let Ok(text) = self.query(caller, "iam", &params).await else {
            return Ok(Vec::new());
        };
        let doc = xml(&text)?;
        // The object's own tags: for a profile, not those of the roles in it.
        let object = doc.root().descendants().find(|n| {
            n.has_tag_name("Role") || n.has_tag_name("Policy") || n.has_tag_name("InstanceProfile")
        });
        Ok(pairs(
            object
                .into_iter()
                .flat_map(|o| o.children().filter(|n| n.has_tag_name("Tags"))),
            "member",
            ("Key", "Value"),
        ))
    }

    /// An Auto Scaling group's tags.
    pub(crate) async fn group_tags(
        &self,
        caller: &Incoming,
        group: &str,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let params = [
            ("Action", "DescribeTags"),
            ("Version", "2011-01-01"),
            ("Filters.member.1.Name", "auto-scaling-group"),
            ("Filters.member.1.Values.member.1", group),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let text = self.query(caller, "autoscaling", &params).await?;
        let doc = xml(&text)?;
        Ok(pairs(
            doc.root().descendants().filter(|n| n.has_tag_name("Tags")),
            "member",
            ("Key", "Value"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn auth(action: &str, resource: &str, context: &[(&str, &[&str])]) -> Authorization {
        Authorization {
            action: action.into(),
            resource: resource.into(),
            context: context
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    #[test]
    fn conditions_evaluate_as_iam_does() {
        let policy = json!({"Statement": [
            {"Effect": "Allow", "Action": "ec2:Terminate*", "Resource": "*",
             "Condition": {"Null": {"aws:ResourceTag/stackwarden:stack": "false"}}},
            {"Effect": "Allow", "Action": "iam:PassRole", "Resource": "arn:aws:iam::*:role/*",
             "Condition": {"StringEquals": {"iam:PassedToService": ["ec2.amazonaws.com"]}}},
            {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "arn:aws:ec2:*:*:instance/*",
             "Condition": {"ForAllValues:StringLike": {"aws:TagKeys": ["stackwarden:*:host_config.*"]}}},
            {"Effect": "Deny", "Action": "ec2:TerminateInstances", "Resource": "*",
             "Condition": {"StringEquals": {"aws:ResourceTag/protected": "true"}}},
        ]});
        let i = "arn:aws:ec2:us-east-1:123456789012:instance/i-1";
        let tagged: &[(&str, &[&str])] = &[("aws:ResourceTag/stackwarden:stack", &["s"])];
        assert!(allowed(&policy, &auth("ec2:TerminateInstances", i, tagged)));
        assert!(!allowed(&policy, &auth("ec2:TerminateInstances", i, &[])));
        assert!(!allowed(
            &policy,
            &auth(
                "ec2:TerminateInstances",
                i,
                &[
                    ("aws:ResourceTag/stackwarden:stack", &["s"]),
                    ("aws:ResourceTag/protected", &["true"])
                ]
            )
        ));
        let role = "arn:aws:iam::123456789012:role/r";
        assert!(allowed(
            &policy,
            &auth(
                "iam:PassRole",
                role,
                &[("iam:PassedToService", &["ec2.amazonaws.com"])]
            )
        ));
        assert!(!allowed(
            &policy,
            &auth(
                "iam:PassRole",
                role,
                &[("iam:PassedToService", &["lambda.amazonaws.com"])]
            )
        ));
        assert!(!allowed(
            &policy,
            &auth(
                "iam:PassRole",
                "*",
                &[("iam:PassedToService", &["ec2.amazonaws.com"])]
            )
        ));
        let keys = |k: &[&'static str]| auth("ec2:CreateTags", i, &[("aws:TagKeys", k)]);
        assert!(allowed(&policy, &keys(&["stackwarden:s:host_config.a"])));
        assert!(!allowed(
            &policy,
            &keys(&["stackwarden:s:host_config.a", "Name"])
        ));
        assert!(
            !allowed(&policy, &auth("ec2:RunInstances", "*", &[])),
            "no statement allows it"
        );
    }
}
