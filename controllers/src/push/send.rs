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
use aws_sdk_ssm::types::{CommandFilter, CommandFilterKey, InstanceInformationStringFilter};
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
/// installed it ([`record`]) and report those that failed, with their stderr.
///
/// SendCommand refuses a whole batch with `InvalidInstanceId` when any one instance is not
/// managed by SSM. The batch is then split by what `DescribeInstanceInformation` knows: the
/// managed instances get the push, and the others ([`Unreachable`]) are named, with what their
/// state says of the likely cause. Other batches are sent either way; the instances left out
/// lack the push, so a later pass sends it once SSM knows them.
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
    let mut left_out = Vec::new();
    let mut sent = 0;
    let command = Command {
        comment: comment(push),
        script: &push.script,
        timeout: "600",
        controls,
    };
    for batch in instances.chunks(BATCH) {
        let delivery = command.send_to_managed(ctx, batch).await?;
        if let Some(id) = delivery.command {
            let pending = Pending {
                hash: push.hash.clone(),
                command: id,
                at,
            };
            tag(ctx, &push.hash_tag(), &pending.to_string(), &delivery.sent).await?;
            sent += delivery.sent.len();
        }
        left_out.extend(delivery.left_out);
    }
    if sent > 0 {
        tracing::info!(
            bundle = %push.name,
            instances = sent,
            "pushed files; the next passes read the hosts' verdict"
        );
    }
    if !left_out.is_empty() {
        return Err(Unreachable::of(ctx, &left_out).await?.error(push, sent));
    }
    Err(Error::waiting(
        format!("the {} push to {sent} instance(s) is running", push.name),
        RUNNING,
    ))
}

/// What identifies a push in Run Command's history: `stackwarden NAME sha256:...`, cut to the
/// 100 characters SendCommand takes as a `Comment` (a longer one is refused outright).
pub fn comment(push: &Prepared) -> String {
    let full = format!("stackwarden {} {}", push.name, push.short_hash());
    if full.chars().count() <= MAX_COMMENT {
        return full;
    }
    // The hash is what tells pushes apart: the name gives way.
    let hash = format!(" {}", push.short_hash());
    let room = MAX_COMMENT - "stackwarden ".len() - hash.chars().count() - 1;
    let name: String = push.name.chars().take(room).collect();
    format!("stackwarden {name}~{hash}")
}

/// The longest `Comment` SendCommand takes.
const MAX_COMMENT: usize = 100;

/// How long SSM keeps trying to deliver a command to an instance that stopped after the pass
/// saw it running (its invocation is `Delayed` meanwhile), SendCommand's `TimeoutSeconds`:
/// then the invocation ends `Delivery Timed Out` and the push is sent again once the instance
/// runs. Ten minutes, where AWS's default is an hour, so such a push does not hold its
/// bundle's rollout for long.
pub const DELIVERY_TIMEOUT_SECONDS: i32 = 600;

/// One AWS-RunShellScript command, as pushes and verifies send it.
pub(crate) struct Command<'a> {
    pub comment: String,
    pub script: &'a str,
    /// `executionTimeout`, in seconds.
    pub timeout: &'a str,
    pub controls: &'a Controls,
}

