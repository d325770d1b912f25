//! Files pushed over SSM Run Command to every instance matching tags (node_exporter settings,
//! the ADOT collector config, promtail, the CloudWatch agent), each with optional validate and
//! reload commands.
//!
//! The fleet is read with one paginated `DescribeInstances` per resource; each instance records
//! the hash it has in the tag `stackwarden:host_config.<name>`, so a converged pass sends no SSM
//! call and an instance that joins later (tagged, without the hash) gets the files on the next
//! pass. The push fans out in batches of at most 50 instance ids per `SendCommand`, with the
//! desired MaxConcurrency and MaxErrors, and is tracked with `ListCommands` (one call per 50
//! commands) and, only for commands with failures, `ListCommandInvocations`: never one call per
//! host.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_ec2::types::{Filter, Tag};
use serde::Deserialize;
use toml::Spanned;

use crate::change::{Action, Change};
use crate::controller::{wait_until, Context, Controller, Progress};
use crate::desired::{DesiredState, Resource, Spec, Validator};
use crate::error::{aws_error, Error, Result};
use crate::model::{Kind, Outputs, Refs, ResourceId};
use crate::push::{self, shell_quote, Bundle, File};

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
    /// Host path → the source file's content, read by `validate`.
    #[serde(skip)]
    pub loaded: BTreeMap<String, String>,
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
            if let Some(file) = v.read(&f.source) {
                self.loaded.insert(f.path.clone(), file.text().to_string());
            }
        }
        for (what, value) in [
            ("max_concurrency", &self.max_concurrency),
            ("max_errors", &self.max_errors),
        ] {
            let n = value.strip_suffix('%').unwrap_or(value);
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                v.here(format!(
                    "{what} `{value}` is not a number or a percentage (such as 50 or 10%)"
                ));
            }
        }
    }

    /// The bundle every matching instance receives.
    pub fn bundle(&self, name: &str, refs: &Refs) -> Bundle {
        let mut files = BTreeMap::new();
        let mut validate = Vec::new();
        for f in &self.files {
            let content = self.loaded.get(&f.path).cloned().unwrap_or_default();
            files.insert(
                f.path.clone(),
                File {
                    content: refs.render(&content).value,
                    mode: f.mode.clone(),
                },
            );
            if let Some(cmd) = &f.validate {
                validate.push(cmd.replace("{}", &format!("\"$stage\"{}", shell_quote(&f.path))));
            }
        }
        Bundle {
            name: format!("host_config.{name}"),
            files,
            validate,
            reload: self.reload.iter().cloned().collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The controller

/// The instance tag recording the hash of the `host_config.<name>` bundle an instance has.
pub fn hash_tag(name: &str) -> String {
    format!("stackwarden:host_config.{name}")
}

/// Instance ids per SendCommand: the API's limit.
pub const BATCH: usize = 50;

#[derive(Debug, Clone, Default)]
pub struct FleetInstance {
    pub id: String,
    /// The hash in the instance's tag, if any.
    pub installed: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Per host_config resource: the running instances its targets select.
    pub fleets: BTreeMap<ResourceId, Vec<FleetInstance>>,
}

/// One push to a fleet: the bundle's script, the instances that lack it, the error controls.
#[derive(Debug, Clone, PartialEq)]
pub struct Fanout {
    pub resource: String,
    pub name: String,
    pub script: String,
    pub hash: String,
    pub instances: Vec<String>,
    pub max_concurrency: String,
    pub max_errors: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Sends the bundle's script to the instances, tracks it, tags the ones that installed it.
    Push(Fanout),
}

pub struct HostConfigController;

fn spec_name(id: &ResourceId) -> &str {
    &id.name
}

#[async_trait]
impl Controller for HostConfigController {
    type Observed = Observed;
    type Op = Op;

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::HostConfig]
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        let reads = desired
            .of_kind(Kind::HostConfig)
            .filter_map(|r| match &r.spec {
                Spec::HostConfig(s) => Some((r, s)),
                _ => None,
            })
            .map(|(r, s)| async move {
                let tag = hash_tag(spec_name(&r.id));
                let mut call = ctx.ec2.describe_instances().filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values("running")
                        .build(),
                );
                for (k, v) in &s.targets {
                    call =
                        call.filters(Filter::builder().name(format!("tag:{k}")).values(v).build());
                }
                let mut fleet = Vec::new();
                let mut pages = call.max_results(1000).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(aws_error("ec2", "DescribeInstances"))?;
                    for i in page.reservations().iter().flat_map(|r| r.instances()) {
                        fleet.push(FleetInstance {
                            id: i.instance_id().unwrap_or_default().to_string(),
                            installed: i
                                .tags()
                                .iter()
                                .find(|t| t.key() == Some(tag.as_str()))
                                .and_then(|t| t.value())
                                .map(str::to_string),
                        });
                    }
                }
                fleet.sort_by(|a, b| a.id.cmp(&b.id));
                Ok::<_, Error>((r.id.clone(), fleet))
            });
        let fleets = futures::future::join_all(reads)
            .await
            .into_iter()
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Observed { fleets })
    }

    fn outputs(&self, desired: &DesiredState, _obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        desired
            .of_kind(Kind::HostConfig)
            .filter_map(|r| match &r.spec {
                Spec::HostConfig(s) => Some((
                    r.id.clone(),
                    Outputs::from([(
                        "hash".into(),
                        s.bundle(spec_name(&r.id), &Refs::default()).hash(),
                    )]),
                )),
                _ => None,
            })
            .collect()
    }

    fn diff(
        &self,
        _desired: &DesiredState,
        r: &Resource,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let Spec::HostConfig(s) = &r.spec else {
            return Ok(None);
        };
        let bundle = s.bundle(spec_name(&r.id), refs);
        let hash = bundle.hash();
        let script = bundle.script();
        if script.len() > push::MAX_SCRIPT_BYTES {
            return Err(Error::Invalid(format!(
                "{}: the files make a {} KiB push, over the {} KiB a Run Command can carry",
                r.id,
                script.len() / 1024,
                push::MAX_SCRIPT_BYTES / 1024
            )));
        }
        let fleet = obs.fleets.get(&r.id).map(Vec::as_slice).unwrap_or_default();
        let stale: Vec<String> = fleet
            .iter()
            .filter(|i| i.installed.as_deref() != Some(hash.as_str()))
            .map(|i| i.id.clone())
            .collect();
        if stale.is_empty() {
            return Ok(None);
        }
        let mut c = Change::new(
            r.id.clone(),
            Action::Update,
            format!(
                "{} files on instances tagged {}",
                s.files.len(),
                show_targets(&s.targets)
            ),
        );
        let sample: Vec<&str> = stale.iter().take(3).map(String::as_str).collect();
        let more = if stale.len() > 3 {
            format!(" and {} more", stale.len() - 3)
        } else {
            String::new()
        };
        c.field(
            "installed",
            Some(format!(
                "{} of {} instances lack sha256:{}",
                stale.len(),
                fleet.len(),
                &hash[..12]
            )),
            Some(format!("all {} ({}{more})", fleet.len(), sample.join(", "))),
        );
        c.op(Op::Push(Fanout {
            resource: r.id.to_string(),
            name: bundle.name.clone(),
            script,
            hash,
            instances: stale,
            max_concurrency: s.max_concurrency.clone(),
            max_errors: s.max_errors.clone(),
        }));
        Ok(Some(c))
    }

    fn removed(&self, _desired: &DesiredState, _obs: &Observed, _prune: bool) -> Vec<Change<Op>> {
        // Files on hosts are left in place when a host_config is removed: nothing owns them.
        Vec::new()
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        let Op::Push(push) = op;
        fan_out(ctx, push).await?;
        Ok(None)
    }
}

