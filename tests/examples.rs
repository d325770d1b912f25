//! The example desired-state directories (examples/), one per seed stack that users build today
//! with Terraform. Each validates offline, converges from empty in one `reconcile --once`
//! against the emulator, then plans clean and reconciles again without a write; and what its
//! seed describes is checked in AWS, including the configuration pushed to its hosts.
//!
//! Run Command pushes report success without running here (the emulator's default): the reload
//! commands are `systemctl restart ...` for real hosts. The push script itself runs for real
//! in tests/hosts.rs, tests/fleet.rs and tests/grafana.rs; here the pushed files are read back
//! from the commands sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aws_sdk_ec2::types::Filter;

use crate::harness::{
    command, copy_dir, edit, path_str, run, run_commands, script_files, Aws, Run,
};

/// An example copied to a temporary directory, with a fresh emulator to converge it against.
pub(crate) struct Example {
    pub(crate) aws: Aws,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) sdk: aws_config::SdkConfig,
}

/// A running instance, as the tests look at it.
#[derive(Debug)]
struct Running {
    id: String,
    private_ip: String,
    /// Its (first) security group.
    group: String,
    tags: BTreeMap<String, String>,
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

impl Example {
    /// Validates `examples/<name>` as it is in the repository (offline, no AWS call), then
    /// copies it for the test to fill in what a user fills in.
    async fn copy(name: &str, region: &'static str) -> Example {
        let original = examples().join(name);
        let v = run(command(None, &["validate", path_str(&original)]));
        v.expect(0);
        assert!(
            v.stderr.contains("AWS API calls: 0"),
            "validate made AWS calls:\n{}",
            v.stderr
        );
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&original, dir.path());
        let aws = Aws::start();
        let sdk = aws.sdk_in(region).await;
        Example { aws, dir, sdk }
    }

