//! SSM Run Command that really runs (awsJson1.1, signing name `ssm`; the rest of SSM is moto's).
//!
//! `SendCommand` with `AWS-RunShellScript` resolves its targets through moto's EC2 (instance
//! ids, or `tag:<key>` / `tag-key` targets, running instances only) and runs the commands as
//! the agent does on Ubuntu (a file, `sh -c FILE`, dash as sh) in each instance's sandbox: `$STACKWARDEN_ROOT` is the sandbox root, which is also the
//! working directory, and the sandbox environment is added. MaxConcurrency, MaxErrors and the
//! `executionTimeout` parameter are honoured; the exit status, stdout and stderr become the
//! invocation's status and output, truncated as AWS truncates them.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::response::Response;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::{watch, Semaphore};

use crate::route::Incoming;
use crate::wire::{aws_json, epoch, iso8601, paginate, ApiError};
use crate::{lock, State, Unsandboxed};

const DOCUMENT: &str = "AWS-RunShellScript";
/// The longest `Comment` SendCommand takes.
const MAX_COMMENT: usize = 100;
/// The `sh` of Ubuntu and Debian hosts, where the SSM agent's `sh -c FILE` runs dash.
const SHELL: &str = "dash";
const PLUGIN: &str = "aws:runShellScript";
/// The size of a command's parameters the emulator takes. AWS documents no limit of its own
/// for a command's parameters, but one for the document the agent runs, 64 KB
/// (`MaxDocumentSizeExceeded`: "The size limit of a document is 64 KB."), which the commands
/// are part of: the emulator refuses a larger command with that error.
pub const MAX_PARAMETERS_BYTES: usize = 64 * 1024;
/// Output kept per stream; what AWS returns is cut shorter still.
const MAX_CAPTURE: usize = 1 << 20;
const STDOUT_LIMIT: usize = 24_000;
const STDERR_LIMIT: usize = 8_000;
const PLUGIN_OUTPUT_LIMIT: usize = 2_500;
const FILTER_KEYS: [&str; 5] = [
    "InvokedAfter",
    "InvokedBefore",
    "Status",
    "ExecutionStage",
    "DocumentName",
];

pub fn serves(operation: &str) -> bool {
    matches!(
        operation,
        "SendCommand"
            | "ListCommands"
            | "GetCommandInvocation"
            | "ListCommandInvocations"
            | "CancelCommand"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Pending,
    /// The instance is stopped (or stopping, or still pending): the command waits for it to
    /// run, until its delivery timeout (`TimeoutSeconds`).
    Delayed,
    InProgress,
    Success,
    Failed,
    TimedOut,
    Cancelled,
    /// Not sent: the command's MaxErrors was exceeded first.
    Terminated,
    /// Never reached the agent before the command expired (a stopped instance, an agent
    /// that is down): not counted against MaxErrors.
    DeliveryTimedOut,
}

impl Status {
    /// (Status, StatusDetails) as AWS reports them for an invocation.
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Status::Pending => ("Pending", "Pending"),
            Status::Delayed => ("Delayed", "Delayed"),
            Status::InProgress => ("InProgress", "InProgress"),
            Status::Success => ("Success", "Success"),
            Status::Failed => ("Failed", "Failed"),
            Status::TimedOut => ("TimedOut", "Execution Timed Out"),
            Status::Cancelled => ("Cancelled", "Cancelled"),
            Status::Terminated => ("Cancelled", "Terminated"),
            Status::DeliveryTimedOut => ("TimedOut", "Delivery Timed Out"),
        }
    }

    fn terminal(self) -> bool {
        !matches!(self, Status::Pending | Status::Delayed | Status::InProgress)
    }

    fn error(self) -> bool {
        matches!(self, Status::Failed | Status::TimedOut)
    }
}

struct Invocation {
    instance: String,
    name: String,
    status: Status,
    code: i32,
    stdout: String,
    stderr: String,
    started: Option<SystemTime>,
    ended: Option<SystemTime>,
    cancel: watch::Sender<bool>,
}

struct Command {
    id: String,
    region: String,
    comment: Option<String>,
    parameters: BTreeMap<String, Vec<String>>,
    instance_ids: Vec<String>,
    targets: Value,
    requested: SystemTime,
    timeout_seconds: Option<i64>,
    max_concurrency: String,
    max_errors: String,
    error_budget: usize,
    cancelled: bool,
    /// No target matched the command's tags.
    no_instances: bool,
    invocations: Vec<Invocation>,
}

