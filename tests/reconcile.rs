//! `plan` and `reconcile --once` against the emulator: converging from empty, drift made out of band
//! through the SDK, ownership, adoption, observe-only, orphaning and pruning; stacks acting as
//! roles of other accounts, each in its own, and a role that cannot be assumed.

use aws_sdk_amp::primitives::Blob;

use crate::harness::{default_stack, edit, path_str, stack_as, stackwarden, stackwarden_with, Aws};

const PROMETHEUS_ROLE: &str = "monitoring-prometheus";
const SSM_CORE: &str = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore";

fn converge(aws: &Aws, dir: &str) {
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]).expect(0);
}

async fn workspace_id(aws: &Aws) -> String {
    let amp = aws.amp().await;
    let list = amp.list_workspaces().send().await.unwrap();
    let owned: Vec<_> = list
        .workspaces()
        .iter()
        .filter(|w| {
            w.tags()
                .and_then(|t| t.get("stackwarden:id"))
                .map(String::as_str)
                == Some("amp.workspace.main")
        })
        .filter(|w| w.status().map(|s| s.status_code().as_str()) != Some("DELETING"))
        .collect();
    assert_eq!(owned.len(), 1, "exactly one owned workspace: {owned:?}");
    owned[0].workspace_id().to_string()
}

async fn policy_default_document(aws: &Aws, name: &str) -> serde_json::Value {
    let iam = aws.iam().await;
    let arn = format!("arn:aws:iam::123456789012:policy/{name}");
    let p = iam.get_policy().policy_arn(&arn).send().await.unwrap();
    let version = p
        .policy()
        .unwrap()
        .default_version_id()
        .unwrap()
        .to_string();
    let v = iam
        .get_policy_version()
        .policy_arn(&arn)
        .version_id(version)
        .send()
        .await
        .unwrap();
    let raw = v.policy_version().unwrap().document().unwrap().to_string();
    let decoded = if raw.starts_with('{') {
        raw
    } else {
        percent_decode(&raw)
    };
    serde_json::from_str(&decoded).unwrap()
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reconciles_from_empty_then_plan_is_clean_and_reads_only() {
    let aws = Aws::start();
    let dir = default_stack();
    let dir = path_str(dir.path());

    let cold = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]);
    cold.expect(0);
    assert!(
        cold.stdout.contains("Converged: 10 resources in sync."),
        "{}",
        cold.stdout
    );
    let (_, writes) = cold.calls();
    assert!(writes > 0);

    let plan = stackwarden(Some(&aws.endpoint), &["plan", dir]);
    plan.expect(0);
    assert!(
        plan.stdout.contains("No changes: 10 resources in sync"),
        "{}",
        plan.stdout
    );
    let (total, writes) = plan.calls();
    assert_eq!(writes, 0, "a converged plan only reads");
    // Batched reads: per kind one listing (made even for kinds the stack does not use, so
    // objects it owns there are found when removed: EC2 instances, security groups, volumes,
    // Managed Grafana workspaces, Auto Scaling groups), plus the per-object reads IAM and AMP
    // need. Before them, one GetCallerIdentity checks that AWS can be called.
    assert_eq!(plan.count("GetCallerIdentity"), 1, "{}", plan.stderr);
    assert!(
        total - 1 <= 18,
        "a converged plan reads in batches, got {total} calls:\n{}",
        plan.stderr
    );

    // Every object carries both ownership tags.
    let iam = aws.iam().await;
    let tags = iam
        .list_role_tags()
        .role_name(PROMETHEUS_ROLE)
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = tags.tags().iter().map(|t| t.key()).collect();
    assert!(
        keys.contains(&"stackwarden:stack") && keys.contains(&"stackwarden:id"),
        "{keys:?}"
    );

    // The policy names the workspace's ARN, resolved at plan time.
    let ws = workspace_id(&aws).await;
    let doc = policy_default_document(&aws, "monitoring-prometheus_remote_write").await;
    assert!(doc.to_string().contains(&ws), "{doc}");

    // The JSON plan says the same for tools.
    let json = stackwarden(Some(&aws.endpoint), &["plan", "--json", dir]);
    json.expect(0);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["pending"], false);
    assert_eq!(v["summary"]["in_sync"], 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_band_drift_makes_plan_exit_2_and_reconcile_fixes_it() {
    let aws = Aws::start();
    let dir = default_stack();
    let dir = path_str(dir.path());
    converge(&aws, dir);
    let iam = aws.iam().await;
    let amp = aws.amp().await;
    let ws = workspace_id(&aws).await;

    // A managed policy detached, an inline policy edited, a rule group changed, a tag removed.
    iam.detach_role_policy()
        .role_name(PROMETHEUS_ROLE)
        .policy_arn(SSM_CORE)
        .send()
        .await
        .unwrap();
    iam.put_role_policy()
        .role_name(PROMETHEUS_ROLE)
        .policy_name("ec2_discovery")
        .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ec2:*","Resource":"*"}]}"#)
        .send()
        .await
        .unwrap();
    amp.put_rule_groups_namespace()
        .workspace_id(&ws)
        .name("node")
        .data(Blob::new("groups:\n- name: tampered\n  rules: []\n"))
        .send()
        .await
        .unwrap();
    iam.untag_role()
        .role_name("monitoring-grafana")
        .tag_keys("project")
        .send()
        .await
        .unwrap();

    let plan = stackwarden(Some(&aws.endpoint), &["plan", dir]);
    plan.expect(2);
    for expected in [
        "~ iam.role.prometheus",
        "managed_policies: (none) → arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
        "inline_policies.ec2_discovery:",
        "~ amp.workspace.main.rule_groups.node (rule groups namespace ",
        "    data: sha256:",
        // The rules' lines: the tampered group taken out, the desired ones put back.
        "      -- name: tampered\n",
        "      +  - name: node\n",
        // The policy pretty-printed, the action taken out.
        "      -      \"Action\": \"ec2:*\",\n",
        "~ iam.role.grafana",
        "tags.project: (none) → monitoring",
    ] {
        assert!(
            plan.stdout.contains(expected),
            "plan lacks {expected:?}:\n{}",
            plan.stdout
        );
    }

    // The JSON plan carries the rules' diff with the digests.
    let json = stackwarden(Some(&aws.endpoint), &["plan", "--json", dir]);
    json.expect(2);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let rules = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "amp.workspace.main.rule_groups.node")
        .unwrap_or_else(|| panic!("{}", json.stdout));
    let data = &rules["fields"][0];
    assert_eq!(data["field"], "data");
    assert!(data["before"].as_str().unwrap().starts_with("sha256:"));
    let diff = data["diff"].as_str().unwrap();
    assert!(diff.contains("\n-- name: tampered\n"), "{diff}");
    assert!(diff.contains("\n+  - name: node\n"), "{diff}");

    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]).expect(0);
    stackwarden(Some(&aws.endpoint), &["plan", dir]).expect(0);

    let attached = iam
        .list_attached_role_policies()
        .role_name(PROMETHEUS_ROLE)
        .send()
        .await
        .unwrap();
    assert!(attached
        .attached_policies()
        .iter()
        .any(|p| p.policy_arn() == Some(SSM_CORE)));
    let tags = iam
        .list_role_tags()
        .role_name("monitoring-grafana")
        .send()
        .await
        .unwrap();
    assert!(tags
        .tags()
        .iter()
        .any(|t| t.key() == "project" && t.value() == "monitoring"));
    let ns = amp
        .describe_rule_groups_namespace()
        .workspace_id(&ws)
        .name("node")
        .send()
        .await
        .unwrap();
    let data =
        String::from_utf8(ns.rule_groups_namespace().unwrap().data().as_ref().to_vec()).unwrap();
    assert!(data.contains("HighCpuUsage"), "{data}");
}

