//! Files pushed over SSM Run Command to every instance matching tags (node_exporter settings,
//! the ADOT collector config, promtail, the CloudWatch agent), each with optional validate and
//! reload commands.
//!
//! The fleet is read with one paginated `DescribeInstances` per resource; each instance records
//! the hash it has in the tag `stackwarden:<stack>:host_config.<name>`, so a converged pass sends no SSM
//! call and an instance that joins later (tagged, without the hash) gets the files on the next
//! pass. The push goes out through [`crate::push::send`] with the desired MaxConcurrency and
//! MaxErrors: batches of 50 instances, tracked by pages, never one call per host.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde::Deserialize;
use toml::Spanned;

use crate::change::{Action, Change};
use crate::controller::{Context, Controller, Pushed};
use crate::desired::{DesiredState, KindSpec, Resource, Validator, TAG_STACK};
use crate::diag::Diagnostics;
use crate::error::Result;
use crate::host::HostSpec;
use crate::kind::{schema, Form, Kind, KindDef};
use crate::model::{Outputs, Refs, ResourceId, KNOWN_AFTER_APPLY};
use crate::push::send::{track, Controls, Op, Rollout, Tracked};
use crate::push::{shell_quote, Bundle, Content, File};

static HOST_CONFIG_KIND: KindDef = KindDef {
    path: "host_config",
    attributes: &["hash"],
    form: Form::Table {
        schema: schema::<HostConfigSpec>,
    },
    attribute_parts: &[],
    whole: Some(link_and_check),
    controller: || Box::new(HostConfigController),
};
/// `[host_config.<name>]`.
pub const HOST_CONFIG: Kind = Kind::new(&HOST_CONFIG_KIND);