impl Command {
    fn errors(&self) -> usize {
        self.invocations.iter().filter(|i| i.status.error()).count()
    }

    /// (Status, StatusDetails) of the command as a whole.
    fn words(&self) -> (&'static str, &'static str) {
        let statuses: Vec<Status> = self.invocations.iter().map(|i| i.status).collect();
        let open = statuses.iter().any(|s| !s.terminal());
        if self.no_instances {
            return ("Success", "No Instances In Tag");
        }
        if open {
            return if self.cancelled {
                ("Cancelling", "Cancelling")
            } else if statuses.iter().all(|s| *s == Status::Pending) {
                ("Pending", "Pending")
            } else {
                ("InProgress", "InProgress")
            };
        }
        if self.cancelled && statuses.contains(&Status::Cancelled) {
            return ("Cancelled", "Cancelled");
        }
        let errors = self.errors();
        if errors > self.error_budget {
            if statuses
                .iter()
                .filter(|s| s.error())
                .all(|s| *s == Status::TimedOut)
            {
                return ("TimedOut", "Execution Timed Out");
            }
            return ("Failed", "Failed");
        }
        if statuses.iter().all(|s| *s == Status::Success) {
            ("Success", "Success")
        } else {
            ("Failed", "Incomplete")
        }
    }

    fn describe(&self) -> Value {
        let (status, details) = self.words();
        let mut v = json!({
            "CommandId": self.id,
            "DocumentName": DOCUMENT,
            "DocumentVersion": "$DEFAULT",
            "ExpiresAfter": epoch(self.requested + Duration::from_secs(self.timeout_seconds.unwrap_or(3600) as u64)),
            "Parameters": self.parameters,
            "InstanceIds": self.instance_ids,
            "Targets": self.targets,
            "RequestedDateTime": epoch(self.requested),
            "Status": status,
            "StatusDetails": details,
            "MaxConcurrency": self.max_concurrency,
            "MaxErrors": self.max_errors,
            "TargetCount": self.invocations.len(),
            "CompletedCount": self.invocations.iter().filter(|i| i.status.terminal()).count(),
            "ErrorCount": self.errors(),
            "DeliveryTimedOutCount": self.invocations.iter().filter(|i| i.status == Status::DeliveryTimedOut).count(),
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": false},
        });
        if let Some(c) = &self.comment {
            v["Comment"] = c.clone().into();
        }
        if let Some(t) = self.timeout_seconds {
            v["TimeoutSeconds"] = t.into();
        }
        v
    }

    fn invocation(&self, inv: &Invocation, details: bool) -> Value {
        let (status, status_details) = inv.status.words();
        let mut v = json!({
            "CommandId": self.id,
            "InstanceId": inv.instance,
            "InstanceName": inv.name,
            "Comment": self.comment.clone().unwrap_or_default(),
            "DocumentName": DOCUMENT,
            "DocumentVersion": "$DEFAULT",
            "RequestedDateTime": epoch(self.requested),
            "Status": status,
            "StatusDetails": status_details,
            "TraceOutput": "",
            "StandardOutputUrl": "",
            "StandardErrorUrl": "",
            "CommandPlugins": [],
            "ServiceRole": "",
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": false},
        });
        if details {
            // Plugins have no Terminated or Cancelling of their own.
            let plugin_status = match inv.status {
                Status::Terminated => "Cancelled",
                Status::DeliveryTimedOut => "TimedOut",
                s => s.words().0,
            };
            let mut output = truncate(&inv.stdout, PLUGIN_OUTPUT_LIMIT).to_string();
            if !inv.stderr.is_empty() {
                output.push_str("\n----------ERROR-------\n");
                output.push_str(&inv.stderr);
            }
            let mut plugin = json!({
                "Name": PLUGIN,
                "Status": plugin_status,
                "StatusDetails": status_details,
                "ResponseCode": inv.code,
                "Output": truncate(&output, PLUGIN_OUTPUT_LIMIT),
                "StandardOutputUrl": "",
                "StandardErrorUrl": "",
                "OutputS3Region": self.region,
                "OutputS3BucketName": "",
                "OutputS3KeyPrefix": "",
            });
            if let Some(t) = inv.started {
                plugin["ResponseStartDateTime"] = epoch(t).into();
            }
            if let Some(t) = inv.ended {
                plugin["ResponseFinishDateTime"] = epoch(t).into();
            }
            v["CommandPlugins"] = json!([plugin]);
        }
        v
    }
}

