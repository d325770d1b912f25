//! Grafana behind an ALB against the emulator: created from empty with its provisioning on every
//! instance of the group (files that parse, the password only in its file); drift in a listener,
//! the health check, the group's size and the load balancer's security group corrected; a launch
//! template change rolled out as one new version and one instance refresh, tracked across
//! passes; the admin password in no output; bad input refused offline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use aws_sdk_autoscaling::types::AutoScalingGroup;
use aws_sdk_ec2::types::{Filter, IpPermission, IpRange};
use aws_sdk_elasticloadbalancingv2::types::{Action, ActionTypeEnum, Listener, ProtocolEnum};
use aws_sdk_ssm::types::ParameterType;
use stackwarden_emulator::{Fault, FaultKind, PublicImage, RefreshOutcome, Settings};

use crate::harness::{
    default_stack, edit, path_str, run_commands, script_files, stackwarden, stackwarden_with,
    terraform_grafana, Aws, Run,
};

const PASSWORD: &str = "Zq9-grafana-admin-s3cret";

/// The stack's Grafana: two instances in two zones behind an HTTPS load balancer, data sources
/// for the AMP workspace and CloudWatch, the default dashboards, the password from SSM.
/// Grafana runs in a container, restarted and given its password through `docker` (the
/// stand-in at `docker`, see [`docker_stand_in`]).
fn grafana_toml(subnets: &[String], certificate: &str, docker: &str) -> String {
    format!(
        r#"[grafana.main]
ami = "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
instance_type = "t3.small"
subnets = ["{a}", "{b}"]
instance_profile = "${{iam.instance_profile.grafana.name}}"
min_size = 2
max_size = 3
desired_capacity = 2
health_check_grace_period = "2m"
min_healthy_percentage = 50
user_data = "grafana/user-data.sh"

[grafana.main.alb]
subnets = ["{a}", "{b}"]
allowed_cidrs = ["10.0.0.0/8"]
certificate_arn = "{certificate}"
idle_timeout = "120s"

[grafana.main.provisioning]
dashboards = ["dashboards/node.json", "dashboards/application.json"]
amp_url = "${{amp.workspace.main.prometheus_endpoint}}"
cloudwatch = true
admin_password_ssm_parameter = "/grafana/admin"
ini = {{ server = {{ domain = "grafana.example.com" }}, users = {{ allow_sign_up = "false" }} }}
restart = "{docker} restart grafana"
cli = "{docker} exec -i grafana grafana cli"
health_url = "file:///dev/null"
"#,
        a = subnets[0],
        b = subnets[1],
    )
}

struct Setup {
    aws: Aws,
    sandboxes: tempfile::TempDir,
    dir: tempfile::TempDir,
    _bin: tempfile::TempDir,
}

impl Setup {
    fn dir(&self) -> &str {
        path_str(self.dir.path())
    }

    /// Runs the CLI with debug logs, and checks the password is in none of its output.
    fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, &[])
    }

    /// [`Setup::run`] with more environment.
    fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut full = args.to_vec();
        full.push(self.dir());
        let mut env = env.to_vec();
        env.push(("RUST_LOG", "debug,aws=info,hyper=info,h2=info,rustls=info"));
        let run = stackwarden_with(Some(&self.aws.endpoint), &full, &env);
        assert!(
            !run.stdout.contains(PASSWORD) && !run.stderr.contains(PASSWORD),
            "the admin password appeared in the output of {args:?}"
        );
        run
    }

    /// The stack's Auto Scaling Group as AWS has it.
    async fn group(&self) -> AutoScalingGroup {
        self.group_named("monitoring-main").await
    }

    async fn group_named(&self, name: &str) -> AutoScalingGroup {
        let out = self
            .aws
            .autoscaling()
            .await
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .unwrap();
        out.auto_scaling_groups()[0].clone()
    }

    /// The load balancer's listeners by port.
    async fn listeners(&self) -> BTreeMap<i32, Listener> {
        let elb = self.aws.elb().await;
        let lbs = elb
            .describe_load_balancers()
            .names("monitoring-main")
            .send()
            .await
            .unwrap();
        let out = elb
            .describe_listeners()
            .load_balancer_arn(lbs.load_balancers()[0].load_balancer_arn().unwrap())
            .send()
            .await
            .unwrap();
        out.listeners()
            .iter()
            .map(|l| (l.port().unwrap(), l.clone()))
            .collect()
    }

    /// The password went over no wire the operator writes to: it is in no Run Command's
    /// parameters (their encoded files decoded too), which fetch it instead, and in no tag of
    /// EC2 or Auto Scaling. The instances fetched it themselves with their own credentials,
    /// `fetches` calls of `operation` (`GetParameter`, `GetSecretValue`) in all, and every
    /// other caller (the operator, this test) called `operation` for nothing of it.
    async fn password_fetched_by_the_hosts_only(&self, operation: &str, fetches: usize) {
        let commands = run_commands(&self.aws.ssm().await).await;
        assert!(!commands.is_empty());
        let mut fetching = 0;
        for c in &commands {
            let text = format!("{:?}", c.parameters());
            assert!(
                !text.contains(PASSWORD),
                "in a command's parameters: {text}"
            );
            for script in c.parameters().and_then(|p| p.get("commands")).unwrap() {
                for (path, content) in script_files(script) {
                    assert!(!content.contains(PASSWORD), "pushed in {path}");
                }
                if script.contains("\nfetch /etc/grafana/admin-password 0600 aws ") {
                    fetching += 1;
                }
            }
        }
        assert!(fetching > 0, "no push fetches the password");
        let ec2_tags = self.aws.ec2().await.describe_tags().send().await.unwrap();
        let asg_tags = self
            .aws
            .autoscaling()
            .await
            .describe_tags()
            .send()
            .await
            .unwrap();
        let values: Vec<&str> = ec2_tags
            .tags()
            .iter()
            .filter_map(|t| t.value())
            .chain(asg_tags.tags().iter().filter_map(|t| t.value()))
            .collect();
        assert!(!values.is_empty());
        assert!(values.iter().all(|v| !v.contains(PASSWORD)), "{values:?}");
        let calls = self.aws.emulator.calls();
        let by = |host: bool| {
            calls
                .iter()
                .filter(|c| c.operation == operation && c.caller.starts_with("ASIA") == host)
                .count()
        };
        assert_eq!(by(true), fetches, "fetches by the instances");
        if operation == "GetSecretValue" {
            assert_eq!(by(false), 0, "the operator read the secret");
        }
        let instances = self.group_instances().await;
        let keys: BTreeSet<String> = instances
            .iter()
            .map(|i| stackwarden_emulator::instance_access_key(i))
            .collect();
        let callers: BTreeSet<String> = calls
            .iter()
            .filter(|c| c.operation == operation && c.caller.starts_with("ASIA"))
            .map(|c| c.caller.clone())
            .collect();
        assert!(
            keys.is_subset(&callers),
            "each instance fetched with its own credentials: {keys:?} of {callers:?}"
        );
    }

    async fn group_instances(&self) -> Vec<String> {
        self.group_instances_of("monitoring-main").await
    }

    async fn group_instances_of(&self, name: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .group_named(name)
            .await
            .instances()
            .iter()
            .map(|i| i.instance_id().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }
}

