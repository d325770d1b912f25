//! Bad input: every command rejects it with `path:line:column: message`, exit 1, and zero AWS
//! calls (counted by the operator's own call counter).

use std::path::Path;

use crate::harness::{default_stack, edit, path_str, stackwarden};

/// Runs validate, plan and reconcile --once on a broken directory and checks each rejects it
/// the same way, with a message at `file:line:column` that contains `expect`.
#[track_caller]
fn rejected(dir: &Path, file: &str, line: usize, expect: &str) {
    let d = path_str(dir);
    for args in [
        vec!["validate", d],
        vec!["plan", d],
        vec!["reconcile", "--once", d],
    ] {
        let run = stackwarden(None, &args);
        run.expect(1);
        let at = format!("{}:{line}:", dir.join(file).display());
        let line_ok = run
            .stderr
            .lines()
            .any(|l| l.starts_with(&at) && l.contains(expect));
        assert!(
            line_ok,
            "{args:?}: expected `{at}<column>: ...{expect}...` in:\n{}",
            run.stderr
        );
        let (total, _) = run.calls();
        assert_eq!(total, 0, "{args:?} called AWS");
        assert!(
            run.stdout.is_empty(),
            "{args:?} printed a plan:\n{}",
            run.stdout
        );
    }
}

#[test]
fn malformed_toml() {
    let dir = default_stack();
    edit(
        dir.path(),
        "amp.toml",
        "alias = \"monitoring\"",
        "alias = \"monitoring",
    );
    rejected(dir.path(), "amp.toml", 4, "invalid TOML");
}

#[test]
fn unknown_key() {
    let dir = default_stack();
    edit(
        dir.path(),
        "iam.toml",
        "managed_policies = [\n  \"arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore\",",
        "managed_polices = [\n  \"arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore\",",
    );
    rejected(dir.path(), "iam.toml", 7, "managed_polices");
}

#[test]
fn unknown_section_with_a_suggestion() {
    let dir = default_stack();
    std::fs::write(
        dir.path().join("extra.toml"),
        "[iamm.role.x]\ntrust = { services = [\"ec2.amazonaws.com\"] }\n",
    )
    .unwrap();
    rejected(dir.path(), "extra.toml", 1, "did you mean `iam`?");
}

#[test]
fn wrong_type() {
    let dir = default_stack();
    edit(
        dir.path(),
        "stack.toml",
        "tags = { project = \"monitoring\" }",
        "tags = [\"monitoring\"]",
    );
    rejected(dir.path(), "stack.toml", 9, "");
}

#[test]
fn dangling_reference() {
    let dir = default_stack();
    edit(
        dir.path(),
        "iam.toml",
        "role = \"${iam.role.grafana.name}\"",
        "role = \"${iam.role.grafna.name}\"",
    );
    rejected(
        dir.path(),
        "iam.toml",
        36,
        "iam.role.grafna, which the desired state does not define",
    );
}

#[test]
fn dangling_reference_inside_a_policy_file() {
    let dir = default_stack();
    edit(
        dir.path(),
        "policies/amp-query.json",
        "${amp.workspace.main.arn}",
        "${amp.workspace.other.arn}",
    );
    rejected(
        dir.path(),
        "policies/amp-query.json",
        8,
        "amp.workspace.other",
    );
}

#[test]
fn invalid_promql() {
    let dir = default_stack();
    edit(
        dir.path(),
        "rules/node.yml",
        "expr: up == 0",
        "expr: up == (0",
    );
    rejected(dir.path(), "rules/node.yml", 48, "invalid PromQL");
}

#[test]
fn alertmanager_route_to_an_undefined_receiver() {
    let dir = default_stack();
    edit(
        dir.path(),
        "alertmanager/amp.yml",
        "      - receiver: warning",
        "      - receiver: warnings",
    );
    rejected(
        dir.path(),
        "alertmanager/amp.yml",
        27,
        "route names receiver `warnings`, which is not defined",
    );
}

