//! Files pushed over SSM Run Command to every instance matching tags (node_exporter settings,
//! the ADOT collector config, promtail): schema and offline checks. The controller is not part
//! of this version; `plan` says so for every `host_config` resource.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::desired::Validator;

/// `[host_config.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfigSpec {
    /// Instances carrying all these tags receive the files.
    pub targets: BTreeMap<String, String>,
    pub files: Vec<FileSpec>,
    /// Run after the files are in place, e.g. `systemctl restart aws-otel-collector`.
    pub reload: Option<String>,
    #[serde(default = "fifty")]
    pub max_concurrency: String,
    #[serde(default = "zero")]
    pub max_errors: String,
}

fn fifty() -> String {
    "50".into()
}
fn zero() -> String {
    "0".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path on the host.
    pub path: String,
    /// File in the desired directory.
    pub source: Spanned<String>,
    #[serde(default = "mode")]
    pub mode: String,
    /// Command that validates the new file before it replaces the old (`{}` is its path).
    pub validate: Option<String>,
}

fn mode() -> String {
    "0644".into()
}

impl HostConfigSpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
        if self.targets.is_empty() {
            v.here("`targets` selects no instance: give at least one tag");
        }
        for f in &self.files {
            if !f.path.starts_with('/') {
                v.error(
                    &f.source.span(),
                    format!("`{}` must be an absolute path on the host", f.path),
                );
            }
            if f.mode.len() != 4 || !f.mode.chars().all(|c| ('0'..='7').contains(&c)) {
                v.error(
                    &f.source.span(),
                    format!("mode `{}` is not an octal mode like 0644", f.mode),
                );
            }
            v.read(&f.source);
        }
    }
}
