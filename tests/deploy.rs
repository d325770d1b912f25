//! The deploy/ files: the operator's own IAM policy allows every call the operator makes (a
//! full scenario with every controller, from empty to pruned, under the lease once, counted by
//! its `--stats`), and the
//! cloud-init and workflow files are valid YAML that carry the systemd unit and the commands.

use std::collections::BTreeSet;
use std::path::Path;

use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};

use crate::harness::{default_stack, path_str, stackwarden, Aws, Run};

fn deploy_file(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy")
            .join(name),
    )
    .unwrap()
}

/// (IAM action prefix, operation) of every call a run counted.
fn actions(run: &Run) -> BTreeSet<String> {
    run.stderr
        .lines()
        .filter_map(|l| {
            // `  <n>  <service, maybe several words> <operation>`
            let mut parts: Vec<&str> = l.split_whitespace().collect();
            parts.first()?.parse::<u64>().ok()?;
            let op = parts.pop()?;
            let service = parts[1..].join(" ");
            let prefix = match service.as_str() {
                "IAM" => "iam",
                "amp" => "aps",
                "grafana" => "grafana",
                "EC2" => "ec2",
                "SSM" => "ssm",
                "STS" => "sts",
                "Auto Scaling" => "autoscaling",
                "Elastic Load Balancing v2" => "elasticloadbalancing",
                "Secrets Manager" => "secretsmanager",
                "DynamoDB" => "dynamodb",
                other => panic!("service {other} has no IAM prefix here; add it"),
            };
            Some(format!("{prefix}:{op}"))
        })
        .collect()
}

