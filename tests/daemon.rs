//! `stackwarden reconcile` as a daemon against the emulator, its desired directory a git
//! checkout: it converges and reports the HEAD commit it enforces; a commit is applied at once
//! (the file watch, not the hour-long resync) and reported with its commit id; an invalid commit
//! is reported and the previous state stays enforced; the status endpoint; SIGTERM during a
//! pass lets it finish and exits 0, a second signal exits at once.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stackwarden_emulator::{Fault, FaultKind};

use crate::harness::{default_stack, edit, Aws};

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
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Log lines before this were matched already: each wait looks only at what came after.
    cursor: usize,
}

impl Daemon {
    fn start(endpoint: &str, dir: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stackwarden"))
            .args([
                "--endpoint-url",
                endpoint,
                "--region",
                "us-east-1",
                "--log-format",
                "json",
                "reconcile",
                "--interval",
                "1h",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg(dir)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("RUST_LOG", "info")
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
    fn address(&self) -> String {
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

    /// Waits for a log line after the last one matched with this message (and these fields),
    /// returning when it was seen.
    fn wait_for(&mut self, message: &str, fields: &[(&str, &str)]) -> Instant {
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
                    self.cursor += i + 1;
                    return Instant::now();
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
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the daemon to exit.
    fn exit_code(&mut self) -> Option<i32> {
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

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_is_applied_at_once_an_invalid_one_is_not_and_sigterm_exits_cleanly() {
    let aws = Aws::start();
    let dir = default_stack();
    let repo = dir.path();
    git(repo, &["init", "-q", "-b", "main"]);
    git(repo, &["add", "."]);
    git(repo, &["commit", "-qm", "the default stack"]);
    let first = git(repo, &["rev-parse", "HEAD"]);

    let mut daemon = Daemon::start(&aws.endpoint, repo);
    daemon.wait_for(
        "pass done",
        &[("generation", &first), ("converged", "true")],
    );

    // A commit: applied without waiting for the resync (an hour), reported with its id.
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
    let latency = started.duration_since(committed);
    assert!(
        latency < Duration::from_secs(2),
        "the pass for the commit started {latency:?} after it"
    );
    daemon.wait_for(
        "pass done",
        &[("generation", &second), ("converged", "true")],
    );
    let role = aws
        .iam()
        .await
        .get_role()
        .role_name("monitoring-prometheus")
        .send()
        .await
        .unwrap();
    assert!(
        role.role()
            .unwrap()
            .tags()
            .iter()
            .any(|t| t.key() == "project" && t.value() == "observability"),
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
    daemon.wait_for(
        "pass done",
        &[("generation", &second), ("converged", "true")],
    );

    // The endpoint: ready, every resource in sync at the commit, metrics promtool accepts, and
    // `stackwarden status` showing the same.
    let address = daemon.address();
    let get = |path: &str| {
        ureq::get(&format!("http://{address}{path}"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    assert_eq!(get("/healthz"), "ok\n");
    assert_eq!(get("/readyz"), "ready\n");
    let report: serde_json::Value = serde_json::from_str(&get("/status")).unwrap();
    assert_eq!(report["generation"], second.as_str());
    assert_eq!(report["invalid"], third.as_str());
    let resources = report["resources"].as_object().unwrap();
    assert_eq!(resources.len(), 7, "{report:#}");
    for (id, r) in resources {
        assert_eq!(r["state"], "in_sync", "{id}: {r}");
        assert_eq!(r["generation"], second.as_str(), "{id}: {r}");
    }
    let metrics = get("/metrics");
    for family in [
        "stackwarden_reconciles_total{",
        "stackwarden_pass_duration_seconds_count",
        "stackwarden_resources{state=\"in_sync\"} 7",
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

    // SIGTERM during a pass: the pass finishes, then the daemon exits 0.
    aws.emulator.inject(Fault::on(
        "iam",
        "GetRole",
        FaultKind::Latency { millis: 300 },
    ));
    std::fs::write(repo.join("notes.txt"), "a change that starts a pass\n").unwrap();
    daemon.wait_for("pass starting", &[("generation", &second)]);
    daemon.signal("TERM");
    daemon.wait_for("signal: finishing the pass in flight, then exiting", &[]);
    daemon.wait_for("pass done", &[("generation", &second)]);
    assert_eq!(daemon.exit_code(), Some(0));

    // Two signals: the second exits at once, the pass unfinished.
    std::fs::remove_file(repo.join("broken.toml")).unwrap();
    let mut daemon = Daemon::start(&aws.endpoint, repo);
    daemon.wait_for("pass starting", &[]);
    daemon.signal("TERM");
    daemon.wait_for("signal: finishing the pass in flight, then exiting", &[]);
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(1));
    daemon.wait_for("second signal: exiting without finishing the pass", &[]);
}
