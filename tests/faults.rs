//! Proof under faults: the default stack converges from empty while the emulator throttles 30%
//! of all calls and fails 5% with server errors, in a bounded number of passes; and for every
//! k, an operator killed with SIGKILL right after its k-th write converges when restarted.
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

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_any_write_a_restarted_operator_converges_without_duplicates() {
    let mut k = 1;
    loop {
        let aws = Aws::start();
        let dir = default_stack();
        let d = path_str(dir.path());
        // Writes after the k-th hang (before they reach the emulator's state), so the process
        // is killed with exactly k writes made.
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
            assert!(k > 10, "a cold reconcile makes more than {k} writes");
            break;
        }
        let restart = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
        assert_eq!(
            restart.code, 0,
            "k={k}: the restarted operator did not converge:\n{}\n{}",
            restart.stdout, restart.stderr
        );
        the_default_stack_exists_once(&aws).await;
        k += 1;
    }
}
