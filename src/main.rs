//! `stackwarden`: the CLI. Parses arguments, loads the desired state, builds the AWS clients and
//! runs one of validate / plan / reconcile. Exit codes follow `terraform plan
//! -detailed-exitcode`: see [`ExitCode`]s below and the README.

mod aws;
mod daemon;
mod engine;
mod lease;
mod limit;
mod load;
mod report;
mod schedule;
mod status;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use stackwarden_controllers::{verify, Context, DesiredState, Waits};

use crate::aws::{AwsOptions, CallCounter};
use crate::engine::Engine;

/// Reconciles an AWS monitoring stack (Prometheus on EC2, Grafana, AMP, AMG, IAM) with a
/// desired-state directory.
#[derive(Parser)]
#[command(name = "stackwarden", version)]
struct Cli {
    /// AWS region (default: AWS_REGION, the profile's region, then `[stack] region`).
    #[arg(long, global = true)]
    region: Option<String>,
    /// Named profile from the shared AWS config files.
    #[arg(long, global = true)]
    profile: Option<String>,
    /// Send every AWS call to this endpoint (an emulator). AWS_ENDPOINT_URL and
    /// AWS_ENDPOINT_URL_<SERVICE> are honoured too.
    #[arg(long, global = true)]
    endpoint_url: Option<String>,
    /// Print the AWS API calls made, by service and operation, to stderr when done.
    #[arg(long, global = true)]
    stats: bool,
    /// Client-side rate limit of one AWS service, SERVICE=REQUESTS_PER_SECOND with the SigV4
    /// service name (ec2, iam, aps, ssm, autoscaling, elasticloadbalancing, ...); `*` for every
    /// service not named. Repeatable. Default: 20 per second per service.
    #[arg(long = "rate-limit", global = true, value_name = "SERVICE=RPS")]
    rate_limits: Vec<String>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STACKWARDEN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check the desired state offline (no AWS call). Exit 0 valid, 1 invalid.
    Validate {
        #[arg(default_value = "desired")]
        dir: PathBuf,
    },
    /// Show what reconcile would change. Exit 0 in sync, 2 changes pending, 1 error.
    Plan {
        #[arg(default_value = "desired")]
        dir: PathBuf,
        /// Machine-readable plan on stdout.
        #[arg(long)]
        json: bool,
        /// Delete owned resources that are no longer in the desired state.
        #[arg(long)]
        prune: bool,
    },
    /// Converge AWS to the desired state: once (`--once`), or continuously.
    Reconcile {
        #[arg(default_value = "desired")]
        dir: PathBuf,
        /// One pass, then exit: 0 converged, 1 error.
        #[arg(long)]
        once: bool,
        /// Only plan (same output and exit codes as `plan`).
        #[arg(long)]
        dry_run: bool,
        /// Delete owned resources that are no longer in the desired state.
        #[arg(long)]
        prune: bool,
        /// With `--once`: first compare the files on every host the stack pushed to with what
        /// was pushed, and push again where they were changed.
        #[arg(long)]
        verify: bool,
        /// When running continuously: how often the files on hosts are verified (`0s`: never).
        #[arg(long, default_value = "6h", value_parser = parse_interval, value_name = "INTERVAL")]
        verify_interval: Duration,
        /// Drift resync when running continuously: how often each kind is read again.
        /// `DURATION` for every kind, `KIND=DURATION` for one (`host=5m`); repeatable.
        /// Default 60s.
        #[arg(long, alias = "interval", value_name = "[KIND=]DURATION")]
        resync: Vec<String>,
        /// At most this many resources are applied at once (independent ones only).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Fast-forward the desired directory's git checkout from its upstream this often.
        #[arg(long, value_parser = parse_interval, value_name = "INTERVAL")]
        git_pull: Option<Duration>,
        /// Write to AWS only while holding the lease in this DynamoDB table (created when
        /// missing); without it the daemon only observes. For two management instances.
        #[arg(long, value_name = "TABLE")]
        lease: Option<String>,
        /// How long a lease lasts without renewal (renewed every third of it).
        #[arg(long, default_value = "30s", value_parser = parse_interval)]
        lease_duration: Duration,
        /// Where the daemon serves /metrics, /healthz, /readyz and /status (port 0: any free
        /// port, logged).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
    /// Show the running daemon's status: every resource's state, last error and generation.
    Status {
        /// The daemon's `--listen` address.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// The status as JSON, as `/status` serves it.
        #[arg(long)]
        json: bool,
    },
}

/// Loopback: the endpoint shows the stack's state and is meant for the local Prometheus agent.
const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

fn parse_interval(s: &str) -> Result<Duration, String> {
    stackwarden_controllers::desired::parse_duration(s)
}

/// Exit codes, fixed by the CLI's contract.
const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_CHANGES: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version are successes; a usage error is an error (1), never "changes" (2).
            return ExitCode::from(if e.use_stderr() { EXIT_ERROR } else { EXIT_OK });
        }
    };
    init_logging(
        cli.log_format,
        matches!(cli.command, Command::Reconcile { dry_run: false, .. }),
    );
    let counter = CallCounter::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(&cli, &counter));
    if cli.stats {
        eprint!("{}", aws::render_stats(&counter));
    }
    match code {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn init_logging(format: LogFormat, verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A role that cannot be assumed is reported once, by the operator, naming the stack
    // (`aws::caller_account`); the SDK's own warning would say it again. Unless asked for.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("aws_config")) {
        filter = filter.add_directive(
            "aws_config::sts::assume_role=error"
                .parse()
                .expect("a valid directive"),
        );
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Loads the desired state, printing every error; `None` when invalid.
fn load_or_report(dir: &Path) -> Option<DesiredState> {
    match load::load(dir) {
        Ok(d) => Some(d),
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!(
                "{}: {} error(s); nothing was applied",
                dir.display(),
                diags.len()
            );
            None
        }
    }
}

/// The engine of the stack, on the process's own SDK configuration `base` or, when the stack
/// names a role, on that role's ([`aws::stack_config`]). The credentials (the role's, when it
/// has one) are checked with one call before anything else, so missing credentials, an
/// endpoint that does not answer or a role that cannot be assumed is one error for the stack,
/// not one per resource. With a role, the account it acts in is returned.
async fn stack_engine(
    base: &aws_config::SdkConfig,
    cli: &Cli,
    desired: &DesiredState,
    counter: &Arc<CallCounter>,
) -> anyhow::Result<(Engine, Option<String>)> {
    let sdk = aws::stack_config(base, &desired.stack).await;
    let engine = engine_with(&sdk, cli, counter)?;
    let account = aws::caller_account(&engine.ctx.sts, &desired.stack).await?;
    engine.ctx.knows_account(account.clone());
    if desired.stack.assume_role.is_none() {
        return Ok((engine, None));
    }
    tracing::info!(role = %desired.stack.assume_role.as_ref().map(|r| r.get_ref().as_str()).unwrap_or_default(), %account, "acting as the stack's role");
    Ok((engine, Some(account)))
}

/// The process's own SDK configuration: the CLI's AWS settings, the stack's region, the rate
/// limits. The stack's calls go through [`stack_engine`]; the lease uses this one as is.
async fn sdk_for(cli: &Cli, desired: &DesiredState) -> anyhow::Result<aws_config::SdkConfig> {
    let opts = AwsOptions {
        region: cli.region.clone(),
        profile: cli.profile.clone(),
        endpoint_url: cli.endpoint_url.clone(),
        limits: Some(
            limit::Limits::parse(&cli.rate_limits)
                .map_err(|e| anyhow::anyhow!("--rate-limit {e}"))?,
        ),
    };
    aws::sdk_config(&opts, desired.stack.region.as_deref()).await
}

fn engine_with(
    sdk: &aws_config::SdkConfig,
    cli: &Cli,
    counter: &Arc<CallCounter>,
) -> anyhow::Result<Engine> {
    let concurrency = match &cli.command {
        Command::Reconcile { concurrency, .. } => *concurrency,
        _ => 1,
    };
    let waits = Waits {
        poll: env_interval("STACKWARDEN_POLL_INTERVAL")?.unwrap_or(Waits::default().poll),
        timeout: env_interval("STACKWARDEN_WAIT_TIMEOUT")?.unwrap_or(Waits::default().timeout),
        propagation: env_interval("STACKWARDEN_PROPAGATION_TIMEOUT")?
            .unwrap_or(Waits::default().propagation),
    };
    Ok(Engine::new(
        Context::new(sdk, vec![counter.interceptor()], waits),
        concurrency,
    ))
}

/// A duration from the environment (Prometheus syntax), if set.
fn env_interval(name: &str) -> anyhow::Result<Option<std::time::Duration>> {
    match std::env::var(name) {
        Ok(s) => parse_interval(&s)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{name}: {e}")),
        Err(_) => Ok(None),
    }
}

async fn run(cli: &Cli, counter: &Arc<CallCounter>) -> anyhow::Result<u8> {
    match &cli.command {
        Command::Validate { dir } => Ok(match load_or_report(dir) {
            Some(d) => {
                for w in d.warnings() {
                    eprintln!("{w}");
                }
                println!(
                    "{}: valid (stack {}, {} resources)",
                    dir.display(),
                    d.stack_name(),
                    d.resources.len()
                );
                EXIT_OK
            }
            None => EXIT_ERROR,
        }),
        Command::Plan { dir, json, prune } => plan(cli, dir, *json, *prune, counter).await,
        Command::Reconcile {
            dir,
            dry_run: true,
            prune,
            ..
        } => plan(cli, dir, false, *prune, counter).await,
        Command::Reconcile {
            dir,
            once: true,
            prune,
            verify,
            ..
        } => {
            let Some(desired) = load_or_report(dir) else {
                return Ok(EXIT_ERROR);
            };
            let sdk = sdk_for(cli, &desired).await?;
            let (engine, _) = stack_engine(&sdk, cli, &desired, counter).await?;
            // With --lease, a CI run and the daemon never write at once.
            let (engine, lease) = with_lease(cli, engine, &sdk, &desired, counter).await?;
            if let Some(l) = &lease {
                if !l.held() {
                    eprintln!(
                        "error: the lease is held by {}; nothing was applied",
                        l.holder_now().await
                    );
                    return Ok(EXIT_ERROR);
                }
            }
            if *verify {
                let verified = verify_once(&engine, &desired).await;
                match &verified {
                    Ok(v) => eprint!("{}", report::verify_text(v)),
                    Err(e) => eprintln!("error: the verify of the files on hosts failed: {e}"),
                }
                if verified.is_err() {
                    if let Some(l) = lease {
                        l.release().await;
                    }
                    return Ok(EXIT_ERROR);
                }
            }
            let pass = reconcile_once(&engine, &desired, *prune).await;
            if let Some(l) = lease {
                l.release().await;
            }
            Ok(if pass.converged() {
                EXIT_OK
            } else {
                EXIT_ERROR
            })
        }
        Command::Reconcile { dir, .. } => run_daemon(cli, dir, counter).await,
        Command::Status { listen, json } => {
            let url = format!("http://{listen}/status");
            let text = ureq::get(&url)
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
                .with_context(|| {
                    format!("cannot read {url}: is the daemon running with --listen {listen}?")
                })?;
            if *json {
                println!("{text}");
            } else {
                let report: status::Report =
                    serde_json::from_str(&text).context("the daemon's /status is not a status")?;
                print!("{}", status::table(&report));
            }
            Ok(EXIT_OK)
        }
    }
}

async fn plan(
    cli: &Cli,
    dir: &Path,
    json: bool,
    prune: bool,
    counter: &Arc<CallCounter>,
) -> anyhow::Result<u8> {
    let Some(desired) = load_or_report(dir) else {
        return Ok(EXIT_ERROR);
    };
    let sdk = sdk_for(cli, &desired).await?;
    let (engine, account) = stack_engine(&sdk, cli, &desired, counter).await?;
    let acting_as = desired
        .stack
        .assume_role
        .as_ref()
        .zip(account.as_ref())
        .map(|(role, account)| report::ActingAs {
            role: role.get_ref(),
            account,
        });
    let obs = engine
        .observe(&desired, engine::Scope::everything(&desired))
        .await;
    let started = std::time::Instant::now();
    let plan = engine.plan(&desired, &obs, prune);
    // The pure part of a plan, without AWS: what tests/bench.sh reports for large states.
    tracing::info!(
        resources = desired.resources.len(),
        micros = started.elapsed().as_micros() as u64,
        "diff computed"
    );
    if let Some(w) = report::unsupported_warning(&plan.unsupported) {
        eprintln!("{w}");
    }
    for w in desired.warnings() {
        eprintln!("{w}");
    }
    if json {
        println!(
            "{}",
            report::plan_json(&desired, &engine.ctx.region, acting_as, &plan)
        );
    } else {
        print!(
            "{}",
            report::plan_text(&desired, &engine.ctx.region, acting_as, &plan)
        );
    }
    Ok(if plan.failures().next().is_some() {
        EXIT_ERROR
    } else if plan.has_pending() {
        EXIT_CHANGES
    } else {
        EXIT_OK
    })
}

/// `reconcile --once --verify`: the verify of the files on hosts, waited for (printing its
/// progress) up to `STACKWARDEN_WAIT_TIMEOUT`.
async fn verify_once(engine: &Engine, desired: &DesiredState) -> anyhow::Result<verify::Verified> {
    let deadline = tokio::time::Instant::now() + engine.ctx.waits.timeout;
    let mut step = verify::start(&engine.ctx, desired).await?;
    loop {
        match step {
            verify::Verify::Done(v) => return Ok(v),
            verify::Verify::Running(sent, progress) => {
                eprintln!("verify: {progress}");
                let pause = verify::RUNNING.min(engine.ctx.waits.poll);
                if tokio::time::Instant::now() + pause > deadline {
                    anyhow::bail!(
                        "still running after {:?} (STACKWARDEN_WAIT_TIMEOUT): {progress}",
                        engine.ctx.waits.timeout
                    );
                }
                tokio::time::sleep(pause).await;
                step = sent.look(&engine.ctx).await?;
            }
        }
    }
}

/// How many more passes `reconcile --once` makes for differences that arise while it writes
/// and for failures that may pass on a retry.
const MORE_PASSES: usize = 3;

/// Whether every failure of a pass may pass on a retry (a call still throttled after the SDK's
/// attempts, a server error): none is known to be permanent.
fn only_retryable_failures(pass: &engine::Pass) -> bool {
    let mut failures = pass
        .applied
        .errors
        .iter()
        .chain(&pass.check.errors)
        .filter(|e| !e.is_waiting())
        .peekable();
    failures.peek().is_some()
        && failures.all(|e| {
            matches!(
                e.class,
                stackwarden_controllers::ErrorClass::Retryable
                    | stackwarden_controllers::ErrorClass::Throttled
            )
        })
}

/// Whether the check after a pass shows only differences the pass did not write (and nothing
/// failed): what changed in AWS meanwhile, not a write that did not take.
fn arose_meanwhile(pass: &engine::Pass) -> bool {
    let failed = pass
        .applied
        .errors
        .iter()
        .chain(&pass.check.errors)
        .any(|e| !e.is_waiting());
    let deletes: Vec<_> = pass
        .check
        .removed
        .iter()
        .map(|(_, c)| c)
        .filter(|c| c.action == stackwarden_controllers::Action::Delete)
        .collect();
    let mut pending = pass.check.writes().peekable();
    if failed || (pending.peek().is_none() && deletes.is_empty()) {
        return false;
    }
    // An object to delete that the pass did not try to (one left by an interrupted create
    // that it found only after its writes).
    let deletes_new = deletes.iter().all(|d| {
        !pass
            .applied
            .changes
            .iter()
            .any(|a| a.action == d.action && a.object == d.object)
    });
    let shown = |f: &stackwarden_controllers::FieldChange| (f.field.clone(), f.after.clone());
    deletes_new
        && pending.all(|c| {
            let written: std::collections::BTreeSet<_> = pass
                .applied
                .changes
                .iter()
                .filter(|a| a.id == c.id)
                .flat_map(|a| a.fields.iter().map(shown))
                .collect();
            !c.fields.iter().map(shown).any(|f| written.contains(&f))
        })
}

/// `reconcile --once`: passes over everything until it converges, something fails, or only
/// objects still converging remain after `STACKWARDEN_WAIT_TIMEOUT`; prints what it waits for
/// meanwhile, then the summary.
async fn reconcile_once(engine: &Engine, desired: &DesiredState, prune: bool) -> engine::Pass {
    let deadline = tokio::time::Instant::now() + engine.ctx.waits.timeout;
    let mut applied = Vec::new();
    let mut more = 0;
    let mut pass = loop {
        let mut pass = engine
            .pass(desired, engine::Scope::everything(desired), prune, true)
            .await;
        // A difference that arose while the pass wrote (an instance an Auto Scaling Group
        // launched meanwhile) is the next pass's work; one the pass wrote and that is still
        // there is a write that did not take, and fails the run. Failures that may pass on a
        // retry get another pass too, after a pause; permanent ones end the run.
        let retry = only_retryable_failures(&pass);
        if more < MORE_PASSES && (retry || arose_meanwhile(&pass)) {
            more += 1;
            applied.append(&mut pass.applied.changes);
            if retry {
                eprintln!("retrying what failed in a pass that may pass on a retry");
                tokio::time::sleep(engine.ctx.waits.poll.min(Duration::from_secs(1))).await;
            }
            continue;
        }
        applied.append(&mut pass.applied.changes);
        let Some(after) = pass.only_waiting() else {
            break pass;
        };
        // Progress: what is still converging, once per object and pass.
        let mut shown = std::collections::BTreeSet::new();
        for e in pass.applied.errors.iter().chain(&pass.check.errors) {
            if e.is_waiting() && shown.insert(&e.resource) {
                eprintln!("{}: {}", e.resource, e.error);
            }
        }
        let pause = after.min(engine.ctx.waits.poll);
        if tokio::time::Instant::now() + pause > deadline {
            eprintln!(
                "still converging after {:?} (STACKWARDEN_WAIT_TIMEOUT): the next run goes on",
                engine.ctx.waits.timeout
            );
            break pass;
        }
        tokio::time::sleep(pause).await;
    };
    pass.applied.changes = applied;
    if let Some(w) = report::unsupported_warning(&pass.check.unsupported) {
        eprintln!("{w}");
    }
    for w in desired.warnings() {
        eprintln!("{w}");
    }
    print!(
        "{}",
        report::reconcile_text(&pass.applied.changes, &pass.applied.errors, &pass.check)
    );
    pass
}

/// With `--lease`: the lease table ready, one attempt to take the lease made, and the engine
/// writing only while it is held.
async fn with_lease(
    cli: &Cli,
    engine: Engine,
    sdk: &aws_config::SdkConfig,
    desired: &DesiredState,
    counter: &Arc<CallCounter>,
) -> anyhow::Result<(Engine, Option<Arc<lease::Lease>>)> {
    let Command::Reconcile {
        lease: Some(table),
        lease_duration,
        ..
    } = &cli.command
    else {
        return Ok((engine, None));
    };
    // The process's own credentials, not the stack's role: the table is the management
    // account's, shared by the stacks of every account it manages.
    let l = Arc::new(lease::Lease::new(
        sdk,
        counter.interceptor(),
        table,
        &lease::key(&desired.stack),
        *lease_duration,
    ));
    l.prepare().await?;
    l.try_acquire().await;
    tracing::info!(holder = %l.holder, held = l.held(), table, "lease");
    // Renewed for as long as the process runs (a long `--once` pass too).
    tokio::spawn(l.clone().keep());
    let gate = l.clone();
    Ok((engine.gated(Arc::new(move || gate.held())), Some(l)))
}

/// `reconcile` without `--once`: serves the status endpoint, takes the lease when asked to,
/// and runs the daemon's loop ([`daemon::run`]).
async fn run_daemon(cli: &Cli, dir: &Path, counter: &Arc<CallCounter>) -> anyhow::Result<u8> {
    let Command::Reconcile {
        prune,
        resync,
        git_pull,
        listen,
        verify_interval,
        ..
    } = &cli.command
    else {
        unreachable!("run_daemon is only called for reconcile");
    };
    let resync = schedule::Resync::parse(resync).map_err(|e| anyhow::anyhow!("--resync {e}"))?;
    let status = status::Status::new(counter.clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz, /readyz and /status");
    let app = status::router(status.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the status endpoint stopped");
        }
    });
    let desired =
        load_or_report(dir).context("the desired state is invalid; nothing was applied")?;
    let sdk = sdk_for(cli, &desired).await?;
    let (engine, _) = stack_engine(&sdk, cli, &desired, counter).await?;
    let (engine, lease) = with_lease(cli, engine, &sdk, &desired, counter).await?;
    let opts = daemon::Options {
        dir: dir.to_path_buf(),
        prune: *prune,
        resync,
        git_pull: *git_pull,
        verify: (!verify_interval.is_zero()).then_some(*verify_interval),
    };
    let code = daemon::run(engine, desired, opts, status, lease.clone()).await;
    if let Some(l) = lease {
        l.release().await;
    }
    code
}
