//! The deploy/ files: the operator's own IAM policy allows every call the operator makes, with
//! its resources and conditions as IAM evaluates them (a full scenario with every controller,
//! from empty to pruned, under the lease once, with the emulator holding the operator to the
//! policy), and the
//! cloud-init and workflow files are valid YAML that carry the systemd unit and the commands;
//! the template unit runs one stack per instance, with its own checkout, port and lease item.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use stackwarden_emulator::{Enforce, Settings};

use crate::harness::{
    default_stack, path_str, stack_as, stackwarden_with, terraform_grafana, Aws, Run,
};

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

/// The access key the operator signs with in the scenario: the emulator holds it to
/// deploy/iam-policy.json.
const OPERATOR: &str = "AKIAOPERATORPOLICY";

/// The operator under its own policy, as `stackwarden ARGS DIR --stats`.
fn operator(aws: &Aws, args: &[&str]) -> Run {
    stackwarden_with(
        Some(&aws.endpoint),
        args,
        &[("AWS_ACCESS_KEY_ID", OPERATOR)],
    )
}

/// An emulator holding the operator's calls (signed with `OPERATOR`) to
/// deploy/iam-policy.json, as IAM evaluates it.
fn held_to_the_operators_policy() -> Aws {
    let policy: serde_json::Value = serde_json::from_str(&deploy_file("iam-policy.json")).unwrap();
    Aws::with(Settings {
        enforce: Some(Enforce {
            access_key: OPERATOR.into(),
            policy,
        }),
        ..Settings::default()
    })
}

