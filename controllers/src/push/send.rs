//! Sending a prepared bundle to instances over SSM Run Command, the one way every controller
//! pushes files: batches of at most 50 instance ids per `SendCommand` with the given
//! MaxConcurrency and MaxErrors. Nothing waits for the hosts inside a pass: each instance's
//! record tag (`stackwarden:<bundle name>`) is marked with the command carrying the push
//! ([`Pending`]), and the passes after it read the verdicts ([`track`]: `ListCommands` bounded
//! to the commands sent since the oldest mark, 50 a page, and only for commands with failures
//! `ListCommandInvocations` for the hosts' output; never one call per host), then record the
//! bundle's hash on the instances that installed it, so later passes send them nothing.
//!
//! Every kind that pushes (a host's Prometheus config, a Grafana group's provisioning, a
//! `host_config`) decides from [`Rollout`] what a pass does, and writes with one [`Op`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::types::Tag;
use aws_sdk_ssm::types::{CommandFilter, CommandFilterKey};
use aws_smithy_types::date_time::Format;

use super::Prepared;
use crate::controller::Context;
use crate::error::{aws_error, Error, Result};

/// Instance ids per SendCommand: the API's limit.
pub const BATCH: usize = 50;

/// What the SSM agent puts between stdout and stderr in a plugin's output.
const STDERR_MARKER: &str = "----------ERROR-------";

/// Run Command's error controls for one push.
#[derive(Debug, Clone, PartialEq)]
pub struct Controls {
    pub max_concurrency: String,
    pub max_errors: String,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            max_concurrency: "50".into(),
            max_errors: "0".into(),
        }
    }
}

/// The writes of every kind that pushes files to instances.
#[derive(Debug, Clone)]
pub enum Op {
    /// Sends the bundle to the instances that lack it ([`send`]). `None` while they are not
    /// known (a plan made before the host or group exists): applying it then waits for them.
    Push {
        push: Prepared,
        instances: Option<Vec<String>>,
        controls: Controls,
    },
    /// Records on the instances that they installed the bundle: their command succeeded.
    Record {
        push: Prepared,
        instances: Vec<String>,
    },
}

/// How soon to look again for instances a push waits for.
const LAUNCHING: Duration = Duration::from_secs(10);

impl Op {
    pub async fn apply(&self, ctx: &Context) -> Result<()> {
        match self {
            Op::Push {
                push,
                instances: None,
                ..
            } => Err(Error::waiting(
                format!(
                    "the {} push {} waits for its instances to run",
                    push.name,
                    push.short_hash()
                ),
                LAUNCHING,
            )),
            Op::Push {
                push,
                instances: Some(instances),
                controls,
            } => send(ctx, push, instances, controls).await,
            Op::Record { push, instances } => record(ctx, push, instances).await,
        }
    }
}

/// Sends `push` to `instances` and marks each with the command that carries it ([`Pending`]
/// in its record tag). Nothing waits for the hosts: the push answers "waiting", and the passes
/// after it read the commands' verdicts ([`track`]), record the hash on the instances that
/// installed it ([`record`]) and report those that failed, with their stderr. An instance the
/// agent does not know yet (just launched) leaves the push for the next pass.
async fn send(
    ctx: &Context,
    push: &Prepared,
    instances: &[String],
    controls: &Controls,
) -> Result<()> {
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    for batch in instances.chunks(BATCH) {
        let sent = ctx
            .ssm
            .send_command()
            .document_name("AWS-RunShellScript")
            .set_instance_ids(Some(batch.to_vec()))
            .comment(format!("stackwarden {} {}", push.name, push.short_hash()))
            .parameters("commands", vec![push.script.clone()])
            .parameters("executionTimeout", vec!["600".into()])
            .max_concurrency(&controls.max_concurrency)
            .max_errors(&controls.max_errors)
            .send()
            .await;
        let sent = match sent {
            Ok(s) => s,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_invalid_instance_id()) =>
            {
                return Err(Error::waiting(
                    format!(
                        "an instance is not yet reachable over SSM (InvalidInstanceId: its agent registers shortly after boot); the {} push is sent again then",
                        push.name
                    ),
                    crate::error::PROPAGATION,
                ));
            }
            Err(e) => return Err(aws_error("ssm", "SendCommand")(e)),
        };
        let command = sent
            .command()
            .and_then(|c| c.command_id())
            .unwrap_or_default()
            .to_string();
        let pending = Pending {
            hash: push.hash.clone(),
            command,
            at,
        };
        tag(ctx, &push.hash_tag(), &pending.to_string(), batch).await?;
    }
    tracing::info!(
        bundle = %push.name,
        instances = instances.len(),
        "pushed files; the next passes read the hosts' verdict"
    );
    Err(Error::waiting(
        format!(
            "the {} push to {} instance(s) is running",
            push.name,
            instances.len()
        ),
        RUNNING,
    ))
}

