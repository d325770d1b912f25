//! Grafana as an Auto Scaling Group behind an Application Load Balancer: schema and offline
//! checks. The controller is not part of this version; `plan` says so for every `grafana`
//! resource.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::desired::{check_duration, check_tags, Validator};

/// `[grafana.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrafanaSpec {
    pub ami: String,
    pub instance_type: String,
    pub subnets: Vec<String>,
    pub instance_profile: Option<String>,
    pub user_data: Option<Spanned<String>>,
    pub min_size: i32,
    pub max_size: i32,
    /// Unset: left to scaling policies.
    pub desired_capacity: Option<i32>,
    pub health_check_grace_period: Option<Spanned<String>>,
    #[serde(default = "ninety")]
    pub min_healthy_percentage: i32,
    pub alb: AlbSpec,
    #[serde(default)]
    pub provisioning: ProvisioningSpec,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
}

fn ninety() -> i32 {
    90
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlbSpec {
    #[serde(default = "internet_facing")]
    pub scheme: String,
    pub subnets: Vec<String>,
    pub vpc: Option<String>,
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
    pub idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub deletion_protection: bool,
    /// HTTPS on 443 with HTTP 80 redirecting to it; without it, HTTP only.
    pub certificate_arn: Option<String>,
    pub ssl_policy: Option<String>,
    #[serde(default = "health_path")]
    pub health_check_path: String,
}

fn internet_facing() -> String {
    "internet-facing".into()
}
fn health_path() -> String {
    "/api/health".into()
}

/// What is pushed to the instances over SSM.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningSpec {
    /// Dashboard JSON files.
    #[serde(default)]
    pub dashboards: Vec<Spanned<String>>,
    /// grafana.ini overrides: section → key → value.
    #[serde(default)]
    pub ini: BTreeMap<String, BTreeMap<String, String>>,
    /// Prometheus datasource URL, e.g. `http://${host.prometheus.private_ip}:9090`.
    pub prometheus_url: Option<String>,
    /// AMP datasource, e.g. `${amp.workspace.main.prometheus_endpoint}`.
    pub amp_url: Option<String>,
    #[serde(default)]
    pub cloudwatch: bool,
    /// Admin password: the name of an SSM SecureString parameter or a Secrets Manager secret,
    /// never the password itself.
    pub admin_password_ssm_parameter: Option<String>,
    pub admin_password_secret: Option<String>,
}

impl GrafanaSpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
        if self.min_size < 0 || self.max_size < self.min_size {
            v.here(format!(
                "sizes must satisfy 0 <= min_size ({}) <= max_size ({})",
                self.min_size, self.max_size
            ));
        }
        if let Some(d) = self.desired_capacity {
            if d < self.min_size || d > self.max_size {
                v.here(format!(
                    "desired_capacity {d} is outside min_size..=max_size"
                ));
            }
        }
        if !(0..=100).contains(&self.min_healthy_percentage) {
            v.here("min_healthy_percentage is a percentage (0 to 100)");
        }
        if !["internet-facing", "internal"].contains(&self.alb.scheme.as_str()) {
            v.here(format!(
                "alb.scheme `{}` is not internet-facing or internal",
                self.alb.scheme
            ));
        }
        for d in [&self.health_check_grace_period, &self.alb.idle_timeout]
            .into_iter()
            .flatten()
        {
            check_duration(v, d, "duration");
        }
        if let Some(u) = &self.user_data {
            v.read(u);
        }
        for d in &self.provisioning.dashboards {
            if let Some(file) = v.read(d) {
                crate::dashboard::check_dashboard(&file.file, v.diags);
            }
        }
        if self.provisioning.admin_password_ssm_parameter.is_some()
            && self.provisioning.admin_password_secret.is_some()
        {
            v.here("give the admin password as an SSM parameter or a secret, not both");
        }
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}