#[tokio::test(flavor = "multi_thread")]
async fn same_named_resources_without_our_tags_are_never_touched() {
    let aws = Aws::start();
    let iam = aws.iam().await;
    let amp = aws.amp().await;
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"lambda.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    iam.create_role()
        .role_name(PROMETHEUS_ROLE)
        .assume_role_policy_document(trust)
        .send()
        .await
        .unwrap();
    let foreign = amp
        .create_workspace()
        .alias("monitoring")
        .send()
        .await
        .unwrap();

    let dir = default_stack();
    let dir = path_str(dir.path());
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]);
    run.expect(1);
    assert!(
        run.stdout.contains("error: iam.role.prometheus: role `monitoring-prometheus` already exists and is not managed by this stack"),
        "{}",
        run.stdout
    );
    // What references the role waits; everything unrelated converged.
    assert!(
        run.stdout
            .contains("error: iam.instance_profile.prometheus: waiting for iam.role.prometheus"),
        "{}",
        run.stdout
    );
    let plan = stackwarden(Some(&aws.endpoint), &["plan", dir]);
    plan.expect(1);
    assert!(
        !plan.stdout.contains("iam.role.grafana"),
        "grafana converged:\n{}",
        plan.stdout
    );

    // The foreign role is exactly as it was: no tags, its own trust policy, nothing attached.
    let role = iam
        .get_role()
        .role_name(PROMETHEUS_ROLE)
        .send()
        .await
        .unwrap();
    let role = role.role().unwrap();
    assert!(role.tags().is_empty(), "{:?}", role.tags());
    assert!(role
        .assume_role_policy_document()
        .unwrap()
        .contains("lambda"));
    let attached = iam
        .list_attached_role_policies()
        .role_name(PROMETHEUS_ROLE)
        .send()
        .await
        .unwrap();
    assert!(attached.attached_policies().is_empty());
    // The foreign workspace with the same alias is untouched; ours is another one.
    let w = amp
        .describe_workspace()
        .workspace_id(foreign.workspace_id())
        .send()
        .await
        .unwrap();
    assert!(w.workspace().unwrap().tags().is_none_or(|t| t.is_empty()));
    assert_ne!(workspace_id(&aws).await, foreign.workspace_id());
}

