//! `stackwarden`: the CLI. Parses arguments, loads the desired state, builds the AWS clients and
//! runs one of validate / plan / reconcile. Exit codes follow `terraform plan
//! -detailed-exitcode`: see [`ExitCode`]s below and the README.

mod aws;
mod engine;
mod limit;
mod load;
mod report;
mod status;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use stackwarden_controllers::{Context, DesiredState, Waits};

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
        /// Time between passes when running continuously.
        #[arg(long, default_value = "60s", value_parser = parse_interval)]
        interval: Duration,
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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

async fn engine_for(
    cli: &Cli,
    desired: &DesiredState,
    counter: &Arc<CallCounter>,
) -> anyhow::Result<Engine> {
    let opts = AwsOptions {
        region: cli.region.clone(),
        profile: cli.profile.clone(),
        endpoint_url: cli.endpoint_url.clone(),
        limits: Some(
            limit::Limits::parse(&cli.rate_limits)
                .map_err(|e| anyhow::anyhow!("--rate-limit {e}"))?,
        ),
    };
    let sdk = aws::sdk_config(&opts, desired.stack.region.as_deref()).await?;
    let waits = Waits {
        poll: env_interval("STACKWARDEN_POLL_INTERVAL")?.unwrap_or(Waits::default().poll),
        timeout: env_interval("STACKWARDEN_WAIT_TIMEOUT")?.unwrap_or(Waits::default().timeout),
    };
    Ok(Engine::new(Context::new(
        &sdk,
        vec![counter.interceptor()],
        waits,
    )))
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
            ..
        } => {
            let Some(desired) = load_or_report(dir) else {
                return Ok(EXIT_ERROR);
            };
            let engine = engine_for(cli, &desired, counter).await?;
            let pass = reconcile_once(&engine, &desired, *prune).await;
            Ok(if pass.converged() {
                EXIT_OK
            } else {
                EXIT_ERROR
            })
        }
        Command::Reconcile {
            dir,
            prune,
            interval,
            listen,
            ..
        } => run_loop(cli, dir, *prune, *interval, *listen, counter).await,
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
    let engine = engine_for(cli, &desired, counter).await?;
    let obs = engine.observe(&desired).await;
    let plan = engine.plan(&desired, &obs, prune);
    if let Some(w) = report::unsupported_warning(&plan.unsupported) {
        eprintln!("{w}");
    }
    for w in desired.warnings() {
        eprintln!("{w}");
    }
    if json {
        println!("{}", report::plan_json(&desired, &engine.ctx.region, &plan));
    } else {
        print!("{}", report::plan_text(&desired, &engine.ctx.region, &plan));
    }
    Ok(if !plan.errors.is_empty() {
        EXIT_ERROR
    } else if plan.has_pending() {
        EXIT_CHANGES
    } else {
        EXIT_OK
    })
}

/// One full pass with confirmation; prints the summary. Returns whether it converged.
/// What one pass did and what the check after it found.
struct Pass {
    applied: engine::Applied,
    check: engine::Plan,
}

impl Pass {
    fn converged(&self) -> bool {
        self.applied.errors.is_empty() && self.check.errors.is_empty() && !self.check.has_pending()
    }
}

async fn reconcile_once(engine: &Engine, desired: &DesiredState, prune: bool) -> Pass {
    let obs = engine.observe(desired).await;
    let applied = engine.apply(desired, &obs, prune).await;
    let after = engine.observe(desired).await;
    let check = engine.plan(desired, &after, prune);
    if let Some(w) = report::unsupported_warning(&check.unsupported) {
        eprintln!("{w}");
    }
    for w in desired.warnings() {
        eprintln!("{w}");
    }
    print!(
        "{}",
        report::reconcile_text(&applied.changes, &applied.errors, &check)
    );
    Pass { applied, check }
}

/// Continuous reconciliation: a pass every `interval`, and one as soon as the desired directory
/// changes (debounced). The directory is re-read before each pass; an invalid one is reported
/// and the last valid one kept. Each pass logs the generation it enforces (the git HEAD commit,
/// or the content hash). Ctrl-C or SIGTERM stops it after the pass in flight; a second signal
/// stops it at once.
async fn run_loop(
    cli: &Cli,
    dir: &Path,
    prune: bool,
    interval: Duration,
    listen: std::net::SocketAddr,
    counter: &Arc<CallCounter>,
) -> anyhow::Result<u8> {
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
    let mut desired =
        load_or_report(dir).context("the desired state is invalid; nothing was applied")?;
    let engine = engine_for(cli, &desired, counter).await?;
    // Registered before the first pass, so a signal during a pass is kept until it ends.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut watch =
        watch::Watch::start(dir).with_context(|| format!("cannot watch {}", dir.display()))?;
    let mut generation = watch::generation(dir, &desired.content_hash);
    loop {
        tracing::info!(%generation, "pass starting");
        let started = std::time::Instant::now();
        // A first signal lets the pass in flight finish (its changes are not cut in the middle),
        // then exits; a second one exits at once.
        let mut stopping = false;
        let pass = {
            let in_flight = reconcile_once(&engine, &desired, prune);
            tokio::pin!(in_flight);
            loop {
                tokio::select! {
                    p = &mut in_flight => break p,
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if stopping {
                    tracing::warn!("second signal: exiting without finishing the pass");
                    return Ok(EXIT_ERROR);
                }
                stopping = true;
                tracing::info!("signal: finishing the pass in flight, then exiting");
            }
        };
        status.pass(
            &generation,
            &pass.applied,
            &pass.check,
            started.elapsed().as_secs_f64(),
        );
        tracing::info!(%generation, converged = pass.converged(), "pass done");
        if stopping {
            return Ok(EXIT_OK);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = watch.changed(WATCH_QUIET) => tracing::info!("the desired directory changed"),
            _ = int.recv() => return Ok(EXIT_OK),
            _ = term.recv() => return Ok(EXIT_OK),
        }
        match load::load(dir) {
            Ok(d) => {
                generation = watch::generation(dir, &d.content_hash);
                desired = d;
                status.invalid(None);
            }
            Err(diags) => {
                for d in &diags {
                    tracing::error!("{d}");
                }
                let invalid = watch::generation(dir, "(no commit)");
                status.invalid(Some(invalid.clone()));
                tracing::error!(
                    %invalid,
                    %generation,
                    "the desired state is invalid; still enforcing the last valid one"
                );
            }
        }
    }
}

/// How long the desired directory must be quiet after a change before a pass starts: a
/// checkout writes many files.
const WATCH_QUIET: Duration = Duration::from_millis(200);