async fn setup() -> Setup {
    setup_with(Settings::default()).await
}

/// [`setup`] with these emulator settings (the sandboxes and their environment are the
/// setup's).
async fn setup_with(settings: Settings) -> Setup {
    let sandboxes = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        sandbox_dir: Some(sandboxes.path().to_path_buf()),
        ..settings
    });
    let subnets = aws
        .ec2()
        .await
        .describe_subnets()
        .filters(
            Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut subnets: Vec<(String, String)> = subnets
        .subnets()
        .iter()
        .map(|s| {
            (
                s.availability_zone().unwrap().to_string(),
                s.subnet_id().unwrap().to_string(),
            )
        })
        .collect();
    subnets.sort();
    let subnets: Vec<String> = subnets.into_iter().map(|(_, s)| s).take(2).collect();
    aws.ssm()
        .await
        .put_parameter()
        .name("/grafana/admin")
        .value(PASSWORD)
        .r#type(ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let cert = aws
        .iam()
        .await
        .upload_server_certificate()
        .server_certificate_name("grafana")
        .certificate_body("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        .private_key("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
        .send()
        .await
        .unwrap();
    let arn = cert
        .server_certificate_metadata()
        .unwrap()
        .arn()
        .to_string();
    let dir = default_stack();
    std::fs::write(
        dir.path().join("grafana.toml"),
        grafana_toml(&subnets, &arn, &docker_stand_in(bin.path())),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("grafana")).unwrap();
    std::fs::write(
        dir.path().join("grafana/user-data.sh"),
        "#!/bin/bash\ndnf install -y grafana\n",
    )
    .unwrap();
    Setup {
        aws,
        sandboxes,
        dir,
        _bin: bin,
    }
}

/// A `docker` for the group's instances, where no Grafana runs: each call is appended to
/// `docker.log` in the instance's sandbox, with what `exec -i` reads on its stdin.
fn docker_stand_in(dir: &Path) -> String {
    let docker = dir.join("docker");
    std::fs::write(
        &docker,
        "#!/bin/sh\nlog=\"$STACKWARDEN_ROOT/docker.log\"\necho \"$*\" >> \"$log\"\ncase \"$1 $2\" in\n  'exec -i') echo \"stdin: $(cat)\" >> \"$log\" ;;\n  'restart grafana') ;;\n  *) echo \"docker stand-in: unexpected $*\" >&2; exit 2 ;;\nesac\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    docker.display().to_string()
}

/// The provisioning files on one instance parse, and name what the desired state says.
fn check_provisioning(root: &Path) {
    let read = |p: &str| {
        std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p} on {root:?}: {e}"))
    };
    let ini = read("etc/grafana/grafana.ini");
    assert!(
        ini.contains("[server]\ndomain = grafana.example.com"),
        "{ini}"
    );
    assert!(
        ini.contains("admin_password = $__file{/etc/grafana/admin-password}"),
        "{ini}"
    );
    assert!(!ini.contains(PASSWORD));
    assert_eq!(read("etc/grafana/admin-password"), PASSWORD);
    // The configured commands ran (restart, then the password through the CLI), not the
    // package's defaults, which are not on this machine.
    let docker = read("docker.log");
    let calls: Vec<&str> = docker.lines().collect();
    assert!(
        calls.len() >= 3 && calls.len().is_multiple_of(3),
        "{docker}"
    );
    let push = &calls[calls.len() - 3..];
    assert_eq!(push[0], "restart grafana", "{docker}");
    assert_eq!(
        push[1],
        format!(
            "exec -i grafana grafana cli --homepath /usr/share/grafana --config {}/etc/grafana/grafana.ini admin reset-admin-password --password-from-stdin",
            root.display()
        ),
        "{docker}"
    );
    assert_eq!(push[2], format!("stdin: {PASSWORD}"), "{docker}");
    let datasources = read("etc/grafana/provisioning/datasources/stackwarden.yaml");
    let doc = marked_yaml::parse_yaml(0, &datasources).unwrap();
    let list = doc
        .as_mapping()
        .unwrap()
        .get_sequence("datasources")
        .unwrap();
    let names: Vec<&str> = list
        .iter()
        .map(|d| d.as_mapping().unwrap().get_scalar("name").unwrap().as_str())
        .collect();
    assert_eq!(names, ["Amazon Managed Prometheus", "CloudWatch"]);
    let amp = list[0].as_mapping().unwrap();
    assert!(amp
        .get_scalar("url")
        .unwrap()
        .as_str()
        .contains("/workspaces/ws-"));
    assert_eq!(
        amp.get_mapping("jsonData")
            .unwrap()
            .get_scalar("sigV4Auth")
            .unwrap()
            .as_str(),
        "true"
    );
    let providers = read("etc/grafana/provisioning/dashboards/stackwarden.yaml");
    marked_yaml::parse_yaml(0, &providers).unwrap();
    for d in ["node.json", "application.json"] {
        let text = read(&format!("var/lib/grafana/dashboards/stackwarden/{d}"));
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grafana_from_empty_then_drift_corrected_and_a_template_change_rolled_out_once() {
    let s = setup().await;

    // Plan from empty: what is created, the password as (sensitive).
    let plan = s.run(&["plan"]);
    plan.expect(2);
    assert!(
        plan.stdout.contains("grafana monitoring-main"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains("(sensitive, SSM parameter /grafana/admin)"),
        "{}",
        plan.stdout
    );

    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    let instances = s.group_instances().await;
    assert_eq!(instances.len(), 2);
    for id in &instances {
        check_provisioning(&s.sandboxes.path().join(id));
    }
    s.password_fetched_by_the_hosts_only("GetParameter", 2)
        .await;

    // What AWS has: the group, its template, the load balancer and its listeners.
    let asg = s.aws.autoscaling().await;
    let group = s.group().await;
    assert_eq!(
        (group.min_size(), group.max_size(), group.desired_capacity()),
        (Some(2), Some(3), Some(2))
    );
    assert_eq!(group.health_check_type(), Some("ELB"));
    assert_eq!(group.health_check_grace_period(), Some(120));
    assert_eq!(group.target_group_arns().len(), 1);
    let template = group.launch_template().unwrap();
    assert_eq!(template.version(), Some("1"));
    let ec2 = s.aws.ec2().await;
    let versions = ec2
        .describe_launch_template_versions()
        .launch_template_id(template.launch_template_id().unwrap())
        .send()
        .await
        .unwrap();
    let data = versions.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(
        data.metadata_options()
            .unwrap()
            .http_tokens()
            .unwrap()
            .as_str(),
        "required"
    );
    assert!(
        data.image_id().unwrap().starts_with("ami-"),
        "resolved: {data:?}"
    );
    assert_eq!(
        data.iam_instance_profile().unwrap().name(),
        Some("monitoring-grafana")
    );
    assert_eq!(data.block_device_mappings().len(), 1);
    let root = &data.block_device_mappings()[0];
    assert_eq!(
        root.device_name(),
        Some("/dev/xvda"),
        "at the root device of the image (Amazon Linux's)"
    );
    assert_eq!(root.ebs().unwrap().encrypted(), Some(true));
    assert_eq!(root.ebs().unwrap().volume_size(), Some(20));

    let elb = s.aws.elb().await;
    let lbs = elb
        .describe_load_balancers()
        .names("monitoring-main")
        .send()
        .await
        .unwrap();
    let lb = &lbs.load_balancers()[0];
    let alb_sg = lb.security_groups()[0].clone();
    let by_port = s.listeners().await;
    assert_eq!(by_port.keys().copied().collect::<Vec<_>>(), [80, 443]);
    let http = by_port[&80].default_actions()[0].redirect_config().unwrap();
    assert_eq!((http.protocol(), http.port()), (Some("HTTPS"), Some("443")));
    assert_eq!(by_port[&443].protocol(), Some(&ProtocolEnum::Https));
    let tgs = elb
        .describe_target_groups()
        .names("monitoring-main")
        .send()
        .await
        .unwrap();
    let tg = &tgs.target_groups()[0];
    assert_eq!(tg.port(), Some(3000));
    assert_eq!(tg.health_check_path(), Some("/api/health"));
    let tg_arn = tg.target_group_arn().unwrap().to_string();

    // The instances' group admits only the load balancer's group.
    let groups = ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values("monitoring-main-instances")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let inst_sg = &groups.security_groups()[0];
    let perms = inst_sg.ip_permissions();
    assert_eq!(perms.len(), 1);
    assert!(perms[0].ip_ranges().is_empty());
    assert_eq!(
        perms[0].user_id_group_pairs()[0].group_id(),
        Some(alb_sg.as_str())
    );

    // Converged: nothing to do, no SSM call.
    let plan = s.run(&["plan"]);
    plan.expect(0);
    assert_eq!(plan.count("SendCommand"), 0);

    // Drift out of band: the HTTP listener forwards instead of redirecting, the health check
    // path changed, the group's max size changed, the load balancer's group opened to the world.
    elb.modify_listener()
        .listener_arn(by_port[&80].listener_arn().unwrap())
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&tg_arn)
                .build(),
        )
        .send()
        .await
        .unwrap();
    elb.modify_target_group()
        .target_group_arn(&tg_arn)
        .health_check_path("/")
        .send()
        .await
        .unwrap();
    asg.update_auto_scaling_group()
        .auto_scaling_group_name("monitoring-main")
        .max_size(10)
        .send()
        .await
        .unwrap();
    ec2.authorize_security_group_ingress()
        .group_id(&alb_sg)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(443)
                .to_port(443)
                .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let plan = s.run(&["plan"]);
    plan.expect(2);
    for field in [
        // Each listener is a node of its own.
        "~ grafana.main.listener.80",
        "listener:",
        // The target group is a node of its own.
        "~ grafana.main.target_group",
        "health_check:",
        "max_size",
        // The load balancer's rules are a node of their own.
        "grafana.main.ingress.alb",
        "rules",
    ] {
        assert!(plan.stdout.contains(field), "{field} in\n{}", plan.stdout);
    }
    s.run(&["reconcile", "--once"]).expect(0);
    s.run(&["plan"]).expect(0);
    let tg = elb
        .describe_target_groups()
        .names("monitoring-main")
        .send()
        .await
        .unwrap();
    assert_eq!(
        tg.target_groups()[0].health_check_path(),
        Some("/api/health")
    );
    assert_eq!(
        s.listeners().await[&80].default_actions()[0].r#type(),
        Some(&ActionTypeEnum::Redirect)
    );

    // A launch template change: one new version, one instance refresh, tracked across passes.
    // The type changes, and the image becomes the seed's Ubuntu (the most recent of
    // Canonical's jammy images, whose root device is /dev/sda1).
    let ubuntu = |name: &str, created: &str| {
        s.aws.emulator.publish_image(PublicImage::new(
            "099720109477",
            &format!("ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-{name}"),
            created,
        ))
    };
    ubuntu("20240501", "2024-05-01T00:00:00.000Z");
    let jammy = ubuntu("20240502", "2024-05-02T00:00:00.000Z");
    let amazon_linux = data.image_id().unwrap().to_string();
    edit(s.dir.path(), "grafana.toml", "t3.small", "t3.medium");
    edit(
        s.dir.path(),
        "grafana.toml",
        "ami = \"resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64\"",
        "ami = { owner = \"099720109477\", name = \"ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*\" }",
    );
    let plan = s.run(&["plan"]);
    plan.expect(2);
    for line in [
        "~ grafana.main.launch_template",
        "instance_type: t3.small → t3.medium",
        &format!("ami: {amazon_linux} → {jammy}"),
        "block_devices: /dev/xvda 20 GiB encrypted → /dev/sda1 20 GiB encrypted",
        "version: 1 → 2",
        // The group's own change plans the version the template's makes.
        "~ grafana.main (",
        "launch_template.version: 1 → 2",
        "instance_refresh: 1 → 2",
        "a rolling instance refresh replaces the instances",
    ] {
        assert!(plan.stdout.contains(line), "{line} in\n{}", plan.stdout);
    }
    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    assert_eq!(
        run.count("CreateLaunchTemplateVersion"),
        1,
        "{}",
        run.stderr
    );
    assert_eq!(run.count("StartInstanceRefresh"), 1, "{}", run.stderr);
    let mut refreshes = 1;
    for _ in 0..6 {
        let run = s.run(&["reconcile", "--once"]);
        refreshes += run.count("StartInstanceRefresh");
        assert_eq!(run.count("CreateLaunchTemplateVersion"), 0);
    }
    assert_eq!(refreshes, 1, "one refresh for one template change");
    assert_eq!(
        s.group().await.launch_template().unwrap().version(),
        Some("2")
    );
    let version = ec2
        .describe_launch_template_versions()
        .launch_template_id(template.launch_template_id().unwrap())
        .versions("2")
        .send()
        .await
        .unwrap();
    let data = version.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(data.image_id(), Some(jammy.as_str()));
    let devices: Vec<&str> = data
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.device_name())
        .collect();
    assert_eq!(devices, ["/dev/sda1"]);
    let refreshed = asg
        .describe_instance_refreshes()
        .auto_scaling_group_name("monitoring-main")
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.instance_refreshes().len(), 1);
    assert_eq!(
        refreshed.instance_refreshes()[0].status().unwrap().as_str(),
        "Successful"
    );
    // The replacements got the provisioning too, and the stack is converged.
    let replaced = s.group_instances().await;
    assert_eq!(replaced.len(), 2, "{replaced:?}");
    assert!(
        replaced.iter().all(|i| !instances.contains(i)),
        "{replaced:?}"
    );
    for id in &replaced {
        check_provisioning(&s.sandboxes.path().join(id));
    }
    s.run(&["plan"]).expect(0);

    // The pattern is resolved on every pass: a newer image is a new version.
    let newer = ubuntu("20240601", "2024-06-01T00:00:00.000Z");
    let plan = s.run(&["plan"]);
    plan.expect(2);
    for line in [format!("ami: {jammy} → {newer}"), "version: 2 → 3".into()] {
        assert!(plan.stdout.contains(&line), "{line} in\n{}", plan.stdout);
    }

    // Removed from the desired state and pruned: everything of it is gone. The load
    // balancer's delete fails through all of the SDK's attempts in the pass that deletes the
    // group, so the next pass must still look for it with no group left. Once deleted, its
    // network interfaces stay in its security group for three seconds, as on AWS: the
    // group's delete waits for them within the same run.
    std::fs::remove_file(s.dir.path().join("grafana.toml")).unwrap();
    s.aws
        .emulator
        .configure(|e| e.interface_release = std::time::Duration::from_secs(3));
    s.aws.emulator.inject(
        Fault::on(
            "elasticloadbalancing",
            "DeleteLoadBalancer",
            FaultKind::ServerError { status: 500 },
        )
        .times(5),
    );
    let pruned = s.run(&["reconcile", "--once", "--prune"]);
    pruned.expect(0);
    assert!(
        pruned
            .stderr
            .contains("has a dependent object (the network interfaces of a deleted load balancer)"),
        "the group's delete met the interfaces:\n{}",
        pruned.stderr
    );
    let failed = s
        .aws
        .emulator
        .calls()
        .iter()
        .filter(|c| c.operation == "DeleteLoadBalancer" && c.status == 500)
        .count();
    assert_eq!(failed, 5, "the fault hit all five attempts of one pass");
    let left = asg.describe_auto_scaling_groups().send().await.unwrap();
    assert!(left.auto_scaling_groups().is_empty());
    let left = elb.describe_load_balancers().send().await.unwrap();
    assert!(left.load_balancers().is_empty());
    let left = elb.describe_target_groups().send().await.unwrap();
    assert!(left.target_groups().is_empty());
    let ec2 = s.aws.ec2().await;
    let left = ec2.describe_launch_templates().send().await.unwrap();
    assert!(left.launch_templates().is_empty());
    let left = ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("tag-key")
                .values("stackwarden:stack")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(left.security_groups().is_empty(), "{left:?}");
}