/// A workspace deleted out of band is made again, past the stale client token the first
/// create left, and the policies naming its ARN follow in the same pass.
#[tokio::test(flavor = "multi_thread")]
async fn recreated_workspace_updates_the_policy_naming_its_arn_in_the_same_pass() {
    let aws = Aws::start();
    let dir = default_stack();
    let dir = path_str(dir.path());
    converge(&aws, dir);
    let old = workspace_id(&aws).await;
    aws.amp()
        .await
        .delete_workspace()
        .workspace_id(&old)
        .send()
        .await
        .unwrap();

    stackwarden(Some(&aws.endpoint), &["plan", dir]).expect(2);
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]);
    run.expect(0);
    // The request is the first create's, and so is its client token, which AMP answers with
    // the deleted workspace: seen gone, the create is made again with a token of its own.
    assert_eq!(run.count("CreateWorkspace"), 2, "{:?}", run.counts());
    let new = workspace_id(&aws).await;
    assert_ne!(old, new);
    for policy in [
        "monitoring-prometheus_remote_write",
        "monitoring-grafana_query",
    ] {
        let doc = policy_default_document(&aws, policy).await.to_string();
        assert!(doc.contains(&new) && !doc.contains(&old), "{policy}: {doc}");
    }
    stackwarden(Some(&aws.endpoint), &["plan", dir]).expect(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn adopting_an_existing_role_tags_it_without_recreating_it() {
    let aws = Aws::start();
    let iam = aws.iam().await;
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    let created = iam
        .create_role()
        .role_name("legacy-prometheus")
        .assume_role_policy_document(trust)
        .send()
        .await
        .unwrap();
    let role_id = created.role().unwrap().role_id().to_string();

    let dir = default_stack();
    edit(
        dir.path(),
        "iam.toml",
        "[iam.role.prometheus]\n",
        "[iam.role.prometheus]\nadopt = \"legacy-prometheus\"\n",
    );
    let dir = path_str(dir.path());
    let plan = stackwarden(Some(&aws.endpoint), &["plan", dir]);
    plan.expect(2);
    assert!(
        plan.stdout
            .contains("adopting existing role legacy-prometheus"),
        "{}",
        plan.stdout
    );
    converge(&aws, dir);
    stackwarden(Some(&aws.endpoint), &["plan", dir]).expect(0);

    let role = iam
        .get_role()
        .role_name("legacy-prometheus")
        .send()
        .await
        .unwrap();
    let role = role.role().unwrap();
    assert_eq!(role.role_id(), role_id, "adopted, not recreated");
    assert!(role
        .tags()
        .iter()
        .any(|t| t.key() == "stackwarden:id" && t.value() == "iam.role.prometheus"));
    let profile = iam
        .get_instance_profile()
        .instance_profile_name("monitoring-prometheus")
        .send()
        .await
        .unwrap();
    assert_eq!(
        profile.instance_profile().unwrap().roles()[0].role_name(),
        "legacy-prometheus"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_only_resources_show_drift_but_are_never_written() {
    let aws = Aws::start();
    let dir = default_stack();
    converge(&aws, path_str(dir.path()));
    edit(
        dir.path(),
        "iam.toml",
        "[iam.role.grafana]\n",
        "[iam.role.grafana]\nobserve_only = true\n",
    );
    let dir = path_str(dir.path());
    let iam = aws.iam().await;
    iam.detach_role_policy()
        .role_name("monitoring-grafana")
        .policy_arn(SSM_CORE)
        .send()
        .await
        .unwrap();

    let plan = stackwarden(Some(&aws.endpoint), &["plan", dir]);
    plan.expect(0);
    assert!(
        plan.stdout
            .contains("~ iam.role.grafana (role monitoring-grafana) [observe only: not applied]"),
        "{}",
        plan.stdout
    );
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]);
    run.expect(0);
    assert!(
        run.stdout
            .contains("drift (observe only, not applied): iam.role.grafana"),
        "{}",
        run.stdout
    );
    let attached = iam
        .list_attached_role_policies()
        .role_name("monitoring-grafana")
        .send()
        .await
        .unwrap();
    assert!(!attached
        .attached_policies()
        .iter()
        .any(|p| p.policy_arn() == Some(SSM_CORE)));
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_resources_are_orphaned_unless_pruned() {
    let aws = Aws::start();
    let dir = default_stack();
    converge(&aws, path_str(dir.path()));
    // Remove the Grafana instance profile from the desired state.
    edit(
        dir.path(),
        "iam.toml",
        "[iam.instance_profile.grafana]\nrole = \"${iam.role.grafana.name}\"\n",
        "",
    );
    let dir = path_str(dir.path());

    let plan = stackwarden(Some(&aws.endpoint), &["plan", dir]);
    plan.expect(0);
    assert!(
        plan.stdout
            .contains("! iam.instance_profile.grafana (instance profile monitoring-grafana)"),
        "{}",
        plan.stdout
    );
    converge(&aws, dir);
    let iam = aws.iam().await;
    assert!(
        iam.get_instance_profile()
            .instance_profile_name("monitoring-grafana")
            .send()
            .await
            .is_ok(),
        "orphaned, not deleted"
    );

    let plan = stackwarden(Some(&aws.endpoint), &["plan", "--prune", dir]);
    plan.expect(2);
    assert!(
        plan.stdout.contains("- iam.instance_profile.grafana"),
        "{}",
        plan.stdout
    );
    stackwarden(
        Some(&aws.endpoint),
        &["reconcile", "--once", "--prune", dir],
    )
    .expect(0);
    assert!(
        iam.get_instance_profile()
            .instance_profile_name("monitoring-grafana")
            .send()
            .await
            .is_err(),
        "pruned"
    );
    stackwarden(Some(&aws.endpoint), &["plan", "--prune", dir]).expect(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_changes_make_new_versions_and_never_exceed_five() {
    let aws = Aws::start();
    let dir = default_stack();
    let path = dir.path();
    let dir = path_str(path);
    converge(&aws, dir);
    for i in 0..6 {
        let sid = if i == 0 {
            "RemoteWrite".to_string()
        } else {
            format!("RemoteWrite{i}")
        };
        edit(
            path,
            "policies/amp-remote-write.json",
            &format!("\"Sid\": \"{sid}\""),
            &format!("\"Sid\": \"RemoteWrite{}\"", i + 1),
        );
        converge(&aws, dir);
    }
    let iam = aws.iam().await;
    let arn = "arn:aws:iam::123456789012:policy/monitoring-prometheus_remote_write";
    let versions = iam
        .list_policy_versions()
        .policy_arn(arn)
        .send()
        .await
        .unwrap();
    assert_eq!(versions.versions().len(), 5, "{:?}", versions.versions());
    let doc = policy_default_document(&aws, "monitoring-prometheus_remote_write").await;
    assert_eq!(doc["Statement"][0]["Sid"], "RemoteWrite6");
}

#[tokio::test(flavor = "multi_thread")]
async fn alertmanager_definition_is_put_on_change_and_a_rejection_is_reported_not_retried() {
    let aws = Aws::start();
    let dir = default_stack();
    let d = path_str(dir.path());
    converge(&aws, d);
    let ws = workspace_id(&aws).await;
    let amp = aws.amp().await;
    let describe = || async {
        amp.describe_alert_manager_definition()
            .workspace_id(&ws)
            .send()
            .await
            .unwrap()
            .alert_manager_definition
            .unwrap()
    };
    let active = describe().await;
    assert_eq!(active.status.unwrap().status_code.as_str(), "ACTIVE");
    let file = dir.path().join("alertmanager/amp.yml");
    assert_eq!(active.data.as_ref(), std::fs::read(&file).unwrap());

    // A changed file is put, and the next plan is clean.
    edit(
        dir.path(),
        "alertmanager/amp.yml",
        "group_interval: 15m",
        "group_interval: 20m",
    );
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(2);
    assert!(plan.stdout.contains("alertmanager"), "{}", plan.stdout);
    converge(&aws, d);
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
    let fixed_text = std::fs::read(&file).unwrap();
    assert_eq!(describe().await.data.as_ref(), fixed_text);

    // What only AMP checks (an SNS receiver without a topic) fails with AMP's reason, and the
    // same definition is not put again on the next pass.
    edit(
        dir.path(),
        "alertmanager/amp.yml",
        "topic_arn: arn:aws:sns:us-east-1:123456789012:monitoring-pager",
        "api_url: https://sns.us-east-1.amazonaws.com",
    );
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(1);
    assert!(
        run.stderr
            .contains("must provide either a Target ARN, Topic ARN, or Phone Number"),
        "{}",
        run.stderr
    );
    let again = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    again.expect(1);
    assert!(again
        .stderr
        .contains("AMP rejected the alertmanager definition"));
    assert!(
        !again.stderr.contains("PutAlertManagerDefinition"),
        "a rejected definition was put again:\n{}",
        again.stderr
    );
    assert_eq!(
        describe().await.data.as_ref(),
        fixed_text,
        "the definition in force is the last good one"
    );

    // Fixing the file puts it.
    std::fs::write(&file, &fixed_text).unwrap();
    converge(&aws, d);
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_service_endpoint_variables_are_honoured() {
    let aws = Aws::start();
    let dir = default_stack();
    let e = aws.endpoint.as_str();
    let per_service = [
        ("AWS_ENDPOINT_URL_IAM", e),
        ("AWS_ENDPOINT_URL_AMP", e),
        ("AWS_ENDPOINT_URL_GRAFANA", e),
        ("AWS_ENDPOINT_URL_EC2", e),
        ("AWS_ENDPOINT_URL_SSM", e),
        ("AWS_ENDPOINT_URL_STS", e),
    ];
    // The global AWS_ENDPOINT_URL points at a closed port: every call must use its service's.
    let run = stackwarden_with(
        None,
        &["reconcile", "--once", path_str(dir.path())],
        &per_service,
    );
    run.expect(0);
    assert!(run.calls().1 > 0, "{}", run.stderr);
}

/// The rule groups namespaces of the workspace, by name: (ARN, creation time).
async fn namespaces(aws: &Aws, ws: &str) -> std::collections::BTreeMap<String, (String, String)> {
    aws.amp()
        .await
        .list_rule_groups_namespaces()
        .workspace_id(ws)
        .send()
        .await
        .unwrap()
        .rule_groups_namespaces()
        .iter()
        .map(|n| {
            let created = n.created_at().to_string();
            (n.name().to_string(), (n.arn().to_string(), created))
        })
        .collect()
}

/// Each AMP part lost out of band is made again alone: one `reconcile --once` writes only
/// that object, and the workspace and the other parts keep their identities.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_amp_part_is_restored_alone_keeping_the_workspace_and_the_other_parts() {
    let aws = Aws::start();
    let dir = default_stack();
    let dir = path_str(dir.path());
    converge(&aws, dir);
    let amp = aws.amp().await;
    let ws = workspace_id(&aws).await;
    let before = namespaces(&aws, &ws).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // A rule groups namespace deleted.
    amp.delete_rule_groups_namespace()
        .workspace_id(&ws)
        .name("node")
        .send()
        .await
        .unwrap();
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]);
    run.expect(0);
    assert!(
        run.stdout
            .contains("+ amp.workspace.main.rule_groups.node (rule groups namespace node)"),
        "{}",
        run.stdout
    );
    assert_eq!(run.count("CreateRuleGroupsNamespace"), 1, "{}", run.stderr);
    assert_eq!(
        run.calls().1,
        1,
        "one write, the namespace:\n{}",
        run.stderr
    );
    assert_eq!(workspace_id(&aws).await, ws);
    let after = namespaces(&aws, &ws).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(
        after["application"], before["application"],
        "the other namespace kept"
    );

    // The alertmanager definition deleted: created again (and recorded), waited for across
    // passes until AMP has checked it, nothing else written.
    amp.delete_alert_manager_definition()
        .workspace_id(&ws)
        .send()
        .await
        .unwrap();
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]);
    run.expect(0);
    assert!(
        run.stdout
            .contains("+ amp.workspace.main.alertmanager (alertmanager definition"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("amp.workspace.main.alertmanager: waiting: alertmanager definition"),
        "progress while AMP checks the definition:\n{}",
        run.stderr
    );
    assert_eq!(
        run.count("CreateAlertManagerDefinition"),
        1,
        "{}",
        run.stderr
    );
    assert_eq!(run.count("TagResource"), 1, "{}", run.stderr);
    assert_eq!(run.calls().1, 2, "{}", run.stderr);
    assert_eq!(workspace_id(&aws).await, ws);
    assert_eq!(namespaces(&aws, &ws).await, after);
    stackwarden(Some(&aws.endpoint), &["plan", dir]).expect(0);
}

/// The stack's region is authoritative. With `AWS_REGION` naming another region (a CI runner's
/// default), `plan` and `reconcile --once` of a stack that says `region = "us-east-1"` act in
/// us-east-1 only: converged there, nothing planned or made elsewhere. A `--region` that
/// contradicts the stack's is an error naming both, before any AWS call.
#[tokio::test(flavor = "multi_thread")]
async fn the_stack_region_wins_over_the_environment_and_a_contradicting_flag_is_an_error() {
    let aws = Aws::start();
    let dir = default_stack();
    let d = path_str(dir.path());
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);

    let elsewhere = [("AWS_REGION", "eu-west-1")];
    let plan = stackwarden_with(Some(&aws.endpoint), &["plan", d], &elsewhere);
    plan.expect(0);
    assert!(plan.stdout.contains("No changes"), "{}", plan.stdout);
    let again = stackwarden_with(Some(&aws.endpoint), &["reconcile", "--once", d], &elsewhere);
    again.expect(0);
    assert_eq!(again.calls().1, 0, "no write:\n{}", again.stderr);
    let eu = aws_sdk_amp::Client::new(&aws.sdk_in("eu-west-1").await);
    let workspaces = eu.list_workspaces().send().await.unwrap();
    assert!(
        workspaces.workspaces().is_empty(),
        "nothing made in eu-west-1: {:?}",
        workspaces.workspaces()
    );

    for args in [
        vec!["--region", "eu-west-1", "plan", d],
        vec!["--region", "eu-west-1", "reconcile", "--once", d],
    ] {
        let refused = stackwarden(Some(&aws.endpoint), &args);
        refused.expect(1);
        assert!(
            refused
                .stderr
                .contains("--region eu-west-1 contradicts the stack's region us-east-1"),
            "{args:?}: {}",
            refused.stderr
        );
        assert_eq!(refused.calls().0, 0, "{args:?} called AWS");
    }
    // Repeating the stack's region is fine.
    stackwarden(Some(&aws.endpoint), &["--region", "us-east-1", "plan", d]).expect(0);
}

