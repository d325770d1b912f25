//! What is pushed to every Grafana instance of a group: `grafana.ini` overrides, the data
//! sources and dashboard provider, the dashboards, and the admin password file, restarted into
//! and checked through Grafana's health endpoint.
//!
//! The admin password never travels: the operator reads only its version (SSM
//! `DescribeParameters`, Secrets Manager `DescribeSecret`), and the pushed script has each host
//! fetch that version itself with its instance role (`aws ssm get-parameter --with-decryption`
//! or `aws secretsmanager get-secret-value`) into its own 0600 file that `grafana.ini` reads
//! (`$__file{...}`). The bundle's hash covers the fetch command, so a rotation (a new version)
//! is pushed again. Grafana applies `admin_password` only when it creates its database, so the
//! push also sets it with `grafana cli admin reset-admin-password`, which makes a rotation take
//! effect.

use std::collections::BTreeMap;
use std::path::Path;

use super::{GrafanaSpec, PasswordSource, ProvisioningSpec};
use crate::desired::KindSpec;
use crate::model::Refs;
use crate::push::yaml::{map, s, Yaml};
use crate::push::{self, shell_quote, Bundle, File};

/// The bundle's name on the host (its stage, backup and hash files, and its instance tag).
pub const NAME: &str = "grafana";
pub const INI: &str = "/etc/grafana/grafana.ini";
pub const DATASOURCES: &str = "/etc/grafana/provisioning/datasources/stackwarden.yaml";
pub const PROVIDERS: &str = "/etc/grafana/provisioning/dashboards/stackwarden.yaml";
pub const DASHBOARD_DIR: &str = "/var/lib/grafana/dashboards/stackwarden";
pub const PASSWORD_FILE: &str = "/etc/grafana/admin-password";

/// The spec of a group's provisioning node (`grafana.<name>.provisioning`): the table's
/// `provisioning`, and where Grafana answers (the reload waits for its health endpoint).
#[derive(Debug, Clone)]
pub struct ProvisioningPart {
    pub provisioning: ProvisioningSpec,
    pub port: u16,
    pub health_path: String,
}

impl ProvisioningPart {
    pub fn of(s: &GrafanaSpec) -> Self {
        ProvisioningPart {
            provisioning: s.provisioning.clone(),
            port: s.target_group.port,
            health_path: s.target_group.health_check_path.clone(),
        }
    }
}

impl KindSpec for ProvisioningPart {}

/// The admin password's current version: all the operator ever reads of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordVersion {
    pub source: PasswordSource,
    /// The SSM parameter's version number, or the secret's `AWSCURRENT` version id.
    pub version: String,
}

impl PasswordVersion {
    /// The command that prints this version of the password on a host, with the host's own
    /// credentials (its instance role), in the stack's region.
    pub fn fetch_command(&self, region: &str) -> String {
        let region = shell_quote(region);
        match &self.source {
            PasswordSource::SsmParameter(name) => format!(
                "aws ssm get-parameter --region {region} --name {} --with-decryption --query Parameter.Value --output text",
                shell_quote(&format!("{name}:{}", self.version))
            ),
            PasswordSource::Secret(name) => format!(
                "aws secretsmanager get-secret-value --region {region} --secret-id {} --version-id {} --query SecretString --output text",
                shell_quote(name),
                shell_quote(&self.version)
            ),
        }
    }
}

impl PasswordSource {
    /// How plans name it.
    pub fn describe(&self) -> String {
        match self {
            PasswordSource::SsmParameter(p) => format!("(sensitive, SSM parameter {p})"),
            PasswordSource::Secret(s) => format!("(sensitive, secret {s})"),
        }
    }
}

/// The name a dashboard file gets on the host: its file name.
pub fn dashboard_file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

/// A data source the provisioning defines, as a dashboard can name it: by `name` (the string
/// form `"datasource": "Prometheus"`) or by `uid` (the object form `{"uid": "prometheus"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSource {
    pub name: &'static str,
    pub uid: &'static str,
    /// Grafana's plugin id, what a `datasource` template variable's `query` selects.
    pub kind: &'static str,
}

