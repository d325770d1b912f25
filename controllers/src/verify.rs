//! Files changed on hosts after a push: found by a verify, put back by the next pass.
//!
//! Every push leaves a manifest beside its hash on the host (`/var/lib/stackwarden/<bundle>.files`:
//! mode, sha256 and path of each file it installed). A verify sends one read-only script
//! (`verify.sh`) per batch of 50 instances, which compares the live files of every bundle the
//! stack recorded there with that manifest and prints what differs. An instance whose files
//! differ gets its record tag set to [`DRIFTED`]: no bundle hashes to that, so the next pass
//! pushes the bundle to it again (plans say why until then), and the finding survives a restart
//! of the operator. Only instances the stack pushed to are looked at, with the same ownership
//! rule as the pushes: another stack's instance is never sent a command.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Filter;

use crate::controller::Context;
use crate::desired::{DesiredState, TAG_STACK};
use crate::error::{aws_error, Result};
use crate::model::Kind;
pub use crate::push::send::RUNNING;
use crate::push::send::{commands_since, stdout_of, tag, Command, Controls, Pending, BATCH};
use crate::push::shell_quote;

/// What a verify writes into an instance's record tag when the files of that bundle were
/// changed on the host: no bundle hashes to it, so the next pass pushes the bundle again.
pub const DRIFTED: &str = "drifted";

/// How plans show what an instance's record tag says it has installed.
pub fn show_installed(installed: Option<&str>) -> Option<String> {
    installed.map(|h| {
        if h == DRIFTED {
            "changed on the host since the push (found by verify)".to_string()
        } else if let Some(p) = Pending::parse(h) {
            format!(
                "sha256:{} being pushed (command {})",
                &p.hash[..p.hash.len().min(12)],
                p.command
            )
        } else {
            format!("sha256:{}", &h[..h.len().min(12)])
        }
    })
}

/// The plan note for instances a verify found changed: `(instance, installed)` pairs.
pub fn drift_note<'a>(
    instances: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Option<String> {
    let drifted: Vec<&str> = instances
        .into_iter()
        .filter(|(_, installed)| *installed == Some(DRIFTED))
        .map(|(id, _)| id)
        .collect();
    (!drifted.is_empty()).then(|| {
        format!(
            "files changed on the host since the push (found by verify) on {}: pushed again",
            drifted.join(", ")
        )
    })
}

/// One bundle a stack records on instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The instance tag holding the installed hash.
    pub tag: String,
    /// The bundle's name on the host (its manifest is `<bundle>.files`).
    pub bundle: String,
    /// The kind whose resources push it: made due again when it drifted.
    pub kind: Kind,
    /// The tag is named per stack (`host_config`); otherwise (`prometheus`, `grafana`) the
    /// instance must carry this stack's `stackwarden:stack` tag.
    pub per_stack: bool,
}

/// The bundles the desired state pushes: what each kind says it pushes
/// ([`Controller::pushes`](crate::controller::Controller::pushes)).
pub fn records(desired: &DesiredState) -> Vec<Record> {
    Kind::all()
        .flat_map(|kind| {
            kind.controller()
                .pushes(desired)
                .into_iter()
                .map(move |p| Record {
                    tag: p.tag,
                    bundle: p.bundle,
                    kind,
                    per_stack: p.per_stack,
                })
        })
        .collect()
}

/// Files of one bundle changed on one instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Drift {
    pub instance: String,
    pub bundle: String,
    /// The changed, re-moded or missing paths; empty when the push left no manifest.
    pub files: Vec<String>,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.files.is_empty() {
            write!(
                f,
                "{} {}: no record of the push on the host",
                self.instance, self.bundle
            )
        } else {
            write!(
                f,
                "{} {}: {}",
                self.instance,
                self.bundle,
                self.files.join(", ")
            )
        }
    }
}

/// What a verify found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verified {
    /// How many instances were looked at.
    pub instances: usize,
    pub drifted: Vec<Drift>,
    /// Instances whose verify did not run (agent offline, command failed): `id (status)`.
    pub unverified: Vec<String>,
    /// The kinds whose resources push what drifted.
    pub kinds: BTreeSet<Kind>,
}

/// The verify script for these bundles.
fn script(bundles: &BTreeSet<&str>) -> String {
    let names: Vec<String> = bundles.iter().map(|b| shell_quote(b)).collect();
    include_str!("verify.sh").replace("@BUNDLES@", &names.join(" "))
}

/// One instance to verify: its id and the records it holds an installed hash for.
#[derive(Debug, Clone)]
struct Target {
    id: String,
    records: Vec<Record>,
}