impl Command<'_> {
    /// Sends the command to `instances` (at most [`BATCH`]): its id, or `None` when SSM refused
    /// the whole call because one of them is not a managed instance (`InvalidInstanceId`).
    pub(crate) async fn send(&self, ctx: &Context, instances: &[String]) -> Result<Option<String>> {
        let sent = ctx
            .ssm
            .send_command()
            .document_name("AWS-RunShellScript")
            .set_instance_ids(Some(instances.to_vec()))
            .comment(&self.comment)
            .parameters("commands", vec![self.script.to_string()])
            .parameters("executionTimeout", vec![self.timeout.to_string()])
            .timeout_seconds(DELIVERY_TIMEOUT_SECONDS)
            .max_concurrency(&self.controls.max_concurrency)
            .max_errors(&self.controls.max_errors)
            .send()
            .await;
        match sent {
            Ok(s) => Ok(Some(
                s.command()
                    .and_then(|c| c.command_id())
                    .unwrap_or_default()
                    .to_string(),
            )),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_invalid_instance_id()) =>
            {
                Ok(None)
            }
            Err(e) => Err(aws_error("ssm", "SendCommand")(e)),
        }
    }

    /// [`Command::send`], splitting a batch SSM refuses as a whole (`InvalidInstanceId`: one
    /// of them is not a managed instance) by what `DescribeInstanceInformation` knows: the
    /// managed instances get the command, the others are left out. An agent that drops out
    /// between the two calls leaves its batch out: it is sent to again by the next pass.
    pub(crate) async fn send_to_managed(
        &self,
        ctx: &Context,
        batch: &[String],
    ) -> Result<Delivery> {
        if let Some(command) = self.send(ctx, batch).await? {
            return Ok(Delivery {
                command: Some(command),
                sent: batch.to_vec(),
                left_out: Vec::new(),
            });
        }
        let managed = managed_of(ctx, batch).await?;
        let (mut reachable, mut left_out): (Vec<String>, Vec<String>) =
            batch.iter().cloned().partition(|i| managed.contains(i));
        let command = match reachable.is_empty() {
            true => None,
            false => self.send(ctx, &reachable).await?,
        };
        if command.is_none() {
            left_out.append(&mut reachable);
        }
        Ok(Delivery {
            command,
            sent: reachable,
            left_out,
        })
    }
}

/// Where one batch's command went.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// The command's id, when one was sent.
    pub command: Option<String>,
    /// The instances it was sent to.
    pub sent: Vec<String>,
    /// The instances SSM does not manage (or that dropped out), sent nothing.
    pub left_out: Vec<String>,
}

/// The instances of `batch` SSM manages now (`DescribeInstanceInformation`, every page).
async fn managed_of(ctx: &Context, batch: &[String]) -> Result<BTreeSet<String>> {
    let filter = InstanceInformationStringFilter::builder()
        .key("InstanceIds")
        .set_values(Some(batch.to_vec()))
        .build()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let mut pages = ctx
        .ssm
        .describe_instance_information()
        .filters(filter)
        .max_results(50)
        .into_paginator()
        .send();
    let mut managed = BTreeSet::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error("ssm", "DescribeInstanceInformation"))?;
        managed.extend(
            page.instance_information_list()
                .iter()
                .filter_map(|i| i.instance_id().map(str::to_string)),
        );
    }
    Ok(managed)
}

/// How long after launch an instance SSM does not know is taken for one whose agent is still
/// registering, not one that will never answer.
const REGISTERING: Duration = Duration::from_secs(600);

/// Instances a push could not reach over SSM, each with what EC2 says of it.
#[derive(Debug, Default, PartialEq)]
struct Unreachable {
    /// `i-... (why)`, one for each instance.
    named: Vec<String>,
    /// Every one of them launched minutes ago, running, with an instance profile: their
    /// agents are most likely still registering.
    registering: bool,
}

