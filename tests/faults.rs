//! Proof under faults: the default stack converges from empty while the emulator throttles 30%
//! of all calls and fails 5% with server errors, in a bounded number of passes; and for every
//! k, an operator killed with SIGKILL right after its k-th write converges when restarted, for
//! the default stack and for seed 000's (a host, a Grafana group, their security groups).
//! Either way: exactly one of each object, each tagged, no second policy version.

use std::time::{Duration, Instant};

use stackwarden_emulator::{Fault, FaultKind};

use crate::harness::{command, default_stack, path_str, stackwarden, Aws};

/// The default stack exists exactly once, every object carrying the ownership tags.
async fn the_default_stack_exists_once(aws: &Aws) {
    let iam = aws.iam().await;
    let owned = |tags: &[aws_sdk_iam::types::Tag]| {
        tags.iter()
            .any(|t| t.key() == "stackwarden:stack" && t.value() == "monitoring")
            && tags.iter().any(|t| t.key() == "stackwarden:id")
    };

    let roles = iam.list_roles().send().await.unwrap();
    let mut names: Vec<&str> = roles.roles().iter().map(|r| r.role_name()).collect();
    names.sort();
    assert_eq!(names, ["monitoring-grafana", "monitoring-prometheus"]);
    for name in names {
        let tags = iam.list_role_tags().role_name(name).send().await.unwrap();
        assert!(owned(tags.tags()), "role {name}: {:?}", tags.tags());
    }

    let policies = iam
        .list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .send()
        .await
        .unwrap();
    let mut names: Vec<(&str, &str)> = policies
        .policies()
        .iter()
        .map(|p| (p.policy_name().unwrap(), p.arn().unwrap()))
        .collect();
    names.sort();
    assert_eq!(
        names.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [
            "monitoring-grafana_query",
            "monitoring-prometheus_remote_write"
        ]
    );
    for (name, arn) in names {
        let tags = iam.list_policy_tags().policy_arn(arn).send().await.unwrap();
        assert!(owned(tags.tags()), "policy {name}: {:?}", tags.tags());
        let versions = iam
            .list_policy_versions()
            .policy_arn(arn)
            .send()
            .await
            .unwrap();
        assert_eq!(versions.versions().len(), 1, "policy {name}: one version");
    }

    let profiles = iam.list_instance_profiles().send().await.unwrap();
    let mut names: Vec<&str> = profiles
        .instance_profiles()
        .iter()
        .map(|p| p.instance_profile_name())
        .collect();
    names.sort();
    assert_eq!(names, ["monitoring-grafana", "monitoring-prometheus"]);
    for p in profiles.instance_profiles() {
        assert_eq!(p.roles().len(), 1, "{}", p.instance_profile_name());
        let got = iam
            .get_instance_profile()
            .instance_profile_name(p.instance_profile_name())
            .send()
            .await
            .unwrap();
        let tags = got.instance_profile().unwrap().tags();
        assert!(owned(tags), "{}: {tags:?}", p.instance_profile_name());
    }

    let amp = aws.amp().await;
    let workspaces = amp.list_workspaces().send().await.unwrap();
    assert_eq!(workspaces.workspaces().len(), 1, "one workspace");
    let ws = &workspaces.workspaces()[0];
    assert_eq!(ws.alias(), Some("monitoring"));
    let tags = ws.tags().cloned().unwrap_or_default();
    assert_eq!(
        tags.get("stackwarden:stack").map(String::as_str),
        Some("monitoring")
    );
    let namespaces = amp
        .list_rule_groups_namespaces()
        .workspace_id(ws.workspace_id())
        .send()
        .await
        .unwrap();
    assert_eq!(namespaces.rule_groups_namespaces().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_stack_converges_through_throttling_and_server_errors() {
    let aws = Aws::start();
    // The first rule that fires answers: 30% throttled, then 5% of all calls server errors
    // (2.5% each of 500 and 503), every service in its own protocol's shape.
    let server = 0.025 / 0.7;
    aws.emulator
        .inject(Fault::everywhere(FaultKind::Throttle).rate(0.3));
    aws.emulator
        .inject(Fault::everywhere(FaultKind::ServerError { status: 500 }).rate(server));
    aws.emulator.inject(
        Fault::everywhere(FaultKind::ServerError { status: 503 }).rate(server / (1.0 - server)),
    );
    let dir = default_stack();
    let d = path_str(dir.path());
    let mut passes = 0;
    loop {
        passes += 1;
        let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
        if run.code == 0 {
            break;
        }
        assert!(
            passes < 5,
            "not converged after {passes} passes under faults; the last one:\n{}\n{}",
            run.stdout,
            run.stderr
        );
    }
    let faulted = aws.emulator.calls().iter().filter(|c| c.fault).count();
    assert!(faulted > 20, "the faults fired ({faulted} calls)");
    eprintln!("converged in {passes} passes, {faulted} calls faulted");

    aws.emulator.clear_faults();
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
    the_default_stack_exists_once(&aws).await;
}

/// For every k: a cold `reconcile --once` of what `setup` makes, killed with SIGKILL right
/// after its k-th write (the writes after it are held by the emulator, so exactly k reached
/// AWS), then restarted: the restart converges in one run and `check` finds exactly one of
/// every object. Ends at the first k the cold run finishes without reaching; returns the
/// number of writes of a whole cold run.
async fn killed_after_each_write<S, F, C>(setup: S, check: C) -> u32
where
    S: Fn() -> F,
    F: std::future::Future<Output = (Aws, tempfile::TempDir)>,
    C: for<'a> Fn(&'a Aws) -> futures::future::BoxFuture<'a, ()>,
{
    let mut k = 1;
    loop {
        let (aws, dir) = setup().await;
        let d = path_str(dir.path());
        aws.emulator.inject(Fault::writes_after(
            k,
            FaultKind::Latency { millis: 600_000 },
        ));
        let mut child = command(Some(&aws.endpoint), &["reconcile", "--once", d])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            let writes = aws.emulator.calls().iter().filter(|c| c.write).count();
            if writes >= k as usize {
                // SIGKILL: no chance to clean up.
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            assert!(Instant::now() < deadline, "k={k}: no progress");
            std::thread::sleep(Duration::from_millis(10));
        };
        aws.emulator.clear_faults();
        if let Some(status) = finished {
            // Fewer than k writes make the whole cold reconcile: every k has been covered.
            assert!(status.success(), "k={k}: the uninterrupted run failed");
            return k - 1;
        }
        let restart = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
        assert_eq!(
            restart.code, 0,
            "k={k}: the restarted operator did not converge:\n{}\n{}",
            restart.stdout, restart.stderr
        );
        check(&aws).await;
        k += 1;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_any_write_a_restarted_operator_converges_without_duplicates() {
    let writes = killed_after_each_write(
        || async { (Aws::start(), default_stack()) },
        |aws| Box::pin(the_default_stack_exists_once(aws)),
    )
    .await;
    assert!(
        writes > 10,
        "a cold reconcile makes more than {writes} writes"
    );
}

/// Seed 000's stack (a Prometheus host with its volume, Grafana's group behind an HTTPS load
/// balancer, their security groups and IAM) exists exactly once.
async fn seed_000_exists_once(aws: &Aws) {
    let (ec2, elb, asg, iam) = (
        aws.ec2().await,
        aws.elb().await,
        aws.autoscaling().await,
        aws.iam().await,
    );
    let stack = aws_sdk_ec2::types::Filter::builder()
        .name("tag:stackwarden:stack")
        .values("aws-monitoring")
        .build();
    let id = |tags: &[aws_sdk_ec2::types::Tag]| -> String {
        tags.iter()
            .find(|t| t.key() == Some("stackwarden:id"))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_string()
    };

    let instances = ec2
        .describe_instances()
        .filters(stack.clone())
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut by_id: std::collections::BTreeMap<String, usize> = Default::default();
    for i in instances.reservations().iter().flat_map(|r| r.instances()) {
        *by_id.entry(id(i.tags())).or_default() += 1;
    }
    assert_eq!(
        by_id,
        [
            ("grafana.main".to_string(), 2),
            ("host.prometheus".to_string(), 1)
        ]
        .into(),
        "one Prometheus instance, Grafana's desired capacity"
    );

    let volumes = ec2
        .describe_volumes()
        .filters(stack.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(volumes.volumes().len(), 1, "{:?}", volumes.volumes());

    let groups = ec2
        .describe_security_groups()
        .filters(stack.clone())
        .send()
        .await
        .unwrap();
    let mut ids: Vec<String> = groups
        .security_groups()
        .iter()
        .map(|g| id(g.tags()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "grafana.main.security_group.alb",
            "grafana.main.security_group.instances",
            "host.prometheus.security_group"
        ]
    );

    let templates = ec2
        .describe_launch_templates()
        .filters(stack)
        .send()
        .await
        .unwrap();
    assert_eq!(templates.launch_templates().len(), 1);
    let lbs = elb.describe_load_balancers().send().await.unwrap();
    assert_eq!(lbs.load_balancers().len(), 1);
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(lbs.load_balancers()[0].load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(listeners.listeners().len(), 2);
    let tgs = elb.describe_target_groups().send().await.unwrap();
    assert_eq!(tgs.target_groups().len(), 1);
    let groups = asg.describe_auto_scaling_groups().send().await.unwrap();
    assert_eq!(groups.auto_scaling_groups().len(), 1);
    assert_eq!(groups.auto_scaling_groups()[0].instances().len(), 2);
    assert_eq!(
        groups.auto_scaling_groups()[0].target_group_arns(),
        [tgs.target_groups()[0]
            .target_group_arn()
            .unwrap()
            .to_string()]
    );

    let policies = iam
        .list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .send()
        .await
        .unwrap();
    for p in policies.policies() {
        let versions = iam
            .list_policy_versions()
            .policy_arn(p.arn().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(
            versions.versions().len(),
            1,
            "{:?}: one version",
            p.policy_name()
        );
    }
    let profiles = iam.list_instance_profiles().send().await.unwrap();
    for p in profiles.instance_profiles() {
        assert_eq!(
            p.roles().len(),
            1,
            "{}: one role",
            p.instance_profile_name()
        );
    }
}

/// The crash test over the composites: seed 000's stack reconciled from empty, the operator
/// SIGKILLed after each of its writes in turn, the emulator refusing creates of names that
/// exist as AWS does: every restart converges with exactly one of every object.
#[tokio::test(flavor = "multi_thread")]
async fn seed_000_killed_after_any_write_a_restarted_operator_converges_without_duplicates() {
    let writes = killed_after_each_write(
        || async {
            let ex = crate::examples::Example::seed_000().await;
            (ex.aws, ex.dir)
        },
        |aws| Box::pin(seed_000_exists_once(aws)),
    )
    .await;
    assert!(
        writes > 30,
        "a cold reconcile of seed 000 makes more than {writes} writes"
    );
    eprintln!("seed 000: killed after each of {writes} writes");
}
