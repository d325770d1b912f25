//! Amazon Managed Grafana workspaces and their role associations: schema and offline checks.
//! The controller that reconciles them against the Managed Grafana API is not part of this
//! version; `plan` says so for every `amg` resource.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::desired::{check_tags, Validator};

/// `[amg.workspace.<name>]`; `adopt = "<workspace id>"` manages an existing one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    pub name: Option<String>,
    pub description: Option<String>,
    /// `AWS_SSO` and/or `SAML`.
    #[serde(default = "default_auth")]
    pub authentication_providers: Vec<String>,
    /// `SERVICE_MANAGED` or `CUSTOMER_MANAGED`.
    #[serde(default = "default_permission_type")]
    pub permission_type: String,
    /// `CURRENT_ACCOUNT` or `ORGANIZATION`.
    #[serde(default = "default_account_access")]
    pub account_access_type: String,
    /// `PROMETHEUS`, `CLOUDWATCH`, ...
    #[serde(default)]
    pub data_sources: Vec<String>,
    /// `SNS`.
    #[serde(default)]
    pub notification_destinations: Vec<String>,
    /// Workspace IAM role, usually `${iam.role.<name>.arn}`.
    pub role_arn: Option<String>,
    /// Identity Center users and groups per Grafana role.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleMembers>,
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
}

/// The exact set of users and groups a Grafana role grants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMembers {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// IAM Identity Center user and group ids: a UUID, optionally after the identity store's
/// 10-hex-digit prefix and a dash (`9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a`).
pub fn is_identity_center_id(id: &str) -> bool {
    let uuid = match id.split_at_checked(11) {
        Some((prefix, rest))
            if id.len() == 47
                && prefix.ends_with('-')
                && prefix[..10].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            rest
        }
        _ => id,
    };
    let groups: Vec<&str> = uuid.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn default_auth() -> Vec<String> {
    vec!["AWS_SSO".into()]
}
fn default_permission_type() -> String {
    "SERVICE_MANAGED".into()
}
fn default_account_access() -> String {
    "CURRENT_ACCOUNT".into()
}

impl WorkspaceSpec {
    pub fn validate(&mut self, v: &mut Validator<'_>) {
        for p in &self.authentication_providers {
            if p != "AWS_SSO" && p != "SAML" {
                v.here(format!(
                    "authentication provider `{p}` is not AWS_SSO or SAML"
                ));
            }
        }
        if !["SERVICE_MANAGED", "CUSTOMER_MANAGED"].contains(&self.permission_type.as_str()) {
            v.here(format!(
                "permission_type `{}` is not SERVICE_MANAGED or CUSTOMER_MANAGED",
                self.permission_type
            ));
        }
        if !["CURRENT_ACCOUNT", "ORGANIZATION"].contains(&self.account_access_type.as_str()) {
            v.here(format!(
                "account_access_type `{}` is not CURRENT_ACCOUNT or ORGANIZATION",
                self.account_access_type
            ));
        }
        // A user or group holds one role in a workspace.
        let mut holder: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for (role, members) in &self.roles {
            if !["admin", "editor", "viewer"].contains(&role.as_str()) {
                v.here(format!(
                    "Grafana role `{role}` is not admin, editor or viewer"
                ));
            }
            let listed = members
                .users
                .iter()
                .map(|u| ("user", u.as_str()))
                .chain(members.groups.iter().map(|g| ("group", g.as_str())));
            for (kind, id) in listed {
                if !is_identity_center_id(id) {
                    v.here(format!(
                        "{kind} `{id}` in role `{role}` is not an IAM Identity Center {kind} id (a UUID, optionally after a 10-hex-digit identity store prefix and `-`)"
                    ));
                }
                if let Some(other) = holder.insert((kind, id), role) {
                    v.here(format!(
                        "{kind} `{id}` is in both `{other}` and `{role}`: a user or group holds one Grafana role"
                    ));
                }
            }
        }
        if let Some(tags) = &self.tags {
            check_tags(v, tags);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_center_ids_with_or_without_the_store_prefix() {
        assert!(is_identity_center_id(
            "94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a"
        ));
        assert!(is_identity_center_id(
            "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a"
        ));
        assert!(!is_identity_center_id("alice"));
        assert!(!is_identity_center_id(
            "zz67729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a"
        ));
        assert!(!is_identity_center_id(
            "94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0"
        ));
    }
}