/// A verify under way: its commands sent, their findings not yet read. Nothing waits for it:
/// whoever started it [`look`](Sent::look)s again after [`RUNNING`].
#[derive(Debug, Clone)]
pub struct Sent {
    targets: Vec<Target>,
    /// Each command and the instances it went to.
    commands: Vec<(String, Vec<String>)>,
    /// A little before the commands were sent: `ListCommands` is read from there.
    since: SystemTime,
    /// Instances SSM does not manage (SendCommand: `InvalidInstanceId`): sent nothing.
    unreachable: Vec<String>,
}

/// Where a verify stands.
#[derive(Debug)]
pub enum Verify {
    /// Its commands still run on the hosts: look again after [`RUNNING`].
    Running(Sent, String),
    Done(Verified),
}

/// Starts a verify of the files on every instance the stack pushed to: one read-only command
/// per batch of instances. Returns at once; nothing to verify is done at once.
pub async fn start(ctx: &Context, desired: &DesiredState) -> Result<Verify> {
    let records = records(desired);
    if records.is_empty() {
        return Ok(Verify::Done(Verified::default()));
    }
    let targets = targets(ctx, desired.stack_name(), &records).await?;
    if targets.is_empty() {
        return Ok(Verify::Done(Verified::default()));
    }
    let since = SystemTime::now() - Duration::from_secs(300);
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    let mut unreachable = Vec::new();
    // One host that cannot run it does not stop the others'.
    let controls = Controls {
        max_concurrency: "50".into(),
        max_errors: "100%".into(),
    };
    for batch in targets.chunks(BATCH) {
        let bundles: BTreeSet<&str> = batch
            .iter()
            .flat_map(|t| t.records.iter().map(|r| r.bundle.as_str()))
            .collect();
        let script = script(&bundles);
        let command = Command {
            comment: "stackwarden verify".into(),
            script: &script,
            timeout: "300",
            controls: &controls,
        };
        let ids: Vec<String> = batch.iter().map(|t| t.id.clone()).collect();
        // An instance SSM does not manage is reported as not verified; the others are.
        let delivery = command.send_to_managed(ctx, &ids).await?;
        unreachable.extend(delivery.left_out);
        if let Some(id) = delivery.command {
            commands.push((id, delivery.sent));
        }
    }
    tracing::info!(
        instances = targets.len(),
        commands = commands.len(),
        "verify sent"
    );
    let status = format!(
        "sent to {} instances{}",
        targets.len() - unreachable.len(),
        match unreachable.len() {
            0 => String::new(),
            n => format!(", {n} not reachable over SSM"),
        }
    );
    let sent = Sent {
        targets,
        commands,
        since,
        unreachable,
    };
    if sent.commands.is_empty() {
        return sent.findings(ctx).await.map(Verify::Done);
    }
    Ok(Verify::Running(sent, status))
}

impl Sent {
    /// How many instances the verify was sent to.
    pub fn instances(&self) -> usize {
        self.targets.len()
    }

    /// One look at the verify's commands: still running, or done, in which case what they
    /// found is read and every instance whose files changed is marked [`DRIFTED`].
    pub async fn look(self, ctx: &Context) -> Result<Verify> {
        let wanted: BTreeSet<&str> = self.commands.iter().map(|(id, _)| id.as_str()).collect();
        let commands = commands_since(ctx, self.since, &wanted).await?;
        let completed: i32 = commands.iter().map(|c| c.completed_count()).sum();
        let errors: i32 = commands.iter().map(|c| c.error_count()).sum();
        let open = self.commands.iter().any(|(id, _)| {
            commands
                .iter()
                .find(|c| c.command_id() == Some(id.as_str()))
                .is_none_or(|c| {
                    c.status().is_none_or(|s| {
                        matches!(s.as_str(), "Pending" | "InProgress" | "Cancelling")
                    })
                })
        });
        if open {
            let status = format!(
                "{completed} of {} instances done, {errors} failed",
                self.targets.len()
            );
            tracing::info!(%status, "verify running");
            return Ok(Verify::Running(self, status));
        }
        self.findings(ctx).await.map(Verify::Done)
    }