/// Up to this many running pushes are looked up one command each.
const PER_COMMAND: usize = 3;

/// How soon to look again at a push that is running.
pub const RUNNING: Duration = Duration::from_secs(3);

/// Records on `instances` that they installed `push` (its hash in their record tag).
async fn record(ctx: &Context, push: &Prepared, instances: &[String]) -> Result<()> {
    tag(ctx, &push.hash_tag(), &push.hash, instances).await
}

/// Sets one tag on instances, 1000 a call.
pub(crate) async fn tag(ctx: &Context, key: &str, value: &str, instances: &[String]) -> Result<()> {
    // CreateTags takes up to 1000 resources per call.
    for chunk in instances.chunks(1000) {
        ctx.ec2
            .create_tags()
            .set_resources(Some(chunk.to_vec()))
            .tags(Tag::builder().key(key).value(value).build())
            .send()
            .await
            .map_err(aws_error("ec2", "CreateTags"))?;
    }
    Ok(())
}

/// What a record tag holds while a push runs: `pending:<hash>:<command id>@<unix seconds>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub hash: String,
    pub command: String,
    /// When it was sent: where the verdicts are looked for.
    pub at: u64,
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pending:{}:{}@{}", self.hash, self.command, self.at)
    }
}

impl Pending {
    pub fn parse(value: &str) -> Option<Pending> {
        let rest = value.strip_prefix("pending:")?;
        let (hash, rest) = rest.split_once(':')?;
        let (command, at) = rest.rsplit_once('@')?;
        Some(Pending {
            hash: hash.to_string(),
            command: command.to_string(),
            at: at.parse().ok()?,
        })
    }
}

/// The verdicts of the commands that pushes marked on instances, read by observe.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tracked {
    /// Command id → its verdict, for the commands found.
    pub commands: BTreeMap<String, Verdict>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Still running on some of its instances.
    pub running: bool,
    /// Instances it failed on, with their stderr.
    pub failed: BTreeMap<String, String>,
}

/// [`track`] for the records instances carry in `tag`: the pushes of one bundle running on them.
pub async fn track_tag(
    ctx: &Context,
    instances: &[crate::instances::ObservedInstance],
    tag: &str,
) -> Result<Tracked> {
    track(
        ctx,
        instances
            .iter()
            .filter_map(|i| i.tags.get(tag).map(String::as_str)),
    )
    .await
}