/// The data sources, in the order they are listed.
pub const PROMETHEUS: DataSource = DataSource {
    name: "Prometheus",
    uid: "prometheus",
    kind: "prometheus",
};
pub const AMP: DataSource = DataSource {
    name: "Amazon Managed Prometheus",
    uid: "amp",
    kind: "prometheus",
};
pub const CLOUDWATCH: DataSource = DataSource {
    name: "CloudWatch",
    uid: "cloudwatch",
    kind: "cloudwatch",
};

/// The data sources `datasources` provisions, in its order: the first is Grafana's default (the
/// one a panel without a `datasource` queries).
pub fn defined(p: &ProvisioningSpec) -> Vec<DataSource> {
    [
        (p.prometheus_url.is_some(), PROMETHEUS),
        (p.amp_url.is_some(), AMP),
        (p.cloudwatch, CLOUDWATCH),
    ]
    .into_iter()
    .filter_map(|(on, ds)| on.then_some(ds))
    .collect()
}

/// `datasources/stackwarden.yaml`: the configured data sources, and the removal of those the
/// desired state no longer has (Grafana keeps a provisioned data source otherwise).
pub fn datasources(p: &ProvisioningSpec, refs: &Refs, region: &str) -> String {
    let mut list = Vec::new();
    let mut gone = Vec::new();
    let mut default_taken = false;
    let mut is_default = || !std::mem::replace(&mut default_taken, true);
    match &p.prometheus_url {
        Some(url) => list.push(map(vec![
            ("name", s(PROMETHEUS.name)),
            ("uid", s(PROMETHEUS.uid)),
            ("type", s(PROMETHEUS.kind)),
            ("access", s("proxy")),
            ("url", s(refs.render(url).value)),
            ("isDefault", Yaml::Bool(is_default())),
            ("editable", Yaml::Bool(false)),
        ])),
        None => gone.push(PROMETHEUS.name),
    }
    match &p.amp_url {
        Some(url) => {
            let url = refs.render(url).value;
            list.push(map(vec![
                ("name", s(AMP.name)),
                ("uid", s(AMP.uid)),
                ("type", s(AMP.kind)),
                ("access", s("proxy")),
                ("url", s(url.trim_end_matches('/'))),
                ("isDefault", Yaml::Bool(is_default())),
                ("editable", Yaml::Bool(false)),
                (
                    "jsonData",
                    map(vec![
                        ("httpMethod", s("POST")),
                        ("sigV4Auth", Yaml::Bool(true)),
                        ("sigV4AuthType", s("default")),
                        ("sigV4Region", s(region)),
                    ]),
                ),
            ]))
        }
        None => gone.push(AMP.name),
    }
    if p.cloudwatch {
        list.push(map(vec![
            ("name", s(CLOUDWATCH.name)),
            ("uid", s(CLOUDWATCH.uid)),
            ("type", s(CLOUDWATCH.kind)),
            ("isDefault", Yaml::Bool(is_default())),
            ("editable", Yaml::Bool(false)),
            (
                "jsonData",
                map(vec![
                    ("authType", s("default")),
                    ("defaultRegion", s(region)),
                ]),
            ),
        ]));
    } else {
        gone.push(CLOUDWATCH.name);
    }
    let mut doc = vec![("apiVersion", Yaml::Int(1))];
    if !gone.is_empty() {
        doc.push((
            "deleteDatasources",
            Yaml::List(
                gone.into_iter()
                    .map(|n| map(vec![("name", s(n)), ("orgId", Yaml::Int(1))]))
                    .collect(),
            ),
        ));
    }
    doc.push(("datasources", Yaml::List(list)));
    map(doc).to_text()
}

/// `dashboards/stackwarden.yaml`: one file provider for the pushed dashboards.
fn providers() -> String {
    map(vec![
        ("apiVersion", Yaml::Int(1)),
        (
            "providers",
            Yaml::List(vec![map(vec![
                ("name", s("stackwarden")),
                ("type", s("file")),
                ("allowUiUpdates", Yaml::Bool(false)),
                ("options", map(vec![("path", s(DASHBOARD_DIR))])),
            ])]),
        ),
    ])
    .to_text()
}