/// Cuts text to at most `max` characters.
fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// The Run Command state: every command sent, newest last.
#[derive(Default)]
pub struct RunCommand {
    commands: Mutex<Vec<Command>>,
}

impl RunCommand {
    fn with<R>(&self, id: &str, f: impl FnOnce(&mut Command) -> R) -> Option<R> {
        lock(&self.commands).iter_mut().find(|c| c.id == id).map(f)
    }
}

pub async fn handle(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let body = req.json()?;
    match req.operation.as_str() {
        "SendCommand" => send_command(state, req, &body).await,
        "ListCommands" => list(state, req, &body, false),
        "ListCommandInvocations" => list(state, req, &body, true),
        "GetCommandInvocation" => get_invocation(state, &body),
        "CancelCommand" => cancel(state, &body),
        other => Err(ApiError::internal(format!("{other} is not served here"))),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("InvalidParameters", message)
}

fn string_list(body: &Value, key: &str) -> Result<Option<Vec<String>>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            ApiError::bad_request(
                "ValidationException",
                format!("{key} must be a list of strings"),
            )
        }),
    }
}

async fn send_command(
    state: &Arc<State>,
    req: &Incoming,
    body: &Value,
) -> Result<Response, ApiError> {
    let document = body
        .get("DocumentName")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let document_ok = document == DOCUMENT
        || document.ends_with(&format!("::document/{DOCUMENT}"))
            && document.starts_with("arn:aws:ssm:");
    if !document_ok {
        return Err(ApiError::bad_request(
            "InvalidDocument",
            format!(
                "Document with name {document} does not exist (the emulator runs {DOCUMENT} only)"
            ),
        ));
    }
    if let Some(c) = body.get("Comment").and_then(Value::as_str) {
        if c.chars().count() > MAX_COMMENT {
            return Err(ApiError::bad_request(
                "ValidationException",
                format!("1 validation error detected: Value '{c}' at 'comment' failed to satisfy constraint: Member must have length less than or equal to {MAX_COMMENT}"),
            ));
        }
    }
    let parameters: BTreeMap<String, Vec<String>> = match body.get("Parameters") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| invalid("Parameters must map names to lists of strings"))?,
    };
    if let Some(k) = parameters
        .keys()
        .find(|k| !["commands", "workingDirectory", "executionTimeout"].contains(&k.as_str()))
    {
        return Err(invalid(format!(
            "Parameter \"{k}\" is not defined in {DOCUMENT}"
        )));
    }
    let commands = parameters
        .get("commands")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| invalid("Parameter \"commands\" is required"))?;
    let size: usize = parameters
        .iter()
        .map(|(k, v)| k.len() + v.iter().map(String::len).sum::<usize>())
        .sum();
    if size > MAX_PARAMETERS_BYTES {
        return Err(ApiError::bad_request(
            "MaxDocumentSizeExceeded",
            "The size limit of a document is 64 KB.",
        ));
    }
    let execution_timeout = match parameters.get("executionTimeout").and_then(|v| v.first()) {
        None => 3600,
        Some(t) => t
            .parse::<u64>()
            .ok()
            .filter(|t| (1..=172_800).contains(t))
            .ok_or_else(|| {
                invalid(format!(
                    "executionTimeout {t:?} must be a number of seconds from 1 to 172800"
                ))
            })?,
    };
    // How long an invocation waits for its instance to run: `TimeoutSeconds`, 30 s to 30
    // days, an hour when not given.
    let delivery_timeout = match body.get("TimeoutSeconds") {
        None | Some(Value::Null) => 3600,
        Some(t) => t
            .as_u64()
            .filter(|t| (30..=2_592_000).contains(t))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "ValidationException",
                    format!("TimeoutSeconds {t} must be from 30 to 2592000"),
                )
            })?,
    };
    let script = commands.join("\n");
    let working_directory = parameters
        .get("workingDirectory")
        .and_then(|v| v.first())
        .filter(|d| !d.is_empty())
        .cloned();

    let ids = string_list(body, "InstanceIds")?.unwrap_or_default();
    let targets = body
        .get("Targets")
        .cloned()
        .filter(|t| !t.is_null())
        .unwrap_or(json!([]));
    let target_list = targets.as_array().cloned().unwrap_or_default();
    if ids.is_empty() == target_list.is_empty() {
        return Err(invalid("give either InstanceIds or Targets"));
    }
    if ids.len() > 50 {
        return Err(ApiError::bad_request(
            "ValidationException",
            "InstanceIds: at most 50 instance ids",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = ids.iter().find(|id| !seen.insert(*id)) {
        return Err(ApiError::bad_request(
            "DuplicateInstanceId",
            format!("instance {dup} is listed twice"),
        ));
    }
    let concurrency_text = body
        .get("MaxConcurrency")
        .and_then(Value::as_str)
        .unwrap_or("50")
        .to_string();
    let errors_text = body
        .get("MaxErrors")
        .and_then(Value::as_str)
        .unwrap_or("0")
        .to_string();
    let concurrency = parse_limit(&concurrency_text, false).ok_or_else(|| {
        ApiError::bad_request(
            "ValidationException",
            format!(
                "MaxConcurrency {concurrency_text:?} is not a number or percentage of at least 1"
            ),
        )
    })?;
    let error_limit = parse_limit(&errors_text, true).ok_or_else(|| {
        ApiError::bad_request(
            "ValidationException",
            format!("MaxErrors {errors_text:?} is not a number or percentage"),
        )
    })?;

    let instances = if !ids.is_empty() {
        // AWS takes instances that are running, pending, stopping or stopped (the command
        // waits for those not running) and refuses the whole call when any one instance is
        // in none of these states or not managed.
        let found = state
            .moto
            .instances_in(
                req,
                &["pending", "running", "stopping", "stopped"],
                &[("instance-id".to_string(), ids.clone())],
            )
            .await?;
        let not_managed = crate::agent::unmanaged(state, &ids);
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| !found.iter().any(|f| &f.id == *id) || not_managed.contains(id))
            .collect();
        if !missing.is_empty() {
            let list = missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ApiError::bad_request(
                "InvalidInstanceId",
                format!("Instances [[{list}]] not in a valid state for account 123456789012. Valid states are: Running, Pending, Stopped, Stopping. Invalid states are: Shutting-down and Terminated. (or SSM does not manage them: no agent, or no instance role)"),
            ));
        }
        // In the order given.
        ids.iter()
            .map(|id| {
                let name = found
                    .iter()
                    .find(|f| &f.id == id)
                    .and_then(|f| f.name.clone());
                (id.clone(), name.unwrap_or_default())
            })
            .collect::<Vec<_>>()
    } else {
        if target_list.len() > 5 {
            return Err(invalid("at most 5 targets"));
        }
        let mut filters = Vec::new();
        let mut only_ids: Option<Vec<String>> = None;
        for t in &target_list {
            let key = t.get("Key").and_then(Value::as_str).unwrap_or_default();
            let values = string_list(t, "Values")?.unwrap_or_default();
            if values.is_empty() {
                return Err(invalid(format!("target {key} has no values")));
            }
            if key == "InstanceIds" {
                only_ids = Some(values);
            } else if key == "tag-key" {
                filters.push(("tag-key".to_string(), values));
            } else if let Some(tag) = key.strip_prefix("tag:") {
                filters.push((format!("tag:{tag}"), values));
            } else {
                return Err(invalid(format!(
                    "target key {key:?}: the emulator resolves InstanceIds, tag:<key> and tag-key"
                )));
            }
        }
        if let Some(ids) = only_ids {
            filters.push(("instance-id".to_string(), ids));
        }
        let found = state.moto.running_instances(req, &filters).await?;
        // Targets resolve to the instances SSM manages; the others are not targeted at all.
        let ids: Vec<String> = found.iter().map(|i| i.id.clone()).collect();
        let not_managed = crate::agent::unmanaged(state, &ids);
        found
            .into_iter()
            .filter(|i| !not_managed.contains(&i.id))
            .map(|i| (i.id, i.name.unwrap_or_default()))
            .collect()
    };

    let id = uuid::Uuid::new_v4().to_string();
    let count = instances.len();
    let comment = body
        .get("Comment")
        .and_then(Value::as_str)
        .map(str::to_string);
    let command = Command {
        id: id.clone(),
        region: req.region.clone(),
        comment,
        parameters,
        instance_ids: ids,
        targets,
        requested: SystemTime::now(),
        timeout_seconds: body.get("TimeoutSeconds").and_then(Value::as_i64),
        max_concurrency: concurrency_text,
        max_errors: errors_text,
        error_budget: error_limit.budget(count),
        cancelled: false,
        no_instances: count == 0,
        invocations: instances
            .iter()
            .map(|(instance, name)| Invocation {
                instance: instance.clone(),
                name: name.clone(),
                status: Status::Pending,
                code: -1,
                stdout: String::new(),
                stderr: String::new(),
                started: None,
                ended: None,
                cancel: watch::channel(false).0,
            })
            .collect(),
    };
    let answer = json!({"Command": command.describe()});
    lock(&state.ssm.commands).push(command);
    let job = Job {
        command: id,
        script,
        working_directory,
        timeout: Duration::from_secs(execution_timeout),
        delivery: Duration::from_secs(delivery_timeout),
        concurrency: concurrency.width(count),
        caller: Incoming::internal(req, "ec2", "POST", "/", Default::default()),
    };
    tokio::spawn(drive(state.clone(), job));
    Ok(aws_json(answer))
}