/// Reads the verdicts of the commands named by these record tag values: one `ListCommands` per
/// command for a few (or old) ones, else the commands sent since the oldest mark, 50 a page;
/// only a command that failed somewhere costs a `ListCommandInvocations` for the hosts'
/// stderr. No call when no push is running.
pub async fn track<'a>(
    ctx: &Context,
    records: impl IntoIterator<Item = &'a str>,
) -> Result<Tracked> {
    let pending: Vec<Pending> = records.into_iter().filter_map(Pending::parse).collect();
    let mut tracked = Tracked::default();
    let Some(oldest) = pending.iter().map(|p| p.at).min() else {
        return Ok(tracked);
    };
    let wanted: BTreeSet<&str> = pending.iter().map(|p| p.command.as_str()).collect();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut seen = Vec::new();
    if wanted.len() <= PER_COMMAND || now.saturating_sub(oldest) > 3600 {
        // Few commands, or marks older than an hour (a shared account runs many commands
        // meanwhile): one ListCommands per command.
        for id in &wanted {
            match ctx.ssm.list_commands().command_id(*id).send().await {
                Ok(out) => seen.extend(out.commands().iter().cloned()),
                // Gone (SSM keeps commands 30 days): the push is sent again.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_invalid_command_id()) => {}
                Err(e) => return Err(aws_error("ssm", "ListCommands")(e)),
            }
        }
    } else {
        // Many recent ones (a large fleet's batches): the commands sent since the oldest mark
        // (with room for clock skew), 50 a page.
        let since = UNIX_EPOCH + Duration::from_secs(oldest.saturating_sub(300));
        seen = commands_since(ctx, since, &wanted).await?;
    }
    let mut failed = Vec::new();
    for c in seen {
        let id = c.command_id().unwrap_or_default();
        let status = c.status().map(|s| s.as_str()).unwrap_or_default();
        let running = matches!(status, "Pending" | "InProgress" | "Cancelling");
        if !running && status != "Success" {
            failed.push(id.to_string());
        }
        tracked.commands.insert(
            id.to_string(),
            Verdict {
                running,
                failed: BTreeMap::new(),
            },
        );
    }
    for id in failed {
        let mut pages = ctx
            .ssm
            .list_command_invocations()
            .command_id(&id)
            .details(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("ssm", "ListCommandInvocations"))?;
            for inv in page.command_invocations() {
                let status = inv.status().map(|s| s.as_str()).unwrap_or("unknown");
                if status == "Success" {
                    continue;
                }
                let output = inv
                    .command_plugins()
                    .first()
                    .and_then(|p| p.output())
                    .unwrap_or_default();
                if let Some(v) = tracked.commands.get_mut(&id) {
                    v.failed.insert(
                        inv.instance_id().unwrap_or_default().to_string(),
                        format!("{status}: {}", stderr_of(output)),
                    );
                }
            }
        }
    }
    Ok(tracked)
}

/// Where a push stands on a fleet: what to send, what to record, what runs, what failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollout {
    /// Instances to send the push to: without it, with another version, or whose command was
    /// lost.
    pub send: Vec<String>,
    /// Instances whose command succeeded: their record is to be written.
    pub record: Vec<String>,
    /// Instances whose command still runs.
    pub running: Vec<String>,
    /// `instance (status): stderr` of the instances it failed on.
    pub failed: Vec<String>,
}

impl Rollout {
    /// From each instance's record tag value and the commands' verdicts.
    pub fn of<'a>(
        push: &Prepared,
        fleet: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
        tracked: &Tracked,
    ) -> Rollout {
        let mut p = Rollout::default();
        for (id, installed) in fleet {
            if installed == Some(push.hash.as_str()) {
                continue;
            }
            let pending = installed
                .and_then(Pending::parse)
                .filter(|pending| pending.hash == push.hash);
            let verdict = pending
                .as_ref()
                .and_then(|pending| tracked.commands.get(&pending.command));
            match verdict {
                None => p.send.push(id.to_string()),
                Some(v) => match v.failed.get(id) {
                    Some(stderr) => p.failed.push(format!("{id} ({stderr})")),
                    None if v.running => p.running.push(id.to_string()),
                    None => p.record.push(id.to_string()),
                },
            }
        }
        p
    }

    /// The error for the instances the push failed on, once nothing else is to be done.
    pub fn failure(&self, push: &Prepared, total: usize) -> Option<Error> {
        if self.failed.is_empty() {
            return None;
        }
        let shown: Vec<&str> = self.failed.iter().take(3).map(String::as_str).collect();
        Some(Error::Invalid(format!(
            "{} of {} instances failed to install {}: {}{}",
            self.failed.len(),
            total,
            push.name,
            shown.join("; "),
            if self.failed.len() > 3 { "; ..." } else { "" }
        )))
    }

    /// Waiting on the instances it still runs on.
    pub fn waiting(&self, push: &Prepared) -> Option<Error> {
        (!self.running.is_empty()).then(|| {
            Error::waiting(
                format!(
                    "the {} push is running on {} instance(s)",
                    push.name,
                    self.running.len()
                ),
                RUNNING,
            )
        })
    }
}