    /// Seeds 000 and 001 (`ec2-prometheus-grafana-alb`) with what the example asks a user to
    /// fill in: subnets, the certificate, and the admin password in SSM.
    pub(crate) async fn seed_000() -> Example {
        let ex = Example::copy("ec2-prometheus-grafana-alb", "us-east-1").await;
        ex.fill_in_subnets(
            "grafana.toml",
            &["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2"],
        )
        .await;
        ex.fill_in_subnets(
            "grafana.toml",
            &["subnet-0bbbbbbbbbbbbbbb1", "subnet-0bbbbbbbbbbbbbbb2"],
        )
        .await;
        // The emulator's load balancers accept an IAM server certificate where ACM's would be.
        let cert = aws_sdk_iam::Client::new(&ex.sdk)
            .upload_server_certificate()
            .server_certificate_name("grafana")
            .certificate_body("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
            .private_key("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
            .send()
            .await
            .unwrap();
        edit(
            ex.dir.path(),
            "grafana.toml",
            "arn:aws:acm:us-east-1:123456789012:certificate/0c1d2e3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f",
            cert.server_certificate_metadata().unwrap().arn(),
        );
        aws_sdk_ssm::Client::new(&ex.sdk)
            .put_parameter()
            .name("/monitoring/grafana-admin")
            .value("correct horse battery staple")
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send()
            .await
            .unwrap();
        ex
    }

    /// `stackwarden ARGS` on the copy, in the region its `[stack]` names.
    fn stackwarden(&self, args: &[&str]) -> Run {
        let mut cmd = command(Some(&self.aws.endpoint), args);
        cmd.arg(path_str(self.dir.path())).env_remove("AWS_REGION");
        run(cmd)
    }

    /// One `reconcile --once` converges it; `plan` then finds nothing to do, and a second pass
    /// writes nothing.
    fn converge(&self) -> Run {
        let applied = self.stackwarden(&["reconcile", "--once"]);
        applied.expect(0);
        assert!(
            applied.calls().1 > 0,
            "nothing was written:\n{}",
            applied.stderr
        );
        let plan = self.stackwarden(&["plan"]);
        plan.expect(0);
        assert!(plan.stdout.contains("No changes"), "{}", plan.stdout);
        let again = self.stackwarden(&["reconcile", "--once"]);
        again.expect(0);
        assert_eq!(
            again.calls().1,
            0,
            "a converged pass wrote:\n{}",
            again.stderr
        );
        applied
    }

    /// Puts the emulator's default subnets (one per zone) where the example has the
    /// placeholders a user replaces with their own subnet ids.
    async fn fill_in_subnets(&self, file: &str, placeholders: &[&str]) {
        let out = aws_sdk_ec2::Client::new(&self.sdk)
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
        let mut subnets: Vec<&str> = out.subnets().iter().filter_map(|s| s.subnet_id()).collect();
        subnets.sort();
        for (placeholder, subnet) in placeholders.iter().zip(subnets) {
            let path = self.dir.path().join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(placeholder), "{file} lacks {placeholder}");
            std::fs::write(path, text.replace(placeholder, subnet)).unwrap();
        }
    }

    /// Running instances carrying a tag.
    async fn instances(&self, key: &str, value: &str) -> Vec<Running> {
        let out = aws_sdk_ec2::Client::new(&self.sdk)
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("running")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let mut found: Vec<Running> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| Running {
                id: i.instance_id().unwrap().to_string(),
                private_ip: i.private_ip_address().unwrap_or_default().to_string(),
                group: i.security_groups()[0].group_id().unwrap().to_string(),
                tags: i
                    .tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap_or_default().to_string(),
                            t.value().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
            })
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// The one running instance tagged `Role=<role>`.
    async fn host(&self, role: &str) -> Running {
        let mut found = self.instances("Role", role).await;
        assert_eq!(found.len(), 1, "running instances of {role}: {found:?}");
        found.remove(0)
    }

    /// The EBS volume attached to an instance at a device.
    async fn data_volume(&self, instance: &Running, device: &str) -> aws_sdk_ec2::types::Volume {
        let out = aws_sdk_ec2::Client::new(&self.sdk)
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name("attachment.instance-id")
                    .values(&instance.id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.volumes()
            .iter()
            .find(|v| v.attachments().iter().any(|a| a.device() == Some(device)))
            .unwrap_or_else(|| panic!("no volume at {device} on {}: {out:?}", instance.id))
            .clone()
    }

    /// The files the pushes carried: host path → content, the latest push of a path winning,
    /// with the instances each latest push went to.
    async fn pushed_files(&self) -> BTreeMap<String, (String, Vec<String>)> {
        let ssm = aws_sdk_ssm::Client::new(&self.sdk);
        let mut files = BTreeMap::new();
        for c in run_commands(&ssm).await {
            let targets = c.instance_ids().to_vec();
            let scripts = c
                .parameters()
                .and_then(|p| p.get("commands"))
                .cloned()
                .unwrap_or_default();
            for (path, content) in scripts.iter().flat_map(|s| script_files(s)) {
                files.insert(path, (content, targets.clone()));
            }
        }
        files
    }
}

fn yaml(text: &str) -> serde_json::Value {
    marked_yaml::from_yaml(0, text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

/// Writes pushed files under `root` at their host paths, then runs the real `promtool check
/// config` (Debian package prometheus) on the pushed prometheus.yml: the rendered config and
/// every rule file it names must pass, as they must on the host before a reload.
fn promtool_accepts(files: &BTreeMap<String, (String, Vec<String>)>) {
    let root = tempfile::tempdir().unwrap();
    for (path, (content, _)) in files {
        let target = root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, content).unwrap();
    }
    let out = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(root.path().join("etc/prometheus/prometheus.yml"))
        .output()
        .expect("promtool not found: run the tests with tests/run.sh, which installs prometheus");
    assert!(
        out.status.success(),
        "promtool rejected the pushed config:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ingress of a security group: (port, CIDRs, source groups).
async fn ingress(ec2: &aws_sdk_ec2::Client, group: &str) -> Vec<(i32, Vec<String>, Vec<String>)> {
    let out = ec2
        .describe_security_groups()
        .group_ids(group)
        .send()
        .await
        .unwrap();
    let mut rules: Vec<_> = out.security_groups()[0]
        .ip_permissions()
        .iter()
        .map(|p| {
            (
                p.from_port().unwrap_or_default(),
                p.ip_ranges()
                    .iter()
                    .filter_map(|r| r.cidr_ip().map(str::to_string))
                    .collect(),
                p.user_id_group_pairs()
                    .iter()
                    .filter_map(|g| g.group_id().map(str::to_string))
                    .collect(),
            )
        })
        .collect();
    rules.sort();
    rules
}

/// The one AMP workspace with this alias: (id, prometheus endpoint).
async fn workspace(amp: &aws_sdk_amp::Client, alias: &str) -> (String, String) {
    let list = amp.list_workspaces().alias(alias).send().await.unwrap();
    let live: Vec<_> = list
        .workspaces()
        .iter()
        .filter(|w| w.status().map(|s| s.status_code().as_str()) != Some("DELETING"))
        .collect();
    assert_eq!(live.len(), 1, "workspaces with alias {alias}: {live:?}");
    let id = live[0].workspace_id().to_string();
    let described = amp
        .describe_workspace()
        .workspace_id(&id)
        .send()
        .await
        .unwrap();
    let endpoint = described
        .workspace()
        .and_then(|w| w.prometheus_endpoint())
        .unwrap()
        .to_string();
    (id, endpoint)
}

/// The default version of the customer managed policy with this name.
async fn policy_document(iam: &aws_sdk_iam::Client, name: &str) -> String {
    let list = iam
        .list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .send()
        .await
        .unwrap();
    let p = list
        .policies()
        .iter()
        .find(|p| p.policy_name() == Some(name))
        .unwrap_or_else(|| panic!("no policy {name}"));
    let version = iam
        .get_policy_version()
        .policy_arn(p.arn().unwrap())
        .version_id(p.default_version_id().unwrap())
        .send()
        .await
        .unwrap();
    version
        .policy_version()
        .and_then(|v| v.document())
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_003_amp_amg_and_an_adot_host_converge_and_follow_a_recreated_workspace() {
    let ex = Example::copy("amp-amg-adot", "eu-west-1").await;
    ex.converge();
    let amp = aws_sdk_amp::Client::new(&ex.sdk);
    let iam = aws_sdk_iam::Client::new(&ex.sdk);

    // AMP: the workspace, its rule groups and its alertmanager definition.
    let (ws, endpoint) = workspace(&amp, "monitoring-test").await;
    let namespaces = amp
        .list_rule_groups_namespaces()
        .workspace_id(&ws)
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = namespaces
        .rule_groups_namespaces()
        .iter()
        .map(|n| n.name())
        .collect();
    assert_eq!(names, ["host"]);
    let definition = amp
        .describe_alert_manager_definition()
        .workspace_id(&ws)
        .send()
        .await
        .unwrap();
    assert_eq!(
        definition
            .alert_manager_definition()
            .and_then(|d| d.status())
            .map(|s| s.status_code().as_str()),
        Some("ACTIVE")
    );

    // Managed Grafana: Identity Center sign-in, the two groups in their roles.
    let grafana = aws_sdk_grafana::Client::new(&ex.sdk);
    let workspaces = grafana.list_workspaces().send().await.unwrap();
    let g = workspaces
        .workspaces()
        .iter()
        .find(|w| w.name() == Some("monitoring-test-grafana"))
        .expect("the Grafana workspace");
    let permissions = grafana
        .list_permissions()
        .workspace_id(g.id())
        .send()
        .await
        .unwrap();
    let mut roles: Vec<(String, String)> = permissions
        .permissions()
        .iter()
        .map(|p| {
            (
                p.role().as_str().to_string(),
                p.user().map(|u| u.id().to_string()).unwrap_or_default(),
            )
        })
        .collect();
    roles.sort();
    assert_eq!(
        roles,
        [
            (
                "ADMIN".to_string(),
                "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a".to_string()
            ),
            (
                "VIEWER".to_string(),
                "9067729b3d-3b0c7b2e-5f4e-4d61-9a38-0e1f2a3b4c5d".to_string()
            ),
        ]
    );

    // The host, with both agent configs pushed in the pass that launched it.
    let host = ex.host("monitored").await;
    for bundle in ["host_config.adot", "host_config.cloudwatch_agent"] {
        assert!(
            host.tags
                .contains_key(&format!("stackwarden:monitoring-test:{bundle}")),
            "{bundle} not recorded: {host:?}"
        );
    }
    let files = ex.pushed_files().await;
    let (adot, to) = &files["/opt/aws/aws-otel-collector/etc/config.yaml"];
    assert_eq!(to.as_slice(), std::slice::from_ref(&host.id));
    let adot = yaml(adot);
    assert_eq!(
        adot["exporters"]["prometheusremotewrite"]["endpoint"],
        format!("{endpoint}api/v1/remote_write")
    );
    assert_eq!(adot["extensions"]["sigv4auth"]["region"], "eu-west-1");
    let (agent, _) = &files["/opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json"];
    let agent: serde_json::Value = serde_json::from_str(agent).unwrap();
    assert_eq!(
        agent["logs"]["logs_collected"]["files"]["collect_list"][0]["log_group_name"],
        "/monitoring-test/system"
    );
    assert!(policy_document(&iam, "monitoring-test-remote_write")
        .await
        .contains(&ws));

    // The seed's pain: a recreated workspace broke the policy and the collector's endpoint.
    // Here one pass follows it: a new workspace, the policy and ADOT's config naming it, and
    // the same instance, never replaced.
    amp.delete_workspace()
        .workspace_id(&ws)
        .send()
        .await
        .unwrap();
    ex.converge();
    let (recreated, endpoint) = workspace(&amp, "monitoring-test").await;
    assert_ne!(recreated, ws);
    assert!(policy_document(&iam, "monitoring-test-remote_write")
        .await
        .contains(&recreated));
    let files = ex.pushed_files().await;
    let adot = yaml(&files["/opt/aws/aws-otel-collector/etc/config.yaml"].0);
    assert_eq!(
        adot["exporters"]["prometheusremotewrite"]["endpoint"],
        format!("{endpoint}api/v1/remote_write")
    );
    assert_eq!(
        ex.host("monitored").await.id,
        host.id,
        "the host was replaced"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_004_app_prometheus_and_grafana_hosts_with_node_exporter() {
    let ex = Example::copy("ec2-metrics-only", "us-east-1").await;
    ex.converge();
    let ec2 = aws_sdk_ec2::Client::new(&ex.sdk);
    let (app, prometheus, grafana) = (
        ex.host("app").await,
        ex.host("prometheus").await,
        ex.host("grafana").await,
    );

    // Ports 8080 and 9100 of the app admit only the Prometheus host's group.
    assert_eq!(
        ingress(&ec2, &app.group).await,
        [
            (8080, vec![], vec![prometheus.group.clone()]),
            (9100, vec![], vec![prometheus.group.clone()]),
        ]
    );
    // The TSDB volume: 20 GiB gp3, encrypted, attached to the Prometheus host.
    let data = ex.data_volume(&prometheus, "/dev/sdf").await;
    assert_eq!(data.size(), Some(20));
    assert_eq!(data.volume_type().map(|t| t.as_str()), Some("gp3"));
    assert_eq!(data.encrypted(), Some(true));

    // What was pushed, and where: no private IP edited by hand anywhere.
    let files = ex.pushed_files().await;
    let (config, to) = &files["/etc/prometheus/prometheus.yml"];
    assert_eq!(to.as_slice(), std::slice::from_ref(&prometheus.id));
    let config = yaml(config);
    let jobs: Vec<&str> = config["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j.get("ec2_sd_configs").is_some())
        .map(|j| j["job_name"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, ["flask", "node"]);
    promtool_accepts(&files);
    let (env, to) = &files["/etc/default/node_exporter"];
    assert_eq!(to.as_slice(), std::slice::from_ref(&app.id));
    assert!(env.contains("--collector.systemd"));
    let (datasource, to) = &files["/etc/grafana/provisioning/datasources/prometheus.yaml"];
    assert_eq!(to.as_slice(), std::slice::from_ref(&grafana.id));
    assert_eq!(
        yaml(datasource)["datasources"][0]["url"],
        format!("http://{}:9090", prometheus.private_ip)
    );
    // Grafana's own `${datasource}` variables reach the dashboard untouched.
    let (dashboard, _) = &files["/var/lib/grafana/dashboards/node.json"];
    assert!(dashboard.contains("${datasource}"));
    serde_json::from_str::<serde_json::Value>(dashboard).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_002_app_prometheus_loki_and_grafana_hosts_with_promtail() {
    let ex = Example::copy("ec2-prometheus-loki-grafana", "us-east-1").await;
    ex.converge();
    let ec2 = aws_sdk_ec2::Client::new(&ex.sdk);
    let mut hosts = BTreeMap::new();
    for role in ["app", "prometheus", "loki", "grafana"] {
        hosts.insert(role, ex.host(role).await);
    }
    let ip = |role: &str| hosts[role].private_ip.clone();
    let group = |role: &str| hosts[role].group.clone();
    let id = |role: &str| hosts[role].id.clone();

    // Loki's push API from the app hosts, its queries from Grafana; nothing else.
    let mut sources = vec![group("app"), group("grafana")];
    sources.sort();
    assert_eq!(
        ingress(&ec2, &group("loki")).await,
        [(3100, vec![], sources)]
    );

    let files = ex.pushed_files().await;
    promtool_accepts(&files);
    let (promtail, to) = &files["/etc/promtail/config.yml"];
    assert_eq!(to.as_slice(), [id("app")]);
    let promtail = yaml(promtail);
    assert_eq!(
        promtail["clients"][0]["url"],
        format!("http://{}:3100/loki/api/v1/push", ip("loki"))
    );
    // promtail's own environment expansion is left for promtail.
    assert_eq!(
        promtail["scrape_configs"][0]["static_configs"][0]["labels"]["host"],
        "${HOSTNAME}"
    );
    let (loki, to) = &files["/etc/loki/config.yml"];
    assert_eq!(to.as_slice(), [id("loki")]);
    assert_eq!(yaml(loki)["limits_config"]["retention_period"], "168h");
    let (datasources, to) = &files["/etc/grafana/provisioning/datasources/observability.yaml"];
    assert_eq!(to.as_slice(), [id("grafana")]);
    let datasources = yaml(datasources);
    assert_eq!(
        datasources["datasources"][0]["url"],
        format!("http://{}:9090", ip("prometheus"))
    );
    assert_eq!(
        datasources["datasources"][1]["url"],
        format!("http://{}:3100", ip("loki"))
    );

    // The seed baked configs into user data: a change meant a new instance. Here a longer
    // retention is pushed to the running Loki host, and only to it.
    let loki_file = ex.dir.path().join("hosts/loki.yml");
    let text = std::fs::read_to_string(&loki_file).unwrap();
    std::fs::write(&loki_file, text.replace("168h", "336h")).unwrap();
    let changed = ex.converge();
    assert_eq!(changed.count("SendCommand"), 1, "{}", changed.stderr);
    assert_eq!(changed.count("RunInstances"), 0);
    let files = ex.pushed_files().await;
    assert_eq!(
        yaml(&files["/etc/loki/config.yml"].0)["limits_config"]["retention_period"],
        "336h"
    );
    assert_eq!(ex.host("loki").await.id, id("loki"));
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_000_001_prometheus_with_ebs_alertmanager_and_grafana_behind_an_alb() {
    let ex = Example::seed_000().await;
    ex.converge();

    // The Prometheus host and its TSDB volume: 100 GiB gp3, 3000 IOPS, encrypted, attached.
    // A converged plan reads each kind of AWS object once for all the objects of the kind:
    // one DescribeInstances for the host, the Grafana group and both host_configs, one
    // DescribeSecurityGroups for the three groups. Read per object: each role with a
    // description (GetRole, which the account details lack) and each instance profile's tags.
    // One DescribeTags reads the load balancer's, target group's and listeners' tags. The
    // Grafana template's AMI is its parameter's value (GetParameter, every pass) and that
    // image's root device (DescribeImages, once per process: it never changes). Before
    // anything, one GetCallerIdentity checks that AWS can be called.
    let plan = ex.stackwarden(&["plan"]);
    plan.expect(0);
    let per_object: &[(&str, u64)] = &[("IAM GetRole", 2), ("IAM GetInstanceProfile", 2)];
    let expected: BTreeMap<String, u64> = [
        "Auto Scaling DescribeAutoScalingGroups",
        "Auto Scaling DescribeInstanceRefreshes",
        "EC2 DescribeImages",
        "EC2 DescribeInstances",
        "EC2 DescribeLaunchTemplateVersions",
        "EC2 DescribeLaunchTemplates",
        "EC2 DescribeSecurityGroups",
        "EC2 DescribeVolumes",
        "Elastic Load Balancing v2 DescribeListeners",
        "Elastic Load Balancing v2 DescribeLoadBalancerAttributes",
        "Elastic Load Balancing v2 DescribeLoadBalancers",
        "Elastic Load Balancing v2 DescribeTags",
        "Elastic Load Balancing v2 DescribeTargetGroups",
        "IAM GetAccountAuthorizationDetails",
        "SSM DescribeParameters",
        "SSM GetParameter",
        "STS GetCallerIdentity",
        "amp ListWorkspaces",
        "grafana ListWorkspaces",
    ]
    .into_iter()
    .map(|op| (op, 1))
    .chain(per_object.iter().copied())
    .map(|(op, n)| (op.to_string(), n))
    .collect();
    assert_eq!(plan.counts(), expected, "{}", plan.stderr);

    let prometheus = ex.host("prometheus").await;
    let data = ex.data_volume(&prometheus, "/dev/sdf").await;
    assert_eq!(data.size(), Some(100));
    assert_eq!(data.volume_type().map(|t| t.as_str()), Some("gp3"));
    assert_eq!(data.iops(), Some(3000));
    assert_eq!(data.encrypted(), Some(true));

    // Grafana: two instances in service, HTTP redirected to HTTPS with the certificate.
    let asg = aws_sdk_autoscaling::Client::new(&ex.sdk)
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("aws-monitoring-main")
        .send()
        .await
        .unwrap();
    let group = &asg.auto_scaling_groups()[0];
    assert_eq!(
        (group.min_size(), group.max_size(), group.desired_capacity()),
        (Some(2), Some(4), Some(2))
    );
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&ex.sdk);
    let lbs = elb
        .describe_load_balancers()
        .names("aws-monitoring-main")
        .send()
        .await
        .unwrap();
    let lb = &lbs.load_balancers()[0];
    assert_eq!(lb.scheme().map(|s| s.as_str()), Some("internet-facing"));
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(lb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    let mut ports: Vec<(i32, String)> = listeners
        .listeners()
        .iter()
        .map(|l| {
            (
                l.port().unwrap(),
                l.default_actions()[0]
                    .r#type()
                    .unwrap()
                    .as_str()
                    .to_string(),
            )
        })
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [(80, "redirect".to_string()), (443, "forward".to_string())]
    );
    let grafanas = ex.instances("stackwarden:id", "grafana.main").await;
    assert_eq!(grafanas.len(), 2, "{grafanas:?}");
    for g in &grafanas {
        assert!(g.tags.contains_key("stackwarden:grafana"), "{g:?}");
    }

    // Seed 000's topology: Prometheus admits Grafana's instances by their security group, while
    // Grafana's data source (below) names Prometheus's address.
    let rules = ingress(&aws_sdk_ec2::Client::new(&ex.sdk), &prometheus.group).await;
    let from_grafana: Vec<_> = rules
        .iter()
        .filter(|(port, _, groups)| *port == 9090 && groups.contains(&grafanas[0].group))
        .collect();
    assert_eq!(from_grafana.len(), 1, "{rules:?}");
    assert!(grafanas.iter().all(|g| g.group == grafanas[0].group));

    // The pushed configs: Prometheus's (with the seed's rules) passes promtool, Alertmanager's
    // passes amtool, and each went where it belongs.
    let files = ex.pushed_files().await;
    promtool_accepts(&files);
    let config = yaml(&files["/etc/prometheus/prometheus.yml"].0);
    assert_eq!(
        config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0],
        "localhost:9093"
    );
    assert_eq!(config["rule_files"].as_array().unwrap().len(), 3);
    let (alertmanager, to) = &files["/etc/alertmanager/alertmanager.yml"];
    assert_eq!(to.as_slice(), std::slice::from_ref(&prometheus.id));
    let checked = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(checked.path(), alertmanager).unwrap();
    let out = std::process::Command::new("amtool")
        .arg("check-config")
        .arg(checked.path())
        .output()
        .expect("amtool not found: run the tests with tests/run.sh, which installs prometheus-alertmanager");
    assert!(
        out.status.success(),
        "amtool rejected the pushed alertmanager.yml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        yaml(&files["/etc/prometheus/cloudwatch-exporter.yml"].0)["region"],
        "us-east-1"
    );
    let (datasources, to) = &files["/etc/grafana/provisioning/datasources/stackwarden.yaml"];
    let mut to = to.clone();
    to.sort();
    let grafana_ids: Vec<String> = grafanas.iter().map(|g| g.id.clone()).collect();
    assert_eq!(to, grafana_ids);
    let ip = &prometheus.private_ip;
    assert!(
        datasources.contains(&format!("http://{ip}:9090")),
        "{datasources}"
    );
}

/// Two stacks in one account: `ec2-metrics-only` (stack `metrics`) and
/// `ec2-prometheus-loki-grafana` (stack `observability`) both have a `host_config.grafana`
/// targeting `Role = grafana`. Reconciled in turn, twice, against one emulator: every Run
/// Command a stack sends targets its own instances only, the second round sends none, and both
/// plans are clean after it (each stack's records are its own, so neither undoes the other).
#[tokio::test(flavor = "multi_thread")]
async fn two_stacks_in_one_account_never_push_to_each_others_instances() {
    let ex = Example::copy("ec2-metrics-only", "us-east-1").await;
    let other = tempfile::tempdir().unwrap();
    copy_dir(
        &examples().join("ec2-prometheus-loki-grafana"),
        other.path(),
    );
    let stacks = [("metrics", ex.dir.path()), ("observability", other.path())];
    let ssm = aws_sdk_ssm::Client::new(&ex.sdk);
    let ec2 = aws_sdk_ec2::Client::new(&ex.sdk);
    let commands = || async {
        run_commands(&ssm)
            .await
            .iter()
            .map(|c| {
                (
                    c.command_id().unwrap().to_string(),
                    c.instance_ids().to_vec(),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let stack_of = |instance: String| {
        let ec2 = ec2.clone();
        async move {
            let out = ec2
                .describe_instances()
                .instance_ids(&instance)
                .send()
                .await
                .unwrap();
            out.reservations()[0].instances()[0]
                .tags()
                .iter()
                .find(|t| t.key() == Some("stackwarden:stack"))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_string()
        }
    };
    for round in 1..=2 {
        for (stack, dir) in stacks {
            let before = commands().await;
            let mut cmd = command(Some(&ex.aws.endpoint), &["reconcile", "--once"]);
            cmd.arg(path_str(dir)).env_remove("AWS_REGION");
            let applied = run(cmd);
            applied.expect(0);
            let sent: Vec<(String, Vec<String>)> = commands()
                .await
                .into_iter()
                .filter(|(id, _)| !before.contains_key(id))
                .collect();
            if round == 2 {
                assert_eq!(
                    applied.count("SendCommand"),
                    0,
                    "round 2, {stack}: {sent:?}\n{}",
                    applied.stdout
                );
            }
            for (id, targets) in sent {
                for instance in targets {
                    assert_eq!(
                        stack_of(instance.clone()).await,
                        stack,
                        "round {round}: {stack}'s command {id} targets {instance}"
                    );
                }
            }
        }
    }
    for (stack, dir) in stacks {
        let mut cmd = command(Some(&ex.aws.endpoint), &["plan"]);
        cmd.arg(path_str(dir)).env_remove("AWS_REGION");
        let plan = run(cmd);
        plan.expect(0);
        assert!(
            plan.stdout.contains("belong to another stack"),
            "{stack}'s plan says what it leaves alone:\n{}",
            plan.stdout
        );
    }
}

/// The seed repository's own dashboards (tests/fixtures/seed-dashboards/: one names its data
/// source `Prometheus`, one uses the default, one names the uid `prometheus`) validate in the
/// Grafana example, whose provisioning defines that data source. Without it, the one naming it
/// is refused at the line that names it.
#[test]
fn the_seed_repositorys_dashboards_validate_against_the_provisioned_prometheus() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-dashboards");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples().join("ec2-prometheus-grafana-alb"), dir.path());
    let names = [
        "aws-infrastructure.json",
        "ec2_monitoring.json",
        "github_monitoring.json",
    ];
    for name in names {
        std::fs::copy(seed.join(name), dir.path().join("dashboards").join(name)).unwrap();
    }
    edit(
        dir.path(),
        "grafana.toml",
        "dashboards = [\"dashboards/node.json\",",
        "dashboards = [\"dashboards/aws-infrastructure.json\", \"dashboards/ec2_monitoring.json\", \"dashboards/github_monitoring.json\", \"dashboards/node.json\",",
    );
    let v = run(command(None, &["validate", path_str(dir.path())]));
    v.expect(0);
    assert!(v.stderr.contains("AWS API calls: 0"), "{}", v.stderr);

    edit(
        dir.path(),
        "grafana.toml",
        "prometheus_url = \"http://${host.prometheus.private_ip}:9090\"\n",
        "",
    );
    let v = run(command(None, &["validate", path_str(dir.path())]));
    v.expect(1);
    let at = format!(
        "{}:23:",
        dir.path()
            .join("dashboards/aws-infrastructure.json")
            .display()
    );
    assert!(
        v.stderr.lines().any(|l| l.starts_with(&at)
            && l.contains("names the data source `Prometheus`, which the provisioning does not define (it defines `CloudWatch` (uid `cloudwatch`))")),
        "expected {at}... in:\n{}",
        v.stderr
    );
}