/// A host_config depends on the stack's hosts its targets select, as on what it references: it
/// is applied after them, so a host launched in a pass gets its files in that pass. Two
/// host_configs that write the same path and could select the same instance (no tag on which
/// their targets disagree) would overwrite each other's file on every pass: an error.
fn link_and_check(kind: Kind, desired: &mut DesiredState, diags: &mut Diagnostics) {
    let edges: Vec<(ResourceId, ResourceId)> = desired
        .specs::<HostConfigSpec>(kind)
        .flat_map(|(r, s)| {
            s.targeted_hosts(desired)
                .map(|host| (r.id.clone(), host.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    for (config, host) in edges {
        if let Some(r) = desired.resources.get_mut(&config) {
            r.depends_on.insert(host);
        }
    }
    let configs: Vec<(&Resource, &HostConfigSpec)> = desired.specs(kind).collect();
    for (i, (a, sa)) in configs.iter().enumerate() {
        for (b, sb) in &configs[i + 1..] {
            let disjoint = sa
                .targets
                .iter()
                .any(|(k, v)| sb.targets.get(k).is_some_and(|w| w != v));
            if disjoint {
                continue;
            }
            for f in &sb.files {
                if sa.files.iter().any(|g| g.path == f.path) {
                    diags.at_origin(
                        &b.origin,
                        format!(
                            "{} and {} both write `{}` to the instances their targets share",
                            a.id, b.id, f.path
                        ),
                    );
                }
            }
        }
    }
}

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

impl KindSpec for HostConfigSpec {
    fn instance_tag_keys(&self) -> Vec<&str> {
        self.targets.keys().map(String::as_str).collect()
    }

    fn validate(&mut self, v: &mut Validator<'_>) {
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
                // `${...}` in a file is rendered before the push, like in TOML: a file naming
                // a resource is pushed after it exists, and again when it changes.
                v.scan_host_file_refs(&file);
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
}

impl HostConfigSpec {
    /// The stack's hosts whose instances these targets select: a host_config is applied after
    /// them, and a host launched in the same pass gets the files in that pass.
    pub fn targeted_hosts<'a>(
        &'a self,
        desired: &'a DesiredState,
    ) -> impl Iterator<Item = &'a ResourceId> + 'a {
        desired
            .specs::<HostSpec>(crate::host::HOST)
            .filter(move |(r, h)| {
                let tags = h.instance_tags(desired, &r.id);
                self.targets.iter().all(|(k, v)| tags.get(k) == Some(v))
            })
            .map(|(r, _)| &r.id)
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
                    content: Content::Text(refs.render(&content).value),
                    mode: f.mode.clone(),
                },
            );
            if let Some(cmd) = &f.validate {
                validate.push(cmd.replace("{}", &format!("\"$stage\"{}", shell_quote(&f.path))));
            }
        }
        Bundle {
            name: bundle_name(name),
            files,
            validate,
            reload: self.reload.iter().cloned().collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The controller

/// The bundle of `[host_config.<name>]` on the hosts (`host_config.<name>`).
pub fn bundle_name(name: &str) -> String {
    format!("host_config.{name}")
}

/// The instance tag recording what a stack's `[host_config.<name>]` installed there:
/// `stackwarden:<stack>:host_config.<name>`. Named per stack, so two stacks' host_configs of
/// one name never read each other's record.
pub fn record_tag(stack: &str, name: &str) -> String {
    format!("stackwarden:{stack}:{}", bundle_name(name))
}

#[derive(Debug, Clone, Default)]
pub struct FleetInstance {
    pub id: String,
    /// The stack its `stackwarden:stack` tag names, if any.
    pub stack: Option<String>,
    /// The hash in the instance's tag, if any.
    pub installed: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Per host_config resource: the running instances its targets select.
    pub fleets: BTreeMap<ResourceId, Vec<FleetInstance>>,
    /// The verdicts of the pushes running on them.
    pub tracked: Tracked,
}

pub struct HostConfigController;

#[async_trait]
impl Controller for HostConfigController {
    type Observed = Observed;
    type Op = Op;

    fn kind(&self) -> Kind {
        HOST_CONFIG
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Observed> {
        if desired.of_kind(HOST_CONFIG).next().is_none() {
            return Ok(Observed::default());
        }
        let instances = crate::instances::instances(ctx, desired).await?;
        let fleets: BTreeMap<ResourceId, Vec<FleetInstance>> = desired
            .specs::<HostConfigSpec>(HOST_CONFIG)
            .map(|(r, s)| {
                let tag = record_tag(desired.stack_name(), &r.id.name);
                let fleet = instances
                    .iter()
                    .filter(|i| i.is_running())
                    .filter(|i| s.targets.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
                    .map(|i| FleetInstance {
                        id: i.id.clone(),
                        stack: i.tags.get(TAG_STACK).cloned(),
                        installed: i.tags.get(&tag).cloned(),
                    })
                    .collect();
                (r.id.clone(), fleet)
            })
            .collect();
        let tracked = track(
            ctx,
            fleets
                .values()
                .flatten()
                .filter_map(|i| i.installed.as_deref()),
        )
        .await?;
        Ok(Observed { fleets, tracked })
    }

    fn outputs(&self, desired: &DesiredState, _obs: &Observed) -> Vec<(ResourceId, Outputs)> {
        desired
            .specs::<HostConfigSpec>(HOST_CONFIG)
            .map(|(r, s)| {
                (
                    r.id.clone(),
                    Outputs::from([("hash".into(), s.bundle(&r.id.name, &Refs::default()).hash())]),
                )
            })
            .collect()
    }

    fn diff(
        &self,
        desired: &DesiredState,
        r: &Resource,
        obs: &Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Op>>> {
        let s = r.spec.expect::<HostConfigSpec>();
        let mut prepared = s.bundle(&r.id.name, refs).prepare()?;
        prepared.record = record_tag(desired.stack_name(), &r.id.name);
        let stack = desired.stack_name();
        // Instances another stack owns are never touched, whatever the targets match.
        let (mut fleet, others): (Vec<FleetInstance>, Vec<FleetInstance>) = obs
            .fleets
            .get(&r.id)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .partition(|i| i.stack.as_deref().is_none_or(|s| s == stack));
        let mut notes = Vec::new();
        if !others.is_empty() {
            let owners: BTreeSet<&str> = others.iter().filter_map(|i| i.stack.as_deref()).collect();
            notes.push(format!(
                "{} instance(s) matching the targets belong to another stack ({}) and are left alone: {}",
                others.len(),
                owners.into_iter().collect::<Vec<_>>().join(", "),
                others.iter().take(3).map(|i| i.id.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        // The stack's own hosts it targets: one launched in this pass (after the fleet was
        // read) is known by its outputs; one not launched yet, only by its address.
        let mut unlaunched = Vec::new();
        for host in s.targeted_hosts(desired) {
            match refs.outputs.get(host).and_then(|o| o.get("instance_id")) {
                Some(id) if !fleet.iter().any(|i| &i.id == id) => fleet.push(FleetInstance {
                    id: id.clone(),
                    stack: Some(stack.to_string()),
                    installed: None,
                }),
                Some(_) => {}
                None => unlaunched.push(format!("{host} {KNOWN_AFTER_APPLY}")),
            }
        }
        let rollout = Rollout::of(
            &prepared,
            fleet
                .iter()
                .map(|i| (i.id.as_str(), i.installed.as_deref())),
            &obs.tracked,
        );
        let stale = rollout.send.clone();
        let mut c = Change::new(
            r.id.clone(),
            Action::Update,
            format!(
                "{} files on instances tagged {}",
                s.files.len(),
                show_targets(&s.targets)
            ),
        );
        notes.extend(crate::verify::drift_note(
            fleet
                .iter()
                .map(|i| (i.id.as_str(), i.installed.as_deref())),
        ));
        c.notes = notes;
        if !rollout.record.is_empty() {
            c.field(
                "installed",
                Some(format!("being installed on {}", rollout.record.len())),
                Some(format!("installed {}", prepared.short_hash())),
            );
            c.op(Op::Record {
                push: prepared.clone(),
                instances: rollout.record.clone(),
            });
        }
        if stale.is_empty() && unlaunched.is_empty() {
            if c.ops.is_empty() {
                let total = fleet.len();
                if let Some(e) = rollout
                    .failure(&prepared, total)
                    .or_else(|| rollout.waiting(&prepared))
                {
                    return Err(e);
                }
            }
            return Ok((!c.ops.is_empty() || !c.notes.is_empty()).then_some(c));
        }
        let total = fleet.len() + unlaunched.len();
        let sample: Vec<&str> = stale
            .iter()
            .chain(&unlaunched)
            .take(3)
            .map(String::as_str)
            .collect();
        let more = if stale.len() + unlaunched.len() > 3 {
            format!(" and {} more", stale.len() + unlaunched.len() - 3)
        } else {
            String::new()
        };
        // Files naming a resource not created yet hash differently once it exists.
        let hash = if s.loaded.values().all(|text| refs.render(text).is_known()) {
            prepared.short_hash()
        } else {
            KNOWN_AFTER_APPLY.to_string()
        };
        c.field(
            "installed",
            Some(format!(
                "{} of {total} instances lack {hash}",
                stale.len() + unlaunched.len(),
            )),
            Some(format!("all {total} ({}{more})", sample.join(", "))),
        );
        c.op(Op::Push {
            push: prepared,
            instances: Some(stale),
            controls: Controls {
                max_concurrency: s.max_concurrency.clone(),
                max_errors: s.max_errors.clone(),
            },
        });
        Ok(Some(c))
    }

    fn removed(&self, _desired: &DesiredState, _obs: &Observed, _prune: bool) -> Vec<Change<Op>> {
        // Files on hosts are left in place when a host_config is removed: nothing owns them.
        Vec::new()
    }

    async fn apply(&self, ctx: &Context, op: &Op) -> Result<Option<Outputs>> {
        op.apply(ctx).await.map(|()| None)
    }

    /// One bundle per `host_config`, its tag named per stack.
    fn pushes(&self, desired: &DesiredState) -> Vec<Pushed> {
        desired
            .of_kind(HOST_CONFIG)
            .map(|r| Pushed {
                tag: record_tag(desired.stack_name(), &r.id.name),
                bundle: bundle_name(&r.id.name),
                per_stack: true,
            })
            .collect()
    }
}

fn show_targets(t: &BTreeMap<String, String>) -> String {
    t.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Spec;
    use crate::testing::{desired, resource, STACK};

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
        let r = resource(HOST_CONFIG, "node_exporter", Spec::new(spec()));
        HostConfigController
            .diff(&desired(vec![r.clone()]), &r, o, &Refs::default())
            .unwrap()
    }

    fn fleet(installed: &[Option<&str>]) -> Observed {
        let id = ResourceId::new(HOST_CONFIG, "node_exporter");
        Observed {
            fleets: BTreeMap::from([(
                id,
                installed
                    .iter()
                    .enumerate()
                    .map(|(n, h)| FleetInstance {
                        id: format!("i-{n}"),
                        stack: None,
                        installed: h.map(str::to_string),
                    })
                    .collect(),
            )]),
            tracked: Default::default(),
        }
    }

    #[test]
    fn instances_of_another_stack_are_left_alone_and_said_so() {
        let mut o = fleet(&[None, None, None]);
        let instances = o.fleets.values_mut().next().unwrap();
        instances[0].stack = Some(STACK.into());
        instances[1].stack = Some("other".into());
        let c = diff(&o).unwrap();
        let [Op::Push {
            instances: Some(instances),
            push,
            ..
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(instances, &["i-0", "i-2"], "its own and the untagged one");
        assert_eq!(push.hash_tag(), "stackwarden:s:host_config.node_exporter");
        assert_eq!(c.notes.len(), 1);
        assert!(c.notes[0].contains("another stack (other)") && c.notes[0].contains("i-1"));
        // Converged, the note stays: plan says what it leaves alone.
        let hash = spec().bundle("node_exporter", &Refs::default()).hash();
        let mut o = fleet(&[Some(&hash), None]);
        o.fleets.values_mut().next().unwrap()[1].stack = Some("other".into());
        let c = diff(&o).unwrap();
        assert!(c.ops.is_empty());
        assert_eq!(c.notes.len(), 1);
    }

    #[test]
    fn only_instances_lacking_the_hash_get_the_push() {
        let hash = spec().bundle("node_exporter", &Refs::default()).hash();
        let c = diff(&fleet(&[Some(&hash), None, Some("old")])).unwrap();
        let [Op::Push {
            instances: Some(instances),
            ..
        }] = &c.ops[..]
        else {
            panic!()
        };
        assert_eq!(instances, &["i-1", "i-2"]);
        assert!(diff(&fleet(&[Some(&hash), Some(&hash)])).is_none());
        assert!(diff(&fleet(&[])).is_none(), "no instance, nothing to do");
    }

    #[test]
    fn an_instance_a_verify_found_changed_is_pushed_again_and_plan_says_why() {
        let hash = spec().bundle("node_exporter", &Refs::default()).hash();
        let c = diff(&fleet(&[Some(&hash), Some(crate::verify::DRIFTED)])).unwrap();
        let [Op::Push {
            instances: Some(instances),
            ..
        }] = &c.ops[..]
        else {
            panic!("{:?}", c.ops)
        };
        assert_eq!(instances, &["i-1"]);
        assert_eq!(
            c.notes,
            ["files changed on the host since the push (found by verify) on i-1: pushed again"]
        );
    }

    #[test]
    fn the_validate_command_gets_the_staged_path() {
        let b = spec().bundle("node_exporter", &Refs::default());
        assert_eq!(b.validate, ["test -s \"$stage\"/etc/default/node_exporter"]);
        assert_eq!(b.reload, ["systemctl restart node_exporter"]);
        assert_eq!(b.name, "host_config.node_exporter");
    }
}