/// The group's record of the version its instances were refreshed to.
fn recorded_version(group: &AutoScalingGroup) -> Option<String> {
    group
        .tags()
        .iter()
        .find(|t| t.key() == Some("stackwarden:template-version"))
        .and_then(|t| t.value())
        .map(str::to_string)
}

/// A template change whose instance refresh fails is not a rollout: `reconcile --once` fails
/// naming the refresh, its status reason and the group, the old instances stay (on the old
/// version, which the group keeps), nothing records the new version, and `plan` shows the
/// change pending. The failed refresh is not started again by the next run; once the cause is
/// gone and the user starts it again by hand (as the error says), a run follows it to its
/// end, records the version, and the stack is converged.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_instance_refresh_is_an_error_and_the_template_change_stays_pending() {
    let s = setup().await;
    s.run(&["reconcile", "--once"]).expect(0);
    let instances = s.group_instances().await;
    assert_eq!(instances.len(), 2);
    let reason =
        "Instances failed to pass ELB health checks: i-0f00 (target group monitoring-main)";
    s.aws.emulator.configure(|e| {
        e.refresh_outcome = RefreshOutcome::Failed {
            reason: reason.into(),
        }
    });

    edit(s.dir.path(), "grafana.toml", "t3.small", "t3.medium");
    let run = s.run(&["reconcile", "--once"]);
    run.expect(1);
    assert_eq!(run.count("StartInstanceRefresh"), 1, "{}", run.stderr);
    let asg = s.aws.autoscaling().await;
    let refreshes = asg
        .describe_instance_refreshes()
        .auto_scaling_group_name("monitoring-main")
        .send()
        .await
        .unwrap();
    let [failed] = refreshes.instance_refreshes() else {
        panic!("{refreshes:?}")
    };
    assert_eq!(failed.status().unwrap().as_str(), "Failed");
    let id = failed.instance_refresh_id().unwrap().to_string();
    let template = s
        .group()
        .await
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    let message = format!(
        "instance refresh {id} of Auto Scaling group monitoring-main toward launch template {template} version 2 ended Failed: {reason}."
    );
    assert!(
        run.stdout.contains(&message),
        "{message} in\n{}\n{}",
        run.stdout,
        run.stderr
    );
    let group = s.group().await;
    assert_eq!(group.launch_template().unwrap().version(), Some("1"));
    assert_eq!(recorded_version(&group).as_deref(), Some("1"));
    assert_eq!(s.group_instances().await, instances, "nothing replaced");

    // The change is still pending, with what happened to it.
    let plan = s.run(&["plan"]);
    plan.expect(2);
    for line in [
        "~ grafana.main (",
        "launch_template.version: 1 → 2",
        "instance_refresh: 1 → 2",
        message.as_str(),
    ] {
        assert!(plan.stdout.contains(line), "{line} in\n{}", plan.stdout);
    }
    assert_eq!(plan.count("StartInstanceRefresh"), 0);

    // The next run neither starts it again nor records anything: the same error. The
    // group's provisioning does not wait for it: a change of it reaches the instances.
    edit(
        s.dir.path(),
        "grafana.toml",
        r#"allow_sign_up = "false""#,
        r#"allow_sign_up = "true""#,
    );
    let run = s.run(&["reconcile", "--once"]);
    run.expect(1);
    assert!(run.stdout.contains(&message), "{}", run.stdout);
    for operation in [
        "StartInstanceRefresh",
        "CreateLaunchTemplateVersion",
        "UpdateAutoScalingGroup",
    ] {
        assert_eq!(run.count(operation), 0, "{operation}:\n{}", run.stderr);
    }
    assert!(run.count("SendCommand") > 0, "{}", run.stderr);
    for i in &instances {
        let ini =
            std::fs::read_to_string(s.sandboxes.path().join(i).join("etc/grafana/grafana.ini"))
                .unwrap();
        assert!(ini.contains("allow_sign_up = true"), "{ini}");
    }
    assert_eq!(
        recorded_version(&s.group().await).as_deref(),
        Some("1"),
        "nothing recorded"
    );

    // The cause fixed, the refresh started again by hand, as the error says: followed to its
    // end and recorded.
    s.aws
        .emulator
        .configure(|e| e.refresh_outcome = RefreshOutcome::Successful);
    asg.start_instance_refresh()
        .auto_scaling_group_name("monitoring-main")
        .desired_configuration(
            aws_sdk_autoscaling::types::DesiredConfiguration::builder()
                .launch_template(
                    aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                        .launch_template_id(&template)
                        .version("2")
                        .build(),
                )
                .build(),
        )
        .preferences(
            aws_sdk_autoscaling::types::RefreshPreferences::builder()
                .skip_matching(true)
                .min_healthy_percentage(50)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    assert_eq!(run.count("StartInstanceRefresh"), 0, "{}", run.stderr);
    let group = s.group().await;
    assert_eq!(group.launch_template().unwrap().version(), Some("2"));
    assert_eq!(recorded_version(&group).as_deref(), Some("2"));
    let replaced = s.group_instances().await;
    assert_eq!(replaced.len(), 2, "{replaced:?}");
    assert!(
        replaced.iter().all(|i| !instances.contains(i)),
        "{replaced:?}"
    );
    for i in &replaced {
        check_provisioning(&s.sandboxes.path().join(i));
    }
    s.run(&["plan"]).expect(0);
}