/// MaxConcurrency or MaxErrors: an absolute number or a percentage of the targets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Limit {
    Count(usize),
    Percent(usize),
}

impl Limit {
    /// The error budget for `targets` targets: a percentage rounds down (10% of 50 allows 5).
    fn budget(self, targets: usize) -> usize {
        match self {
            Limit::Count(n) => n,
            Limit::Percent(p) => targets * p / 100,
        }
    }

    /// The concurrency for `targets` targets: a percentage rounds up, and at least one runs.
    fn width(self, targets: usize) -> usize {
        match self {
            Limit::Count(n) => n,
            Limit::Percent(p) => (targets * p).div_ceil(100),
        }
        .max(1)
    }
}

fn parse_limit(text: &str, zero_ok: bool) -> Option<Limit> {
    let limit = match text.strip_suffix('%') {
        Some(p) => Limit::Percent(p.parse().ok().filter(|p| *p <= 100)?),
        None => Limit::Count(text.parse().ok()?),
    };
    let n = match limit {
        Limit::Count(n) | Limit::Percent(n) => n,
    };
    (zero_ok || n > 0).then_some(limit)
}

struct Job {
    command: String,
    script: String,
    working_directory: Option<String>,
    timeout: Duration,
    /// How long an invocation waits for its instance to run before it is Delivery Timed Out.
    delivery: Duration,
    concurrency: usize,
    /// Who sent the command: instance states are read from moto in its name.
    caller: Incoming,
}