#[test]
fn alertmanager_receiver_amp_cannot_deliver_to() {
    let dir = default_stack();
    edit(
        dir.path(),
        "alertmanager/amp.yml",
        "    - name: email\n      sns_configs:",
        "    - name: email\n      email_configs:\n        - to: ops@example.com\n      sns_configs:",
    );
    rejected(
        dir.path(),
        "alertmanager/amp.yml",
        50,
        "`email_configs` is not supported by Amazon Managed Service for Prometheus",
    );
}

#[test]
fn grafana_role_member_that_is_not_an_identity_center_id() {
    let dir = default_stack();
    std::fs::write(
        dir.path().join("amg.toml"),
        "[amg.workspace.grafana]\nroles = { viewer = { users = [\"alice@example.com\"] } }\n",
    )
    .unwrap();
    rejected(
        dir.path(),
        "amg.toml",
        2,
        "user `alice@example.com` in role `viewer` is not an IAM Identity Center user id",
    );
}

#[test]
fn grafana_group_in_two_roles() {
    let dir = default_stack();
    let group = "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a";
    std::fs::write(
        dir.path().join("amg.toml"),
        format!("[amg.workspace.grafana]\nroles = {{ admin = {{ groups = [\"{group}\"] }}, viewer = {{ groups = [\"{group}\"] }} }}\n"),
    )
    .unwrap();
    rejected(
        dir.path(),
        "amg.toml",
        2,
        "is in both `admin` and `viewer`: a user or group holds one Grafana role",
    );
}

#[test]
fn dashboard_query_that_is_not_promql() {
    let dir = default_stack();
    std::fs::write(
        dir.path().join("grafana.toml"),
        "[grafana.main]\nami = \"ami-12c6146b\"\ninstance_type = \"t3.small\"\nsubnets = [\"subnet-a\", \"subnet-b\"]\nmin_size = 2\nmax_size = 4\nalb = { subnets = [\"subnet-c\", \"subnet-d\"], allowed_cidrs = [\"0.0.0.0/0\"] }\nprovisioning = { prometheus_url = \"http://10.0.0.5:9090\", dashboards = [\"dashboards/node.json\"] }\n",
    )
    .unwrap();
    edit(
        dir.path(),
        "dashboards/node.json",
        "avg by (instance) (rate(node_cpu_seconds_total",
        "avg by instance) (rate(node_cpu_seconds_total",
    );
    rejected(
        dir.path(),
        "dashboards/node.json",
        95,
        "panel `CPU busy`: invalid PromQL",
    );
}

#[test]
fn invalid_policy_json() {
    let dir = default_stack();
    edit(
        dir.path(),
        "policies/ec2-discovery.json",
        "\"Resource\": \"*\"",
        "\"Resource\": \"*\",",
    );
    rejected(
        dir.path(),
        "policies/ec2-discovery.json",
        9,
        "invalid policy JSON",
    );
}

#[test]
fn missing_referenced_file() {
    let dir = default_stack();
    edit(dir.path(), "amp.toml", "rules/node.yml", "rules/nodes.yml");
    rejected(dir.path(), "amp.toml", 10, "cannot read `rules/nodes.yml`");
}

#[test]
fn conflicting_names() {
    let dir = default_stack();
    edit(
        dir.path(),
        "iam.toml",
        "[iam.role.grafana]\n",
        "[iam.role.grafana]\nname = \"monitoring-prometheus\"\n",
    );
    rejected(
        dir.path(),
        "iam.toml",
        4,
        "both name the iam.role `monitoring-prometheus`",
    );
}

/// An IPv6 range that is not one, one with bits past its prefix, and a prefix list id of
/// another kind of object, each at its own value.
#[test]
fn ipv6_ranges_and_prefix_lists_are_checked_at_their_values() {
    let dir = default_stack();
    std::fs::write(
        dir.path().join("hosts.toml"),
        "[host.prom]\nami = \"ami-12c6146b\"\ninstance_type = \"t3.medium\"\nsecurity_group = { ingress = [\n  { port = 22, ipv6_cidrs = [\"::/0\",\n    \"2001:db8:::/48\"] },\n  { port = 9100, ipv6_cidrs = [\"2001:db8::1/32\"] },\n  { port = 9100, prefix_lists = [\"pl-63a5400a\", \"vpc-63a5400a\"] },\n] }\n",
    )
    .unwrap();
    rejected(
        dir.path(),
        "hosts.toml",
        6,
        "ingress: `2001:db8:::/48` is not an IPv6 CIDR such as 2001:db8::/32 or ::/0",
    );
    rejected(
        dir.path(),
        "hosts.toml",
        7,
        "ingress: `2001:db8::1/32` has bits set past its /32 prefix: the network is 2001:db8::/32",
    );
    rejected(
        dir.path(),
        "hosts.toml",
        8,
        "ingress: `vpc-63a5400a` is not a managed prefix list id such as pl-0123456789abcdef0",
    );
    let run = stackwarden(None, &["validate", path_str(dir.path())]);
    assert!(run.stderr.contains("3 error(s)"), "{}", run.stderr);
}

