//! The Prometheus host's bundle: `prometheus.yml` (rendered from the desired state, or a raw file)
//! and the rule files, validated with promtool and reloaded through `POST /-/reload`, or with the
//! commands the host's `[prometheus]` table gives (a containerised Prometheus).
//!
//! Rule files are installed under `/etc/prometheus/` at their path in the desired directory and
//! referenced relatively from `prometheus.yml`, so promtool checks the staged rules together with
//! the staged config, and the same files work under any `$STACKWARDEN_ROOT`.

use std::collections::BTreeMap;

use super::PrometheusSpec;
use crate::desired::{FileRef, Validator};
use crate::model::Refs;
use crate::push::yaml::{map, s, Yaml};
use crate::push::{self, shell_quote, Bundle, File};
use toml::Spanned;

/// The bundle's name on the host (its stage, backup and hash files, and its instance tag).
pub const NAME: &str = "prometheus";
pub const CONFIG_DIR: &str = "/etc/prometheus";
pub const CONFIG_FILE: &str = "/etc/prometheus/prometheus.yml";

/// The part of a raw `prometheus.yml` a check reads.
#[derive(serde::Deserialize)]
struct RawConfig {
    #[serde(default)]
    rule_files: Option<Vec<marked_yaml::Spanned<String>>>,
}

/// A raw config and the rule files pushed beside it agree: each `rule_files` entry of the
/// config (a path or glob, relative to `/etc/prometheus/` as Prometheus resolves it) matches
/// at least one pushed rule file, and each pushed rule file (installed at
/// `/etc/prometheus/<its path in the desired directory>`) is matched by an entry. Otherwise
/// promtool passes and Prometheus runs without the rules, telling nobody. An entry with a
/// `${...}` reference is rendered later and not checked.
pub fn check_rule_files(v: &mut Validator, config: &FileRef, pushed: &[Spanned<String>]) {
    let Some(raw) =
        crate::rules::parse_yaml::<RawConfig>(&config.file, v.diags, "Prometheus config")
    else {
        return;
    };
    let entries = raw.rule_files.unwrap_or_default();
    let installed: Vec<String> = pushed
        .iter()
        .map(|p| format!("{CONFIG_DIR}/{}", p.get_ref().trim_start_matches("./")))
        .collect();
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let mut matched = vec![false; installed.len()];
    let mut unchecked = false;
    for e in &entries {
        let entry = e.as_str();
        if entry.contains("${") {
            unchecked = true;
            continue;
        }
        let full = if entry.starts_with('/') {
            entry.to_string()
        } else {
            format!("{CONFIG_DIR}/{}", entry.trim_start_matches("./"))
        };
        let pattern = glob::Pattern::new(&full).ok();
        let mut any = false;
        for (i, path) in installed.iter().enumerate() {
            let hit = match &pattern {
                Some(p) => p.matches_with(path, options),
                None => &full == path,
            };
            if hit {
                matched[i] = true;
                any = true;
            }
        }
        if !any {
            let offset = e
                .span()
                .start()
                .map_or(0, |m| config.file.offset_of(m.line(), m.column()));
            let listed = if installed.is_empty() {
                "no rule files are pushed (`rule_files` of the host's `[prometheus]`)".to_string()
            } else {
                format!("the rule files pushed are {}", installed.join(", "))
            };
            v.error_in(
                &config.file,
                offset,
                format!("`rule_files` entry `{entry}` ({full}) matches no rule file: {listed}; Prometheus would load no rules from it"),
            );
        }
    }
    if unchecked {
        return;
    }
    for (i, f) in pushed.iter().enumerate() {
        if !matched[i] {
            v.error(
                &f.span(),
                format!(
                    "rule file `{}` is pushed to {}, but no `rule_files` entry of the config `{}` loads it",
                    f.get_ref(),
                    installed[i],
                    config.path
                ),
            );
        }
    }
}

