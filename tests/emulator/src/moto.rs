//! moto: starting it, forwarding requests to it, and the few reads the emulated APIs need from
//! it (EC2 instances for Run Command targets, Auto Scaling groups for instance refresh, AMP
//! workspaces for alertmanager definitions).

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::route::Incoming;
use crate::wire::ApiError;

/// Which moto the emulator fronts.
#[derive(Clone, Debug)]
pub enum Backend {
    /// A moto server already running at this URL.
    Url(String),
    /// Start this `moto_server` executable on a free loopback port, and stop it on exit.
    Spawn(PathBuf),
}

/// A moto child process, killed on drop.
pub(crate) struct Process(Option<Child>);

impl Process {
    pub(crate) fn start(backend: &Backend) -> anyhow::Result<(Process, String)> {
        let program = match backend {
            Backend::Url(url) => return Ok((Process(None), url.trim_end_matches('/').into())),
            Backend::Spawn(program) => program,
        };
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // Without it, AWS managed policies such as AmazonSSMManagedInstanceCore do not exist.
            .env("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
            // Corrections to moto (moto/sitecustomize.py), loaded at its start.
            .env("PYTHONPATH", concat!(env!("CARGO_MANIFEST_DIR"), "/moto"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start moto ({})", program.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("moto ({}) exited at start: {status}", program.display());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("moto did not listen on port {port} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((Process(Some(child)), format!("http://127.0.0.1:{port}")))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP client for moto.
pub(crate) struct Moto {
    url: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Hop-by-hop headers and those the client recomputes; everything else passes unchanged.
const NOT_FORWARDED: [&str; 4] = ["host", "connection", "content-length", "transfer-encoding"];

impl Moto {
    pub(crate) fn new(url: String) -> Moto {
        Moto {
            url,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Sends a request to moto as it came and returns moto's answer as it is.
    pub(crate) async fn forward(&self, req: &Incoming) -> Result<http::Response<Bytes>, ApiError> {
        let uri = format!(
            "{}{}",
            self.url,
            req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let mut builder = http::Request::builder().method(req.method.clone()).uri(uri);
        for (name, value) in &req.headers {
            if !NOT_FORWARDED.contains(&name.as_str()) {
                builder = builder.header(name, value);
            }
        }
        let request = builder
            .body(Full::new(req.body.clone()))
            .map_err(|e| ApiError::internal(format!("cannot build the request to moto: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| ApiError::internal(format!("moto did not answer: {e}")))?;
        let (mut parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ApiError::internal(format!("moto's answer was cut: {e}")))?
            .to_bytes();
        for name in NOT_FORWARDED {
            parts.headers.remove(name);
        }
        Ok(http::Response::from_parts(parts, body))
    }

    /// A query-protocol call to moto on behalf of a caller (same credentials and region).
    pub(crate) async fn query(
        &self,
        caller: &Incoming,
        service: &str,
        params: &[(String, String)],
    ) -> Result<String, ApiError> {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let request = Incoming::internal(caller, service, "POST", "/", body.into());
        let response = self.forward(&request).await?;
        let text = String::from_utf8_lossy(response.body()).into_owned();
        if !response.status().is_success() {
            return Err(ApiError::internal(format!(
                "moto answered {} to {service} {}: {text}",
                response.status(),
                params.first().map(|p| p.1.as_str()).unwrap_or("")
            )));
        }
        Ok(text)
    }

    /// Running EC2 instances, optionally narrowed by EC2 filters (name, values).
    pub(crate) async fn running_instances(
        &self,
        caller: &Incoming,
        filters: &[(String, Vec<String>)],
    ) -> Result<Vec<Instance>, ApiError> {
        self.instances_in(caller, &["running"], filters).await
    }

    /// EC2 instances in one of `states`, optionally narrowed by EC2 filters (name, values).
    pub(crate) async fn instances_in(
        &self,
        caller: &Incoming,
        states: &[&str],
        filters: &[(String, Vec<String>)],
    ) -> Result<Vec<Instance>, ApiError> {
        let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
        let mut all: Vec<(&str, &[String])> = vec![("instance-state-name", &states)];
        all.extend(filters.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        let text = self
            .query(caller, "ec2", &ec2_query("DescribeInstances", &all))
            .await?;
        let doc = xml(&text)?;
        Ok(instance_items(&doc)
            .filter_map(|item| {
                let id = child_text(item, "instanceId")?;
                let name = item
                    .children()
                    .filter(|n| n.has_tag_name("tagSet"))
                    .flat_map(|s| s.children().filter(|n| n.has_tag_name("item")))
                    .find(|t| child_text(*t, "key").as_deref() == Some("Name"))
                    .and_then(|t| child_text(t, "value"));
                Some(Instance { id, name })
            })
            .collect())
    }

    /// Whether an `AWS` principal a trust policy names exists, as IAM checks it: a role or
    /// user of moto's default account (`arn:aws:iam::123456789012:role/NAME`, with or without
    /// a path) must exist, looked for in that account whoever asks (a stack acting in another
    /// account through an assumed role may name it); account roots, other accounts and other
    /// forms are taken.
    pub(crate) async fn principal_exists(
        &self,
        caller: &Incoming,
        arn: &str,
    ) -> Result<bool, ApiError> {
        let Some(resource) = arn.strip_prefix("arn:aws:iam::123456789012:") else {
            return Ok(true);
        };
        let (action, key) = match resource.split_once('/') {
            Some(("role", _)) => ("GetRole", "RoleName"),
            Some(("user", _)) => ("GetUser", "UserName"),
            _ => return Ok(true),
        };
        let name = resource.rsplit('/').next().unwrap_or_default();
        let params = [("Action", action), ("Version", "2010-05-08"), (key, name)]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        let request = Incoming::internal_in(caller, "123456789012", "iam", body.into())?;
        Ok(self.forward(&request).await?.status().is_success())
    }

    /// The instance profile (its name, or the last part of its ARN) that a launch template
    /// version names, given as Auto Scaling takes it: `LaunchTemplateId` or
    /// `LaunchTemplateName`, and a version (`$Default`, `$Latest` or a number).
    pub(crate) async fn template_profile(
        &self,
        caller: &Incoming,
        template: (&str, &str),
        version: &str,
    ) -> Result<Option<String>, ApiError> {
        let params = vec![
            (
                "Action".to_string(),
                "DescribeLaunchTemplateVersions".to_string(),
            ),
            ("Version".to_string(), "2016-11-15".to_string()),
            (template.0.to_string(), template.1.to_string()),
            ("LaunchTemplateVersion.1".to_string(), version.to_string()),
        ];
        let Ok(text) = self.query(caller, "ec2", &params).await else {
            // A template moto does not know: moto's own answer to the group call says so.
            return Ok(None);
        };
        let doc = xml(&text)?;
        let profile = doc
            .root()
            .descendants()
            .find(|n| n.has_tag_name("iamInstanceProfile"))
            .and_then(|p| child_text(p, "name").or_else(|| child_text(p, "arn")))
            .map(|named| named.rsplit('/').next().unwrap_or_default().to_string());
        Ok(profile)
    }

    /// Which of `ids` name managed prefix lists that exist (not deleted), the region's AWS-managed
    /// ones included.
    pub(crate) async fn prefix_lists(
        &self,
        caller: &Incoming,
        ids: &[String],
    ) -> Result<BTreeSet<String>, ApiError> {
        if ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        let text = self
            .query(
                caller,
                "ec2",
                &ec2_query("DescribeManagedPrefixLists", &[("prefix-list-id", ids)]),
            )
            .await?;
        let doc = xml(&text)?;
        Ok(doc
            .root()
            .descendants()
            .filter(|n| n.has_tag_name("prefixListSet"))
            .flat_map(|n| n.children().filter(|n| n.has_tag_name("item")))
            .filter(|l| !child_text(*l, "state").is_some_and(|s| s.starts_with("delete")))
            .filter_map(|l| child_text(l, "prefixListId"))
            .collect())
    }

    /// What still uses a security group, as AWS sees it before deleting one: instances not yet
    /// terminated in it, load balancers in it, other groups whose rules name it.
    pub(crate) async fn group_dependents(
        &self,
        caller: &Incoming,
        group: &str,
    ) -> Result<Vec<String>, ApiError> {
        let ec2 = ec2_query::<&str>;
        let mut dependents = Vec::new();
        let alive: &[&str] = &["pending", "running", "stopping", "stopped", "shutting-down"];
        let text = self
            .query(
                caller,
                "ec2",
                &ec2(
                    "DescribeInstances",
                    &[
                        ("instance-state-name", alive),
                        ("instance.group-id", &[group]),
                    ],
                ),
            )
            .await?;
        let doc = xml(&text)?;
        dependents.extend(instance_items(&doc).filter_map(|i| child_text(i, "instanceId")));
        let text = self
            .query(
                caller,
                "ec2",
                &ec2(
                    "DescribeSecurityGroups",
                    &[("ip-permission.group-id", &[group])],
                ),
            )
            .await?;
        let doc = xml(&text)?;
        dependents.extend(
            doc.root()
                .descendants()
                .filter(|n| n.has_tag_name("securityGroupInfo"))
                .flat_map(|n| n.children().filter(|n| n.has_tag_name("item")))
                .filter_map(|g| child_text(g, "groupId"))
                .filter(|id| id != group),
        );
        let params = [
            ("Action", "DescribeLoadBalancers"),
            ("Version", "2015-12-01"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let text = self.query(caller, "elasticloadbalancing", &params).await?;
        let doc = xml(&text)?;
        dependents.extend(
            doc.root()
                .descendants()
                .filter(|n| n.has_tag_name("member") && child_text(*n, "LoadBalancerArn").is_some())
                .filter(|lb| {
                    lb.children()
                        .filter(|n| n.has_tag_name("SecurityGroups"))
                        .flat_map(|l| l.children().filter(|n| n.has_tag_name("member")))
                        .any(|m| m.text() == Some(group))
                })
                .filter_map(|lb| child_text(lb, "LoadBalancerArn")),
        );
        Ok(dependents)
    }

    /// moto's DescribeAutoScalingGroups answer for one group (its XML).
    async fn describe_group(&self, caller: &Incoming, group: &str) -> Result<String, ApiError> {
        let params = [
            ("Action", "DescribeAutoScalingGroups"),
            ("Version", "2011-01-01"),
            ("AutoScalingGroupNames.member.1", group),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        self.query(caller, "autoscaling", &params).await
    }

    /// The Application Load Balancer of a name, when one exists: its settings as
    /// `CreateLoadBalancer` takes them, and its `member` element as `DescribeLoadBalancers`
    /// answers it.
    pub(crate) async fn load_balancer(
        &self,
        caller: &Incoming,
        name: &str,
    ) -> Result<Option<(BalancerSettings, String)>, ApiError> {
        let params = [
            ("Action", "DescribeLoadBalancers"),
            ("Version", "2015-12-01"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let text = self.query(caller, "elasticloadbalancing", &params).await?;
        let doc = xml(&text)?;
        let found = doc
            .root()
            .descendants()
            .filter(|n| n.has_tag_name("member"))
            .find(|m| child_text(*m, "LoadBalancerName").as_deref() == Some(name));
        let Some(found) = found else {
            return Ok(None);
        };
        let members = |list: &str, field: Option<&str>| -> BTreeSet<String> {
            found
                .children()
                .filter(|n| n.has_tag_name(list))
                .flat_map(|l| l.children().filter(|n| n.has_tag_name("member")))
                .filter_map(|m| match field {
                    Some(f) => child_text(m, f),
                    None => m.text().map(str::to_string),
                })
                .collect()
        };
        let settings = BalancerSettings {
            // moto keeps no scheme when none was given; AWS's default is internet-facing.
            scheme: child_text(found, "Scheme")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "internet-facing".into()),
            kind: child_text(found, "Type").unwrap_or_default(),
            subnets: members("AvailabilityZones", Some("SubnetId")),
            security_groups: members("SecurityGroups", None),
        };
        let member = text[found.range()].to_string();
        Ok(Some((settings, member)))
    }

    /// The devices of an instance and the volume at each (its root device included).
    pub(crate) async fn instance_devices(
        &self,
        caller: &Incoming,
        instance: &str,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let params = ec2_query("DescribeInstances", &[("instance-id", &[instance])]);
        let text = self.query(caller, "ec2", &params).await?;
        let doc = xml(&text)?;
        Ok(doc
            .root()
            .descendants()
            .filter(|n| n.has_tag_name("blockDeviceMapping"))
            .flat_map(|n| n.children().filter(|n| n.has_tag_name("item")))
            .filter_map(|item| {
                let device = child_text(item, "deviceName")?;
                let volume = item
                    .children()
                    .find(|n| n.has_tag_name("ebs"))
                    .and_then(|ebs| child_text(ebs, "volumeId"))
                    .unwrap_or_default();
                Some((device, volume))
            })
            .collect())
    }

    /// The instance a volume is attached to, if any.
    pub(crate) async fn volume_instance(
        &self,
        caller: &Incoming,
        volume: &str,
    ) -> Result<Option<String>, ApiError> {
        let params = ec2_query("DescribeVolumes", &[("volume-id", &[volume])]);
        let text = self.query(caller, "ec2", &params).await?;
        let doc = xml(&text)?;
        Ok(doc
            .root()
            .descendants()
            .filter(|n| n.has_tag_name("attachmentSet"))
            .flat_map(|n| n.children().filter(|n| n.has_tag_name("item")))
            .find_map(|item| child_text(item, "instanceId")))
    }

    /// The instances of an Auto Scaling group, or None when there is no such group.
    pub(crate) async fn group_instances(
        &self,
        caller: &Incoming,
        group: &str,
    ) -> Result<Option<Vec<String>>, ApiError> {
        let text = self.describe_group(caller, group).await?;
        let doc = xml(&text)?;
        let Some(found) = group_member(&doc) else {
            return Ok(None);
        };
        let ids = found
            .children()
            .filter(|n| n.has_tag_name("Instances"))
            .flat_map(|i| i.children().filter(|n| n.has_tag_name("member")))
            .filter_map(|m| child_text(m, "InstanceId"))
            .collect();
        Ok(Some(ids))
    }

    /// Replaces instances of an Auto Scaling Group as a successful instance refresh ends: for
    /// each old instance, a new one launched from the group's current launch template (in its
    /// subnets, in turn) joins the group, and the old one leaves it and is terminated; the
    /// desired capacity is the same afterwards. Done by hand because moto's own replacement
    /// fails on a launch template version made with user data (an assertion in moto).
    pub(crate) async fn replace_in_group(
        &self,
        caller: &Incoming,
        group: &str,
        old: &[String],
    ) -> Result<(), ApiError> {
        let text = self.describe_group(caller, group).await?;
        let (template, version, subnets, max, tags) = {
            let doc = xml(&text)?;
            let found = group_member(&doc)
                .ok_or_else(|| ApiError::internal(format!("group {group} is gone")))?;
            let template = found.children().find(|n| n.has_tag_name("LaunchTemplate"));
            let (Some(id), version) = (
                template.and_then(|t| child_text(t, "LaunchTemplateId")),
                template
                    .and_then(|t| child_text(t, "Version"))
                    .unwrap_or_else(|| "$Default".into()),
            ) else {
                return Err(ApiError::internal(format!(
                    "group {group} has no launch template to refresh from"
                )));
            };
            let subnets: Vec<String> = child_text(found, "VPCZoneIdentifier")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let max: usize = child_text(found, "MaxSize")
                .and_then(|m| m.parse().ok())
                .unwrap_or_default();
            // The tags the group puts on the instances it launches.
            let tags: Vec<(String, String)> = found
                .children()
                .filter(|n| n.has_tag_name("Tags"))
                .flat_map(|t| t.children().filter(|n| n.has_tag_name("member")))
                .filter(|m| child_text(*m, "PropagateAtLaunch").as_deref() == Some("true"))
                .filter_map(|m| Some((child_text(m, "Key")?, child_text(m, "Value")?)))
                .collect();
            (id, version, subnets, max, tags)
        };
        // Each new instance joins before the old one leaves: room for them meanwhile.
        let resize = |max: usize| {
            [
                ("Action", "UpdateAutoScalingGroup".to_string()),
                ("Version", "2011-01-01".to_string()),
                ("AutoScalingGroupName", group.to_string()),
                ("MaxSize", max.to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v))
        };
        self.query(caller, "autoscaling", &resize(max + 1)).await?;
        for (i, instance) in old.iter().enumerate() {
            let mut run = vec![
                ("Action", "RunInstances".to_string()),
                ("Version", "2016-11-15".to_string()),
                ("MinCount", "1".to_string()),
                ("MaxCount", "1".to_string()),
                ("LaunchTemplate.LaunchTemplateId", template.clone()),
                ("LaunchTemplate.Version", version.clone()),
            ];
            if !subnets.is_empty() {
                run.push(("SubnetId", subnets[i % subnets.len()].clone()));
            }
            let mut run: Vec<(String, String)> =
                run.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if !tags.is_empty() {
                run.push(("TagSpecification.1.ResourceType".into(), "instance".into()));
                for (n, (k, v)) in tags.iter().enumerate() {
                    run.push((format!("TagSpecification.1.Tag.{}.Key", n + 1), k.clone()));
                    run.push((format!("TagSpecification.1.Tag.{}.Value", n + 1), v.clone()));
                }
            }
            let launched = self.query(caller, "ec2", &run).await?;
            let new = {
                let doc = xml(&launched)?;
                doc.root()
                    .descendants()
                    .find(|n| n.has_tag_name("instanceId"))
                    .and_then(|n| n.text())
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::internal("RunInstances returned no instance"))?
            };
            let attach = [
                ("Action", "AttachInstances"),
                ("Version", "2011-01-01"),
                ("AutoScalingGroupName", group),
                ("InstanceIds.member.1", new.as_str()),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()));
            self.query(caller, "autoscaling", &attach).await?;
            let leave = [
                ("Action", "TerminateInstanceInAutoScalingGroup"),
                ("Version", "2011-01-01"),
                ("InstanceId", instance.as_str()),
                ("ShouldDecrementDesiredCapacity", "true"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()));
            self.query(caller, "autoscaling", &leave).await?;
        }
        self.query(caller, "autoscaling", &resize(max)).await?;
        Ok(())
    }

    /// Whether an AMP workspace exists in moto (through the caller's own signature).
    pub(crate) async fn amp_workspace_exists(
        &self,
        caller: &Incoming,
        workspace: &str,
    ) -> Result<bool, ApiError> {
        let path = format!("/workspaces/{workspace}");
        let request = Incoming::internal(caller, "aps", "GET", &path, Bytes::new());
        let response = self.forward(&request).await?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            s => Err(ApiError::internal(format!(
                "moto answered {s} to DescribeWorkspace {workspace}"
            ))),
        }
    }
}

/// One running EC2 instance.
pub(crate) struct Instance {
    pub id: String,
    pub name: Option<String>,
}

/// The one group of a DescribeAutoScalingGroups answer, when there is one.
fn group_member<'a, 'input>(
    doc: &'a roxmltree::Document<'input>,
) -> Option<roxmltree::Node<'a, 'input>> {
    doc.root()
        .descendants()
        .find(|n| n.has_tag_name("AutoScalingGroups"))
        .and_then(|groups| groups.children().find(|n| n.has_tag_name("member")))
}

/// What makes two `CreateLoadBalancer` calls "the same settings" for AWS's idempotency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BalancerSettings {
    pub scheme: String,
    pub kind: String,
    pub subnets: BTreeSet<String>,
    pub security_groups: BTreeSet<String>,
}

/// An EC2 query with filters (`Filter.N.Name`, `Filter.N.Value.M`).
pub(crate) fn ec2_query<V: AsRef<str>>(
    action: &str,
    filters: &[(&str, &[V])],
) -> Vec<(String, String)> {
    let mut params = vec![
        ("Action".to_string(), action.to_string()),
        ("Version".to_string(), "2016-11-15".to_string()),
    ];
    for (i, (name, values)) in filters.iter().enumerate() {
        params.push((format!("Filter.{}.Name", i + 1), name.to_string()));
        for (j, v) in values.iter().enumerate() {
            params.push((
                format!("Filter.{}.Value.{}", i + 1, j + 1),
                v.as_ref().to_string(),
            ));
        }
    }
    params
}

/// The instances of an EC2 answer (`RunInstances`, `DescribeInstances`): each `item` of its
/// `instancesSet`s.
pub(crate) fn instance_items<'a, 'input>(
    doc: &'a roxmltree::Document<'input>,
) -> impl Iterator<Item = roxmltree::Node<'a, 'input>> {
    doc.root()
        .descendants()
        .filter(|n| n.has_tag_name("instancesSet"))
        .flat_map(|n| n.children().filter(|n| n.has_tag_name("item")))
}

pub(crate) fn child_text(node: roxmltree::Node, tag: &str) -> Option<String> {
    node.children()
        .find(|n| n.has_tag_name(tag))
        .and_then(|n| n.text())
        .map(str::to_string)
}

pub(crate) fn xml(text: &str) -> Result<roxmltree::Document<'_>, ApiError> {
    roxmltree::Document::parse(text)
        .map_err(|e| ApiError::internal(format!("moto's answer is not XML: {e}")))
}