/// A second template change while the refresh of the first still runs: the run waits for it
/// and writes nothing to the group's launch template meanwhile (AWS refuses that while a
/// refresh with a desired configuration is active); once it has ended the newest version
/// gets its own refresh, and only the version that refresh reached is recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_template_change_during_a_refresh_waits_for_it_without_repinning_the_group() {
    let s = setup().await;
    s.run(&["reconcile", "--once"]).expect(0);
    s.aws.emulator.configure(|e| e.refresh_polls = 1000);
    let quick = [("STACKWARDEN_WAIT_TIMEOUT", "3s")];

    edit(s.dir.path(), "grafana.toml", "t3.small", "t3.medium");
    let run = s.run_with(&["reconcile", "--once"], &quick);
    assert_eq!(run.count("StartInstanceRefresh"), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("(STACKWARDEN_WAIT_TIMEOUT)"),
        "{}",
        run.stderr
    );
    run.expect(1);
    let plan = s.run(&["plan"]);
    plan.expect(2);
    assert!(
        plan.stdout
            .contains("toward launch template version 2: the version is recorded once it succeeds"),
        "{}",
        plan.stdout
    );

    edit(s.dir.path(), "grafana.toml", "t3.medium", "t3.large");
    let run = s.run_with(&["reconcile", "--once"], &quick);
    run.expect(1);
    assert_eq!(
        run.count("CreateLaunchTemplateVersion"),
        1,
        "{}",
        run.stderr
    );
    for operation in ["UpdateAutoScalingGroup", "StartInstanceRefresh"] {
        assert_eq!(run.count(operation), 0, "{operation}:\n{}", run.stderr);
    }
    assert!(
        run.stderr.contains("version 3 is rolled out after it ends"),
        "{}",
        run.stderr
    );
    let group = s.group().await;
    assert_eq!(group.launch_template().unwrap().version(), Some("1"));
    assert_eq!(recorded_version(&group).as_deref(), Some("1"));

    s.aws.emulator.configure(|e| e.refresh_polls = 2);
    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    assert_eq!(run.count("StartInstanceRefresh"), 1, "{}", run.stderr);
    let group = s.group().await;
    assert_eq!(group.launch_template().unwrap().version(), Some("3"));
    assert_eq!(recorded_version(&group).as_deref(), Some("3"));
    let refreshes = s
        .aws
        .autoscaling()
        .await
        .describe_instance_refreshes()
        .auto_scaling_group_name("monitoring-main")
        .send()
        .await
        .unwrap();
    let outcomes: Vec<(&str, Option<&str>)> = refreshes
        .instance_refreshes()
        .iter()
        .map(|r| {
            (
                r.status().unwrap().as_str(),
                r.desired_configuration()
                    .and_then(|d| d.launch_template())
                    .and_then(|t| t.version()),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [("Successful", Some("3")), ("Successful", Some("2"))],
        "newest first"
    );
    s.run(&["plan"]).expect(0);
}

/// A create that an earlier run made and AWS lists only a moment later (that run was killed
/// before it saw the answer): this run read the account before the template existed, so its
/// own `CreateLaunchTemplate` is refused as a name taken. The template carries the node's own
/// tags, so the node looks for it again rather than parking as if the name were someone
/// else's; the next pass finds it and uses it. One template, and the group launches from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_refused_for_a_name_an_earlier_run_made_is_looked_for_again() {
    use aws_sdk_ec2::types::{RequestLaunchTemplateData, ResourceType, Tag, TagSpecification};
    let s = setup().await;
    // The run's create is held at the emulator long enough for the earlier run's to land.
    s.aws.emulator.inject(
        Fault::on(
            "ec2",
            "CreateLaunchTemplate",
            FaultKind::Latency { millis: 5000 },
        )
        .times(1),
    );
    let mut cmd = crate::harness::command(Some(&s.aws.endpoint), &["reconcile", "--once", s.dir()]);
    // The engine logs what waits, and why, at info.
    cmd.env("RUST_LOG", "info,aws=warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let mut polls = 0;
    while s.aws.emulator.fault_hits() == [0] {
        polls += 1;
        assert!(polls < 6000, "the run never created its launch template");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ec2 = s.aws.ec2().await;
    let tags = [
        ("stackwarden:stack", "monitoring"),
        ("stackwarden:id", "grafana.main.launch_template"),
    ]
    .map(|(k, v)| Tag::builder().key(k).value(v).build());
    let earlier = ec2
        .create_launch_template()
        .launch_template_name("monitoring-main")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id("ami-12c6146b")
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::LaunchTemplate)
                .set_tags(Some(tags.to_vec()))
                .build(),
        )
        .send()
        .await
        .expect("the earlier run's create lands before this run's");
    let earlier = earlier
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    let out = child.wait_with_output().unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    run.expect(0);
    let refused = s
        .aws
        .emulator
        .calls()
        .iter()
        .filter(|c| c.operation == "CreateLaunchTemplate" && c.status == 400)
        .count();
    assert_eq!(refused, 1, "this run's create was refused as a name taken");
    assert!(
        run.stderr.contains(
            "launch template monitoring-main was made by an earlier run and is not listed yet: looked for again"
        ),
        "{}",
        run.stderr
    );
    let templates = ec2.describe_launch_templates().send().await.unwrap();
    let ids: Vec<&str> = templates
        .launch_templates()
        .iter()
        .filter_map(|t| t.launch_template_id())
        .collect();
    assert_eq!(ids, [earlier.as_str()]);
    let group = s.group().await;
    assert_eq!(
        group.launch_template().unwrap().launch_template_id(),
        Some(earlier.as_str())
    );
    s.run(&["plan"]).expect(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_only_is_a_plan_warning_and_the_password_can_be_a_secret() {
    let s = setup().await;
    let text = std::fs::read_to_string(s.dir.path().join("grafana.toml")).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("certificate_arn"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        s.dir.path().join("grafana.toml"),
        text.replace(
            "admin_password_ssm_parameter = \"/grafana/admin\"",
            "admin_password_secret = \"grafana/admin\"",
        ),
    )
    .unwrap();
    s.aws
        .secrets()
        .await
        .create_secret()
        .name("grafana/admin")
        .secret_string(PASSWORD)
        .send()
        .await
        .unwrap();
    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    assert!(run.stderr.contains("plain HTTP"), "{}", run.stderr);
    let instances = s.group_instances().await;
    assert_eq!(instances.len(), 2, "{instances:?}");
    s.password_fetched_by_the_hosts_only("GetSecretValue", 2)
        .await;
    for id in instances {
        let root = s.sandboxes.path().join(id);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/grafana/admin-password")).unwrap(),
            PASSWORD
        );
    }
    let listeners = s.listeners().await;
    assert_eq!(listeners.keys().copied().collect::<Vec<_>>(), [80]);
    assert_eq!(
        listeners[&80].default_actions()[0].r#type(),
        Some(&ActionTypeEnum::Forward)
    );
    let plan = s.run(&["plan"]);
    plan.expect(0);
    assert!(plan.stderr.contains("plain HTTP"), "{}", plan.stderr);

    // A rotation (a new secret version) is pushed; the hash tag reveals nothing of the value.
    s.aws
        .secrets()
        .await
        .put_secret_value()
        .secret_id("grafana/admin")
        .secret_string(format!("{PASSWORD}-rotated"))
        .send()
        .await
        .unwrap();
    let plan = s.run(&["plan"]);
    plan.expect(2);
    assert!(
        plan.stdout.contains("(sensitive, secret grafana/admin)"),
        "{}",
        plan.stdout
    );
    s.run(&["reconcile", "--once"]).expect(0);
    let instances = s.group_instances().await;
    assert_eq!(instances.len(), 2, "{instances:?}");
    s.password_fetched_by_the_hosts_only("GetSecretValue", 4)
        .await;
    for id in instances {
        let root = s.sandboxes.path().join(id);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/grafana/admin-password")).unwrap(),
            format!("{PASSWORD}-rotated")
        );
    }
}

