//! Sending a prepared bundle to instances over SSM Run Command, the one way every controller
//! pushes files: batches of at most 50 instance ids per `SendCommand` with the given
//! MaxConcurrency and MaxErrors, tracked with `ListCommands` (bounded to the commands sent since
//! the push began, 50 a page) and, only for commands with failures, `ListCommandInvocations`
//! for the hosts' output. Never one call per host. The instances that installed the bundle are
//! tagged with its hash (`stackwarden:<bundle name>`), so the next pass sends them nothing.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Tag;
use aws_sdk_ssm::types::{CommandFilter, CommandFilterKey};
use aws_smithy_types::date_time::Format;

use super::Prepared;
use crate::controller::{wait_until, Context, Progress};
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

/// Sends `push` to `instances`, waits for the verdict, tags the instances that installed it.
/// Hosts that failed make the error, with their stderr; an instance the agent does not know yet
/// (just launched) leaves the push pending for the next pass.
pub async fn send(
    ctx: &Context,
    push: &Prepared,
    instances: &[String],
    controls: &Controls,
) -> Result<()> {
    // Commands stamped before this (with room for clock skew) are not ours.
    let since = SystemTime::now() - Duration::from_secs(300);
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
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
        let id = sent
            .command()
            .and_then(|c| c.command_id())
            .unwrap_or_default()
            .to_string();
        commands.push((id, batch.to_vec()));
    }
    tracing::info!(
        bundle = %push.name,
        instances = instances.len(),
        commands = commands.len(),
        "pushed files, waiting for the hosts"
    );
    let statuses = track(ctx, &push.name, instances.len(), &commands, since).await?;

    let mut succeeded: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for (id, batch) in &commands {
        if statuses.get(id).map(String::as_str) == Some("Success") {
            succeeded.extend(batch.iter().cloned());
            continue;
        }
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
                            .unwrap_or_default();
                        failures.push(format!(
                            "{instance} ({}): {}",
                            other.unwrap_or("unknown"),
                            stderr_of(output)
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
                    .key(push.hash_tag())
                    .value(&push.hash)
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
        "{} of {} instances failed to install {}: {}{}",
        failures.len(),
        instances.len(),
        push.name,
        shown.join("; "),
        if failures.len() > 3 { "; ..." } else { "" }
    )))
}

/// Waits until every command (id, instances) is done; returns each command's status. `name`
/// names what the commands do in logs and progress.
pub(crate) async fn track(
    ctx: &Context,
    name: &str,
    hosts: usize,
    commands: &[(String, Vec<String>)],
    since: SystemTime,
) -> Result<BTreeMap<String, String>> {
    let since = aws_smithy_types::DateTime::from(since)
        .fmt(Format::DateTime)
        .map_err(|e| Error::Invalid(format!("cannot format a time: {e}")))?;
    let what = format!("the {name} command to {hosts} instances");
    wait_until(ctx, &what, || async {
        let mut status: BTreeMap<String, (String, i32, i32)> = BTreeMap::new();
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
            for c in page.commands() {
                let id = c.command_id().unwrap_or_default();
                if commands.iter().any(|(mine, _)| mine == id) {
                    let s = c
                        .status()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default();
                    status.insert(id.to_string(), (s, c.completed_count(), c.error_count()));
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
        tracing::info!(bundle = %name, completed, errors, total = hosts, "command progress");
        Ok(if open {
            Progress::Waiting(format!("{completed} of {hosts} done, {errors} failed"))
        } else {
            Progress::Done(status.into_iter().map(|(id, s)| (id, s.0)).collect())
        })
    })
    .await
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

    #[test]
    fn the_stderr_of_a_plugin_output_is_what_follows_the_marker() {
        assert_eq!(
            stderr_of("checking\n\n----------ERROR-------\npromtool: bad\n"),
            "promtool: bad"
        );
        assert_eq!(stderr_of("only stdout\n"), "only stdout");
    }
}