/// The full deploy scenario with the emulator evaluating deploy/iam-policy.json for every call
/// the operator makes, as IAM would: each call's action on each resource it touches, with its
/// request tags, the tags the resource has, the tag-on-create and `iam:PassRole` authorizations
/// it implies. A call the policy does not allow is refused as AWS refuses it, and fails the run.
#[tokio::test(flavor = "multi_thread")]
async fn the_operators_policy_allows_every_call_it_makes_with_its_conditions() {
    // Without sandboxes, pushes succeed without running: this test is about the calls.
    let aws = held_to_the_operators_policy();
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
    // A role made before the stack, adopted: tagged the stack's first, then changed (the
    // policy allows IAM changes only to what carries the tag), and deleted by the prune.
    aws.iam()
        .await
        .create_role()
        .role_name("legacy-exporter")
        .assume_role_policy_document(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
        )
        .send()
        .await
        .unwrap();
    // And a host made by another tool, its instance and volume untagged: the policy lets the
    // operator claim what no stack owns, then change it as its own.
    let made = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let legacy_instance = made.instances()[0].instance_id().unwrap().to_string();
    let zone = made.instances()[0]
        .placement()
        .unwrap()
        .availability_zone()
        .unwrap()
        .to_string();
    let legacy_volume = ec2
        .create_volume()
        .availability_zone(zone)
        .size(10)
        .send()
        .await
        .unwrap()
        .volume_id()
        .unwrap()
        .to_string();
    ec2.attach_volume()
        .volume_id(&legacy_volume)
        .instance_id(&legacy_instance)
        .device("/dev/sdg")
        .send()
        .await
        .unwrap();
    write(
        "legacy.toml",
        &format!(
            "[iam.role.legacy]\nadopt = \"legacy-exporter\"\ntrust = {{ services = [\"ec2.amazonaws.com\"] }}\ninline_policies = {{ read = \"policies/cloudwatch-read.json\" }}\n\n[host.legacy]\nadopt = \"{legacy_instance}\"\nami = \"ami-12c6146b\"\ninstance_type = \"t3.micro\"\nvolumes = [{{ device = \"/dev/sdg\", size_gib = 10 }}]\n"
        ),
    );
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
    // And Grafana as the seed's Terraform makes it, untagged: each part claimed by its id.
    let owned: Vec<String> = subnets.iter().map(|s| s.to_string()).collect();
    let tf = terraform_grafana(&aws, &owned, "ami-12c6146b").await;
    write(
        "grafana-legacy.toml",
        &format!(
            "[grafana.legacy]\nadopt = \"monitoring-grafana-asg\"\nlaunch_template = {{ adopt = \"{template}\" }}\nami = \"ami-12c6146b\"\ninstance_type = \"t3.small\"\nsubnets = [\"{a}\", \"{b}\"]\nmin_size = 1\nmax_size = 2\nalb = {{ adopt = \"{lb}\", security_group = {{ adopt = \"{alb_sg}\" }}, subnets = [\"{a}\", \"{b}\"], allowed_cidrs = [\"10.0.0.0/8\"] }}\ntarget_group = {{ adopt = \"{tg}\" }}\nsecurity_group = {{ adopt = \"{sg}\" }}\nprovisioning = {{ cloudwatch = true }}\n",
            a = subnets[0],
            b = subnets[1],
            template = tf.template,
            lb = tf.load_balancer,
            alb_sg = tf.alb_group,
            tg = tf.target_group,
            sg = tf.instance_group,
        ),
    );
    let d = path_str(dir.path());
    let mut seen = BTreeSet::new();
    let cold = operator(&aws, &["reconcile", "--once", d]);
    cold.expect(0);
    seen.extend(actions(&cold));
    let iam = aws.iam().await;
    let legacy = iam
        .get_role()
        .role_name("legacy-exporter")
        .send()
        .await
        .unwrap();
    assert!(
        legacy
            .role()
            .unwrap()
            .tags()
            .iter()
            .any(|t| t.key() == "stackwarden:stack"),
        "adopted: {legacy:?}"
    );
    let inline = iam
        .list_role_policies()
        .role_name("legacy-exporter")
        .send()
        .await
        .unwrap();
    assert_eq!(inline.policy_names(), ["read"]);
    for id in [&legacy_instance, &legacy_volume] {
        let tags = ec2
            .describe_tags()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("resource-id")
                    .values(id.as_str())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        assert!(
            tags.tags()
                .iter()
                .any(|t| t.key() == Some("stackwarden:stack")),
            "{id} claimed: {tags:?}"
        );
    }
    let group = aws
        .autoscaling()
        .await
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("monitoring-grafana-asg")
        .send()
        .await
        .unwrap();
    let group = &group.auto_scaling_groups()[0];
    assert_eq!(group.created_time(), tf.created.as_ref(), "the same group");
    assert!(
        group
            .tags()
            .iter()
            .any(|t| t.key() == Some("stackwarden:stack")),
        "claimed: {group:?}"
    );
    // The Grafana load balancer gets HTTPS: a listener made, the HTTP one changed to redirect
    // (listeners carry the group's tags from their creation, so the policy lets them change).
    let certificate = aws
        .iam()
        .await
        .upload_server_certificate()
        .server_certificate_name("grafana")
        .certificate_body("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        .private_key("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
        .send()
        .await
        .unwrap()
        .server_certificate_metadata()
        .unwrap()
        .arn()
        .to_string();
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
            .replace(
                "allowed_cidrs = [\"10.0.0.0/8\"] }",
                &format!(
                    "allowed_cidrs = [\"10.1.0.0/16\"], certificate_arn = \"{certificate}\" }}"
                ),
            ),
    );
    // HTTPS for the adopted load balancer too: Terraform's listener, claimed by the first
    // pass, now changed to redirect.
    let text = std::fs::read_to_string(dir.path().join("grafana-legacy.toml")).unwrap();
    write(
        "grafana-legacy.toml",
        &text.replace(
            "allowed_cidrs = [\"10.0.0.0/8\"] }",
            &format!("allowed_cidrs = [\"10.0.0.0/8\"], certificate_arn = \"{certificate}\" }}"),
        ),
    );
    // Under the lease (created on first use) as a CI job next to the daemon runs it.
    let update = operator(
        &aws,
        &[
            "reconcile",
            "--once",
            "--verify",
            "--lease",
            "stackwarden-lease",
            d,
        ],
    );
    update.expect(0);
    seen.extend(actions(&update));
    for op in ["CreateListener", "ModifyListener"] {
        assert_eq!(
            update.count(op),
            2,
            "{op}, one per group: {}",
            update.stderr
        );
    }
    let kept = aws
        .elb()
        .await
        .describe_listeners()
        .load_balancer_arn(&tf.load_balancer)
        .send()
        .await
        .unwrap();
    let http = kept
        .listeners()
        .iter()
        .find(|l| l.port() == Some(80))
        .unwrap();
    assert_eq!(http.listener_arn(), Some(tf.listener.as_str()));
    assert_eq!(
        http.default_actions()[0].r#type().map(|t| t.as_str()),
        Some("redirect")
    );
    for f in [
        "legacy.toml",
        "grafana-legacy.toml",
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
    let prune = operator(&aws, &["reconcile", "--once", "--prune", d]);
    prune.expect(0);
    seen.extend(actions(&prune));
    assert!(
        iam.get_role()
            .role_name("legacy-exporter")
            .send()
            .await
            .is_err(),
        "the adopted role is deleted by the prune"
    );

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
    // Every call was the operator's or this test's; none of the operator's was refused.
    let calls = aws.emulator.calls();
    let refused: Vec<_> = calls
        .iter()
        .filter(|c| c.caller == OPERATOR && c.status == 403)
        .collect();
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert!(
        calls
            .iter()
            .filter(|c| c.caller == OPERATOR && c.write)
            .count()
            > 50,
        "the scenario's writes were the operator's"
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

/// A unit file's `[Service]` settings, `(KEY, VALUE)` in order (comments left out).
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line.split_once('=').expect("KEY=VALUE");
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

/// An environment file's `KEY=VALUE` lines.
fn environment_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

/// An `ExecStart` command line as systemd expands it for `instance`: `%i` is the instance,
/// `${VAR}` one word, `$VAR` alone as a word the value split at whitespace.
fn expand(command: &str, instance: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut words = Vec::new();
    for word in command.split_whitespace() {
        let word = word.replace("%i", instance);
        match word.strip_prefix('$') {
            Some(var) if !var.starts_with('{') => {
                words.extend(env[var].split_whitespace().map(str::to_string));
            }
            _ => {
                let mut w = word.clone();
                for (k, v) in env {
                    w = w.replace(&format!("${{{k}}}"), v);
                }
                assert!(!w.contains('$'), "{word}: a variable the file does not set");
                words.push(w);
            }
        }
    }
    words
}

/// The template unit, `stackwarden@<stack>.service`: the hardening of the single unit, and
/// per stack its own checkout and state directory, its own port (from its environment file,
/// which must exist) and its own lease item. Its command line, as systemd expands it with the
/// example environment file, runs the daemon of a stack acting as a role of another account,
/// under the operator's policy (which lets it assume the `stackwarden` roles, no other): it
/// converges there and holds the lease item of that account's stack in its own account.
#[tokio::test(flavor = "multi_thread")]
async fn the_template_unit_runs_each_stack_with_its_own_checkout_port_and_lease_item() {
    let template = deploy_file("stackwarden@.service");
    let settings = service_settings(&template);
    let single = service_settings(&deploy_file("stackwarden.service"));
    for (key, value) in &single {
        let per_stack = matches!(key.as_str(), "ExecStart" | "StateDirectory")
            || (key == "Environment" && value.starts_with("HOME="));
        if !per_stack {
            assert!(
                settings.contains(&(key.clone(), value.clone())),
                "the template lacks {key}={value} of stackwarden.service"
            );
        }
    }
    let setting = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(setting("StateDirectory"), ["stackwarden/%i"]);
    assert_eq!(
        setting("EnvironmentFile"),
        ["/etc/stackwarden/%i.env"],
        "required: no `-`"
    );
    assert!(setting("Environment").contains(&"HOME=/var/lib/stackwarden/%i"));
    let [exec] = setting("ExecStart")[..] else {
        panic!("one ExecStart");
    };
    assert!(exec.contains("--listen ${STACKWARDEN_LISTEN}"), "{exec}");
    assert!(exec.ends_with(" /var/lib/stackwarden/%i/desired"), "{exec}");

    // The command line of stackwarden@dev with the example environment file (on a free port),
    // its checkout at a temporary directory.
    let aws = held_to_the_operators_policy();
    aws.assumable_role("111111111111", "stackwarden", None)
        .await;
    aws.assumable_role("111111111111", "admin", None).await;
    let sts = aws_sdk_sts::Client::new(&aws.sdk_as("us-east-1", OPERATOR).await);
    let other = sts
        .assume_role()
        .role_arn("arn:aws:iam::111111111111:role/admin")
        .role_session_name("operator")
        .send()
        .await
        .expect_err("the policy allows the stacks' roles only");
    assert_eq!(other.code(), Some("AccessDenied"), "{other:?}");
    let desired = stack_as("dev", "arn:aws:iam::111111111111:role/stackwarden", None);
    let mut env = environment_file(&deploy_file("stackwarden-stack.env"));
    assert!(env["STACKWARDEN_ARGS"].contains("--lease stackwarden-lease"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    env.insert("STACKWARDEN_LISTEN".into(), listen.clone());
    let words = expand(exec, "dev", &env);
    assert_eq!(words[0], "/usr/local/bin/stackwarden");
    assert_eq!(words.last().unwrap(), "/var/lib/stackwarden/dev/desired");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_stackwarden"));
    cmd.args(&words[1..words.len() - 1])
        .arg(desired.path())
        .env("AWS_ENDPOINT_URL", &aws.endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", OPERATOR)
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("RUST_LOG", "info");
    let before = aws.emulator.calls().len();
    let mut daemon = crate::daemon::Daemon::spawn(cmd);
    assert_eq!(daemon.address(), listen, "the port of the stack's own file");
    daemon.wait_for("pass done", &[("converged", "true"), ("write", "true")]);
    let ready = ureq::get(&format!("http://{listen}/readyz"))
        .call()
        .unwrap();
    assert_eq!(ready.status(), 200);

    // It acted in the stack's account, and holds the lease item of that account's stack.
    let roles = aws.iam_in("111111111111").await.list_roles().send().await;
    let names: Vec<String> = roles
        .unwrap()
        .roles()
        .iter()
        .map(|r| r.role_name().to_string())
        .collect();
    assert!(names.contains(&"dev-prometheus".to_string()), "{names:?}");
    let dynamodb = aws_sdk_dynamodb::Client::new(&aws.sdk().await);
    let items = dynamodb
        .scan()
        .table_name("stackwarden-lease")
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = items
        .items()
        .iter()
        .filter_map(|i| i.get("lease")?.as_s().ok().map(String::as_str))
        .collect();
    assert_eq!(
        keys,
        ["111111111111/dev"],
        "the lease table is the operator's own"
    );

    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0));
    // The operator's own calls (the role assumed, the lease) were all allowed; the stack's
    // were made with the role's credentials, not the operator's.
    let calls = aws.emulator.calls();
    let own: Vec<_> = calls[before..]
        .iter()
        .filter(|c| c.caller == OPERATOR)
        .collect();
    assert!(own.iter().all(|c| c.status != 403), "refused: {own:?}");
    let mut services: Vec<&str> = own.iter().map(|c| c.service.as_str()).collect();
    services.sort();
    services.dedup();
    assert_eq!(services, ["dynamodb", "sts"], "{own:?}");
}