    /// Reads what the finished commands found and marks the drifted instances.
    async fn findings(&self, ctx: &Context) -> Result<Verified> {
        let mut verified = Verified {
            instances: self.targets.len(),
            ..Verified::default()
        };
        verified.unverified.extend(self.unreachable.iter().map(|i| {
            format!("{i} (not reachable over SSM: is its agent running, with a role allowing SSM?)")
        }));
        let by_id: BTreeMap<&str, &Target> =
            self.targets.iter().map(|t| (t.id.as_str(), t)).collect();
        let mut marks: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (command, _) in &self.commands {
            let mut pages = ctx
                .ssm
                .list_command_invocations()
                .command_id(command)
                .details(true)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(aws_error("ssm", "ListCommandInvocations"))?;
                for inv in page.command_invocations() {
                    let instance = inv.instance_id().unwrap_or_default();
                    let Some(target) = by_id.get(instance) else {
                        continue;
                    };
                    let status = inv.status().map(|s| s.as_str()).unwrap_or("unknown");
                    if status != "Success" {
                        verified.unverified.push(format!("{instance} ({status})"));
                        continue;
                    }
                    let output = inv
                        .command_plugins()
                        .first()
                        .and_then(|p| p.output())
                        .unwrap_or_default();
                    let mut stdout = stdout_of(output).to_string();
                    if !covers(&stdout, &target.records) {
                        // The listing keeps the first 2,500 characters of the output (its
                        // `Output`); GetCommandInvocation keeps the first 24,000.
                        stdout = full_stdout(ctx, command, instance).await?;
                        if !covers(&stdout, &target.records) {
                            verified.unverified.push(format!(
                                "{instance} (its verify output is over the 24,000 characters Run Command keeps)"
                            ));
                        }
                    }
                    for drift in findings(instance, &target.records, &stdout) {
                        let record = target
                            .records
                            .iter()
                            .find(|r| r.bundle == drift.bundle)
                            .expect("findings name the target's own bundles");
                        marks
                            .entry(record.tag.as_str())
                            .or_default()
                            .push(instance.to_string());
                        verified.kinds.insert(record.kind);
                        verified.drifted.push(drift);
                    }
                }
            }
        }
        for (key, instances) in marks {
            tag(ctx, key, DRIFTED, &instances).await?;
        }
        verified
            .drifted
            .sort_by(|a, b| (&a.instance, &a.bundle).cmp(&(&b.instance, &b.bundle)));
        tracing::info!(
            instances = verified.instances,
            drifted = verified.drifted.len(),
            unverified = verified.unverified.len(),
            "verify done"
        );
        Ok(verified)
    }
}

/// The running instances holding an installed hash of one of `records` that this stack may
/// touch, each with the records it holds (a record already marked drifted is pushed anyway).
async fn targets(ctx: &Context, stack: &str, records: &[Record]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    let mut pages = ctx
        .ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag-key")
                .set_values(Some(records.iter().map(|r| r.tag.clone()).collect()))
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("running")
                .build(),
        )
        .max_results(1000)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("ec2", "DescribeInstances"))?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            let tags: BTreeMap<&str, &str> = i
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?, t.value()?)))
                .collect();
            let owner = tags.get(TAG_STACK).copied();
            let held: Vec<Record> = records
                .iter()
                // A push running or marked drifted is not verified: it is being put right.
                .filter(|r| {
                    tags.get(r.tag.as_str())
                        .is_some_and(|v| *v != DRIFTED && Pending::parse(v).is_none())
                })
                .filter(|r| match owner {
                    Some(o) => o == stack,
                    None => r.per_stack,
                })
                .cloned()
                .collect();
            if !held.is_empty() {
                out.push(Target {
                    id: i.instance_id().unwrap_or_default().to_string(),
                    records: held,
                });
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Whether a verify output has a whole line (ending in a newline) for each bundle of `held`:
/// Run Command cuts an output at a length, so the lines of the last bundles can be missing.
fn covers(stdout: &str, held: &[Record]) -> bool {
    let named: BTreeSet<&str> = stdout
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.split([' ', '\n']).nth(1))
        .collect();
    held.iter().all(|r| named.contains(r.bundle.as_str()))
}

/// An instance's verify output as GetCommandInvocation answers it: its first 24,000
/// characters, where the listing has 2,500.
async fn full_stdout(ctx: &Context, command: &str, instance: &str) -> Result<String> {
    let out = ctx
        .ssm
        .get_command_invocation()
        .command_id(command)
        .instance_id(instance)
        .send()
        .await
        .map_err(aws_error("ssm", "GetCommandInvocation"))?;
    Ok(out
        .standard_output_content()
        .unwrap_or_default()
        .to_string())
}

