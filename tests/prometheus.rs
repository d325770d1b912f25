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
        let config = root.join("etc/prometheus/prometheus.yml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(&config, "global:\n  scrape_interval: 15s\n").unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = tempfile::tempdir().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.path().display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle")
            // What an instance role gives it on EC2: remote_write with SigV4 needs credentials
            // to apply the config (sending then fails against the fake AMP URL, harmlessly).
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
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

fn spec(job: &str, rules: &str) -> PrometheusSpec {
    let mut p: PrometheusSpec = toml::from_str(&format!(
        "rule_files = [\"rules/node.yml\"]\nscrape = [{{ job = \"{job}\", targets = [\"127.0.0.1:9\"] }}]\n"
    ))
    .unwrap();
    p.loaded.rules.insert("rules/node.yml".into(), rules.into());
    p
}

const RULES: &str = "groups:\n  - name: node\n    rules:\n      - alert: Down\n        expr: up == 0\n        for: 5m\n";
const BAD_RULES: &str =
    "groups:\n  - name: node\n    rules:\n      - alert: Down\n        expr: up == (0\n";

/// Runs the push as the SSM agent does on Ubuntu: the script in a file, `sh -c FILE`, dash as sh.
fn push(bundle: &Bundle, root: &Path, prometheus: &Prometheus) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("_script.sh");
    std::fs::write(&file, bundle.script()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
    Command::new("dash")
        .arg("-c")
        .arg(&file)
        .env("STACKWARDEN_ROOT", root)
        .env("PROMETHEUS_URL", &prometheus.url)
        .output()
        .unwrap()
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

    let bundle = config::bundle(&spec("api", RULES), &Refs::default(), "us-east-1");
    let out = push(&bundle, root.path(), &prom);
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
    let good = config::bundle(&spec("api", RULES), &Refs::default(), "us-east-1");
    assert!(push(&good, root.path(), &prom).status.success());
    let before = live_config(root.path());

    let bad = config::bundle(&spec("web", BAD_RULES), &Refs::default(), "us-east-1");
    let out = push(&bad, root.path(), &prom);
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
    let mut raw = spec("api", RULES);
    raw.loaded.config = Some("global:\n  scrape_interval: [15s\n".into());
    let out = push(
        &config::bundle(&raw, &Refs::default(), "us-east-1"),
        root.path(),
        &prom,
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
            env: [("PROMETHEUS_URL".to_string(), prom.url.clone())].into(),
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
        &spec("api", RULES),
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
        &spec("web", BAD_RULES),
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