#[test]
fn bad_grafana_input_is_rejected_without_aws_calls() {
    let cases: [(&str, &str, &str); 5] = [
        ("min_size = 1\nmax_size = 2", "min_size = 3\nmax_size = 2", "0 <= min_size (3) <= max_size (2)"),
        (
            "subnets = [\"subnet-a\", \"subnet-b\"] }",
            "subnets = [\"subnet-a\", \"subnet-b\"], require_https = true }",
            "no alb.certificate_arn",
        ),
        ("dashboards = []", "dashboards = [\"broken.json\"]", "broken.json"),
        (
            "cloudwatch = true",
            "cloudwatch = true, prometheus_url = \"http://${host.nothing.private_ip}:9090\"",
            "host.nothing",
        ),
        ("cloudwatch = true", "cloudwatch = true, admin_password_secret = \"a\", admin_password_ssm_parameter = \"b\"", "not both"),
    ];
    for (from, to, message) in cases {
        let dir = default_stack();
        std::fs::write(
            dir.path().join("grafana.toml"),
            r#"[grafana.main]
ami = "ami-12c6146b"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = { subnets = ["subnet-a", "subnet-b"] }
provisioning = { dashboards = [], cloudwatch = true }
"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.json"), "{\"panels\": [").unwrap();
        edit(dir.path(), "grafana.toml", from, to);
        let run = stackwarden(Some("http://127.0.0.1:9"), &["plan", path_str(dir.path())]);
        run.expect(1);
        assert!(run.stderr.contains(message), "{message} in\n{}", run.stderr);
        assert!(
            run.stderr.contains("grafana.toml:") || run.stderr.contains("broken.json:"),
            "{}",
            run.stderr
        );
        assert_eq!(run.calls().0, 0);
    }
}

