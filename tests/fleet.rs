//! host_config against the emulator: files pushed to every instance a tag selects, in each
//! instance's sandbox, with the hash recorded so a converged pass sends nothing; instances that
//! join later; a failure on some hosts reported with their output; overlapping files refused
//! offline; and a push to 1,000 instances in batches, tracked without a call per host.

use aws_sdk_ec2::types::Filter;
use stackwarden_emulator::Settings;

use crate::harness::{default_stack, launch, path_str, run_commands, stackwarden, Aws};

const NODE_EXPORTER: &str = r#"[host_config.node_exporter]
targets = { Role = "app" }
files = [{ path = "/etc/default/node_exporter", source = "hosts/node_exporter.env", validate = "grep -q ARGS {}" }]
reload = "echo reloaded >> \"$STACKWARDEN_ROOT/reloads\""
max_concurrency = "10%"
max_errors = "0"
"#;

fn stack_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = default_stack();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn files_reach_every_tagged_instance_once_and_later_joiners_next_pass() {
    let sandboxes = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        sandbox_dir: Some(sandboxes.path().to_path_buf()),
        ..Settings::default()
    });
    let apps = launch(&aws, 3, "app").await;
    let other = launch(&aws, 1, "db").await;
    let dir = stack_with(&[
        ("host_config.toml", NODE_EXPORTER),
        ("hosts/node_exporter.env", "ARGS=--collector.systemd\n"),
    ]);
    let d = path_str(dir.path());

    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(0);
    assert_eq!(run.count("SendCommand"), 1, "{}", run.stderr);
    for id in &apps {
        let root = sandboxes.path().join(id);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/default/node_exporter")).unwrap(),
            "ARGS=--collector.systemd\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("reloads")).unwrap(),
            "reloaded\n"
        );
    }
    assert!(
        !sandboxes.path().join(&other[0]).exists(),
        "untagged instances get nothing"
    );

    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(0);
    assert_eq!(plan.count("SendCommand") + plan.count("ListCommands"), 0);

    // An instance that joins later gets the files on the next pass, and only it.
    let late = launch(&aws, 1, "app").await;
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(2);
    assert!(
        plan.stdout.contains("1 of 4 instances lack"),
        "{}",
        plan.stdout
    );
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);
    assert!(sandboxes
        .path()
        .join(&late[0])
        .join("etc/default/node_exporter")
        .exists());
    assert_eq!(
        std::fs::read_to_string(sandboxes.path().join(&apps[0]).join("reloads")).unwrap(),
        "reloaded\n",
        "instances that had the files were not sent them again"
    );
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_changed_on_a_host_is_found_by_verify_and_put_back_once() {
    let sandboxes = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        sandbox_dir: Some(sandboxes.path().to_path_buf()),
        ..Settings::default()
    });
    let apps = launch(&aws, 3, "app").await;
    let dir = stack_with(&[
        ("host_config.toml", NODE_EXPORTER),
        ("hosts/node_exporter.env", "ARGS=--collector.systemd\n"),
    ]);
    let d = path_str(dir.path());
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);
    let file = |id: &str| sandboxes.path().join(id).join("etc/default/node_exporter");
    let reloads =
        |id: &str| std::fs::read_to_string(sandboxes.path().join(id).join("reloads")).unwrap();

    // Edited on one host out of band: a plan cannot see inside hosts.
    std::fs::write(file(&apps[1]), "ARGS=tampered\n").unwrap();
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);

    // The verify finds it; the same run puts it back, on that host only.
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", "--verify", d]);
    run.expect(0);
    assert!(
        run.stderr.contains(
            "verify: 3 instances, 1 with files changed since their push (pushed again by this pass)"
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "changed: {} host_config.node_exporter: /etc/default/node_exporter",
            apps[1]
        )),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.count("SendCommand"),
        2,
        "the verify and one push: {}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(file(&apps[1])).unwrap(),
        "ARGS=--collector.systemd\n"
    );
    assert_eq!(reloads(&apps[1]), "reloaded\nreloaded\n");
    for id in [&apps[0], &apps[2]] {
        assert_eq!(reloads(id), "reloaded\n", "{id} was not pushed to again");
    }
    let commands = run_commands(&aws.ssm().await).await;
    let push = commands.last().unwrap();
    assert!(push
        .comment()
        .unwrap()
        .starts_with("stackwarden host_config.node_exporter"));
    assert_eq!(push.instance_ids(), std::slice::from_ref(&apps[1]));
    let verify = &commands[commands.len() - 2];
    assert_eq!(verify.comment(), Some("stackwarden verify"));
    let mut all = apps.clone();
    all.sort();
    assert_eq!(verify.instance_ids(), all.as_slice());

    // Once: the next verify finds nothing and nothing is pushed.
    let again = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", "--verify", d]);
    again.expect(0);
    assert!(
        again
            .stderr
            .contains("verify: 3 instances, 0 with files changed since their push\n"),
        "{}",
        again.stderr
    );
    assert_eq!(again.count("SendCommand"), 1, "the verify only");
    assert_eq!(reloads(&apps[1]), "reloaded\nreloaded\n");
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
}

