//! Test support: start the emulator (and its moto), copy a desired-state directory, run the CLI, talk to the emulator
//! through the SDK for out-of-band changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange};
use aws_sdk_elasticloadbalancingv2::types::{Action, ActionTypeEnum, ProtocolEnum};
use stackwarden_emulator::{Backend, Config, Emulator, Settings};

/// The AWS stand-in of one test: the project's emulator (tests/emulator) in front of its own
/// moto server, both on free loopback ports, stopped on drop. `endpoint` is what the operator
/// gets as `AWS_ENDPOINT_URL`; `emulator` lets the test set sandboxes, settings and faults.
pub struct Aws {
    pub emulator: Emulator,
    pub endpoint: String,
}

fn moto_binary() -> PathBuf {
    let path = std::env::var_os("STACKWARDEN_MOTO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server"));
    assert!(
        path.is_file(),
        "moto not found at {}: run the tests with tests/run.sh, which installs it (or set STACKWARDEN_MOTO)",
        path.display()
    );
    path
}

impl Aws {
    pub fn start() -> Aws {
        Aws::with(Settings::default())
    }

    pub fn with(settings: Settings) -> Aws {
        let emulator = Emulator::start(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            backend: Backend::Spawn(moto_binary()),
            settings,
        })
        .expect("start the emulator and its moto");
        let endpoint = emulator.endpoint().to_string();
        Aws { emulator, endpoint }
    }

    pub async fn sdk(&self) -> aws_config::SdkConfig {
        self.sdk_in("us-east-1").await
    }

    /// SDK settings for another region than the tests' usual us-east-1.
    pub async fn sdk_in(&self, region: &'static str) -> aws_config::SdkConfig {
        self.sdk_as(region, "testing").await
    }

    /// SDK settings signing with another access key (one the emulator may hold to a policy).
    pub async fn sdk_as(&self, region: &'static str, access_key: &str) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_config::Region::new(region))
            .credentials_provider(aws_sdk_iam::config::Credentials::new(
                access_key, "testing", None, None, "test",
            ))
            // Errors are what the conformance tests look at: no retries hiding them.
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await
    }

    pub async fn iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(&self.sdk().await)
    }

    /// IAM as another account's own administrator sees it (the account moto acts in for
    /// `x-moto-account-id`): to make the roles a stack assumes there, and to see what it made.
    pub async fn iam_in(&self, account: &str) -> aws_sdk_iam::Client {
        let conf = aws_sdk_iam::config::Builder::from(&self.sdk().await)
            .interceptor(InAccount(account.to_string()))
            .build();
        aws_sdk_iam::Client::from_conf(conf)
    }

    /// AMP in another account ([`Aws::iam_in`]).
    pub async fn amp_in(&self, account: &str) -> aws_sdk_amp::Client {
        let conf = aws_sdk_amp::config::Builder::from(&self.sdk().await)
            .interceptor(InAccount(account.to_string()))
            .build();
        aws_sdk_amp::Client::from_conf(conf)
    }

    /// A role `name` in `account` that the tests' own credentials (moto's default account,
    /// 123456789012) may assume: its trust policy admits that account, asking for
    /// `external_id` when given.
    pub async fn assumable_role(&self, account: &str, name: &str, external_id: Option<&str>) {
        let mut statement = serde_json::json!({
            "Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
            "Action": "sts:AssumeRole",
        });
        if let Some(id) = external_id {
            statement["Condition"] = serde_json::json!({"StringEquals": {"sts:ExternalId": id}});
        }
        let trust = serde_json::json!({"Version": "2012-10-17", "Statement": [statement]});
        self.iam_in(account)
            .await
            .create_role()
            .role_name(name)
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .unwrap();
    }

    pub async fn amp(&self) -> aws_sdk_amp::Client {
        aws_sdk_amp::Client::new(&self.sdk().await)
    }

    pub async fn grafana(&self) -> aws_sdk_grafana::Client {
        aws_sdk_grafana::Client::new(&self.sdk().await)
    }

    pub async fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::new(&self.sdk().await)
    }

    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk().await)
    }

    pub async fn autoscaling(&self) -> aws_sdk_autoscaling::Client {
        aws_sdk_autoscaling::Client::new(&self.sdk().await)
    }

    pub async fn elb(&self) -> aws_sdk_elasticloadbalancingv2::Client {
        aws_sdk_elasticloadbalancingv2::Client::new(&self.sdk().await)
    }

    pub async fn secrets(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&self.sdk().await)
    }
}