/// The load balancer deleted out of band while its group runs: one `reconcile --once` makes
/// the load balancer and its listeners again, and nothing else: the Auto Scaling Group (AWS
/// refuses a second create of its name), its instances, its target group and its template are
/// the same objects as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_load_balancer_is_rebuilt_alone_while_the_group_keeps_running() {
    let s = setup().await;
    s.run(&["reconcile", "--once"]).expect(0);
    let before = s.group().await;
    let instances = s.group_instances().await;
    assert_eq!(instances.len(), 2, "{instances:?}");
    assert_eq!(before.target_group_arns().len(), 1);

    let elb = s.aws.elb().await;
    let lb = elb
        .describe_load_balancers()
        .names("monitoring-main")
        .send()
        .await
        .unwrap()
        .load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_string();
    elb.delete_load_balancer()
        .load_balancer_arn(&lb)
        .send()
        .await
        .unwrap();

    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    for (operation, calls) in [
        ("CreateLoadBalancer", 1),
        ("CreateListener", 2),
        ("CreateAutoScalingGroup", 0),
        ("CreateTargetGroup", 0),
        ("CreateLaunchTemplate", 0),
        ("CreateLaunchTemplateVersion", 0),
        ("CreateSecurityGroup", 0),
        ("StartInstanceRefresh", 0),
        ("SendCommand", 0),
    ] {
        assert_eq!(run.count(operation), calls, "{operation}:\n{}", run.stderr);
    }
    let after = s.group().await;
    assert_eq!(s.group_instances().await, instances, "the same instances");
    assert_eq!(
        after.created_time(),
        before.created_time(),
        "the same group"
    );
    assert_eq!(after.target_group_arns(), before.target_group_arns());
    assert_eq!(after.launch_template(), before.launch_template());
    assert_eq!(s.listeners().await.len(), 2);
    s.run(&["plan"]).expect(0);
}

/// Seed 000's topology, both ways: the Prometheus host admits Grafana's instances on 9090 by
/// their security group, Grafana's instances admit the host on 9100 (node_exporter), and
/// Grafana's data source names the host's private address. Each security group is a node of its
/// own, so this is no reference cycle: `validate` accepts it and one `reconcile --once`
/// converges it from empty.
#[tokio::test(flavor = "multi_thread")]
async fn security_groups_admitting_each_other_across_a_host_and_grafana_converge_in_one_pass() {
    let s = setup().await;
    std::fs::write(
        s.dir.path().join("host.toml"),
        r#"[host.prometheus]
ami = "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
instance_type = "t3.medium"
security_group = { ingress = [
  { port = 9090, security_groups = ["${grafana.main.security_group_id}"], description = "Grafana" },
] }
"#,
    )
    .unwrap();
    edit(
        s.dir.path(),
        "grafana.toml",
        "[grafana.main.alb]",
        "security_group = { ingress = [{ port = 9100, security_groups = [\"${host.prometheus.security_group_id}\"] }] }\n\n[grafana.main.alb]",
    );
    edit(
        s.dir.path(),
        "grafana.toml",
        "cloudwatch = true",
        "cloudwatch = true\nprometheus_url = \"http://${host.prometheus.private_ip}:9090\"",
    );
    s.run(&["validate"]).expect(0);
    let plan = s.run(&["plan"]);
    plan.expect(2);
    for node in [
        "host.prometheus.security_group",
        "host.prometheus.ingress",
        "grafana.main.security_group.alb",
        "grafana.main.security_group.instances",
        "grafana.main.ingress.alb",
        "grafana.main.ingress.instances",
    ] {
        assert!(plan.stdout.contains(node), "{node} in\n{}", plan.stdout);
    }

    s.run(&["reconcile", "--once"]).expect(0);
    let again = s.run(&["plan"]);
    again.expect(0);
    assert!(again.stdout.contains("No changes"), "{}", again.stdout);

    // Each group admits the other; the host and the instances are in their own.
    let ec2 = s.aws.ec2().await;
    let group = |name: &'static str| {
        let ec2 = ec2.clone();
        async move {
            let out = ec2
                .describe_security_groups()
                .filters(Filter::builder().name("group-name").values(name).build())
                .send()
                .await
                .unwrap();
            assert_eq!(out.security_groups().len(), 1, "one group named {name}");
            out.security_groups()[0].clone()
        }
    };
    let host_sg = group("monitoring-prometheus").await;
    let inst_sg = group("monitoring-main-instances").await;
    let sources = |g: &aws_sdk_ec2::types::SecurityGroup, port: i32| -> Vec<String> {
        g.ip_permissions()
            .iter()
            .filter(|p| p.from_port() == Some(port))
            .flat_map(|p| p.user_id_group_pairs())
            .filter_map(|p| p.group_id().map(String::from))
            .collect()
    };
    let inst_id = inst_sg.group_id().unwrap().to_string();
    let host_id = host_sg.group_id().unwrap().to_string();
    assert_eq!(sources(&host_sg, 9090), std::slice::from_ref(&inst_id));
    assert_eq!(sources(&inst_sg, 9100), std::slice::from_ref(&host_id));
    let hosts = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:stackwarden:id")
                .values("host.prometheus")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let host: Vec<_> = hosts
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(host.len(), 1);
    let host_groups: Vec<_> = host[0]
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id())
        .collect();
    assert_eq!(host_groups, [host_id.as_str()]);
    let ip = host[0].private_ip_address().unwrap();

    // Grafana's data source on every instance names the host.
    let instances = s.group_instances().await;
    assert_eq!(instances.len(), 2);
    for i in &instances {
        let datasources = std::fs::read_to_string(
            s.sandboxes
                .path()
                .join(i)
                .join("etc/grafana/provisioning/datasources/stackwarden.yaml"),
        )
        .unwrap();
        assert!(
            datasources.contains(&format!("http://{ip}:9090")),
            "{datasources}"
        );
    }
}