/// The drift an instance's verify output reports for the bundles it holds (lines for bundles
/// it does not hold, sent to its batch for its neighbours, are ignored).
fn findings(instance: &str, held: &[Record], stdout: &str) -> Vec<Drift> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        // `VERDICT BUNDLE[ PATH<TAB>PATH...]`
        let mut words = line.splitn(3, ' ');
        let (Some(verdict), Some(bundle)) = (words.next(), words.next()) else {
            continue;
        };
        if !held.iter().any(|r| r.bundle == bundle) {
            continue;
        }
        let files: Vec<String> = words
            .next()
            .map(|paths| paths.split('\t').map(str::to_string).collect())
            .unwrap_or_default();
        match verdict {
            "drifted" | "unrecorded" | "absent" => out.push(Drift {
                instance: instance.to_string(),
                bundle: bundle.to_string(),
                files,
            }),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push;

    /// A spec for nodes whose kind is all that matters here.
    #[derive(Debug)]
    struct Any;
    impl crate::desired::KindSpec for Any {}

    /// Each kind says what it pushes: one shared bundle for the hosts' Prometheus configs, one
    /// for the Grafana groups' provisioning, one per `host_config` with its tag named per
    /// stack; nothing for a stack that pushes nothing.
    #[test]
    fn the_records_are_the_bundles_each_kind_pushes() {
        use crate::testing::{desired, resource};
        let node = |kind, name: &str| {
            let mut r = resource(kind, name, crate::desired::Spec::new(Any));
            if kind.part_of().is_some() {
                r.id = crate::model::ResourceId::part(kind, name, None);
            }
            r
        };
        let d = desired(vec![
            node(crate::host::PROMETHEUS, "a"),
            node(crate::host::PROMETHEUS, "b"),
            node(crate::grafana::PROVISIONING, "main"),
            node(crate::host_config::HOST_CONFIG, "node_exporter"),
            node(crate::host_config::HOST_CONFIG, "promtail"),
        ]);
        let got: Vec<(String, String, Kind, bool)> = records(&d)
            .into_iter()
            .map(|r| (r.tag, r.bundle, r.kind, r.per_stack))
            .collect();
        let shared = |bundle: &str, kind| (push::hash_tag(bundle), bundle.to_string(), kind, false);
        let per_stack = |name: &str| {
            (
                crate::host_config::record_tag(crate::testing::STACK, name),
                crate::host_config::bundle_name(name),
                crate::host_config::HOST_CONFIG,
                true,
            )
        };
        assert_eq!(
            got,
            [
                shared(crate::host::config::NAME, crate::host::PROMETHEUS),
                shared(
                    crate::grafana::provisioning::NAME,
                    crate::grafana::PROVISIONING
                ),
                per_stack("node_exporter"),
                per_stack("promtail"),
            ]
        );
        assert!(records(&desired(vec![])).is_empty());
    }

    fn record(bundle: &str) -> Record {
        Record {
            tag: push::hash_tag(bundle),
            bundle: bundle.into(),
            kind: crate::host_config::HOST_CONFIG,
            per_stack: true,
        }
    }

    #[test]
    fn only_the_instances_own_bundles_are_reported() {
        let (a, b) = (record("host_config.a"), record("prometheus"));
        let out = "intact prometheus\ndrifted host_config.a /etc/a.conf\t/etc/b c.conf\ndrifted host_config.other /x\nunrecorded grafana\n";
        assert_eq!(
            findings("i-1", &[a, b.clone()], out),
            [Drift {
                instance: "i-1".into(),
                bundle: "host_config.a".into(),
                files: vec!["/etc/a.conf".into(), "/etc/b c.conf".into()],
            }]
        );
        assert_eq!(
            findings("i-1", &[b], "unrecorded prometheus\n")[0]
                .files
                .len(),
            0
        );
    }

    /// The real scripts: a push leaves a manifest, and the verify finds an edit, a mode change
    /// and a deletion, but not an untouched bundle.
    #[test]
    fn the_verify_script_finds_what_changed_since_the_push() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let bundle = |name: &str, files: &[&str]| push::Bundle {
            name: name.into(),
            files: files
                .iter()
                .map(|p| (p.to_string(), push::File::new(format!("{p}\n"))))
                .collect(),
            validate: Vec::new(),
            reload: Vec::new(),
        };
        let run = |script: String| {
            let out = crate::testing::run_as_agent(&script, dir);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        run(bundle("one", &["/etc/one/a", "/etc/one/b c", "/etc/one/d"]).script());
        run(bundle("two", &["/etc/two/a"]).script());
        let names: BTreeSet<&str> = ["one", "two", "three"].into();
        assert_eq!(
            run(script(&names)),
            "intact one\nabsent three\nintact two\n"
        );
        std::fs::write(dir.join("etc/one/a"), "edited\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("etc/one/b c"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::remove_file(dir.join("etc/one/d")).unwrap();
        assert_eq!(
            run(script(&names)),
            "drifted one /etc/one/a\t/etc/one/b c\t/etc/one/d\nabsent three\nintact two\n"
        );
        std::fs::remove_file(dir.join("var/lib/stackwarden/two.files")).unwrap();
        assert!(run(script(&names)).contains("unrecorded two\n"));
    }
}