/// Sends a command to its targets, at most `concurrency` at a time, stopping once more than
/// MaxErrors invocations have failed.
async fn drive(state: Arc<State>, job: Job) {
    let job = Arc::new(job);
    let count = state
        .ssm
        .with(&job.command, |c| c.invocations.len())
        .unwrap_or(0);
    let permits = Arc::new(Semaphore::new(job.concurrency));
    let mut running = tokio::task::JoinSet::new();
    for index in 0..count {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let start = state.ssm.with(&job.command, |c| {
            let over_budget = c.errors() > c.error_budget;
            let inv = &mut c.invocations[index];
            if inv.status != Status::Pending {
                return None; // cancelled before its turn
            }
            if over_budget {
                inv.status = Status::Terminated;
                return None;
            }
            // Pending until delivered ([`delivered`]).
            Some((inv.instance.clone(), inv.cancel.subscribe()))
        });
        let Some(Some((instance, cancel))) = start else {
            continue;
        };
        let state = state.clone();
        let job = job.clone();
        running.spawn(async move {
            let outcome = match delivered(&state, &job, index, &instance).await {
                Ok(()) => run(&state, &job, &instance, cancel).await,
                Err(outcome) => outcome,
            };
            state.ssm.with(&job.command, |c| {
                let inv = &mut c.invocations[index];
                inv.status = outcome.status;
                inv.code = outcome.code;
                inv.stdout = outcome.stdout;
                inv.stderr = outcome.stderr;
                inv.ended = Some(SystemTime::now());
            });
            drop(permit);
        });
    }
    while running.join_next().await.is_some() {}
}