/// `grafana.ini`: only overrides (Grafana's defaults.ini has the rest), the admin password read
/// from its file.
pub fn ini(p: &ProvisioningSpec, refs: &Refs, with_password: bool) -> String {
    let mut sections = p.ini.clone();
    if with_password {
        sections.entry("security".into()).or_default().insert(
            "admin_password".into(),
            format!("$__file{{{PASSWORD_FILE}}}"),
        );
    }
    let mut out = String::from("; Written by stackwarden: overrides of Grafana's defaults.\n");
    for (section, keys) in &sections {
        out.push_str(&format!("\n[{section}]\n"));
        for (k, v) in keys {
            out.push_str(&format!("{k} = {}\n", refs.render(v).value));
        }
    }
    out
}

/// Grafana's restart when `restart` is left out: the package's service.
pub const DEFAULT_RESTART: &str = "systemctl restart grafana-server";
/// Grafana's command line when `cli` is left out.
pub const DEFAULT_CLI: &str = "grafana cli";

/// The commands a group's push runs on its instances, as the desired state gives them or their
/// defaults.
pub struct Commands<'a> {
    pub restart: &'a str,
    /// Polled after the restart until it answers; default the target group's health check on
    /// localhost.
    pub health_url: String,
    /// The prefix of `admin reset-admin-password` (`docker exec -i grafana grafana cli`).
    pub cli: &'a str,
}