/// `prometheus.yml` from the desired state. `region` is the stack's, the default for EC2
/// discovery and SigV4.
pub fn render(spec: &PrometheusSpec, refs: &Refs, region: &str) -> String {
    let mut global = vec![
        (
            "scrape_interval",
            s(spec
                .scrape_interval
                .as_ref()
                .map_or("15s", |d| d.get_ref().as_str())),
        ),
        (
            "evaluation_interval",
            s(spec
                .evaluation_interval
                .as_ref()
                .map_or("15s", |d| d.get_ref().as_str())),
        ),
    ];
    if !spec.external_labels.is_empty() {
        global.push((
            "external_labels",
            Yaml::Map(
                spec.external_labels
                    .iter()
                    .map(|(k, v)| (k.clone(), s(refs.render(v).value)))
                    .collect(),
            ),
        ));
    }
    let mut doc = vec![("global", map(global))];
    if !spec.rule_files.is_empty() {
        doc.push((
            "rule_files",
            Yaml::List(
                spec.rule_files
                    .iter()
                    .map(|f| s(f.get_ref().clone()))
                    .collect(),
            ),
        ));
    }
    if !spec.alertmanagers.is_empty() {
        let targets = spec
            .alertmanagers
            .iter()
            .map(|t| s(refs.render(t).value))
            .collect();
        doc.push((
            "alerting",
            map(vec![(
                "alertmanagers",
                Yaml::List(vec![map(vec![(
                    "static_configs",
                    Yaml::List(vec![map(vec![("targets", Yaml::List(targets))])]),
                )])]),
            )]),
        ));
    }
    let mut jobs = Vec::new();
    if !spec.scrape.iter().any(|j| j.job == "prometheus") {
        jobs.push(map(vec![
            ("job_name", s("prometheus")),
            (
                "static_configs",
                Yaml::List(vec![map(vec![(
                    "targets",
                    Yaml::List(vec![s("localhost:9090")]),
                )])]),
            ),
        ]));
    }
    for job in &spec.scrape {
        let mut j = vec![("job_name", s(job.job.clone()))];
        if let Some(i) = &job.interval {
            j.push(("scrape_interval", s(i.get_ref().clone())));
        }
        if let Some(p) = &job.metrics_path {
            j.push(("metrics_path", s(p.clone())));
        }
        if !job.targets.is_empty() {
            let targets = job
                .targets
                .iter()
                .map(|t| s(refs.render(t).value))
                .collect();
            j.push((
                "static_configs",
                Yaml::List(vec![map(vec![("targets", Yaml::List(targets))])]),
            ));
        }
        if let Some(port) = job.ec2_port {
            let mut filters = vec![map(vec![
                ("name", s("instance-state-name")),
                ("values", Yaml::List(vec![s("running")])),
            ])];
            for (k, v) in &job.ec2_tags {
                filters.push(map(vec![
                    ("name", s(format!("tag:{k}"))),
                    ("values", Yaml::List(vec![s(v.clone())])),
                ]));
            }
            j.push((
                "ec2_sd_configs",
                Yaml::List(vec![map(vec![
                    ("region", s(region)),
                    ("port", Yaml::Int(port.into())),
                    ("filters", Yaml::List(filters)),
                ])]),
            ));
            // Instances are named by their Name tag, not by their address.
            j.push((
                "relabel_configs",
                Yaml::List(vec![map(vec![
                    ("source_labels", Yaml::List(vec![s("__meta_ec2_tag_Name")])),
                    ("target_label", s("instance")),
                ])]),
            ));
        }
        jobs.push(map(j));
    }
    doc.push(("scrape_configs", Yaml::List(jobs)));
    if let Some(rw) = &spec.remote_write {
        let rw_region = rw
            .region
            .as_ref()
            .map_or_else(|| region.to_string(), |r| refs.render(r).value);
        doc.push((
            "remote_write",
            Yaml::List(vec![map(vec![
                ("url", s(refs.render(&rw.url).value)),
                ("sigv4", map(vec![("region", s(rw_region))])),
                (
                    "queue_config",
                    map(vec![
                        ("max_samples_per_send", Yaml::Int(1000)),
                        ("max_shards", Yaml::Int(200)),
                        ("capacity", Yaml::Int(2500)),
                    ]),
                ),
            ])]),
        ));
    }
    format!(
        "# Rendered by stackwarden from the desired state; edits on the host are overwritten.\n{}",
        map(doc).to_text()
    )
}

/// Where Prometheus answers when `url` is left out.
pub const DEFAULT_URL: &str = "http://localhost:9090";
/// promtool when `promtool` is left out: the host's own.
pub const DEFAULT_PROMTOOL: &str = "promtool";

/// The commands a host's push runs, as the desired state gives them or their defaults.
pub struct Commands<'a> {
    pub promtool: &'a str,
    /// None: `POST <url>/-/reload`.
    pub reload: Option<&'a str>,
    pub url: &'a str,
}

