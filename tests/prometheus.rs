//! The config push against a real Prometheus (Debian package `prometheus`): the very script the
//! operator sends, run directly and through the emulator's Run Command in an instance sandbox.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stackwarden_controllers::host::config;
use stackwarden_controllers::host::PrometheusSpec;
use stackwarden_controllers::push::Bundle;
use stackwarden_controllers::Refs;
use stackwarden_emulator::Sandbox;

use crate::harness::Aws;

/// A Prometheus over a sandbox root, with the lifecycle API on; killed on drop.
pub struct Prometheus {
    child: Child,
    pub url: String,
    _data: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(root: &Path) -> Prometheus {
        Prometheus::launch(root, true)
    }

    /// As a container runs it: no lifecycle API (a reload is a SIGHUP), and no AWS credentials
    /// (nor instance metadata to find them), so a config with SigV4 remote_write passes promtool
    /// and is refused by the reload.
    fn without_lifecycle_or_credentials(root: &Path) -> Prometheus {
        Prometheus::launch(root, false)
    }

    fn launch(root: &Path, lifecycle_and_credentials: bool) -> Prometheus {
        let config = root.join("etc/prometheus/prometheus.yml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(&config, "global:\n  scrape_interval: 15s\n").unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = tempfile::tempdir().unwrap();
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.path().display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE");
        if lifecycle_and_credentials {
            // What an instance role gives it on EC2: remote_write with SigV4 needs credentials
            // to apply the config (sending then fails against the fake AMP URL, harmlessly).
            command
                .arg("--web.enable-lifecycle")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_REGION", "us-east-1");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus not found: run the tests with tests/run.sh, which installs the Debian package prometheus");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(&format!("{url}/-/ready")).is_none() {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Prometheus {
            child,
            url,
            _data: data,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The value of one of Prometheus's own metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let text = get(&format!("{}/metrics", self.url)).expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
            .parse()
            .unwrap()
    }

    /// The configuration Prometheus runs with.
    pub fn running_config(&self) -> String {
        let body = get(&format!("{}/api/v1/status/config", self.url)).expect("config");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["yaml"].as_str().unwrap().to_string()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET with curl (the tests already need it for the push script): the body, or None.
fn get(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-sf", url]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A host's `[prometheus]` table scraping `job`, with Prometheus at `url` and these extra keys.
fn spec_with(job: &str, rules: &str, url: &str, extra: &str) -> PrometheusSpec {
    let mut p: PrometheusSpec = toml::from_str(&format!(
        "rule_files = [\"rules/node.yml\"]\nscrape = [{{ job = \"{job}\", targets = [\"127.0.0.1:9\"] }}]\nurl = \"{url}\"\n{extra}"
    ))
    .unwrap();
    p.loaded.rules.insert("rules/node.yml".into(), rules.into());
    p
}

fn spec(job: &str, rules: &str, url: &str) -> PrometheusSpec {
    spec_with(job, rules, url, "")
}

const RULES: &str = "groups:\n  - name: node\n    rules:\n      - alert: Down\n        expr: up == 0\n        for: 5m\n";
const BAD_RULES: &str =
    "groups:\n  - name: node\n    rules:\n      - alert: Down\n        expr: up == (0\n";

/// Runs the push as the SSM agent does on Ubuntu: the script in a file, `sh -c FILE`, dash as
/// sh; with `path_first`, that directory first on the PATH (where a test puts its stand-ins).
fn push(bundle: &Bundle, root: &Path, path_first: Option<&Path>) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("_script.sh");
    std::fs::write(&file, bundle.script()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = Command::new("dash");
    cmd.arg("-c").arg(&file).env("STACKWARDEN_ROOT", root);
    if let Some(first) = path_first {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", first.display()));
    }
    cmd.output().unwrap()
}

fn live_config(root: &Path) -> String {
    std::fs::read_to_string(root.join("etc/prometheus/prometheus.yml")).unwrap()
}

#[test]
fn a_good_push_is_live_after_reload_in_the_same_process() {
    let root = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(root.path());
    let pid = prom.pid();
    let reloads = prom.metric("prometheus_config_last_reload_success_timestamp_seconds");
    std::thread::sleep(Duration::from_millis(1100));

    let bundle = config::bundle(
        &spec("api", RULES, &prom.url),
        &Refs::default(),
        "us-east-1",
    );
    let out = push(&bundle, root.path(), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains(&format!("installed prometheus sha256:{}", bundle.hash())));
    assert!(prom.running_config().contains("job_name: api"));
    assert_eq!(prom.metric("prometheus_config_last_reload_successful"), 1.0);
    assert!(prom.metric("prometheus_config_last_reload_success_timestamp_seconds") > reloads);
    assert_eq!(prom.pid(), pid);
    let rules = get(&format!("{}/api/v1/rules", prom.url)).unwrap();
    assert!(rules.contains("\"name\":\"Down\""), "{rules}");
    assert_eq!(
        std::fs::read_to_string(root.path().join("var/lib/stackwarden/prometheus.sha256"))
            .unwrap()
            .trim(),
        bundle.hash()
    );
}

#[test]
fn a_push_promtool_rejects_leaves_the_old_config_live() {
    let root = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(root.path());
    let good = config::bundle(
        &spec("api", RULES, &prom.url),
        &Refs::default(),
        "us-east-1",
    );
    assert!(push(&good, root.path(), None).status.success());
    let before = live_config(root.path());

    let bad = config::bundle(
        &spec("web", BAD_RULES, &prom.url),
        &Refs::default(),
        "us-east-1",
    );
    let out = push(&bad, root.path(), None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("validation failed; nothing was installed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("parse error") || stderr.contains("unclosed"),
        "promtool's message: {stderr}"
    );
    assert_eq!(live_config(root.path()), before);
    assert!(prom.running_config().contains("job_name: api"));
    assert!(!prom.running_config().contains("job_name: web"));
    // Broken YAML in the rendered config's place: a raw config that does not parse.
    let mut raw = spec("api", RULES, &prom.url);
    raw.loaded.config = Some("global:\n  scrape_interval: [15s\n".into());
    let out = push(
        &config::bundle(&raw, &Refs::default(), "us-east-1"),
        root.path(),
        None,
    );
    assert!(!out.status.success());
    assert_eq!(live_config(root.path()), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_through_run_command_runs_in_the_sandbox_and_fails_with_promtools_message() {
    let aws = Aws::start();
    let root = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(root.path());
    let ec2 = aws.ec2().await;
    let instance = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_string();
    aws.emulator.set_sandbox(
        &instance,
        Sandbox {
            root: PathBuf::from(root.path()),
            env: Default::default(),
        },
    );
    let ssm = aws.ssm().await;
    let send = |bundle: Bundle| {
        let ssm = ssm.clone();
        let instance = instance.clone();
        async move {
            let id = ssm
                .send_command()
                .document_name("AWS-RunShellScript")
                .instance_ids(&instance)
                .parameters("commands", vec![bundle.script()])
                .send()
                .await
                .unwrap()
                .command
                .unwrap()
                .command_id
                .unwrap();
            loop {
                let inv = ssm
                    .get_command_invocation()
                    .command_id(&id)
                    .instance_id(&instance)
                    .send()
                    .await
                    .unwrap();
                let status = inv.status.clone().unwrap();
                if !matches!(status.as_str(), "Pending" | "InProgress") {
                    return inv;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let ok = send(config::bundle(
        &spec("api", RULES, &prom.url),
        &Refs::default(),
        "us-east-1",
    ))
    .await;
    assert_eq!(
        ok.status.unwrap().as_str(),
        "Success",
        "{:?}",
        ok.standard_error_content
    );
    assert!(prom.running_config().contains("job_name: api"));

    let bad = send(config::bundle(
        &spec("web", BAD_RULES, &prom.url),
        &Refs::default(),
        "us-east-1",
    ))
    .await;
    assert_eq!(bad.status.unwrap().as_str(), "Failed");
    assert_eq!(bad.response_code, 1);
    let stderr = bad.standard_error_content.unwrap();
    assert!(stderr.contains("validation failed"), "{stderr}");
    assert!(prom.running_config().contains("job_name: api"));
}

/// A `docker` on the PATH of a containerised host's push, mapping the commands the README's
/// containerised example configures onto the local Prometheus: `docker exec prometheus CMD` runs
/// CMD here (the container's mounts are the same paths), `docker kill --signal HUP prometheus`
/// signals the Prometheus process. Every call is appended to `docker.log` beside it.
fn docker_stand_in(dir: &Path, prometheus_pid: u32) -> PathBuf {
    let log = dir.join("docker.log");
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> '{log}'\ncase \"$1 $2 $3 $4\" in\n  'exec prometheus '*) shift 2; exec \"$@\" ;;\n  'kill --signal HUP prometheus') exec kill -HUP {prometheus_pid} ;;\n  *) echo \"docker stand-in: unexpected $*\" >&2; exit 2 ;;\nesac\n",
        log = log.display()
    );
    let docker = dir.join("docker");
    std::fs::write(&docker, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    log
}

const CONTAINERISED: &str = "promtool = \"docker exec prometheus promtool\"\nreload = \"docker kill --signal HUP prometheus\"\n";

#[test]
fn a_containerised_prometheus_is_checked_and_reloaded_with_the_configured_commands() {
    let root = tempfile::tempdir().unwrap();
    let prom = Prometheus::without_lifecycle_or_credentials(root.path());
    let pid = prom.pid();
    let bin = tempfile::tempdir().unwrap();
    let log = docker_stand_in(bin.path(), pid);
    let reloads = prom.metric("prometheus_config_last_reload_success_timestamp_seconds");

    let good = config::bundle(
        &spec_with("api", RULES, &prom.url, CONTAINERISED),
        &Refs::default(),
        "us-east-1",
    );
    let out = push(&good, root.path(), Some(bin.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The reload is verified: the same process runs the new config and rules.
    assert!(prom.running_config().contains("job_name: api"));
    assert_eq!(prom.metric("prometheus_config_last_reload_successful"), 1.0);
    assert!(prom.metric("prometheus_config_last_reload_success_timestamp_seconds") > reloads);
    assert_eq!(prom.pid(), pid);
    let rules = get(&format!("{}/api/v1/rules", prom.url)).unwrap();
    assert!(rules.contains("\"name\":\"Down\""), "{rules}");
    // The configured commands ran, and only they: no lifecycle API answers here, so the default
    // HTTP reload would have failed the push.
    let calls = std::fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(
        calls[0].starts_with("exec prometheus promtool check config "),
        "{calls:?}"
    );
    assert!(
        calls[0].ends_with("/etc/prometheus/prometheus.yml"),
        "{calls:?}"
    );
    assert!(
        calls[1].starts_with("exec prometheus promtool check rules "),
        "{calls:?}"
    );
    assert_eq!(calls[2], "kill --signal HUP prometheus");

    // A config promtool passes and Prometheus refuses (SigV4 without credentials): the reload
    // check sees the refusal, the previous files go back and are reloaded.
    let before = live_config(root.path());
    let mut refused = spec_with("web", RULES, &prom.url, CONTAINERISED);
    refused.loaded.config = Some(
        "global:\n  scrape_interval: 15s\nrule_files: [rules/node.yml]\nremote_write:\n  - url: http://127.0.0.1:9/api/v1/remote_write\n    sigv4:\n      region: us-east-1\n".into(),
    );
    let out = push(
        &config::bundle(&refused, &Refs::default(), "us-east-1"),
        root.path(),
        Some(bin.path()),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reload failed; the previous files are back and reloaded"),
        "{stderr}"
    );
    assert!(stderr.contains("did not load the new files"), "{stderr}");
    assert_eq!(live_config(root.path()), before);
    assert!(prom.running_config().contains("job_name: api"));
    assert_eq!(prom.metric("prometheus_config_last_reload_successful"), 1.0);
    let calls = std::fs::read_to_string(&log).unwrap();
    let hups = calls
        .lines()
        .filter(|l| *l == "kill --signal HUP prometheus")
        .count();
    assert_eq!(
        hups, 3,
        "one reload for the good push, two for the refused one: {calls}"
    );
}