/// The commands among `wanted` sent since `since`, read 50 a page until all are found.
pub(crate) async fn commands_since(
    ctx: &Context,
    since: SystemTime,
    wanted: &BTreeSet<&str>,
) -> Result<Vec<aws_sdk_ssm::types::Command>> {
    let since = aws_smithy_types::DateTime::from(since)
        .fmt(Format::DateTime)
        .map_err(|e| Error::Invalid(format!("cannot format a time: {e}")))?;
    let mut seen = Vec::new();
    let mut pages = ctx
        .ssm
        .list_commands()
        .filters(
            CommandFilter::builder()
                .key(CommandFilterKey::InvokedAfter)
                .value(&since)
                .build()
                .map_err(|e| Error::Invalid(e.to_string()))?,
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("ssm", "ListCommands"))?;
        seen.extend(
            page.commands()
                .iter()
                .filter(|c| wanted.contains(c.command_id().unwrap_or_default()))
                .cloned(),
        );
        if seen.len() == wanted.len() {
            break;
        }
    }
    Ok(seen)
}

/// The stdout part of a plugin's output.
pub(crate) fn stdout_of(output: &str) -> &str {
    match output.split_once(STDERR_MARKER) {
        Some((stdout, _)) => stdout,
        None => output,
    }
}

/// The stderr part of a plugin's output (all of it when there is no stderr marker).
pub(crate) fn stderr_of(output: &str) -> &str {
    match output.split_once(STDERR_MARKER) {
        Some((_, stderr)) => stderr.trim(),
        None => output.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(hash: &str) -> Prepared {
        Prepared {
            name: "demo".into(),
            hash: hash.into(),
            script: String::new(),
            record: "stackwarden:demo".into(),
        }
    }

    #[test]
    fn a_pending_mark_reads_back() {
        let p = Pending {
            hash: "ab".repeat(32),
            command: "0b6f6b1c-1c2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
            at: 1_795_000_000,
        };
        let text = p.to_string();
        assert!(text.len() <= 256, "an EC2 tag value: {}", text.len());
        assert_eq!(Pending::parse(&text), Some(p));
        assert_eq!(Pending::parse(&"ab".repeat(32)), None);
    }

    /// Each instance's place in a push, from its record tag and the commands' verdicts alone.
    #[test]
    fn a_rollout_sends_records_waits_and_fails_from_what_it_sees() {
        let push = prepared("new");
        let mark = |command: &str| {
            Pending {
                hash: "new".into(),
                command: command.into(),
                at: 1,
            }
            .to_string()
        };
        let (done, running, failed, lost) = (
            mark("c-done"),
            mark("c-run"),
            mark("c-fail"),
            mark("c-lost"),
        );
        let older = Pending {
            hash: "old".into(),
            command: "c-done".into(),
            at: 1,
        }
        .to_string();
        let tracked = Tracked {
            commands: BTreeMap::from([
                ("c-done".into(), Verdict::default()),
                (
                    "c-run".into(),
                    Verdict {
                        running: true,
                        failed: BTreeMap::new(),
                    },
                ),
                (
                    "c-fail".into(),
                    Verdict {
                        running: false,
                        failed: BTreeMap::from([("i-5".into(), "Failed: promtool: bad".into())]),
                    },
                ),
            ]),
        };
        let fleet = [
            ("i-0", Some("new")),
            ("i-1", None),
            ("i-2", Some("old")),
            ("i-3", Some(done.as_str())),
            ("i-4", Some(running.as_str())),
            ("i-5", Some(failed.as_str())),
            ("i-6", Some(lost.as_str())),
            ("i-7", Some(older.as_str())),
        ];
        let r = Rollout::of(&push, fleet, &tracked);
        assert_eq!(
            r.send,
            ["i-1", "i-2", "i-6", "i-7"],
            "lacking, older, lost, another version's"
        );
        assert_eq!(r.record, ["i-3"]);
        assert_eq!(r.running, ["i-4"]);
        assert_eq!(r.failed, ["i-5 (Failed: promtool: bad)"]);
        let e = r.failure(&push, 8).unwrap();
        assert!(e
            .to_string()
            .contains("1 of 8 instances failed to install demo"));
        assert_eq!(
            r.waiting(&push).unwrap().class(),
            crate::error::ErrorClass::Waiting
        );
    }

    #[test]
    fn the_stderr_of_a_plugin_output_is_what_follows_the_marker() {
        assert_eq!(
            stderr_of("checking\n\n----------ERROR-------\npromtool: bad\n"),
            "promtool: bad"
        );
        assert_eq!(stderr_of("only stdout\n"), "only stdout");
    }
}
