//! `stackwarden reconcile` without `--once`: the long-running controller.
//!
//! A first pass over everything, then batches of whatever the [`Schedule`] says is due: each
//! kind at its resync interval, resources that failed at their backoff, everything when the
//! desired directory changes (file watch, debounced; the git HEAD commit or the content hash is
//! the generation). One batch runs at a time, so a resource is never reconciled twice at once;
//! inside a batch the engine applies independent resources concurrently.
//!
//! Reloading is all-or-nothing: an invalid desired state is reported (log, `/status`, metric)
//! and the last valid one stays enforced. With `--lease`, only the holder of the DynamoDB lease
//! writes; the other daemon observes and serves its status. The first SIGTERM or SIGINT lets the
//! batch in flight finish (its changes are not cut in the middle) and exits 0; a second exits
//! at once with 1.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use stackwarden_controllers::desired::StackSpec;
use stackwarden_controllers::{verify, DesiredState, ResourceId};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::engine::{Engine, Pass, Scope};
use crate::lease::Lease;
use crate::schedule::{Backoff, Outcome, Resync, Schedule};
use crate::status::Status;
use crate::{load, report, watch, EXIT_ERROR, EXIT_OK};

/// How long the desired directory must be quiet after a change before a pass starts: a
/// checkout writes many files.
const WATCH_QUIET: Duration = Duration::from_millis(200);

pub struct Options {
    pub dir: PathBuf,
    pub prune: bool,
    pub resync: Resync,
    /// Fast-forward the checkout from its remote this often.
    pub git_pull: Option<Duration>,
    /// Verify the files on hosts this often (after the first pass, then at this interval).
    pub verify: Option<Duration>,
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn register() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

pub async fn run(
    engine: Engine,
    mut desired: DesiredState,
    opts: Options,
    status: Status,
    lease: Option<Arc<Lease>>,
) -> anyhow::Result<u8> {
    let dir = opts.dir.as_path();
    // Registered before the first pass, so a signal during a pass is kept until it ends.
    let mut signals = Signals::register()?;
    let mut watch =
        watch::Watch::start(dir).with_context(|| format!("cannot watch {}", dir.display()))?;
    if let Some(every) = opts.git_pull {
        tokio::spawn(git_pull(dir.to_path_buf(), every));
    }
    let mut generation = watch::generation(dir, &desired.content_hash);
    let mut schedule = Schedule::new(
        opts.resync.clone(),
        Backoff::default(),
        &desired,
        Instant::now(),
    );
    for w in desired.warnings() {
        tracing::warn!("{w}");
    }
    // Taking the lease makes everything due: the standby only observed until then.
    let mut lease_changes = lease.as_ref().map(|l| l.subscribe());
    let mut stopping = false;
    // The first verify follows the first pass: a restarted daemon verifies at once too.
    let mut verify = Verifying::Due(Instant::now());
    loop {
        let due = schedule.due(Instant::now());
        if !due.is_empty() {
            let write = lease.as_ref().is_none_or(|l| l.held());
            let full = due.resources.len() == desired.resources.len();
            tracing::info!(
                %generation,
                resources = due.resources.len(),
                full,
                write,
                "pass starting"
            );
            let started = std::time::Instant::now();
            let scope = Scope {
                resources: due.resources.clone(),
                removals: due.kinds.clone(),
            };
            let pass = {
                let in_flight = engine.pass(&desired, scope, opts.prune, write);
                tokio::pin!(in_flight);
                loop {
                    tokio::select! {
                        p = &mut in_flight => break p,
                        _ = signals.recv() => {}
                    }
                    if stopping {
                        tracing::warn!("second signal: exiting without finishing the pass");
                        return Ok(EXIT_ERROR);
                    }
                    stopping = true;
                    tracing::info!("signal: finishing the pass in flight, then exiting");
                }
            };
            if !pass.applied.changes.is_empty() || !pass.applied.errors.is_empty() {
                print!(
                    "{}",
                    report::reconcile_text(
                        &pass.applied.changes,
                        &pass.applied.errors,
                        &pass.check
                    )
                );
            }
            status.pass(
                &generation,
                &pass.applied,
                &pass.check,
                started.elapsed().as_secs_f64(),
            );
            schedule.record(&due, &outcomes(&pass, write), Instant::now());
            tracing::info!(
                %generation,
                converged = pass.converged(),
                write,
                changes = pass.applied.changes.len(),
                errors = pass.applied.errors.len() + pass.check.errors.len(),
                "pass done"
            );
            for id in schedule.parked() {
                tracing::debug!(resource = %id, "parked until its desired state changes");
            }
        }
        if stopping {
            return Ok(EXIT_OK);
        }
        // Only a daemon that writes verifies: a verify marks what it finds. One that lost the
        // lease drops its verify in flight; the holder makes its own.
        let mut wake = schedule
            .next_wake()
            .unwrap_or_else(|| Instant::now() + opts.resync.default);
        match opts
            .verify
            .filter(|_| lease.as_ref().is_none_or(|l| l.held()))
        {
            Some(every) => {
                verify = verify
                    .step(&engine, &desired, &status, &mut schedule, every)
                    .await;
                wake = wake.min(verify.next());
            }
            None => verify = verify.dropped(),
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = watch.changed(WATCH_QUIET) => {
                tracing::info!("the desired directory changed");
                if let Some(d) = reload(dir, &generation, &status, &engine.ctx.region, &desired.stack) {
                    generation = watch::generation(dir, &d.content_hash);
                    desired = d;
                    status.retain(&desired);
                    schedule.reload(&desired, Instant::now());
                    for w in desired.warnings() {
                        tracing::warn!("{w}");
                    }
                }
            }
            Some(held) = lease_taken(&mut lease_changes) => {
                if held {
                    schedule.reload(&desired, Instant::now());
                }
            }
            _ = signals.recv() => return Ok(EXIT_OK),
        }
    }
}

/// The daemon's verify of the files on hosts: due at a time, or running on the hosts while
/// passes go on (it is looked at between them, never waited for).
enum Verifying {
    Due(Instant),
    Running {
        sent: verify::Sent,
        started: Instant,
        look_at: Instant,
    },
}

impl Verifying {
    /// When the loop must come back for it.
    fn next(&self) -> Instant {
        match self {
            Verifying::Due(at) => *at,
            Verifying::Running { look_at, .. } => *look_at,
        }
    }