/// Makes every call in one account: moto's `x-moto-account-id`, which it honours over the
/// access key's account (the way to act as an account's administrator in the emulator).
#[derive(Debug)]
struct InAccount(String);

impl aws_smithy_runtime_api::client::interceptors::Intercept for InAccount {
    fn name(&self) -> &'static str {
        "tests.InAccount"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        _cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        context
            .request_mut()
            .headers_mut()
            .insert("x-moto-account-id", self.0.clone());
        Ok(())
    }
}

/// The outcome of one CLI run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// AWS calls the run reported with `--stats`: (total, writes).
    pub fn calls(&self) -> (u64, u64) {
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("AWS API calls: "))
            .unwrap_or_else(|| panic!("no call statistics in stderr:\n{}", self.stderr));
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        (nums[0], nums[2])
    }

    /// Every operation the run reported with `--stats` (`"<service> <operation>"`), with its
    /// number of calls.
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.stderr
            .lines()
            .skip_while(|l| !l.starts_with("AWS API calls: "))
            .skip(1)
            .map_while(|l| {
                let (n, op) = l.trim().split_once(char::is_whitespace)?;
                Some((op.trim().to_string(), n.parse::<u64>().ok()?))
            })
            .collect()
    }

    /// Calls of one operation the run reported with `--stats`.
    pub fn count(&self, operation: &str) -> u64 {
        self.stderr
            .lines()
            .find_map(|l| {
                // `  <n>  <service, maybe several words> <operation>`
                let mut parts = l.split_whitespace();
                let n = parts.next()?.parse::<u64>().ok()?;
                (parts.last()? == operation).then_some(n)
            })
            .unwrap_or(0)
    }

    #[track_caller]
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `stackwarden ARGS --stats` against an endpoint (none: the AWS settings are unusable,
/// so any call would fail).
pub fn stackwarden(endpoint: Option<&str>, args: &[&str]) -> Run {
    stackwarden_with(endpoint, args, &[])
}

/// [`stackwarden`] with extra environment variables.
pub fn stackwarden_with(endpoint: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(endpoint, args);
    cmd.envs(env.iter().copied());
    run(cmd)
}

/// Runs a [`command`] to its end.
pub fn run(mut cmd: Command) -> Run {
    let out = cmd.output().expect("run stackwarden");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `stackwarden ARGS --stats` against an endpoint, ready to run or spawn: test credentials,
/// no shared AWS config, quick polls.
pub fn command(endpoint: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stackwarden"));
    cmd.args(args)
        .arg("--stats")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("STACKWARDEN_POLL_INTERVAL", "1s")
        .env("RUST_LOG", "warn")
        .env_remove("AWS_PROFILE");
    match endpoint {
        Some(e) => cmd.env("AWS_ENDPOINT_URL", e),
        None => cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
    };
    cmd
}

/// A copy of the repository's default desired state, to modify freely.
pub fn default_stack() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("desired"),
        dir.path(),
    );
    dir
}