/// What identifies each object of the group: a part restored must leave the others as they were.
#[derive(Debug, PartialEq)]
struct Identities {
    group_created: Option<aws_smithy_types::DateTime>,
    instances: Vec<String>,
    load_balancer: String,
    target_group: String,
    template: String,
    listeners: BTreeMap<i32, String>,
}

impl Setup {
    async fn identities(&self) -> Identities {
        let elb = self.aws.elb().await;
        let lb = elb
            .describe_load_balancers()
            .names("monitoring-main")
            .send()
            .await
            .unwrap();
        let tg = elb
            .describe_target_groups()
            .names("monitoring-main")
            .send()
            .await
            .unwrap();
        let template = self
            .aws
            .ec2()
            .await
            .describe_launch_templates()
            .launch_template_names("monitoring-main")
            .send()
            .await
            .unwrap();
        Identities {
            group_created: self.group().await.created_time().cloned(),
            instances: self.group_instances().await,
            load_balancer: lb.load_balancers()[0]
                .load_balancer_arn()
                .unwrap()
                .to_string(),
            target_group: tg.target_groups()[0]
                .target_group_arn()
                .unwrap()
                .to_string(),
            template: template.launch_templates()[0]
                .launch_template_id()
                .unwrap()
                .to_string(),
            listeners: self
                .listeners()
                .await
                .into_iter()
                .map(|(port, l)| (port, l.listener_arn().unwrap().to_string()))
                .collect(),
        }
    }

    /// One `reconcile --once` after a loss: exactly these creates, no instance started,
    /// stopped or replaced, and converged after it.
    fn restore(&self, creates: &[(&str, u64)]) {
        let run = self.run(&["reconcile", "--once"]);
        run.expect(0);
        let all = [
            "CreateLoadBalancer",
            "CreateListener",
            "CreateTargetGroup",
            "CreateLaunchTemplate",
            "CreateLaunchTemplateVersion",
            "CreateAutoScalingGroup",
            "CreateSecurityGroup",
            "RunInstances",
            "TerminateInstances",
            "StartInstanceRefresh",
            "SendCommand",
        ];
        for operation in all {
            let want = creates
                .iter()
                .find(|(o, _)| *o == operation)
                .map_or(0, |(_, n)| *n);
            assert_eq!(run.count(operation), want, "{operation}:\n{}", run.stderr);
        }
        let plan = self.run(&["plan"]);
        plan.expect(0);
    }
}

/// Each part of a Grafana group lost out of band (the HTTPS listener, the target group, the
/// launch template), one `reconcile --once` makes that part again and nothing else: the
/// group, its instances and every other object keep their identities.
#[tokio::test(flavor = "multi_thread")]
async fn each_lost_part_of_a_grafana_group_is_restored_alone() {
    let s = setup().await;
    s.run(&["reconcile", "--once"]).expect(0);
    let elb = s.aws.elb().await;
    let before = s.identities().await;
    assert_eq!(before.instances.len(), 2);
    assert_eq!(before.listeners.len(), 2);

    // The HTTPS listener.
    elb.delete_listener()
        .listener_arn(&before.listeners[&443])
        .send()
        .await
        .unwrap();
    s.restore(&[("CreateListener", 1)]);
    let after = s.identities().await;
    assert_eq!(after.listeners[&80], before.listeners[&80]);
    let before = Identities {
        listeners: after.listeners.clone(),
        ..before
    };
    assert_eq!(after, before);

    // The target group (the listener forwarding to it deleted first, as AWS requires; the
    // group is detached from it by the deletion).
    elb.delete_listener()
        .listener_arn(&before.listeners[&443])
        .send()
        .await
        .unwrap();
    elb.delete_target_group()
        .target_group_arn(&before.target_group)
        .send()
        .await
        .unwrap();
    s.restore(&[("CreateTargetGroup", 1), ("CreateListener", 1)]);
    let after = s.identities().await;
    assert_ne!(after.target_group, before.target_group);
    assert_eq!(
        s.group().await.target_group_arns(),
        std::slice::from_ref(&after.target_group),
        "the group is attached to the new target group alone"
    );
    let before = Identities {
        listeners: after.listeners.clone(),
        target_group: after.target_group.clone(),
        ..before
    };
    assert_eq!(after, before);

    // The launch template.
    s.aws
        .ec2()
        .await
        .delete_launch_template()
        .launch_template_id(&before.template)
        .send()
        .await
        .unwrap();
    s.restore(&[("CreateLaunchTemplate", 1)]);
    let after = s.identities().await;
    assert_ne!(after.template, before.template);
    let pinned = s.group().await.launch_template().cloned().unwrap();
    assert_eq!(pinned.launch_template_id(), Some(after.template.as_str()));
    assert_eq!(
        after,
        Identities {
            template: after.template.clone(),
            ..before
        }
    );
}

impl Setup {
    /// The two subnets the setup's stack uses.
    fn subnets(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.path().join("grafana.toml")).unwrap();
        let line = text.lines().find(|l| l.starts_with("subnets = ")).unwrap();
        line.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }
}