impl<'a> Commands<'a> {
    pub fn of(part: &'a ProvisioningPart) -> Commands<'a> {
        let p = &part.provisioning;
        Commands {
            restart: push::command_or(&p.restart, DEFAULT_RESTART),
            health_url: p.health_url.as_ref().map_or_else(
                || format!("http://localhost:{}{}", part.port, part.health_path),
                |u| u.as_str().to_string(),
            ),
            cli: push::command_or(&p.cli, DEFAULT_CLI),
        }
    }

    /// For a plan: what the push runs on each instance.
    pub fn describe(&self, password: bool) -> String {
        let cli = if password {
            format!(", the admin password set with `{}`", self.cli)
        } else {
            String::new()
        };
        format!(
            "on each instance: restart `{}`, then wait for {}{cli}",
            self.restart, self.health_url
        )
    }
}

/// The whole bundle for one group.
pub fn bundle(
    part: &ProvisioningPart,
    refs: &Refs,
    region: &str,
    password: Option<&PasswordVersion>,
) -> Bundle {
    let mut files = BTreeMap::new();
    files.insert(
        INI.to_string(),
        File::new(ini(&part.provisioning, refs, password.is_some())),
    );
    files.insert(
        DATASOURCES.to_string(),
        File::new(datasources(&part.provisioning, refs, region)),
    );
    files.insert(PROVIDERS.to_string(), File::new(providers()));
    let mut names = Vec::new();
    for d in &part.provisioning.dashboards {
        let name = dashboard_file_name(d.get_ref());
        let content = part
            .provisioning
            .loaded_dashboards
            .get(d.get_ref())
            .cloned()
            .unwrap_or_default();
        files.insert(format!("{DASHBOARD_DIR}/{name}"), File::new(content));
        names.push(name);
    }
    if let Some(p) = password {
        files.insert(
            PASSWORD_FILE.to_string(),
            File::fetched(p.fetch_command(region)),
        );
    }

    let dir = format!("\"$root\"{}", shell_quote(DASHBOARD_DIR));
    let keep: Vec<String> = names.iter().map(|n| shell_quote(n)).collect();
    let mut reload = vec![
        // Dashboards removed from the desired state leave the directory.
        format!(
            "for f in {dir}/*.json; do [ -e \"$f\" ] || continue; case \" {} \" in *\" $(basename \"$f\") \"*) ;; *) rm -f \"$f\" ;; esac; done",
            keep.join(" ")
        ),
    ];
    if password.is_some() {
        let file = format!("\"$root\"{PASSWORD_FILE}");
        reload.push(format!(
            "{{ getent group grafana >/dev/null && chgrp grafana {file} && chmod 0640 {file}; }} || true"
        ));
    }
    let commands = Commands::of(part);
    reload.push(commands.restart.to_string());
    reload.push(format!(
        "ok=; for i in $(seq 1 60); do if curl -fsS -o /dev/null {}; then ok=1; break; fi; sleep 1; done; [ -n \"$ok\" ] || {{ echo 'grafana is not healthy 60 s after the restart' >&2; false; }}",
        shell_quote(&commands.health_url)
    ));
    if password.is_some() {
        reload.push(format!(
            "{} --homepath /usr/share/grafana --config \"$root\"{INI} admin reset-admin-password --password-from-stdin < \"$root\"{PASSWORD_FILE} >/dev/null",
            commands.cli
        ));
    }
    Bundle {
        name: NAME.into(),
        files,
        validate: Vec::new(),
        reload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> ProvisioningPart {
        let text = format!(
            r#"
ami = "ami-1"
instance_type = "t3.small"
subnets = ["subnet-a"]
min_size = 1
max_size = 2
alb = {{ subnets = ["subnet-a", "subnet-b"] }}
{extra}
"#
        );
        ProvisioningPart::of(&toml::from_str::<GrafanaSpec>(&text).unwrap())
    }

    fn parse(yaml: &str) -> marked_yaml::Node {
        marked_yaml::parse_yaml(0, yaml).unwrap()
    }

    /// `defined` is what dashboards are checked against: it must list what the file provisions,
    /// by the same names and uids, the default first.
    #[test]
    fn defined_lists_the_provisioned_data_sources_default_first() {
        for (text, want) in [
            (
                r#"provisioning = { prometheus_url = "http://10.0.0.5:9090", cloudwatch = true }"#,
                vec![PROMETHEUS, CLOUDWATCH],
            ),
            (
                r#"provisioning = { amp_url = "https://aps/workspaces/ws-1/", cloudwatch = true }"#,
                vec![AMP, CLOUDWATCH],
            ),
            ("provisioning = {}", vec![]),
        ] {
            let s = spec(text);
            assert_eq!(defined(&s.provisioning), want, "{text}");
            let yaml = datasources(&s.provisioning, &Refs::default(), "eu-west-1");
            let doc = parse(&yaml);
            let list = doc
                .as_mapping()
                .unwrap()
                .get_sequence("datasources")
                .unwrap();
            assert_eq!(list.len(), want.len(), "{yaml}");
            for (i, (node, ds)) in list.iter().zip(&want).enumerate() {
                let m = node.as_mapping().unwrap();
                assert_eq!(m.get_scalar("name").unwrap().as_str(), ds.name);
                assert_eq!(m.get_scalar("uid").unwrap().as_str(), ds.uid);
                assert_eq!(m.get_scalar("type").unwrap().as_str(), ds.kind);
                let default = if i == 0 { "true" } else { "false" };
                assert_eq!(m.get_scalar("isDefault").unwrap().as_str(), default);
            }
        }
    }

    #[test]
    fn datasources_are_yaml_with_sigv4_for_amp_and_remove_what_is_gone() {
        let s = spec(
            r#"provisioning = { prometheus_url = "http://10.0.0.5:9090", amp_url = "https://aps/workspaces/ws-1/" }"#,
        );
        let text = datasources(&s.provisioning, &Refs::default(), "eu-west-1");
        let doc = parse(&text);
        let list = doc
            .as_mapping()
            .unwrap()
            .get_sequence("datasources")
            .unwrap();
        assert_eq!(list.len(), 2);
        let amp = list[1].as_mapping().unwrap();
        assert_eq!(
            amp.get_scalar("url").unwrap().as_str(),
            "https://aps/workspaces/ws-1"
        );
        let json = amp.get_mapping("jsonData").unwrap();
        assert_eq!(json.get_scalar("sigV4Auth").unwrap().as_str(), "true");
        assert_eq!(
            json.get_scalar("sigV4Region").unwrap().as_str(),
            "eu-west-1"
        );
        assert_eq!(
            list[0]
                .as_mapping()
                .unwrap()
                .get_scalar("isDefault")
                .unwrap()
                .as_str(),
            "true"
        );
        assert_eq!(amp.get_scalar("isDefault").unwrap().as_str(), "false");
        assert!(text.contains("deleteDatasources"), "{text}");
        assert!(text.contains("\"CloudWatch\""), "{text}");
    }

    #[test]
    fn the_password_is_fetched_by_the_host_and_a_new_version_changes_the_hash() {
        let s = spec(r#"provisioning = { admin_password_ssm_parameter = "/grafana/admin" }"#);
        let version = |source: PasswordSource, version: &str| PasswordVersion {
            source,
            version: version.into(),
        };
        let ssm = |v: &str| version(PasswordSource::SsmParameter("/grafana/admin".into()), v);
        let a = bundle(&s, &Refs::default(), "eu-west-1", Some(&ssm("3")));
        assert!(a.files[INI]
            .text()
            .contains("admin_password = $__file{/etc/grafana/admin-password}"));
        let file = &a.files[PASSWORD_FILE];
        assert_eq!(file.mode, "0600");
        assert_eq!(
            file.content,
            crate::push::Content::Fetched(
                "aws ssm get-parameter --region eu-west-1 --name /grafana/admin:3 --with-decryption --query Parameter.Value --output text".into()
            )
        );
        assert!(a.script().contains(
            "fetch /etc/grafana/admin-password 0600 aws ssm get-parameter --region eu-west-1 --name /grafana/admin:3"
        ));
        assert_eq!(
            a.hash(),
            bundle(&s, &Refs::default(), "eu-west-1", Some(&ssm("3"))).hash()
        );
        assert_ne!(
            a.hash(),
            bundle(&s, &Refs::default(), "eu-west-1", Some(&ssm("4"))).hash()
        );
        let secret = version(PasswordSource::Secret("grafana admin".into()), "c55e2c7f");
        assert_eq!(
            secret.fetch_command("us-east-1"),
            "aws secretsmanager get-secret-value --region us-east-1 --secret-id 'grafana admin' --version-id c55e2c7f --query SecretString --output text"
        );
    }

    #[test]
    fn a_fetched_file_is_what_the_host_command_prints_and_only_its_owner_reads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let bundle = crate::push::Bundle {
            name: "demo".into(),
            files: BTreeMap::from([(
                "/etc/demo/secret".into(),
                File::fetched("printf '%s\\n' 'pa ss'"),
            )]),
            validate: Vec::new(),
            reload: Vec::new(),
        };
        let out = crate::testing::run_as_agent(&bundle.script(), dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.join("etc/demo/secret");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "pa ss");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A fetch that fails installs nothing and says which command failed.
        let mut failing = bundle.clone();
        failing.files.insert(
            "/etc/demo/secret".into(),
            File::fetched("false ssm get-parameter"),
        );
        failing
            .files
            .insert("/etc/demo/other".into(), File::new("x\n"));
        let out = crate::testing::run_as_agent(&failing.script(), dir);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot fetch /etc/demo/secret with false ssm get-parameter"),
            "{stderr}"
        );
        assert!(!dir.join("etc/demo/other").exists());
    }

    #[test]
    fn the_script_installs_and_prunes_dashboards_under_the_root() {
        let mut s = spec(
            r#"provisioning = { dashboards = ["dashboards/node.json"], restart = "true", health_url = "file:///dev/null" }"#,
        );
        s.provisioning.loaded_dashboards.insert(
            "dashboards/node.json".into(),
            "{\"title\": \"Node\"}".into(),
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let old = dir.join("var/lib/grafana/dashboards/stackwarden/old.json");
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, "{}").unwrap();
        let out = crate::testing::run_as_agent(
            &bundle(&s, &Refs::default(), "us-east-1", None).script(),
            dir,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!old.exists(), "a dashboard no longer desired is removed");
        let node = dir.join("var/lib/grafana/dashboards/stackwarden/node.json");
        assert_eq!(
            std::fs::read_to_string(node).unwrap(),
            "{\"title\": \"Node\"}"
        );
        assert!(dir
            .join("etc/grafana/provisioning/dashboards/stackwarden.yaml")
            .exists());
    }
}