/// Whether an IAM action pattern (`*` wildcards) matches an action.
fn matches(pattern: &str, action: &str) -> bool {
    fn go(p: &[u8], a: &[u8]) -> bool {
        match (p.first(), a.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], a) || (!a.is_empty() && go(p, &a[1..])),
            (Some(x), Some(y)) if x.eq_ignore_ascii_case(y) => go(&p[1..], &a[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), action.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operators_policy_allows_every_call_it_makes() {
    // Without sandboxes, pushes succeed without running: this test is about the calls.
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    ec2.run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(2)
        .max_count(2)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key("Role").value("app").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let dir = default_stack();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "amg.toml",
        "[amg.workspace.grafana]\nrole_arn = \"${iam.role.grafana.arn}\"\npermission_type = \"CUSTOMER_MANAGED\"\n[amg.workspace.grafana.roles]\nadmin = { groups = [\"9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a\"] }\n",
    );
    write(
        "hosts.toml",
        "[host.prometheus]\nami = \"resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64\"\ninstance_type = \"t3.medium\"\ninstance_profile = \"${iam.instance_profile.prometheus.name}\"\nsecurity_group = { ingress = [{ port = 9090, cidrs = [\"10.0.0.0/16\"] }] }\nvolumes = [{ device = \"/dev/sdf\", size_gib = 20 }]\nprometheus = { rule_files = [\"rules/node.yml\"] }\n",
    );
    write(
        "fleet.toml",
        "[host_config.node_exporter]\ntargets = { Role = \"app\" }\nfiles = [{ path = \"/etc/default/node_exporter\", source = \"hosts/ne.env\" }]\n",
    );
    write("hosts/ne.env", "ARGS=\n");
    let subnets = ec2
        .describe_subnets()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let subnets: Vec<&str> = subnets
        .subnets()
        .iter()
        .map(|s| s.subnet_id().unwrap())
        .take(2)
        .collect();
    aws.ssm()
        .await
        .put_parameter()
        .name("/grafana/admin")
        .value("not-in-the-toml")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    write(
        "grafana.toml",
        &format!(
            "[grafana.main]\nami = \"ami-12c6146b\"\ninstance_type = \"t3.small\"\nsubnets = [\"{a}\", \"{b}\"]\ninstance_profile = \"${{iam.instance_profile.grafana.name}}\"\nmin_size = 1\nmax_size = 2\nalb = {{ subnets = [\"{a}\", \"{b}\"], allowed_cidrs = [\"10.0.0.0/8\"] }}\nprovisioning = {{ cloudwatch = true, admin_password_ssm_parameter = \"/grafana/admin\" }}\n",
            a = subnets[0],
            b = subnets[1]
        ),
    );
    let d = path_str(dir.path());
    let mut seen = BTreeSet::new();
    let cold = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    cold.expect(0);
    seen.extend(actions(&cold));
    // Changes to every kind, then everything removed and pruned.
    write("hosts/ne.env", "ARGS=--collector.systemd\n");
    let text = std::fs::read_to_string(dir.path().join("hosts.toml")).unwrap();
    write(
        "hosts.toml",
        &text
            .replace("size_gib = 20", "size_gib = 30")
            .replace("t3.medium", "t3.large"),
    );
    let text = std::fs::read_to_string(dir.path().join("grafana.toml")).unwrap();
    write(
        "grafana.toml",
        &text
            .replace("t3.small", "t3.medium")
            .replace("max_size = 2", "max_size = 3")
            .replace("10.0.0.0/8", "10.1.0.0/16"),
    );
    // Under the lease (created on first use) as a CI job next to the daemon runs it.
    let update = stackwarden(
        Some(&aws.endpoint),
        &["reconcile", "--once", "--lease", "stackwarden-lease", d],
    );
    update.expect(0);
    seen.extend(actions(&update));
    for f in [
        "amg.toml",
        "hosts.toml",
        "fleet.toml",
        "amp.toml",
        "grafana.toml",
    ] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    for policy in ["policies/amp-query.json", "policies/amp-remote-write.json"] {
        let text = std::fs::read_to_string(dir.path().join(policy)).unwrap();
        write(
            policy,
            &text.replace(
                "${amp.workspace.main.arn}",
                "arn:aws:aps:us-east-1:123456789012:workspace/ws-gone",
            ),
        );
    }
    let prune = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", "--prune", d]);
    prune.expect(0);
    seen.extend(actions(&prune));

    let policy: serde_json::Value = serde_json::from_str(&deploy_file("iam-policy.json")).unwrap();
    let allowed: Vec<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(list) => list
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
            other => panic!("Action {other}"),
        })
        .collect();
    for wanted in [
        "ec2:TerminateInstances",
        "grafana:UpdatePermissions",
        "ssm:SendCommand",
        "aps:DeleteWorkspace",
        "autoscaling:StartInstanceRefresh",
        "elasticloadbalancing:DeleteLoadBalancer",
    ] {
        assert!(
            seen.contains(wanted),
            "the scenario should exercise {wanted}: {seen:?}"
        );
    }
    let missing: Vec<&String> = seen
        .iter()
        .filter(|a| !allowed.iter().any(|p| matches(p, a)))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/iam-policy.json does not allow {missing:?}"
    );
}

#[test]
fn cloud_init_carries_the_systemd_unit_and_the_workflow_runs_the_cli() {
    let unit = deploy_file("stackwarden.service");
    for hardening in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "User=stackwarden",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(hardening), "the unit lacks {hardening}");
    }
    let cloud: serde_json::Value =
        marked_yaml::from_yaml(0, &deploy_file("cloud-init.yaml")).unwrap();
    let files = cloud["write_files"].as_array().unwrap();
    let embedded = files
        .iter()
        .find(|f| f["path"] == "/etc/systemd/system/stackwarden.service")
        .expect("the unit in write_files");
    assert_eq!(
        embedded["content"].as_str().unwrap(),
        unit,
        "cloud-init's unit is deploy/stackwarden.service"
    );
    let workflow: serde_json::Value =
        marked_yaml::from_yaml(0, &deploy_file("github-actions.yml")).unwrap();
    let text = workflow.to_string();
    assert!(text.contains("stackwarden plan --stats desired"));
    assert!(text.contains("stackwarden reconcile --once --stats desired"));
    assert!(text.contains("GITHUB_STEP_SUMMARY"));
}

#[test]
fn iam_action_patterns_match_like_iam() {
    assert!(matches("ec2:Describe*", "ec2:DescribeInstances"));
    assert!(matches("ssm:SendCommand", "ssm:sendcommand"));
    assert!(!matches("ec2:Describe*", "ec2:RunInstances"));
}
