//! `stackwarden reconcile` as a daemon against the emulator, its desired directory a git
//! checkout: it converges and reports the HEAD commit it enforces; a commit is applied at once
//! (the file watch, not the resync) and reported with its commit id; an invalid commit is
//! reported and the previous state stays enforced; out-of-band drift is corrected within one
//! resync; the status endpoint; SIGTERM during a pass lets it finish and exits 0, a second
//! signal exits at once. Two daemons sharing a lease, their checkouts kept up by `--git-pull`:
//! only the holder writes, and the other takes over when it dies. A commit naming another role
//! for the stack is refused until a restart.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stackwarden_emulator::{Fault, FaultKind};

use crate::harness::{default_stack, edit, path_str, stackwarden, Aws};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "ci")
        .env("GIT_AUTHOR_EMAIL", "ci@example.com")
        .env("GIT_COMMITTER_NAME", "ci")
        .env("GIT_COMMITTER_EMAIL", "ci@example.com")
        .output()
        .expect("git is installed (tests/install.sh)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The daemon with its JSON log lines collected as they come.
pub(crate) struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Log lines before this were matched already: each wait looks only at what came after.
    cursor: usize,
}

impl Daemon {
    fn start(endpoint: &str, dir: &Path, args: &[&str]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stackwarden"));
        cmd.args([
            "--endpoint-url",
            endpoint,
            "--region",
            "us-east-1",
            "--log-format",
            "json",
            "reconcile",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .arg(dir)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("RUST_LOG", "info");
        Daemon::spawn(cmd)
    }

    /// Runs `cmd` (a `stackwarden reconcile --log-format json ...` with its environment),
    /// collecting its log lines.
    pub(crate) fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Daemon {
            child,
            lines,
            cursor: 0,
        }
    }

    /// The status endpoint's address, from the log.
    pub(crate) fn address(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l["fields"]["address"].as_str().map(str::to_string));
            if let Some(a) = found {
                return a;
            }
            assert!(Instant::now() < deadline, "the daemon logged no address");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forgets every line logged so far: the next wait looks only at what comes after.
    fn skip_logged(&mut self) {
        self.cursor = self.lines.lock().unwrap().len();
    }

    /// Waits for a log line after the last one matched with this message (and these fields),
    /// returning when it was seen.
    pub(crate) fn wait_for(&mut self, message: &str, fields: &[(&str, &str)]) -> Instant {
        self.lines_until(message, fields);
        Instant::now()
    }

    /// Waits for a log line after the last one matched with this message (and these fields),
    /// returning the fields of every line logged from the last match to it, it included.
    fn lines_until(&mut self, message: &str, fields: &[(&str, &str)]) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            {
                let lines = self.lines.lock().unwrap();
                let found = lines[self.cursor..].iter().position(|l| {
                    let f = &l["fields"];
                    f["message"] == message
                        && fields.iter().all(|(k, v)| {
                            f[*k].as_str() == Some(v)
                                || f[*k] == v.parse::<serde_json::Value>().unwrap_or_default()
                        })
                });
                if let Some(i) = found {
                    let seen = lines[self.cursor..=self.cursor + i]
                        .iter()
                        .map(|l| l["fields"].clone())
                        .collect();
                    self.cursor += i + 1;
                    return seen;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no `{message}` {fields:?} in the daemon's log:\n{:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Daemon {
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the daemon to exit.
    pub(crate) fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return s.code();
            }
            assert!(Instant::now() < deadline, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `project` tag of the Prometheus role.
async fn project_tag(aws: &Aws) -> Option<String> {
    let role = aws
        .iam()
        .await
        .get_role()
        .role_name("monitoring-prometheus")
        .send()
        .await
        .unwrap();
    role.role()
        .unwrap()
        .tags()
        .iter()
        .find(|t| t.key() == "project")
        .map(|t| t.value().to_string())
}

/// Out-of-band drift: someone removes the role's `project` tag.
async fn drop_project_tag(aws: &Aws) {
    aws.iam()
        .await
        .untag_role()
        .role_name("monitoring-prometheus")
        .tag_keys("project")
        .send()
        .await
        .unwrap();
    assert_eq!(project_tag(aws).await, None);
}

fn get(address: &str, path: &str) -> String {
    ureq::get(&format!("http://{address}{path}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// The AWS write calls a daemon's `/metrics` counted (everything but reads), leaving out the
/// lease's own DynamoDB calls.
fn aws_writes(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("stackwarden_aws_calls_total{"))
        .filter(|l| !l.contains("service=\"DynamoDB\""))
        .filter(|l| {
            let op = l.split("operation=\"").nth(1).unwrap_or_default();
            !["Describe", "List", "Get"]
                .iter()
                .any(|p| op.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_is_applied_at_once_drift_within_a_resync_an_invalid_commit_is_not_and_sigterm_exits_cleanly(
) {
    let aws = Aws::start();
    let dir = default_stack();
    let repo = dir.path();
    git(repo, &["init", "-q", "-b", "main"]);
    git(repo, &["add", "."]);
    git(repo, &["commit", "-qm", "the default stack"]);
    let first = git(repo, &["rev-parse", "HEAD"]);

    let resync = Duration::from_secs(2);
    let mut daemon = Daemon::start(&aws.endpoint, repo, &["--resync", "2s"]);
    daemon.wait_for("pass starting", &[("generation", &first), ("full", "true")]);
    daemon.wait_for(
        "pass done",
        &[("generation", &first), ("converged", "true")],
    );

    // A commit: applied at once (the file watch), reported with its id.
    edit(
        repo,
        "stack.toml",
        "project = \"monitoring\"",
        "project = \"observability\"",
    );
    let committed = Instant::now();
    git(repo, &["commit", "-qam", "rename the project tag"]);
    let second = git(repo, &["rev-parse", "HEAD"]);
    let started = daemon.wait_for("pass starting", &[("generation", &second)]);
    // A figure, not a promise: tests/bench.sh is where timings are measured.
    eprintln!(
        "the pass for the commit started {:?} after it",
        started.duration_since(committed)
    );
    // The commit's own pass wrote the change (not a later resync).
    let done = daemon.lines_until("pass done", &[]);
    let done = done.last().unwrap();
    assert_eq!(done["generation"], second.as_str(), "{done}");
    assert_eq!(done["converged"], true, "{done}");
    assert_ne!(done["changes"], 0, "the commit's pass applied it: {done}");
    assert_eq!(
        project_tag(&aws).await.as_deref(),
        Some("observability"),
        "the commit reached AWS"
    );

    // An invalid commit: reported; the previous desired state is still the one enforced.
    std::fs::write(repo.join("broken.toml"), "[iam.role.x\n").unwrap();
    git(repo, &["add", "."]);
    git(repo, &["commit", "-qm", "a typo"]);
    let third = git(repo, &["rev-parse", "HEAD"]);
    daemon.wait_for(
        "the desired state is invalid; still enforcing the last valid one",
        &[("invalid", &third), ("generation", &second)],
    );

    // Drift out of band is corrected by the next resync, to the last valid commit.
    drop_project_tag(&aws).await;
    let drifted = Instant::now();
    let until_corrected = daemon.lines_until(
        "pass done",
        &[
            ("generation", &second),
            ("changes", "1"),
            ("converged", "true"),
        ],
    );
    eprintln!(
        "drift corrected {:?} after it happened, with a {resync:?} resync",
        drifted.elapsed()
    );
    assert_eq!(project_tag(&aws).await.as_deref(), Some("observability"));
    // Corrected by a resync of the enforced commit: no change of the directory came between.
    assert!(
        until_corrected
            .iter()
            .all(|l| l["message"] != "the desired directory changed"),
        "{until_corrected:#?}"
    );
    daemon.wait_for(
        "pass done",
        &[
            ("generation", &second),
            ("changes", "0"),
            ("converged", "true"),
        ],
    );

    // The endpoint: ready, every resource in sync at the commit, metrics promtool accepts, and
    // `stackwarden status` showing the same.
    let address = daemon.address();
    assert_eq!(get(&address, "/healthz"), "ok\n");
    assert_eq!(get(&address, "/readyz"), "ready\n");
    let report: serde_json::Value = serde_json::from_str(&get(&address, "/status")).unwrap();
    assert_eq!(report["generation"], second.as_str());
    assert_eq!(report["invalid"], third.as_str());
    let resources = report["resources"].as_object().unwrap();
    // One entry per AWS object: 7 IAM and workspace nodes, two rule groups namespaces and the
    // alertmanager definition.
    assert_eq!(resources.len(), 10, "{report:#}");
    for (id, r) in resources {
        // `changed`: its last pass applied a change and confirmed it (the commit, the drift).
        assert!(
            matches!(r["state"].as_str(), Some("in_sync" | "changed")),
            "{id}: {r}"
        );
        assert_eq!(r["generation"], second.as_str(), "{id}: {r}");
    }
    let metrics = get(&address, "/metrics");
    for family in [
        "stackwarden_reconciles_total{",
        "stackwarden_pass_duration_seconds_count",
        "stackwarden_reconcile_duration_seconds_count{kind=\"iam.role\"}",
        "stackwarden_resources{state=\"in_sync\"}",
        "stackwarden_drift_corrections_total{kind=\"iam.role\"}",
        "stackwarden_aws_calls_total{service=\"IAM\",operation=\"GetRole\",outcome=\"ok\"}",
        "stackwarden_desired_state_invalid 1",
        "stackwarden_last_success_timestamp_seconds",
    ] {
        assert!(metrics.contains(family), "{family} in\n{metrics}");
    }
    assert!(
        metrics.contains(&format!("generation=\"{second}\"")),
        "{metrics}"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (tests/install.sh)");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let table = Command::new(env!("CARGO_BIN_EXE_stackwarden"))
        .args(["status", "--listen", &address])
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("iam.role.prometheus"), "{table}");
    assert!(
        table.contains(&format!("is invalid; still enforcing {second}")),
        "{table}"
    );

    // SIGTERM during a pass: the pass finishes, then the daemon exits 0. The pass is one that
    // starts after the fault slowing it is in place (one logged before may be over already).
    aws.emulator.inject(Fault::on(
        "iam",
        "GetRole",
        FaultKind::Latency { millis: 300 },
    ));
    daemon.skip_logged();
    daemon.wait_for("pass starting", &[("generation", &second)]);
    daemon.signal("TERM");
    daemon.wait_for("signal: finishing the pass in flight, then exiting", &[]);
    daemon.wait_for("pass done", &[("generation", &second)]);
    assert_eq!(daemon.exit_code(), Some(0));

    // Two signals: the second exits at once, the pass unfinished.
    std::fs::remove_file(repo.join("broken.toml")).unwrap();
    let mut daemon = Daemon::start(&aws.endpoint, repo, &[]);
    daemon.wait_for("pass starting", &[]);
    daemon.signal("TERM");
    daemon.wait_for("signal: finishing the pass in flight, then exiting", &[]);
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(1));
    daemon.wait_for("second signal: exiting without finishing the pass", &[]);
}

/// Two management instances, each with its own checkout that `--git-pull` keeps up with the
/// remote, sharing one lease: only the holder writes; when it dies the other takes over.
#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_with_the_lease_never_both_write_and_the_standby_takes_over() {
    let aws = Aws::start();
    let work = default_stack();
    let seed = work.path();
    let remotes = tempfile::tempdir().unwrap();
    let remote = remotes.path().join("desired.git");
    git(
        remotes.path(),
        &["init", "-q", "--bare", "-b", "main", "desired.git"],
    );
    git(seed, &["init", "-q", "-b", "main"]);
    git(seed, &["add", "."]);
    git(seed, &["commit", "-qm", "the default stack"]);
    git(seed, &["remote", "add", "origin", remote.to_str().unwrap()]);
    git(seed, &["push", "-q", "-u", "origin", "main"]);
    let first = git(seed, &["rev-parse", "HEAD"]);
    for name in ["a", "b"] {
        git(remotes.path(), &["clone", "-q", "desired.git", name]);
    }
    let args = [
        "--lease",
        "stackwarden-lease",
        "--lease-duration",
        "3s",
        "--resync",
        "1s",
        "--git-pull",
        "500ms",
    ];
    let mut a = Daemon::start(&aws.endpoint, &remotes.path().join("a"), &args);
    a.wait_for(
        "pass done",
        &[("generation", &first), ("converged", "true")],
    );
    let mut b = Daemon::start(&aws.endpoint, &remotes.path().join("b"), &args);
    b.wait_for(
        "pass starting",
        &[("generation", &first), ("write", "false")],
    );
    b.wait_for("pass done", &[("generation", &first)]);

    // `reconcile --once` under the same lease (a CI job) writes nothing while a daemon holds it.
    let ci = stackwarden(
        Some(&aws.endpoint),
        &[
            "reconcile",
            "--once",
            "--lease",
            "stackwarden-lease",
            path_str(seed),
        ],
    );
    ci.expect(1);
    assert!(
        ci.stderr.contains("the lease is held by") && ci.stderr.contains("nothing was applied"),
        "{}",
        ci.stderr
    );
    let (_, writes) = ci.calls();
    assert_eq!(
        writes,
        ci.count("PutItem"),
        "only lease attempts: {}",
        ci.stderr
    );

    // A pushed commit reaches both checkouts; the holder applies it, the standby observes it.
    edit(
        seed,
        "stack.toml",
        "project = \"monitoring\"",
        "project = \"observability\"",
    );
    git(seed, &["commit", "-qam", "rename the project tag"]);
    git(seed, &["push", "-q"]);
    let second = git(seed, &["rev-parse", "HEAD"]);
    a.wait_for(
        "pass done",
        &[("generation", &second), ("converged", "true")],
    );
    b.wait_for(
        "pass done",
        &[("generation", &second), ("converged", "true")],
    );
    assert_eq!(project_tag(&aws).await.as_deref(), Some("observability"));

    // Drift: the holder corrects it; the standby sees it and writes nothing.
    drop_project_tag(&aws).await;
    a.wait_for("pass done", &[("changes", "1")]);
    b.wait_for("pass done", &[("write", "false")]);
    assert_eq!(project_tag(&aws).await.as_deref(), Some("observability"));
    let a_writes = aws_writes(&get(&a.address(), "/metrics"));
    let b_writes = aws_writes(&get(&b.address(), "/metrics"));
    assert!(!a_writes.is_empty(), "the holder wrote");
    assert!(b_writes.is_empty(), "the standby wrote: {b_writes:#?}");

    // The holder dies without a word: once its lease expires, the standby takes it and
    // corrects the drift that happened meanwhile.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    drop_project_tag(&aws).await;
    b.wait_for("lease taken: this daemon writes", &[]);
    b.wait_for("pass done", &[("write", "true"), ("converged", "true")]);
    assert_eq!(project_tag(&aws).await.as_deref(), Some("observability"));
    assert!(!aws_writes(&get(&b.address(), "/metrics")).is_empty());

    // A clean shutdown gives the lease up.
    b.signal("TERM");
    b.wait_for("lease released", &[]);
    assert_eq!(b.exit_code(), Some(0));
}

/// Files changed on a host after their push: the daemon's verify, on its own interval, finds
/// the edited file, `/status` says where, the pass after it pushes the file back to that host
/// alone, and the next verify finds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_changed_on_a_host_is_found_by_the_periodic_verify_and_put_back() {
    let sandboxes = tempfile::tempdir().unwrap();
    let aws = Aws::with(stackwarden_emulator::Settings {
        sandbox_dir: Some(sandboxes.path().to_path_buf()),
        ..Default::default()
    });
    let out = aws
        .ec2()
        .await
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(2)
        .max_count(2)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("Role")
                        .value("app")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let apps: Vec<String> = out
        .instances()
        .iter()
        .map(|i| i.instance_id().unwrap().to_string())
        .collect();
    assert_eq!(apps.len(), 2);
    let dir = default_stack();
    std::fs::write(
        dir.path().join("host_config.toml"),
        "[host_config.node_exporter]\ntargets = { Role = \"app\" }\nfiles = [{ path = \"/etc/default/node_exporter\", source = \"node_exporter.env\" }]\nreload = \"echo reloaded >> \\\"$STACKWARDEN_ROOT/reloads\\\"\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("node_exporter.env"), "ARGS=\n").unwrap();
    let file = |id: &str| sandboxes.path().join(id).join("etc/default/node_exporter");
    let reloads =
        |id: &str| std::fs::read_to_string(sandboxes.path().join(id).join("reloads")).unwrap();

    let mut daemon = Daemon::start(&aws.endpoint, dir.path(), &["--verify-interval", "2s"]);
    daemon.wait_for("pass done", &[("converged", "true")]);
    daemon.wait_for("verify done", &[("instances", "2"), ("drifted", "0")]);
    std::fs::write(file(&apps[0]), "ARGS=--web.listen-address=:1\n").unwrap();
    daemon.wait_for("verify done", &[("instances", "2"), ("drifted", "1")]);
    daemon.wait_for(
        "files changed on the host since the push; pushing again",
        &[
            ("instance", &apps[0]),
            ("bundle", "host_config.node_exporter"),
        ],
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(&daemon.address(), "/status")).unwrap();
    assert_eq!(
        status["verify"]["drifted"],
        serde_json::json!([{
            "instance": apps[0],
            "bundle": "host_config.node_exporter",
            "files": ["/etc/default/node_exporter"],
        }]),
        "{status:#}"
    );
    daemon.wait_for("pass done", &[("changes", "1"), ("converged", "true")]);
    assert_eq!(std::fs::read_to_string(file(&apps[0])).unwrap(), "ARGS=\n");
    assert_eq!(reloads(&apps[0]), "reloaded\nreloaded\n");
    assert_eq!(
        reloads(&apps[1]),
        "reloaded\n",
        "the intact host was left alone"
    );
    daemon.wait_for("verify done", &[("instances", "2"), ("drifted", "0")]);
    assert_eq!(reloads(&apps[0]), "reloaded\nreloaded\n", "put back once");
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0));
}

/// A slow neighbour: the alertmanager definition takes three minutes to be checked (AMP takes
/// minutes too). Nothing waits for it: the IAM objects are made in the first pass, a commit
/// that changes only a role is applied by the next pass, and IAM drift is corrected by a
/// resync, all while the definition is still CREATING.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_object_delays_nothing_else_commits_and_drift_go_through_while_it_converges() {
    let aws = Aws::with(stackwarden_emulator::Settings {
        transition_delay: Duration::from_secs(180),
        ..Default::default()
    });
    let dir = default_stack();
    let repo = dir.path();
    git(repo, &["init", "-q", "-b", "main"]);
    git(repo, &["add", "."]);
    git(repo, &["commit", "-qm", "the default stack"]);
    let first = git(repo, &["rev-parse", "HEAD"]);
    let mut daemon = Daemon::start(&aws.endpoint, repo, &["--resync", "2s"]);

    // The first pass makes everything but cannot confirm the definition: not converged.
    daemon.wait_for(
        "pass done",
        &[("generation", &first), ("converged", "false")],
    );
    let amp = aws.amp().await;
    let definition_status = || async {
        let ws = amp.list_workspaces().send().await.unwrap().workspaces()[0]
            .workspace_id()
            .to_string();
        let d = amp
            .describe_alert_manager_definition()
            .workspace_id(ws)
            .send()
            .await
            .unwrap();
        d.alert_manager_definition()
            .unwrap()
            .status()
            .unwrap()
            .status_code()
            .as_str()
            .to_string()
    };
    assert_eq!(definition_status().await, "CREATING");
    assert_eq!(project_tag(&aws).await.as_deref(), Some("monitoring"));
    let iam = aws.iam().await;
    let policy = |name: &'static str| {
        let iam = iam.clone();
        async move {
            iam.list_policies()
                .scope(aws_sdk_iam::types::PolicyScopeType::Local)
                .send()
                .await
                .unwrap()
                .policies()
                .iter()
                .any(|p| p.policy_name() == Some(name))
        }
    };
    assert!(policy("monitoring-prometheus_remote_write").await);

    // A commit that changes only a role: its pass writes it.
    edit(
        repo,
        "stack.toml",
        "project = \"monitoring\"",
        "project = \"observability\"",
    );
    git(repo, &["commit", "-qam", "rename the project tag"]);
    let second = git(repo, &["rev-parse", "HEAD"]);
    daemon.wait_for("pass starting", &[("generation", &second)]);
    daemon.wait_for("pass done", &[("generation", &second)]);
    assert_eq!(project_tag(&aws).await.as_deref(), Some("observability"));
    assert_eq!(definition_status().await, "CREATING");

    // Drift on a role: a resync pass puts it back.
    drop_project_tag(&aws).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while project_tag(&aws).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the role's tag was never put back"
        );
        daemon.wait_for("pass done", &[("generation", &second)]);
    }
    assert_eq!(project_tag(&aws).await.as_deref(), Some("observability"));
    assert_eq!(definition_status().await, "CREATING");
}

/// The clients of a running daemon act as the role its stack named when it started: a commit
/// naming another role (another account) is refused like an invalid one, saying a restart is
/// needed, and the stack stays enforced in its account; a commit back to the role is taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_naming_another_role_is_refused_until_a_restart() {
    let aws = Aws::start();
    aws.assumable_role("111111111111", "stackwarden-target", None)
        .await;
    aws.assumable_role("222222222222", "stackwarden-target", None)
        .await;
    let (dev, other) = (
        "arn:aws:iam::111111111111:role/stackwarden-target",
        "arn:aws:iam::222222222222:role/stackwarden-target",
    );
    let dir = crate::harness::stack_as("dev", dev, None);
    let repo = dir.path();
    git(repo, &["init", "-q", "-b", "main"]);
    git(repo, &["add", "."]);
    git(repo, &["commit", "-qm", "the dev stack"]);
    let first = git(repo, &["rev-parse", "HEAD"]);
    let mut daemon = Daemon::start(&aws.endpoint, repo, &[]);
    daemon.wait_for(
        "pass done",
        &[("generation", &first), ("converged", "true")],
    );

    edit(repo, "stack.toml", dev, other);
    git(repo, &["commit", "-qam", "move the stack"]);
    let moved = git(repo, &["rev-parse", "HEAD"]);
    let refused = daemon.lines_until(
        "the desired state is invalid; still enforcing the last valid one",
        &[("invalid", &moved), ("generation", &first)],
    );
    let why = format!(
        "the stack's assume_role changed from {dev} to {other}: the operator acts as the role it started with; restart it to act as another"
    );
    assert!(
        refused.iter().any(|l| l["message"] == why.as_str()),
        "{refused:#?}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(&daemon.address(), "/status")).unwrap();
    assert_eq!(status["invalid"], moved.as_str(), "{status}");
    let other_roles = aws.iam_in("222222222222").await.list_roles().send().await;
    let names: Vec<&str> = other_roles
        .as_ref()
        .unwrap()
        .roles()
        .iter()
        .map(|r| r.role_name())
        .collect();
    assert_eq!(
        names,
        ["stackwarden-target"],
        "nothing made in the other account"
    );

    // Back to the stack's role, with a change: taken and applied.
    edit(repo, "stack.toml", other, dev);
    edit(
        repo,
        "stack.toml",
        "project = \"monitoring\"",
        "project = \"observability\"",
    );
    git(repo, &["commit", "-qam", "stay, renamed"]);
    let back = git(repo, &["rev-parse", "HEAD"]);
    let done = daemon.lines_until("pass done", &[("generation", &back)]);
    let done = done.last().unwrap();
    assert_eq!(done["converged"], true, "{done}");
    assert_ne!(done["changes"], 0, "{done}");
    let status: serde_json::Value =
        serde_json::from_str(&get(&daemon.address(), "/status")).unwrap();
    assert!(status["invalid"].is_null(), "{status}");
}