#[test]
fn every_error_is_reported_at_once() {
    let dir = default_stack();
    edit(
        dir.path(),
        "rules/node.yml",
        "expr: up == 0",
        "expr: up == (0",
    );
    edit(
        dir.path(),
        "policies/ec2-discovery.json",
        "\"Resource\": \"*\"",
        "\"Resource\": \"*\",",
    );
    edit(
        dir.path(),
        "iam.toml",
        "role = \"${iam.role.grafana.name}\"",
        "role = \"${iam.role.grafna.name}\"",
    );
    let run = stackwarden(None, &["validate", path_str(dir.path())]);
    run.expect(1);
    assert!(run.stderr.contains("3 error(s)"), "{}", run.stderr);
}

#[test]
fn the_default_stack_is_valid() {
    let run = stackwarden(
        None,
        &["validate", concat!(env!("CARGO_MANIFEST_DIR"), "/desired")],
    );
    run.expect(0);
    assert_eq!(run.calls().0, 0);
}

/// The default alertmanager definition is valid for Alertmanager itself, not only for our
/// offline check: `amtool check-config` (Debian package prometheus-alertmanager) reads it.
#[test]
fn the_default_alertmanager_definition_passes_amtool() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("desired/alertmanager/amp.yml");
    let definition: serde_json::Value =
        marked_yaml::from_yaml(0, &std::fs::read_to_string(path).unwrap()).unwrap();
    let config = definition["alertmanager_config"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("alertmanager.yml");
    std::fs::write(&file, config).unwrap();
    let out = std::process::Command::new("amtool")
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("amtool not found: run the tests with tests/run.sh, which installs prometheus-alertmanager");
    assert!(
        out.status.success(),
        "amtool rejected the default definition:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 receivers"));
}