/// Waits for the instance to run, the invocation `Delayed` meanwhile: `Err` with the outcome
/// when it does not run within the delivery timeout (or is gone).
async fn delivered(state: &State, job: &Job, index: usize, instance: &str) -> Result<(), Outcome> {
    let deadline = std::time::Instant::now() + job.delivery;
    let only = [("instance-id".to_string(), vec![instance.to_string()])];
    let cancelled = || Outcome {
        status: Status::Cancelled,
        code: -1,
        stdout: String::new(),
        stderr: String::new(),
    };
    loop {
        let running = state.moto.running_instances(&job.caller, &only).await;
        if running.as_ref().is_ok_and(|r| !r.is_empty()) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(Outcome {
                status: Status::DeliveryTimedOut,
                code: -1,
                stdout: String::new(),
                stderr: String::new(),
            });
        }
        // A cancel while delayed ends it.
        let delayed = state.ssm.with(&job.command, |c| {
            let inv = &mut c.invocations[index];
            if inv.status == Status::Cancelled {
                return false;
            }
            inv.status = Status::Delayed;
            true
        });
        if delayed != Some(true) {
            return Err(cancelled());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = state.ssm.with(&job.command, |c| {
        let inv = &mut c.invocations[index];
        if inv.status == Status::Cancelled {
            return false;
        }
        inv.status = Status::InProgress;
        inv.started = Some(SystemTime::now());
        true
    });
    if started != Some(true) {
        return Err(cancelled());
    }
    Ok(())
}

struct Outcome {
    status: Status,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn failed(message: String) -> Outcome {
        Outcome {
            status: Status::Failed,
            code: 1,
            stdout: String::new(),
            stderr: message,
        }
    }
}

/// Runs the script for one instance in its sandbox.
async fn run(
    state: &State,
    job: &Job,
    instance: &str,
    mut cancel: watch::Receiver<bool>,
) -> Outcome {
    if state.settings().undelivered.contains(instance) {
        return Outcome {
            status: Status::DeliveryTimedOut,
            code: -1,
            stdout: String::new(),
            stderr: String::new(),
        };
    }
    let Some(sandbox) = state.sandbox(instance) else {
        return match state.settings().unsandboxed {
            Unsandboxed::Succeed => Outcome {
                status: Status::Success,
                code: 0,
                stdout: String::new(),
                stderr: String::new(),
            },
            Unsandboxed::Fail => Outcome::failed(format!(
                "the emulator has no sandbox for instance {instance}"
            )),
        };
    };
    if let Err(e) = std::fs::create_dir_all(&sandbox.root) {
        return Outcome::failed(format!(
            "cannot create the sandbox {}: {e}",
            sandbox.root.display()
        ));
    }
    let workdir = match &job.working_directory {
        Some(d) => sandbox.root.join(d.trim_start_matches('/')),
        None => sandbox.root.clone(),
    };
    let scripts = scripts_dir().join(&job.command);
    let script = scripts.join(format!("{instance}.sh"));
    if let Err(e) =
        std::fs::create_dir_all(&scripts).and_then(|_| std::fs::write(&script, &job.script))
    {
        return Outcome::failed(format!("cannot write the script {}: {e}", script.display()));
    }
    // As the SSM agent runs AWS-RunShellScript: the commands in an executable file, then
    // `sh -c FILE`. The kernel honours a shebang; without one sh runs the file itself, and on
    // Ubuntu and Debian that sh is dash, so a bashism fails here as it does on those hosts.
    if let Err(e) = std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)) {
        return Outcome::failed(format!("cannot make {} executable: {e}", script.display()));
    }
    let mut command = tokio::process::Command::new(SHELL);
    for name in crate::NOT_INHERITED {
        command.env_remove(name);
    }
    let spawned = command
        .arg("-c")
        .arg(&script)
        .current_dir(&workdir)
        .env("STACKWARDEN_ROOT", &sandbox.root)
        .envs(&sandbox.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Outcome::failed(format!(
                "cannot run {SHELL} in {} (the emulator runs commands as Ubuntu's agent does, under dash: install the Debian package dash): {e}",
                workdir.display()
            ))
        }
    };
    let stdout = tokio::spawn(capture(child.stdout.take()));
    let stderr = tokio::spawn(capture(child.stderr.take()));
    enum End {
        Exit(i32),
        TimedOut,
        Cancelled,
    }
    let end = tokio::select! {
        status = child.wait() => End::Exit(status.ok().and_then(|s| s.code()).unwrap_or(-1)),
        _ = tokio::time::sleep(job.timeout) => End::TimedOut,
        _ = cancel.wait_for(|c| *c) => End::Cancelled,
    };
    if !matches!(end, End::Exit(_)) {
        kill_group(&mut child).await;
    }
    // Background processes that keep the pipes open do not hold the invocation.
    let grace = Duration::from_secs(1);
    let stdout = tokio::time::timeout(grace, stdout)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let stderr = tokio::time::timeout(grace, stderr)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_dir(&scripts);
    let (status, code) = match end {
        End::Exit(0) => (Status::Success, 0),
        End::Exit(code) => (Status::Failed, code),
        End::TimedOut => (Status::TimedOut, -1),
        End::Cancelled => (Status::Cancelled, -1),
    };
    Outcome {
        status,
        code,
        stdout: truncate(&stdout, STDOUT_LIMIT).to_string(),
        stderr: truncate(&stderr, STDERR_LIMIT).to_string(),
    }
}