    /// Without the lease: nothing in flight, the next verify due at once when it is taken.
    fn dropped(self) -> Verifying {
        match self {
            Verifying::Running { .. } => Verifying::Due(Instant::now()),
            due => due,
        }
    }

    /// Starts the verify when due, looks at it when running; what changed makes the kinds
    /// that push it due, so the next batch pushes them again. A verify that fails or still
    /// runs after `STACKWARDEN_WAIT_TIMEOUT` is logged and shown, and tried next interval.
    async fn step(
        self,
        engine: &Engine,
        desired: &DesiredState,
        status: &Status,
        schedule: &mut Schedule,
        every: Duration,
    ) -> Verifying {
        let now = Instant::now();
        let (outcome, started) = match self {
            Verifying::Due(at) if at <= now => {
                tracing::info!("verifying the files on hosts");
                (verify::start(&engine.ctx, desired).await, now)
            }
            Verifying::Running {
                sent,
                started,
                look_at,
            } if look_at <= now => (sent.look(&engine.ctx).await, started),
            waiting => return waiting,
        };
        let verified = match outcome {
            Ok(verify::Verify::Running(sent, progress)) => {
                if started.elapsed() <= engine.ctx.waits.timeout {
                    return Verifying::Running {
                        sent,
                        started,
                        look_at: Instant::now() + verify::RUNNING,
                    };
                }
                Err(format!(
                    "still running after {:?} (STACKWARDEN_WAIT_TIMEOUT): {progress}",
                    engine.ctx.waits.timeout
                ))
            }
            Ok(verify::Verify::Done(v)) => Ok(v),
            Err(e) => Err(e.to_string()),
        };
        match verified {
            Ok(v) => {
                for d in &v.drifted {
                    tracing::warn!(instance = %d.instance, bundle = %d.bundle, files = ?d.files, "files changed on the host since the push; pushing again");
                }
                status.verified(&v);
                schedule.wake(&v.kinds);
            }
            Err(e) => {
                tracing::error!(error = %e, "the verify of the files on hosts failed");
                status.verified(&verify::Verified {
                    unverified: vec![format!("the verify failed: {e}")],
                    ..Default::default()
                });
            }
        }
        Verifying::Due(Instant::now() + every)
    }
}

/// The lease's next change (`true`: taken); never, without a lease.
async fn lease_taken(changes: &mut Option<tokio::sync::watch::Receiver<bool>>) -> Option<bool> {
    match changes {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The desired state after a change; `None` (reported) when it is invalid.
/// A stack whose `[stack] region` changed is refused like an invalid one: the operator acts in
/// the region it started in, and moving a stack is a restart. Likewise its `assume_role` and
/// `external_id`: the clients of every controller were built with that role's credentials,
/// checked once at start, and acting as another role (another account) is a restart too, so a
/// commit never moves a running stack to another account halfway through its state.
fn reload(
    dir: &Path,
    enforced: &str,
    status: &Status,
    region: &str,
    stack: &StackSpec,
) -> Option<DesiredState> {
    let loaded: Result<DesiredState, Vec<String>> =
        load::load(dir).map_err(|diags| diags.iter().map(ToString::to_string).collect());
    let loaded = loaded.and_then(|d| match d.stack.region.as_deref() {
        Some(r) if r != region => Err(vec![format!(
            "the stack's region changed from {region} to {r}: the operator acts in the region it started in; restart it to move the stack"
        )]),
        _ => Ok(d),
    });
    let value = |s: &Option<toml::Spanned<String>>| s.as_ref().map(|v| v.get_ref().clone());
    let shown = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    let loaded = loaded.and_then(|d| {
        let (was, now) = (value(&stack.assume_role), value(&d.stack.assume_role));
        if was != now {
            return Err(vec![format!(
                "the stack's assume_role changed from {} to {}: the operator acts as the role it started with; restart it to act as another",
                shown(was),
                shown(now)
            )]);
        }
        if value(&stack.external_id) != value(&d.stack.external_id) {
            return Err(vec![
                "the stack's external_id changed: the operator assumes its role as it started; restart it to use another external_id".to_string(),
            ]);
        }
        Ok(d)
    });
    match loaded {
        Ok(d) => {
            status.invalid(None);
            Some(d)
        }
        Err(diags) => {
            for d in &diags {
                tracing::error!("{d}");
            }
            let invalid = watch::generation(dir, "(no commit)");
            status.invalid(Some(invalid.clone()));
            tracing::error!(
                %invalid,
                generation = %enforced,
                "the desired state is invalid; still enforcing the last valid one"
            );
            None
        }
    }
}

/// `--git-pull`: fast-forwards the checkout from its upstream every `every`. The file watch
/// sees the new commit like any other change. A pull that fails (network, diverged history) is
/// logged and tried again next time; local commits are never overwritten (`--ff-only`).
async fn git_pull(dir: PathBuf, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let out = tokio::process::Command::new("git")
            .args(["pull", "--ff-only", "--quiet"])
            .current_dir(&dir)
            .kill_on_drop(true)
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => tracing::debug!("git pull done"),
            Ok(o) => tracing::warn!(
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "git pull --ff-only failed; the checkout stays as it is"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot run git pull"),
        }
    }
}

/// How each resource of a pass ended, for the schedule. Pending changes count as retries only
/// when this daemon may write (a standby without the lease merely observes them).
fn outcomes(pass: &Pass, wrote: bool) -> BTreeMap<ResourceId, Outcome> {
    let mut out = BTreeMap::new();
    if wrote {
        for c in pass.check.writes() {
            out.insert(c.id.clone(), Outcome::Retry);
        }
    }
    for e in pass.check.errors.iter().chain(&pass.applied.errors) {
        out.insert(e.resource.clone(), Outcome::of(e.class, e.retry_after));
    }
    out
}