impl Unreachable {
    async fn of(ctx: &Context, ids: &[String]) -> Result<Unreachable> {
        let mut pages = ctx
            .ec2
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .into_paginator()
            .send();
        let mut found = BTreeMap::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("ec2", "DescribeInstances"))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                let id = i.instance_id().unwrap_or_default().to_string();
                let state = i
                    .state()
                    .and_then(|s| s.name())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default();
                let age = i.launch_time().and_then(|t| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH + Duration::from_secs(t.secs().max(0) as u64))
                        .ok()
                });
                found.insert(id, (state, age, i.iam_instance_profile().is_some()));
            }
        }
        Ok(Unreachable::from_states(ids, &found))
    }

    /// Pure: from each instance's state, age and whether it has an instance profile.
    fn from_states(
        ids: &[String],
        found: &BTreeMap<String, (String, Option<Duration>, bool)>,
    ) -> Unreachable {
        let mut out = Unreachable {
            named: Vec::new(),
            registering: true,
        };
        for id in ids {
            let why = match found.get(id) {
                None => {
                    out.registering = false;
                    "not found".to_string()
                }
                Some((state, _, _)) if state != "running" => {
                    out.registering = false;
                    format!("{state}: SSM reaches running instances only")
                }
                Some((_, _, false)) => {
                    out.registering = false;
                    "running with no instance profile: the SSM agent needs a role allowing SSM (AmazonSSMManagedInstanceCore)".to_string()
                }
                Some((_, Some(age), true)) if *age < REGISTERING => {
                    format!(
                        "launched {} s ago: its SSM agent is most likely still registering",
                        age.as_secs()
                    )
                }
                Some(_) => {
                    out.registering = false;
                    "running, yet SSM does not manage it: is the SSM agent installed and running, and does its instance role allow SSM (AmazonSSMManagedInstanceCore)?".to_string()
                }
            };
            out.named.push(format!("{id} ({why})"));
        }
        out
    }

    /// Waiting while the agents register; else an error naming each instance, retried (a
    /// later pass sends the push to those SSM knows by then).
    fn error(&self, push: &Prepared, sent: usize) -> Error {
        let others = match sent {
            0 => String::new(),
            n => format!(" (this pass sent it to the {n} other instance(s))"),
        };
        let what = format!(
            "{} instance(s) not reachable over SSM (SendCommand: InvalidInstanceId): {}; the {} push {} goes to them once SSM manages them{others}",
            self.named.len(),
            self.named.join("; "),
            push.name,
            push.short_hash(),
        );
        if self.registering {
            return Error::waiting(what, crate::error::PROPAGATION);
        }
        Error::Aws {
            service: "ssm",
            operation: "SendCommand",
            code: Some("InvalidInstanceId".into()),
            class: crate::error::ErrorClass::Retryable,
            message: what,
        }
    }
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
    /// Instances it failed on, with their stderr: the script's own failure.
    pub failed: BTreeMap<String, String>,
    /// Instances it never ran on to the end for reasons of delivery, not of the script (the
    /// agent did not pick it up in time, the instance went away, the command was cancelled):
    /// the push is sent to them again.
    pub lost: BTreeSet<String>,
}