/// The seed repository's Grafana as Terraform made it, taken over part by part (each object
/// adopted by its id): nothing of it is created again and every object keeps its identity; the
/// objects get the stack's tags beside Terraform's; the template gets the desired state's
/// version, rolled out by one instance refresh, and the replacements get the provisioning.
/// Once taken over, a plan reads the group and the template by their tags alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_grafana_group_made_by_terraform_is_taken_over_without_recreating_anything() {
    let s = setup().await;
    let ami = s
        .aws
        .ssm()
        .await
        .get_parameter()
        .name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
        .send()
        .await
        .unwrap()
        .parameter()
        .unwrap()
        .value()
        .unwrap()
        .to_string();
    let tf = terraform_grafana(&s.aws, &s.subnets(), &ami).await;
    assert_eq!(tf.instances.len(), 1, "{:?}", tf.instances);
    let text = std::fs::read_to_string(s.dir.path().join("grafana.toml")).unwrap();
    let text = text
        .replacen(
            "[grafana.main]\n",
            &format!(
                "[grafana.main]\nadopt = \"monitoring-grafana-asg\"\nlaunch_template = {{ adopt = \"{}\" }}\n",
                tf.template
            ),
            1,
        )
        .replacen(
            "[grafana.main.alb]\n",
            &format!(
                "[grafana.main.alb]\nadopt = \"{}\"\nsecurity_group = {{ adopt = \"{}\" }}\n",
                tf.load_balancer, tf.alb_group
            ),
            1,
        );
    let text = format!(
        "{text}\n[grafana.main.target_group]\nadopt = \"{}\"\n\n[grafana.main.security_group]\nadopt = \"{}\"\n",
        tf.target_group, tf.instance_group
    );
    std::fs::write(s.dir.path().join("grafana.toml"), text).unwrap();

    let plan = s.run(&["plan"]);
    plan.expect(2);
    for note in [
        "taking over the group it adopts",
        "adopting existing launch template",
        "adopting existing load balancer",
        "adopting existing target group",
    ] {
        assert!(plan.stdout.contains(note), "{note} in\n{}", plan.stdout);
    }
    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    for (operation, n) in [
        ("CreateAutoScalingGroup", 0),
        ("CreateLoadBalancer", 0),
        ("CreateTargetGroup", 0),
        ("CreateLaunchTemplate", 0),
        ("CreateSecurityGroup", 0),
        ("DeleteListener", 0),
        ("CreateListener", 1),
        ("CreateLaunchTemplateVersion", 1),
        ("StartInstanceRefresh", 1),
    ] {
        assert_eq!(run.count(operation), n, "{operation}:\n{}", run.stderr);
    }
    // The refresh replaces Terraform's instance; the replacement gets the provisioning.
    for _ in 0..6 {
        let run = s.run(&["reconcile", "--once"]);
        run.expect(0);
        assert_eq!(run.count("StartInstanceRefresh"), 0);
        assert_eq!(run.count("CreateLaunchTemplateVersion"), 0);
    }
    let plan = s.run(&["plan"]);
    plan.expect(0);
    // Taken over: found by its tags, no read by id any more.
    assert_eq!(
        plan.count("DescribeAutoScalingGroups"),
        1,
        "{}",
        plan.stderr
    );
    assert_eq!(plan.count("DescribeLaunchTemplates"), 1, "{}", plan.stderr);
    assert_eq!(plan.count("DescribeSecurityGroups"), 1, "{}", plan.stderr);

    let group = s.group_named("monitoring-grafana-asg").await;
    assert_eq!(group.created_time().cloned(), tf.created);
    let pinned = group.launch_template().unwrap();
    assert_eq!(pinned.launch_template_id(), Some(tf.template.as_str()));
    assert_eq!(pinned.version(), Some("2"));
    assert_eq!(
        group.target_group_arns(),
        std::slice::from_ref(&tf.target_group)
    );
    // Sized as desired, every instance from the desired template and provisioned.
    let instances = s.group_instances_of("monitoring-grafana-asg").await;
    assert_eq!(instances.len(), 2, "{instances:?}");
    assert!(
        instances.iter().all(|i| !tf.instances.contains(i)),
        "Terraform's instance was refreshed away: {instances:?}"
    );
    for id in &instances {
        check_provisioning(&s.sandboxes.path().join(id));
    }
    let tags: BTreeMap<String, String> = group
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    assert_eq!(tags["stackwarden:id"], "grafana.main");
    assert_eq!(tags["ManagedBy"], "terraform");

    let elb = s.aws.elb().await;
    let lbs = elb.describe_load_balancers().send().await.unwrap();
    assert_eq!(lbs.load_balancers().len(), 1);
    assert_eq!(
        lbs.load_balancers()[0].load_balancer_arn(),
        Some(tf.load_balancer.as_str())
    );
    let tgs = elb.describe_target_groups().send().await.unwrap();
    assert_eq!(tgs.target_groups().len(), 1);
    let tagged = elb
        .describe_tags()
        .resource_arns(&tf.load_balancer)
        .resource_arns(&tf.target_group)
        .send()
        .await
        .unwrap();
    assert_eq!(tagged.tag_descriptions().len(), 2);
    for d in tagged.tag_descriptions() {
        let keys: BTreeSet<&str> = d.tags().iter().filter_map(|t| t.key()).collect();
        assert!(
            keys.contains("stackwarden:id") && keys.contains("ManagedBy"),
            "{d:?}"
        );
    }
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(&tf.load_balancer)
        .send()
        .await
        .unwrap();
    let ports: BTreeMap<i32, &str> = listeners
        .listeners()
        .iter()
        .map(|l| (l.port().unwrap(), l.listener_arn().unwrap()))
        .collect();
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert_eq!(
        ports[&80], tf.listener,
        "the listener kept, redirecting now"
    );
    let tagged = elb
        .describe_tags()
        .resource_arns(&tf.listener)
        .send()
        .await
        .unwrap();
    assert!(
        tagged.tag_descriptions()[0]
            .tags()
            .iter()
            .any(|t| t.key() == Some("stackwarden:id")
                && t.value() == Some("grafana.main.listener.80")),
        "the listener is claimed by its node before it is changed: {tagged:?}"
    );

    let ec2 = s.aws.ec2().await;
    let templates = ec2.describe_launch_templates().send().await.unwrap();
    assert_eq!(templates.launch_templates().len(), 1);
    let template = &templates.launch_templates()[0];
    assert_eq!(template.launch_template_id(), Some(tf.template.as_str()));
    let keys: BTreeSet<&str> = template.tags().iter().filter_map(|t| t.key()).collect();
    assert!(
        keys.contains("stackwarden:id") && keys.contains("ManagedBy"),
        "{keys:?}"
    );
    let groups = ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("tag:ManagedBy")
                .values("terraform")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let ids: BTreeSet<&str> = groups
        .security_groups()
        .iter()
        .filter(|g| g.tags().iter().any(|t| t.key() == Some("stackwarden:id")))
        .filter_map(|g| g.group_id())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([tf.alb_group.as_str(), tf.instance_group.as_str()])
    );
}

/// A cold run as on AWS: Auto Scaling refuses the launch template for seconds while IAM
/// propagates the group's new instance profile, and the admin password's parameter is listed
/// after pages of others (DescribeParameters filters after paging, so those pages come back
/// empty). One `reconcile --once` waits for the first and reads every page for the second:
/// the group is made, each instance gets its provisioning with the password, plan is clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_group_waits_for_its_new_instance_profile_and_finds_its_password_past_empty_pages() {
    let s = setup_with(Settings {
        profile_propagation: std::time::Duration::from_secs(3),
        ..Settings::default()
    })
    .await;
    let ssm = s.aws.ssm().await;
    ssm.delete_parameter()
        .name("/grafana/admin")
        .send()
        .await
        .unwrap();
    for i in 0..60 {
        ssm.put_parameter()
            .name(format!("/app/setting-{i:02}"))
            .value("x")
            .r#type(ParameterType::String)
            .send()
            .await
            .unwrap();
    }
    ssm.put_parameter()
        .name("/grafana/admin")
        .value(PASSWORD)
        .r#type(ParameterType::SecureString)
        .send()
        .await
        .unwrap();

    let run = s.run(&["reconcile", "--once"]);
    run.expect(0);
    assert!(
        run.stderr.contains("CreateAutoScalingGroup")
            && run.stderr.contains(
                "Invalid IAM Instance Profile name (a new object AWS is still propagating)"
            ),
        "{}",
        run.stderr
    );
    assert!(
        run.count("DescribeParameters") >= 2,
        "every page is read: {}",
        run.stderr
    );
    let instances = s.group_instances().await;
    assert_eq!(instances.len(), 2);
    for id in &instances {
        check_provisioning(&s.sandboxes.path().join(id));
    }
    s.run(&["plan"]).expect(0);
}