/// IAM stores a trust policy in its own form: an account id given as a principal comes back as
/// the account's root ARN (the emulator rewrites it as IAM does). That form is the desired one,
/// not drift: after the role is made, `plan` finds nothing, and a second pass writes nothing.
/// Nor is a customer managed policy stored in an equivalent form.
#[tokio::test(flavor = "multi_thread")]
async fn a_trust_policy_and_a_managed_policy_in_iams_stored_forms_are_not_drift() {
    let aws = Aws::start();
    let dir = default_stack();
    let d = path_str(dir.path());
    edit(
        dir.path(),
        "iam.toml",
        "trust = { services = [\"ec2.amazonaws.com\"] }\nmanaged_policies = [\n  \"arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore\",",
        "trust = { services = [\"ec2.amazonaws.com\"], aws = [\"123456789012\"] }\nmanaged_policies = [\n  \"arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore\",",
    );
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);
    let role = aws
        .iam()
        .await
        .get_role()
        .role_name("monitoring-prometheus")
        .send()
        .await
        .unwrap();
    let stored = role.role().unwrap().assume_role_policy_document().unwrap();
    let stored = stackwarden_controllers::policy::decode(stored)
        .unwrap()
        .to_string();
    assert!(
        stored.contains("arn:aws:iam::123456789012:root") && !stored.contains("\"123456789012\""),
        "IAM's stored form: {stored}"
    );
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(0);
    assert!(plan.stdout.contains("No changes"), "{}", plan.stdout);
    let again = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    again.expect(0);
    assert_eq!(again.calls().1, 0, "no write:\n{}", again.stderr);

    // A customer managed policy whose default version holds the same statements in another of
    // IAM's equivalent forms (a scalar for a one-element list, no Sid order, compact JSON) is
    // not drift either.
    let iam = aws.iam().await;
    let policies = iam
        .list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .send()
        .await
        .unwrap();
    let remote_write = policies
        .policies()
        .iter()
        .find(|p| p.policy_name().unwrap().contains("remote_write"))
        .expect("the remote-write policy");
    let arn = remote_write.arn().unwrap();
    let version = iam
        .get_policy_version()
        .policy_arn(arn)
        .version_id(remote_write.default_version_id().unwrap())
        .send()
        .await
        .unwrap();
    let current = stackwarden_controllers::policy::decode(
        version.policy_version().unwrap().document().unwrap(),
    )
    .unwrap();
    let workspace = current["Statement"][0]["Resource"]
        .as_str()
        .unwrap()
        .to_string();
    let equivalent = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": {"Effect": "Allow", "Resource": [workspace], "Action": "aps:RemoteWrite", "Sid": "RemoteWrite"},
    });
    iam.create_policy_version()
        .policy_arn(arn)
        .policy_document(equivalent.to_string())
        .set_as_default(true)
        .send()
        .await
        .unwrap();
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(0);
    assert!(plan.stdout.contains("No changes"), "{}", plan.stdout);
}