/// A copy of the default stack named `name`, acting as `role` (with `external_id`).
pub fn stack_as(name: &str, role: &str, external_id: Option<&str>) -> tempfile::TempDir {
    let dir = default_stack();
    let external_id = external_id
        .map(|id| format!("external_id = \"{id}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        dir.path().join("stack.toml"),
        format!(
            "[stack]\nname = \"{name}\"\nregion = \"us-east-1\"\ntags = {{ project = \"monitoring\" }}\nassume_role = \"{role}\"\n{external_id}"
        ),
    )
    .unwrap();
    dir
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Replaces text in a file of a desired directory; the text must be there.
#[track_caller]
pub fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} does not contain {from:?}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The files a push script installs (its `put PATH MODE <<'STACKWARDEN_EOF'` blocks of base64,
/// decoded).
pub fn script_files(script: &str) -> Vec<(String, String)> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut lines = script.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line
            .strip_prefix("put ")
            .and_then(|r| r.strip_suffix(" <<'STACKWARDEN_EOF'"))
        else {
            continue;
        };
        let (path, _mode) = rest.rsplit_once(' ').unwrap();
        let path = path.trim_matches('\'').to_string();
        let encoded: String = lines
            .by_ref()
            .take_while(|l| *l != "STACKWARDEN_EOF")
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        out.push((path, String::from_utf8(bytes).unwrap()));
    }
    out
}

/// Every Run Command in the account, oldest first.
pub async fn run_commands(ssm: &aws_sdk_ssm::Client) -> Vec<aws_sdk_ssm::types::Command> {
    let mut commands = Vec::new();
    let mut pages = ssm.list_commands().into_paginator().send();
    while let Some(page) = pages.next().await {
        commands.extend(page.unwrap().commands().to_vec());
    }
    commands.sort_by_key(|c| c.requested_date_time().map(|t| t.as_nanos()));
    commands
}

/// What Terraform made of the seed stack's Grafana (`terraform/modules/grafana`): a launch
/// template of its own name, an Auto Scaling Group on its `$Latest` version, a target group, an
/// internet-facing load balancer with one HTTP listener forwarding to it, and the two security
/// groups of `terraform/main.tf`, each tagged as Terraform tags them.
pub struct Terraformed {
    pub alb_group: String,
    pub instance_group: String,
    pub template: String,
    pub target_group: String,
    pub load_balancer: String,
    pub listener: String,
    pub created: Option<aws_smithy_types::DateTime>,
    /// The instances its group launched.
    pub instances: Vec<String>,
}