fn show_targets(t: &BTreeMap<String, String>) -> String {
    t.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sends, tracks and records one push to a fleet.
async fn fan_out(ctx: &Context, push: &Fanout) -> Result<()> {
    let Fanout {
        resource,
        name,
        script,
        hash,
        instances,
        max_concurrency,
        max_errors,
    } = push;
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    for batch in instances.chunks(BATCH) {
        let out = ctx
            .ssm
            .send_command()
            .document_name("AWS-RunShellScript")
            .set_instance_ids(Some(batch.to_vec()))
            .comment(format!("stackwarden {name} sha256:{}", &hash[..12]))
            .parameters("commands", vec![script.clone()])
            .parameters("executionTimeout", vec!["600".into()])
            .max_concurrency(max_concurrency)
            .max_errors(max_errors)
            .send()
            .await
            .map_err(aws_error("ssm", "SendCommand"))?;
        let id = out
            .command()
            .and_then(|c| c.command_id())
            .unwrap_or_default()
            .to_string();
        commands.push((id, batch.to_vec()));
    }
    tracing::info!(
        resource,
        instances = instances.len(),
        commands = commands.len(),
        "pushed files, tracking"
    );
    // One ListCommands page holds 50 commands: the status of the whole push in a call or two.
    let done = wait_until(
        ctx,
        &format!("the {name} push to {} instances", instances.len()),
        || async {
            let mut status: BTreeMap<String, (String, i32, i32)> = BTreeMap::new();
            let mut pages = ctx.ssm.list_commands().into_paginator().send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(aws_error("ssm", "ListCommands"))?;
                for c in page.commands() {
                    let id = c.command_id().unwrap_or_default().to_string();
                    if commands.iter().any(|(mine, _)| mine == &id) {
                        let s = c
                            .status()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default();
                        status.insert(id, (s, c.completed_count(), c.error_count()));
                    }
                }
                if status.len() == commands.len() {
                    break;
                }
            }
            let completed: i32 = status.values().map(|s| s.1).sum();
            let errors: i32 = status.values().map(|s| s.2).sum();
            let open = commands.iter().any(|(id, _)| {
                status.get(id).is_none_or(|(s, _, _)| {
                    matches!(s.as_str(), "Pending" | "InProgress" | "Cancelling")
                })
            });
            tracing::info!(
                resource,
                completed,
                errors,
                total = instances.len(),
                "push progress"
            );
            Ok(if open {
                Progress::Waiting(format!(
                    "{completed} of {} done, {errors} failed",
                    instances.len()
                ))
            } else {
                Progress::Done(status)
            })
        },
    )
    .await?;

    let mut succeeded: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for (id, batch) in &commands {
        let (status, _, _) = done.get(id).cloned().unwrap_or_default();
        if status == "Success" {
            succeeded.extend(batch.iter().cloned());
            continue;
        }
        // Only commands with failures are read per invocation, a page of 50 at a time.
        let mut pages = ctx
            .ssm
            .list_command_invocations()
            .command_id(id)
            .details(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("ssm", "ListCommandInvocations"))?;
            for inv in page.command_invocations() {
                let instance = inv.instance_id().unwrap_or_default().to_string();
                match inv.status().map(|s| s.as_str()) {
                    Some("Success") => succeeded.push(instance),
                    other => {
                        let output = inv
                            .command_plugins()
                            .first()
                            .and_then(|p| p.output())
                            .unwrap_or_default()
                            .trim()
                            .to_string();
                        failures.push(format!(
                            "{instance} ({}): {output}",
                            other.unwrap_or("unknown")
                        ));
                    }
                }
            }
        }
    }
    // CreateTags takes up to 1000 resources per call.
    for chunk in succeeded.chunks(1000) {
        ctx.ec2
            .create_tags()
            .set_resources(Some(chunk.to_vec()))
            .tags(
                Tag::builder()
                    .key(hash_tag(name.trim_start_matches("host_config.")))
                    .value(hash)
                    .build(),
            )
            .send()
            .await
            .map_err(aws_error("ec2", "CreateTags"))?;
    }
    if failures.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = failures.iter().take(3).map(String::as_str).collect();
    Err(Error::Invalid(format!(
        "{} of {} instances failed to install {name}: {}{}",
        failures.len(),
        instances.len(),
        shown.join("; "),
        if failures.len() > 3 { "; ..." } else { "" }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{desired, resource};

    fn spec() -> HostConfigSpec {
        let mut s: HostConfigSpec = toml::from_str(
            "targets = { Role = \"app\" }\nfiles = [{ path = \"/etc/default/node_exporter\", source = \"ne.env\", validate = \"test -s {}\" }]\nreload = \"systemctl restart node_exporter\"\n",
        )
        .unwrap();
        s.loaded.insert(
            "/etc/default/node_exporter".into(),
            "ARGS=--collector.systemd\n".into(),
        );
        s
    }

    fn diff(o: &Observed) -> Option<Change<Op>> {
        let r = resource(Kind::HostConfig, "node_exporter", Spec::HostConfig(spec()));
        HostConfigController
            .diff(&desired(vec![r.clone()]), &r, o, &Refs::default())
            .unwrap()
    }

    fn fleet(installed: &[Option<&str>]) -> Observed {
        let id = ResourceId::new(Kind::HostConfig, "node_exporter");
        Observed {
            fleets: BTreeMap::from([(
                id,
                installed
                    .iter()
                    .enumerate()
                    .map(|(n, h)| FleetInstance {
                        id: format!("i-{n}"),
                        installed: h.map(str::to_string),
                    })
                    .collect(),
            )]),
        }
    }

    #[test]
    fn only_instances_lacking_the_hash_get_the_push() {
        let hash = spec().bundle("node_exporter", &Refs::default()).hash();
        let c = diff(&fleet(&[Some(&hash), None, Some("old")])).unwrap();
        let [Op::Push(Fanout { instances, .. })] = &c.ops[..] else {
            panic!()
        };
        assert_eq!(instances, &["i-1", "i-2"]);
        assert!(diff(&fleet(&[Some(&hash), Some(&hash)])).is_none());
        assert!(diff(&fleet(&[])).is_none(), "no instance, nothing to do");
    }

    #[test]
    fn the_validate_command_gets_the_staged_path() {
        let b = spec().bundle("node_exporter", &Refs::default());
        assert_eq!(b.validate, ["test -s \"$stage\"/etc/default/node_exporter"]);
        assert_eq!(b.reload, ["systemctl restart node_exporter"]);
        assert_eq!(b.name, "host_config.node_exporter");
    }
}