/// The default dashboards (for the Grafana provisioning) pass the same check `validate` applies
/// to any dashboard, and show what the seeds show.
#[test]
fn the_default_dashboards_are_valid_portable_and_complete() {
    use stackwarden_controllers::dashboard::check_dashboard;
    use stackwarden_controllers::diag::{Diagnostics, SourceFile};
    use stackwarden_controllers::grafana::provisioning::{AMP, CLOUDWATCH, PROMETHEUS};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("desired/dashboards");
    let mut titles = Vec::new();
    for name in ["node.json", "application.json", "prometheus.json"] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let file = SourceFile::new(path.clone(), name.into(), text.clone());
        let mut diags = Diagnostics::default();
        check_dashboard(&file, &[PROMETHEUS, AMP, CLOUDWATCH], &mut diags);
        let found: Vec<String> = diags.into_sorted().iter().map(|d| d.to_string()).collect();
        assert!(found.is_empty(), "{name}: {found:?}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for p in v["panels"].as_array().unwrap() {
            titles.push(p["title"].as_str().unwrap().to_string());
        }
    }
    for wanted in [
        "CPU busy",
        "Memory used",
        "Disk used",
        "Disk IO",
        "Network",
        "Request rate",
        "Errors by endpoint",
        "Latency p50 / p95 / p99",
        "Responses by status code",
        "Targets up",
        "Remote write to AMP: samples sent and failed",
    ] {
        assert!(
            titles.iter().any(|t| t == wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
}

/// The desired directory is a boundary. A file and a directory reached through symbolic links
/// leading outside it, a named pipe and a device: each refused at the line naming it by
/// `validate`, `plan` and `reconcile --once`, promptly (a pipe is never opened, so nothing
/// waits for a writer), with zero AWS calls. A link that stays inside is followed.
#[test]
fn symbolic_links_leading_outside_pipes_and_devices_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.yml"), "groups: []\n").unwrap();
    std::fs::create_dir(outside.path().join("rules")).unwrap();
    std::fs::write(outside.path().join("rules/node.yml"), "groups: []\n").unwrap();

    // A file leading outside.
    let dir = default_stack();
    let rule = dir.path().join("rules/node.yml");
    std::fs::remove_file(&rule).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.yml"), &rule).unwrap();
    rejected(
        dir.path(),
        "amp.toml",
        10,
        "`rules/node.yml` leads outside the desired directory",
    );

    // A directory leading outside.
    let dir = default_stack();
    std::fs::remove_dir_all(dir.path().join("rules")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("rules"), dir.path().join("rules")).unwrap();
    rejected(
        dir.path(),
        "amp.toml",
        10,
        "`rules/node.yml` leads outside the desired directory",
    );

    // A named pipe: refused without being opened.
    let dir = default_stack();
    std::fs::remove_file(rule_in(&dir)).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(rule_in(&dir))
        .status()
        .expect("mkfifo (coreutils) runs");
    assert!(made.success());
    let started = std::time::Instant::now();
    rejected(
        dir.path(),
        "amp.toml",
        10,
        "`rules/node.yml` is a named pipe",
    );
    eprintln!("three commands on a pipe took {:?}", started.elapsed());

    // A device, through a link: outside. A device inside is refused as one (the unit test of
    // read_inside, which needs no root to make a device node).
    let dir = default_stack();
    std::fs::remove_file(rule_in(&dir)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", rule_in(&dir)).unwrap();
    rejected(
        dir.path(),
        "amp.toml",
        10,
        "`rules/node.yml` leads outside the desired directory (to /dev/zero",
    );

    // A desired-state file itself leading outside, and one that is a pipe.
    let dir = default_stack();
    std::os::unix::fs::symlink(outside.path().join("secret.yml"), dir.path().join("z.toml"))
        .unwrap();
    rejected(
        dir.path(),
        "z.toml",
        1,
        "`z.toml` leads outside the desired directory",
    );
    let dir = default_stack();
    let made = std::process::Command::new("mkfifo")
        .arg(dir.path().join("z.toml"))
        .status()
        .unwrap();
    assert!(made.success());
    rejected(dir.path(), "z.toml", 1, "`z.toml` is a named pipe");

    // A link that stays inside is fine.
    let dir = default_stack();
    std::fs::rename(rule_in(&dir), dir.path().join("rules/real.yml")).unwrap();
    std::os::unix::fs::symlink("real.yml", rule_in(&dir)).unwrap();
    stackwarden(None, &["validate", path_str(dir.path())]).expect(0);
}

fn rule_in(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("rules/node.yml")
}

/// A raw config whose `rule_files` globs match every pushed rule file (a relative glob, and an
/// absolute path) validates: the check refuses only what Prometheus would silently not load.
#[test]
fn a_raw_config_whose_rule_files_load_every_pushed_file_is_valid() {
    let dir = default_stack();
    let write = |path: &str, text: &str| {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "hosts.toml",
        "[host.prom]\nami = \"ami-12c6146b\"\ninstance_type = \"t3.medium\"\n\n[host.prom.prometheus]\nconfig = \"prometheus/prometheus.yml\"\nrule_files = [\"prometheus/alert_rules/node.yml\", \"prometheus/alert_rules/disk.yml\", \"rules/extra.yml\"]\n",
    );
    write(
        "prometheus/prometheus.yml",
        "rule_files:\n  - \"prometheus/alert_rules/*.yml\"\n  - /etc/prometheus/rules/extra.yml\n",
    );
    let rules = "groups:\n  - name: g\n    rules:\n      - alert: Down\n        expr: up == 0\n";
    write("prometheus/alert_rules/node.yml", rules);
    write("prometheus/alert_rules/disk.yml", rules);
    write("rules/extra.yml", rules);
    let run = stackwarden(None, &["validate", path_str(dir.path())]);
    run.expect(0);
    assert_eq!(run.calls().0, 0);
}