/// Run Command keeps the first 2,500 characters of an output in ListCommandInvocations and
/// the first 24,000 in GetCommandInvocation. A verify whose output is longer than the listing
/// keeps (two bundles of thirty long paths, all changed) is read whole, so the drift of the
/// bundle whose line comes last is found and put back too.
#[tokio::test(flavor = "multi_thread")]
async fn a_verify_output_longer_than_the_listing_keeps_is_read_whole() {
    let sandboxes = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        sandbox_dir: Some(sandboxes.path().to_path_buf()),
        ..Settings::default()
    });
    let apps = launch(&aws, 1, "app").await;
    let long = "a-directory-name-long-enough-that-thirty-paths-fill-the-listing";
    let path = |bundle: &str, n: usize| format!("/etc/{bundle}/{long}/file-{n:02}.conf");
    let mut toml = String::new();
    let mut files = Vec::new();
    for bundle in ["alpha", "beta"] {
        let list: Vec<String> = (0..30)
            .map(|n| {
                files.push((
                    format!("hosts/{bundle}-{n}.conf"),
                    format!("{bundle} {n}\n"),
                ));
                format!(
                    "{{ path = \"{}\", source = \"hosts/{bundle}-{n}.conf\" }}",
                    path(bundle, n)
                )
            })
            .collect();
        toml.push_str(&format!(
            "[host_config.{bundle}]\ntargets = {{ Role = \"app\" }}\nfiles = [{}]\n\n",
            list.join(", ")
        ));
    }
    let mut all: Vec<(&str, &str)> = vec![("host_config.toml", toml.as_str())];
    all.extend(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    let dir = stack_with(&all);
    let d = path_str(dir.path());
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);
    let root = sandboxes.path().join(&apps[0]);
    std::fs::remove_dir_all(root.join("etc")).unwrap();

    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", "--verify", d]);
    run.expect(0);
    for bundle in ["alpha", "beta"] {
        assert!(
            run.stderr.contains(&format!(
                "changed: {} host_config.{bundle}: {}",
                apps[0],
                path(bundle, 0)
            )),
            "{bundle}: {}",
            run.stderr
        );
        for n in 0..30 {
            assert_eq!(
                std::fs::read_to_string(root.join(&path(bundle, n)[1..])).unwrap(),
                format!("{bundle} {n}\n"),
                "put back"
            );
        }
    }
    assert_eq!(run.count("GetCommandInvocation"), 1, "{}", run.stderr);
    assert_eq!(run.count("SendCommand"), 3, "the verify and one push each");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_its_validation_rejects_fails_with_the_hosts_output() {
    let sandboxes = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        sandbox_dir: Some(sandboxes.path().to_path_buf()),
        ..Settings::default()
    });
    launch(&aws, 2, "app").await;
    let dir = stack_with(&[
        ("host_config.toml", NODE_EXPORTER),
        ("hosts/node_exporter.env", "OPTIONS=nothing\n"),
    ]);
    let run = stackwarden(
        Some(&aws.endpoint),
        &["reconcile", "--once", path_str(dir.path())],
    );
    run.expect(1);
    assert!(
        run.stdout
            .contains("instances failed to install host_config.node_exporter")
            && run.stdout.contains("validation failed"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
}

#[test]
fn overlapping_files_for_the_same_hosts_are_refused_offline() {
    let dir = stack_with(&[
        ("host_config.toml", NODE_EXPORTER),
        (
            "more.toml",
            "[host_config.tuning]\ntargets = { Team = \"web\" }\nfiles = [{ path = \"/etc/default/node_exporter\", source = \"hosts/node_exporter.env\" }]\n",
        ),
        ("hosts/node_exporter.env", "ARGS=\n"),
    ]);
    let run = stackwarden(None, &["validate", path_str(dir.path())]);
    run.expect(1);
    assert!(
        run.stderr.contains("host_config.node_exporter and host_config.tuning both write `/etc/default/node_exporter`"),
        "{}",
        run.stderr
    );
    assert_eq!(run.calls().0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_a_thousand_instances_is_batched_and_tracked_in_pages() {
    let aws = Aws::start();
    for _ in 0..4 {
        launch(&aws, 250, "app").await;
    }
    let ec2 = aws.ec2().await;
    let tagged = ec2
        .describe_instances()
        .filters(Filter::builder().name("tag:Role").values("app").build())
        .send()
        .await
        .unwrap();
    let n: usize = tagged
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum();
    assert_eq!(n, 1000);
    let dir = stack_with(&[
        ("host_config.toml", &NODE_EXPORTER.replace("10%", "100%")),
        ("hosts/node_exporter.env", "ARGS=--collector.systemd\n"),
    ]);
    let d = path_str(dir.path());
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(0);
    let sends = run.count("SendCommand");
    let reads = run.count("ListCommands") + run.count("ListCommandInvocations");
    assert_eq!(
        sends, 20,
        "1,000 instances in batches of 50:\n{}",
        run.stderr
    );
    assert!(reads <= 25, "status reads: {reads}\n{}", run.stderr);
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(0);
    assert_eq!(plan.count("SendCommand"), 0);
}