/// Where scripts are written while they run: outside the sandbox, which belongs to the test.
fn scripts_dir() -> PathBuf {
    std::env::temp_dir().join(format!("stackwarden-emulator-{}", std::process::id()))
}

async fn capture<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let mut buf = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.take(MAX_CAPTURE as u64).read_to_end(&mut buf).await;
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Kills the script and everything it started (it leads its own process group).
async fn kill_group(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .await;
    }
    let _ = child.kill().await;
}

struct Filters {
    after: Option<SystemTime>,
    before: Option<SystemTime>,
    status: Option<String>,
    stage: Option<String>,
    document: Option<String>,
}

fn filters(body: &Value) -> Result<Filters, ApiError> {
    let mut f = Filters {
        after: None,
        before: None,
        status: None,
        stage: None,
        document: None,
    };
    for filter in body
        .get("Filters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = filter
            .get("key")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let value = filter
            .get("value")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !FILTER_KEYS.contains(&key) {
            return Err(ApiError::bad_request(
                "InvalidFilterKey",
                format!(
                    "filter key {key:?} is not one of {}",
                    FILTER_KEYS.join(", ")
                ),
            ));
        }
        let time = |v: &str| -> Result<SystemTime, ApiError> {
            time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                .map(SystemTime::from)
                .map_err(|_| {
                    ApiError::bad_request(
                        "InvalidFilterValue",
                        format!("{key} {v:?} is not an ISO 8601 time"),
                    )
                })
        };
        match key {
            "InvokedAfter" => f.after = Some(time(&value)?),
            "InvokedBefore" => f.before = Some(time(&value)?),
            "Status" => f.status = Some(value),
            "ExecutionStage" => {
                if !["Executing", "Complete"].contains(&value.as_str()) {
                    return Err(ApiError::bad_request(
                        "InvalidFilterValue",
                        format!("ExecutionStage {value:?} is not Executing or Complete"),
                    ));
                }
                f.stage = Some(value);
            }
            _ => f.document = Some(value),
        }
    }
    Ok(f)
}

impl Filters {
    fn admits(&self, c: &Command, status: &str, complete: bool) -> bool {
        self.after.is_none_or(|t| c.requested >= t)
            && self.before.is_none_or(|t| c.requested <= t)
            && self.status.as_deref().is_none_or(|s| s == status)
            && self
                .stage
                .as_deref()
                .is_none_or(|s| (s == "Complete") == complete)
            && self.document.as_deref().is_none_or(|d| d == DOCUMENT)
    }
}

fn valid_command_id(id: &str) -> Result<(), ApiError> {
    if id.len() == 36 && uuid::Uuid::try_parse(id).is_ok() {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "InvalidCommandId",
            format!("{id:?} is not a command id"),
        ))
    }
}

/// ListCommands, or ListCommandInvocations when `invocations`; newest command first.
fn list(
    state: &State,
    req: &Incoming,
    body: &Value,
    invocations: bool,
) -> Result<Response, ApiError> {
    let command_id = body.get("CommandId").and_then(Value::as_str);
    if let Some(id) = command_id {
        valid_command_id(id)?;
    }
    let instance = body.get("InstanceId").and_then(Value::as_str);
    let max = match body.get("MaxResults").and_then(Value::as_u64) {
        None => 50,
        Some(n) if (1..=50).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(
                "ValidationException",
                format!("MaxResults {n} is not between 1 and 50"),
            ))
        }
    };
    let details = body
        .get("Details")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let filters = filters(body)?;
    let commands = lock(&state.ssm.commands);
    let mut items = Vec::new();
    for c in commands
        .iter()
        .rev()
        .filter(|c| c.region == req.region && command_id.is_none_or(|id| id == c.id))
    {
        if invocations {
            for inv in c
                .invocations
                .iter()
                .filter(|i| instance.is_none_or(|id| id == i.instance))
            {
                let status = inv.status.words().0;
                if filters.admits(c, status, inv.status.terminal()) {
                    items.push(c.invocation(inv, details));
                }
            }
        } else {
            let in_command =
                instance.is_none_or(|id| c.invocations.iter().any(|i| i.instance == id));
            let status = c.words().0;
            let complete = c.invocations.iter().all(|i| i.status.terminal());
            if in_command && filters.admits(c, status, complete) {
                items.push(c.describe());
            }
        }
    }
    let token = body.get("NextToken").and_then(Value::as_str);
    let page = paginate(&items, max, token)
        .map_err(|_| ApiError::bad_request("InvalidNextToken", "the NextToken is not valid"))?;
    let key = if invocations {
        "CommandInvocations"
    } else {
        "Commands"
    };
    let mut answer = json!({ key: page.items });
    if let Some(t) = page.next_token {
        answer["NextToken"] = t.into();
    }
    Ok(aws_json(answer))
}