/// Makes it in `aws`, in the first two of `subnets`, its instances from `ami`.
pub async fn terraform_grafana(aws: &Aws, subnets: &[String], ami: &str) -> Terraformed {
    use aws_sdk_autoscaling::types::{LaunchTemplateSpecification, Tag as AsgTag};
    use aws_sdk_ec2::types::{
        InstanceType, RequestLaunchTemplateData, ResourceType, Tag, TagSpecification,
    };
    use aws_sdk_elasticloadbalancingv2::types::Tag as ElbTag;
    use base64::Engine as _;
    let (ec2, elb, asg) = (aws.ec2().await, aws.elb().await, aws.autoscaling().await);
    let vpc = ec2
        .describe_vpcs()
        .filters(Filter::builder().name("isDefault").values("true").build())
        .send()
        .await
        .unwrap()
        .vpcs()[0]
        .vpc_id()
        .unwrap()
        .to_string();
    let terraform = |resource: ResourceType| {
        TagSpecification::builder()
            .resource_type(resource)
            .tags(Tag::builder().key("ManagedBy").value("terraform").build())
            .build()
    };
    let group = |name: &'static str, port: i32, from: Option<String>| {
        let ec2 = ec2.clone();
        let vpc = vpc.clone();
        async move {
            let id = ec2
                .create_security_group()
                .group_name(name)
                .description(name)
                .vpc_id(vpc)
                .tag_specifications(terraform(ResourceType::SecurityGroup))
                .send()
                .await
                .unwrap()
                .group_id()
                .unwrap()
                .to_string();
            let rule = IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(port)
                .to_port(port);
            let rule = match from {
                Some(g) => rule.user_id_group_pairs(
                    aws_sdk_ec2::types::UserIdGroupPair::builder()
                        .group_id(g)
                        .build(),
                ),
                None => rule.ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build()),
            };
            ec2.authorize_security_group_ingress()
                .group_id(&id)
                .ip_permissions(rule.build())
                .send()
                .await
                .unwrap();
            id
        }
    };
    let alb_group = group("monitoring-alb-sg", 80, None).await;
    let instance_group = group("monitoring-grafana-sg", 3000, Some(alb_group.clone())).await;
    let user_data = base64::engine::general_purpose::STANDARD
        .encode("#!/bin/bash\napt-get install -y docker.io\ndocker run -d -p 3000:3000 grafana/grafana:10.0.0\n");
    let template = ec2
        .create_launch_template()
        .launch_template_name("monitoring-grafana-20261127")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(ami)
                .instance_type(InstanceType::T3Small)
                .security_group_ids(&instance_group)
                .user_data(user_data)
                .build(),
        )
        .tag_specifications(terraform(ResourceType::LaunchTemplate))
        .send()
        .await
        .unwrap()
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    let elb_tag = ElbTag::builder()
        .key("ManagedBy")
        .value("terraform")
        .build();
    let target_group = elb
        .create_target_group()
        .name("monitoring-grafana-tg")
        .protocol(ProtocolEnum::Http)
        .port(3000)
        .vpc_id(&vpc)
        .health_check_path("/api/health")
        .tags(elb_tag.clone())
        .send()
        .await
        .unwrap()
        .target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();
    let load_balancer = elb
        .create_load_balancer()
        .name("monitoring-grafana-alb")
        .subnets(&subnets[0])
        .subnets(&subnets[1])
        .security_groups(&alb_group)
        .tags(elb_tag)
        .send()
        .await
        .unwrap()
        .load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_string();
    let listener = elb
        .create_listener()
        .load_balancer_arn(&load_balancer)
        .protocol(ProtocolEnum::Http)
        .port(80)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&target_group)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .listeners()[0]
        .listener_arn()
        .unwrap()
        .to_string();
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("monitoring-grafana-asg")
        .launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_id(&template)
                .version("$Latest")
                .build(),
        )
        .min_size(1)
        .max_size(2)
        .desired_capacity(1)
        .vpc_zone_identifier(subnets[..2].join(","))
        .target_group_arns(&target_group)
        .health_check_type("ELB")
        .health_check_grace_period(300)
        .tags(
            AsgTag::builder()
                .key("ManagedBy")
                .value("terraform")
                .propagate_at_launch(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let group = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("monitoring-grafana-asg")
        .send()
        .await
        .unwrap()
        .auto_scaling_groups()[0]
        .clone();
    Terraformed {
        alb_group,
        instance_group,
        template,
        target_group,
        load_balancer,
        listener,
        created: group.created_time().cloned(),
        instances: {
            let mut ids: Vec<String> = group
                .instances()
                .iter()
                .filter_map(|i| i.instance_id().map(str::to_string))
                .collect();
            ids.sort();
            ids
        },
    }
}

/// Launches `count` instances of the emulator's default AMI tagged `Role = role`: their ids.
pub async fn launch(aws: &Aws, count: i32, role: &str) -> Vec<String> {
    let ec2 = aws.ec2().await;
    let out = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(count)
        .max_count(count)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("Role")
                        .value(role)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.instances()
        .iter()
        .map(|i| i.instance_id().unwrap().to_string())
        .collect()
}

/// The ids of `count` of the region's default subnets (one per zone).
pub async fn default_subnets(aws: &Aws, count: usize) -> Vec<String> {
    let out = aws.ec2().await.describe_subnets().send().await.unwrap();
    out.subnets()
        .iter()
        .filter(|s| s.default_for_az() == Some(true))
        .take(count)
        .map(|s| s.subnet_id().unwrap().to_string())
        .collect()
}