impl<'a> Commands<'a> {
    pub fn of(spec: &'a PrometheusSpec) -> Commands<'a> {
        Commands {
            promtool: push::command_or(&spec.promtool, DEFAULT_PROMTOOL),
            reload: spec.reload.as_ref().map(push::HostCommand::as_str),
            url: push::command_or(&spec.url, DEFAULT_URL).trim_end_matches('/'),
        }
    }

    /// For a plan: what the push runs on the host.
    pub fn describe(&self) -> String {
        format!(
            "on the host: promtool `{}`, reload {}, Prometheus at {}",
            self.promtool,
            self.reload
                .map_or_else(|| "`POST /-/reload`".to_string(), |r| format!("`{r}`")),
            self.url
        )
    }

    /// The reload and its check. The HTTP reload answers when it is done, with an error when
    /// Prometheus refused the files; a signal is answered by nobody, so the check waits (30 s)
    /// for Prometheus's own record of its last successful reload to move past the one before
    /// the signal, and fails early when a reload that had succeeded now reads as failed.
    fn reload(&self) -> Vec<String> {
        let url = shell_quote(self.url);
        let metrics = format!("curl -sS --fail-with-body {url}/metrics");
        // grep and awk read everything (no -q, no exit): an early exit would fail curl.
        let Some(command) = self.reload else {
            return vec![
                format!("curl -sS --fail-with-body -X POST {url}/-/reload"),
                format!(
                    "{metrics} | grep -x 'prometheus_config_last_reload_successful 1' >/dev/null"
                ),
            ];
        };
        let read = "$1 == \"prometheus_config_last_reload_successful\" { s = $2 } $1 == \"prometheus_config_last_reload_success_timestamp_seconds\" { t = $2 }";
        vec![
            format!("before=$({metrics} | awk '{read} END {{ print s, t }}')"),
            command.to_string(),
            format!(
                "r=; for i in $(seq 1 30); do r=$({metrics} | awk -v before=\"$before\" 'BEGIN {{ split(before, b, \" \") }} {read} END {{ if (s == 1 && t + 0 > b[2] + 0) print \"ok\"; else if (s == 0 && b[1] == 1) print \"refused\" }}'); [ -n \"$r\" ] && break; sleep 1; done; [ \"$r\" = ok ] || {{ echo \"prometheus at \"{url}\" did not load the new files after the reload command ($r)\" >&2; false; }}"
            ),
        ]
    }
}

/// The bundle for a Prometheus host: its config and rule files, checked with promtool, applied
/// with a reload that must leave `prometheus_config_last_reload_successful` at 1.
pub fn bundle(spec: &PrometheusSpec, refs: &Refs, region: &str) -> Bundle {
    let config = match &spec.loaded.config {
        Some(raw) => refs.render(raw).value,
        None => render(spec, refs, region),
    };
    let mut files = BTreeMap::from([(CONFIG_FILE.to_string(), File::new(config))]);
    for (path, text) in &spec.loaded.rules {
        files.insert(format!("{CONFIG_DIR}/{path}"), File::new(text.clone()));
    }
    let commands = Commands::of(spec);
    let promtool = commands.promtool;
    let mut validate = vec![format!(
        "{promtool} check config \"$stage\"{}",
        shell_quote(CONFIG_FILE)
    )];
    if !spec.loaded.rules.is_empty() {
        let staged: Vec<String> = spec
            .loaded
            .rules
            .keys()
            .map(|p| format!("\"$stage\"{}", shell_quote(&format!("{CONFIG_DIR}/{p}"))))
            .collect();
        validate.push(format!("{promtool} check rules {}", staged.join(" ")));
    }
    Bundle {
        name: NAME.into(),
        files,
        validate,
        reload: commands.reload(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> PrometheusSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn renders_jobs_discovery_rules_and_remote_write() {
        let mut p = spec(
            r#"
scrape_interval = "30s"
external_labels = { cluster = "prod" }
rule_files = ["rules/node.yml"]
alertmanagers = ["10.0.0.5:9093"]
scrape = [
  { job = "node", ec2_port = 9100, ec2_tags = { Role = "app" } },
  { job = "api", targets = ["10.0.0.7:8080"], metrics_path = "/internal/metrics" },
]
remote_write = { url = "https://aps/ws-1/api/v1/remote_write" }
"#,
        );
        p.loaded
            .rules
            .insert("rules/node.yml".into(), "groups: []\n".into());
        let text = render(&p, &Refs::default(), "eu-west-1");
        let v: serde_json::Value = marked_yaml::from_yaml(0, &text).unwrap();
        assert_eq!(v["global"]["scrape_interval"], "30s");
        assert_eq!(v["global"]["external_labels"]["cluster"], "prod");
        assert_eq!(v["rule_files"][0], "rules/node.yml");
        assert_eq!(
            v["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0],
            "10.0.0.5:9093"
        );
        let jobs = v["scrape_configs"].as_array().unwrap();
        assert_eq!(
            jobs[0]["job_name"], "prometheus",
            "the self job comes first"
        );
        let node = &jobs[1];
        assert_eq!(node["ec2_sd_configs"][0]["region"], "eu-west-1");
        assert_eq!(node["ec2_sd_configs"][0]["port"], "9100");
        assert_eq!(node["ec2_sd_configs"][0]["filters"][1]["name"], "tag:Role");
        assert_eq!(node["relabel_configs"][0]["target_label"], "instance");
        assert_eq!(jobs[2]["metrics_path"], "/internal/metrics");
        assert_eq!(v["remote_write"][0]["sigv4"]["region"], "eu-west-1");
    }

    #[test]
    fn the_bundle_validates_config_and_rules_with_promtool() {
        let mut p = spec("rule_files = [\"rules/node.yml\"]");
        p.loaded
            .rules
            .insert("rules/node.yml".into(), "groups: []\n".into());
        let b = bundle(&p, &Refs::default(), "us-east-1");
        assert!(b.files.contains_key("/etc/prometheus/rules/node.yml"));
        assert!(b.validate[0].contains("check config"));
        assert!(b.validate[1].contains("check rules"));
        assert!(b.reload[1].contains("prometheus_config_last_reload_successful 1"));
    }
}