/// What one account holds of the stacks: its roles' and customer managed policies' names, and
/// the `stackwarden:stack` tag of each AMP workspace.
async fn account_holds(iam: &aws_sdk_iam::Client, amp: &aws_sdk_amp::Client) -> Vec<String> {
    let mut held = Vec::new();
    let roles = iam.list_roles().send().await.unwrap();
    held.extend(
        roles
            .roles()
            .iter()
            .map(|r| format!("role {}", r.role_name())),
    );
    let policies = iam
        .list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .send()
        .await
        .unwrap();
    held.extend(
        policies
            .policies()
            .iter()
            .map(|p| format!("policy {}", p.policy_name().unwrap())),
    );
    let workspaces = amp.list_workspaces().send().await.unwrap();
    held.extend(workspaces.workspaces().iter().map(|w| {
        let stack = w.tags().and_then(|t| t.get("stackwarden:stack"));
        format!(
            "workspace of {}",
            stack.map(String::as_str).unwrap_or("none")
        )
    }));
    held.sort();
    held
}

/// The AssumeRole calls the emulator answered so far, by status.
fn assume_role_calls(aws: &Aws) -> Vec<u16> {
    aws.emulator
        .calls()
        .iter()
        .filter(|c| c.service == "sts" && c.operation == "AssumeRole")
        .map(|c| c.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn stacks_acting_as_roles_of_two_accounts_each_make_only_their_own_objects_there() {
    let aws = Aws::start();
    let (dev_account, prod_account) = ("111111111111", "222222222222");
    aws.assumable_role(dev_account, "stackwarden-target", None)
        .await;
    aws.assumable_role(prod_account, "stackwarden-target", Some("prod-ops"))
        .await;
    let dev_role = format!("arn:aws:iam::{dev_account}:role/stackwarden-target");
    let prod_role = format!("arn:aws:iam::{prod_account}:role/stackwarden-target");
    let dev = stack_as("dev", &dev_role, None);
    let prod = stack_as("prod", &prod_role, Some("prod-ops"));
    let (dev, prod) = (path_str(dev.path()), path_str(prod.path()));

    for dir in [dev, prod] {
        let before = assume_role_calls(&aws).len();
        let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", dir]);
        run.expect(0);
        assert!(
            run.stdout.contains("Converged: 10 resources in sync."),
            "{}",
            run.stdout
        );
        // Every client of the run shares the one session.
        assert_eq!(assume_role_calls(&aws)[before..], [200], "{dir}");
    }

    let holds = |iam, amp| async move { account_holds(&iam, &amp).await };
    let expected = |stack: &str| {
        let mut e = vec![
            "role stackwarden-target".to_string(),
            format!("role {stack}-prometheus"),
            format!("role {stack}-grafana"),
            format!("policy {stack}-prometheus_remote_write"),
            format!("policy {stack}-grafana_query"),
            format!("workspace of {stack}"),
        ];
        e.sort();
        e
    };
    assert_eq!(
        holds(aws.iam_in(dev_account).await, aws.amp_in(dev_account).await).await,
        expected("dev"),
        "the dev account holds the dev stack and nothing of prod's"
    );
    assert_eq!(
        holds(
            aws.iam_in(prod_account).await,
            aws.amp_in(prod_account).await
        )
        .await,
        expected("prod"),
        "the prod account holds the prod stack and nothing of dev's"
    );
    assert_eq!(
        holds(aws.iam().await, aws.amp().await).await,
        Vec::<String>::new(),
        "the operator's own account holds neither"
    );
    // References resolve to the stack's own account: the policy names its workspace there.
    let dev_iam = aws.iam_in(dev_account).await;
    let policy = format!("arn:aws:iam::{dev_account}:policy/dev-prometheus_remote_write");
    let version = dev_iam
        .get_policy_version()
        .policy_arn(&policy)
        .version_id("v1")
        .send()
        .await
        .unwrap();
    let document = percent_decode(version.policy_version().unwrap().document().unwrap());
    assert!(
        document.contains(&format!("arn:aws:aps:us-east-1:{dev_account}:workspace/")),
        "{document}"
    );

    // plan names the role and the account in its header, and finds nothing to do.
    let plan = stackwarden(Some(&aws.endpoint), &["plan", dev]);
    plan.expect(0);
    assert!(
        plan.stdout
            .contains(&format!("acting as {dev_role} (account {dev_account})")),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("No changes"), "{}", plan.stdout);
    let json = stackwarden(Some(&aws.endpoint), &["plan", "--json", prod]);
    json.expect(0);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        v["acting_as"],
        serde_json::json!({"role": prod_role, "account": prod_account})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_cannot_be_assumed_is_one_error_for_its_stack_and_the_others_converge() {
    let aws = Aws::start();
    aws.assumable_role("111111111111", "stackwarden-target", None)
        .await;
    aws.assumable_role("222222222222", "stackwarden-target", Some("prod-ops"))
        .await;
    let dev = stack_as(
        "dev",
        "arn:aws:iam::111111111111:role/stackwarden-target",
        None,
    );
    let prod_role = "arn:aws:iam::222222222222:role/stackwarden-target";
    let prod = stack_as("prod", prod_role, Some("prod-ops"));
    // No such role in the account; the right role with the wrong external id.
    let qa_role = "arn:aws:iam::333333333333:role/stackwarden-target";
    let qa = stack_as("qa", qa_role, None);
    let wrong_id = stack_as("prod", prod_role, Some("dev-ops"));

    for (dir, stack, role) in [(&qa, "qa", qa_role), (&wrong_id, "prod", prod_role)] {
        let dir = path_str(dir.path());
        for args in [vec!["reconcile", "--once", dir], vec!["plan", dir]] {
            let before = assume_role_calls(&aws).len();
            let refused = stackwarden(Some(&aws.endpoint), &args);
            refused.expect(1);
            let error = format!(
                "cannot assume role {role} for stack {stack}: AccessDenied: User: arn:aws:"
            );
            assert_eq!(
                refused.stderr.matches(&error).count(),
                1,
                "{args:?}: one error for the stack:\n{}",
                refused.stderr
            );
            assert!(
                refused.stderr.contains(&format!(
                    "is not authorized to perform: sts:AssumeRole on resource: {role}"
                )),
                "{}",
                refused.stderr
            );
            assert_eq!(
                refused.stderr.matches("AccessDenied").count(),
                1,
                "{args:?}: no resource repeats it:\n{}",
                refused.stderr
            );
            assert!(refused.stdout.is_empty(), "{args:?}: {}", refused.stdout);
            // Refused at the first call, before any pass: one AssumeRole, and nothing else
            // reached AWS (the call that needed the credentials was never sent).
            assert_eq!(assume_role_calls(&aws)[before..], [403], "{args:?}");
            assert_eq!(refused.calls(), (0, 0), "{args:?}: {}", refused.stderr);
        }
    }

    for dir in [&dev, &prod] {
        let run = stackwarden(
            Some(&aws.endpoint),
            &["reconcile", "--once", path_str(dir.path())],
        );
        run.expect(0);
        assert!(
            run.stdout.contains("Converged: 10 resources in sync."),
            "{}",
            run.stdout
        );
    }
    let qa_roles = aws.iam_in("333333333333").await.list_roles().send().await;
    assert!(qa_roles.unwrap().roles().is_empty());
}

/// AWS that cannot be called is one error before anything is read, exit 1: an endpoint that
/// does not answer, credentials that are not there. Never a "No changes" followed by the same
/// failure for every resource, never the SDK's debug dump.
#[test]
fn aws_that_cannot_be_called_is_one_error_before_anything_is_read() {
    let dir = default_stack();
    let d = path_str(dir.path());
    let unset = [("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")];
    for (what, env, cause) in [
        (
            "no answer",
            &[][..],
            "cannot call AWS for stack monitoring: dispatch failure: io error",
        ),
        (
            "no credentials",
            &unset[..],
            "cannot call AWS for stack monitoring: dispatch failure: other: the credential provider was not enabled: no credentials found in chain",
        ),
    ] {
        for command in [&["plan", d][..], &["reconcile", "--once", d][..]] {
            let run = stackwarden_with(None, command, env);
            run.expect(1);
            let errors: Vec<&str> = run
                .stderr
                .lines()
                .filter(|l| l.starts_with("error:"))
                .collect();
            assert_eq!(errors.len(), 1, "{what}, {command:?}:\n{}", run.stderr);
            assert!(errors[0].contains(cause), "{what}: {}", errors[0]);
            for absent in ["No changes", "Debug", "DispatchFailure(", "ConnectorError {"] {
                assert!(
                    !run.stderr.contains(absent) && !run.stdout.contains(absent),
                    "{what}, {command:?}: {absent} in\n{}\n{}",
                    run.stdout,
                    run.stderr
                );
            }
            assert!(run.stdout.trim().is_empty(), "{what}: {}", run.stdout);
            let (_, writes) = run.calls();
            assert_eq!(writes, 0);
        }
    }
}