/// Whether an invocation that did not succeed ended for reasons of delivery, not of the
/// script, from its Status and StatusDetails.
pub fn undelivered(status: &str, details: &str) -> bool {
    status == "Cancelled"
        || matches!(
            details,
            "Delivery Timed Out" | "Undeliverable" | "Terminated"
        )
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
                ..Verdict::default()
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
                let instance = inv.instance_id().unwrap_or_default().to_string();
                let details = inv.status_details().unwrap_or_default();
                if undelivered(status, details) {
                    tracing::info!(%instance, command = %id, details, "push not delivered; it is sent again");
                    if let Some(v) = tracked.commands.get_mut(&id) {
                        v.lost.insert(instance);
                    }
                    continue;
                }
                let output = inv
                    .command_plugins()
                    .first()
                    .and_then(|p| p.output())
                    .unwrap_or_default();
                if let Some(v) = tracked.commands.get_mut(&id) {
                    v.failed
                        .insert(instance, format!("{status}: {}", stderr_of(output)));
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
                Some(v) if v.lost.contains(id) => p.send.push(id.to_string()),
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
    use crate::error::ErrorClass;

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
                        ..Verdict::default()
                    },
                ),
                (
                    "c-fail".into(),
                    Verdict {
                        running: false,
                        failed: BTreeMap::from([("i-5".into(), "Failed: promtool: bad".into())]),
                        lost: BTreeSet::from(["i-8".into()]),
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
            ("i-8", Some(failed.as_str())),
        ];
        let r = Rollout::of(&push, fleet, &tracked);
        assert_eq!(
            r.send,
            ["i-1", "i-2", "i-6", "i-7", "i-8"],
            "lacking, older, lost, another version's, not delivered"
        );
        assert_eq!(r.record, ["i-3"]);
        assert_eq!(r.running, ["i-4"]);
        assert_eq!(r.failed, ["i-5 (Failed: promtool: bad)"]);
        let e = r.failure(&push, 9).unwrap();
        assert!(e
            .to_string()
            .contains("1 of 9 instances failed to install demo"));
        assert_eq!(
            r.waiting(&push).unwrap().class(),
            crate::error::ErrorClass::Waiting
        );
    }

    #[test]
    fn only_the_scripts_own_failure_is_a_failure_delivery_is_retried() {
        for (status, details) in [
            ("TimedOut", "Delivery Timed Out"),
            ("Failed", "Undeliverable"),
            ("Failed", "Terminated"),
            ("Cancelled", "Cancelled"),
        ] {
            assert!(undelivered(status, details), "{status} {details}");
        }
        for (status, details) in [("Failed", "Failed"), ("TimedOut", "Execution Timed Out")] {
            assert!(!undelivered(status, details), "{status} {details}");
        }
    }

    #[test]
    fn a_long_comment_is_cut_to_what_send_command_takes_keeping_the_hash() {
        let mut push = prepared(&"ab".repeat(32));
        push.name = format!("host_config.{}", "x".repeat(120));
        let c = comment(&push);
        assert_eq!(c.chars().count(), 100, "{c}");
        assert!(c.starts_with("stackwarden host_config.xxx"), "{c}");
        assert!(c.ends_with(&push.short_hash()), "{c}");
        push.name = "prometheus".into();
        assert_eq!(
            comment(&push),
            format!("stackwarden prometheus {}", push.short_hash())
        );
    }

    #[test]
    fn unreachable_instances_are_named_with_their_likely_cause() {
        let found = BTreeMap::from([
            (
                "i-new".to_string(),
                ("running".to_string(), Some(Duration::from_secs(30)), true),
            ),
            (
                "i-old".to_string(),
                ("running".to_string(), Some(Duration::from_secs(7200)), true),
            ),
            (
                "i-bare".to_string(),
                (
                    "running".to_string(),
                    Some(Duration::from_secs(7200)),
                    false,
                ),
            ),
            (
                "i-down".to_string(),
                ("shutting-down".to_string(), None, true),
            ),
        ]);
        let young = Unreachable::from_states(&["i-new".to_string()], &found);
        assert!(young.registering);
        assert_eq!(young.error(&prepared("h"), 2).class(), ErrorClass::Waiting);
        let ids: Vec<String> = ["i-new", "i-old", "i-bare", "i-down", "i-gone"]
            .map(String::from)
            .to_vec();
        let u = Unreachable::from_states(&ids, &found);
        assert!(!u.registering);
        assert_eq!(u.named.len(), 5);
        assert!(
            u.named[0].starts_with("i-new (launched 30 s ago"),
            "{:?}",
            u.named
        );
        assert!(
            u.named[1].contains("is the SSM agent installed and running"),
            "{:?}",
            u.named
        );
        assert!(u.named[2].contains("no instance profile"), "{:?}", u.named);
        assert!(
            u.named[3].starts_with("i-down (shutting-down"),
            "{:?}",
            u.named
        );
        assert_eq!(u.named[4], "i-gone (not found)");
        let e = u.error(&prepared("h"), 3);
        assert_eq!(e.class(), ErrorClass::Retryable);
        let text = e.to_string();
        assert!(
            text.contains("5 instance(s) not reachable over SSM"),
            "{text}"
        );
        assert!(
            text.contains(
                "goes to them once SSM manages them (this pass sent it to the 3 other instance(s))"
            ),
            "{text}"
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