fn get_invocation(state: &State, body: &Value) -> Result<Response, ApiError> {
    let id = body
        .get("CommandId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    valid_command_id(id)?;
    let instance = body
        .get("InstanceId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(plugin) = body.get("PluginName").and_then(Value::as_str) {
        if plugin != PLUGIN {
            return Err(ApiError::bad_request(
                "InvalidPluginName",
                format!("{DOCUMENT} has no step {plugin:?}"),
            ));
        }
    }
    let commands = lock(&state.ssm.commands);
    let c = commands.iter().find(|c| c.id == id).ok_or_else(|| {
        ApiError::bad_request("InvalidCommandId", format!("command {id} does not exist"))
    })?;
    let inv = c
        .invocations
        .iter()
        .find(|i| i.instance == instance)
        .ok_or_else(|| {
            ApiError::bad_request(
                "InvocationDoesNotExist",
                format!("command {id} was not sent to {instance}"),
            )
        })?;
    let (status, details) = inv.status.words();
    let elapsed = match (inv.started, inv.ended) {
        (Some(s), Some(e)) => format!(
            "PT{:.3}S",
            e.duration_since(s).unwrap_or_default().as_secs_f64()
        ),
        _ => String::new(),
    };
    Ok(aws_json(json!({
        "CommandId": c.id,
        "InstanceId": inv.instance,
        "Comment": c.comment.clone().unwrap_or_default(),
        "DocumentName": DOCUMENT,
        "DocumentVersion": "$DEFAULT",
        "PluginName": PLUGIN,
        "ResponseCode": inv.code,
        "ExecutionStartDateTime": inv.started.map(iso8601).unwrap_or_default(),
        "ExecutionElapsedTime": elapsed,
        "ExecutionEndDateTime": inv.ended.map(iso8601).unwrap_or_default(),
        "Status": status,
        "StatusDetails": details,
        "StandardOutputContent": inv.stdout,
        "StandardOutputUrl": "",
        "StandardErrorContent": inv.stderr,
        "StandardErrorUrl": "",
        "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": false},
    })))
}

/// Cancels the invocations not yet finished (all, or those of the given instances): pending
/// ones never start, running ones are killed.
fn cancel(state: &State, body: &Value) -> Result<Response, ApiError> {
    let id = body
        .get("CommandId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    valid_command_id(id)?;
    let only = string_list(body, "InstanceIds")?.filter(|ids| !ids.is_empty());
    let mut commands = lock(&state.ssm.commands);
    let c = commands.iter_mut().find(|c| c.id == id).ok_or_else(|| {
        ApiError::bad_request("InvalidCommandId", format!("command {id} does not exist"))
    })?;
    if let Some(ids) = &only {
        if let Some(unknown) = ids
            .iter()
            .find(|i| !c.invocations.iter().any(|inv| &inv.instance == *i))
        {
            return Err(ApiError::bad_request(
                "InvalidInstanceId",
                format!("command {id} was not sent to {unknown}"),
            ));
        }
    }
    c.cancelled = true;
    for inv in c
        .invocations
        .iter_mut()
        .filter(|i| only.as_ref().is_none_or(|ids| ids.contains(&i.instance)))
    {
        match inv.status {
            Status::Pending | Status::Delayed => {
                inv.status = Status::Cancelled;
                inv.ended = Some(SystemTime::now());
            }
            Status::InProgress => {
                let _ = inv.cancel.send(true);
            }
            _ => {}
        }
    }
    Ok(aws_json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_as_numbers_and_percentages() {
        assert_eq!(parse_limit("50", false), Some(Limit::Count(50)));
        assert_eq!(parse_limit("10%", true).map(|l| l.budget(50)), Some(5));
        assert_eq!(parse_limit("10%", false).map(|l| l.width(15)), Some(2));
        assert_eq!(parse_limit("1%", false).map(|l| l.width(3)), Some(1));
        assert_eq!(parse_limit("0", true), Some(Limit::Count(0)));
        assert_eq!(parse_limit("0", false), None);
        assert_eq!(parse_limit("101%", true), None);
        assert_eq!(parse_limit("ten", true), None);
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("hi", 10), "hi");
    }
}
