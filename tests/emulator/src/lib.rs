//! An AWS emulator for the APIs moto lacks, in front of moto.
//!
//! It listens on loopback and serves, in their real wire formats:
//! - Amazon Managed Grafana workspaces, tags and permissions (`grafana`, restJson1);
//! - AMP alertmanager definitions (`aps`, restJson1; the rest of AMP is moto's);
//! - SSM Run Command that really runs `AWS-RunShellScript` in a sandbox directory per instance
//!   (`ssm`, awsJson1.1; the rest of SSM is moto's);
//! - Auto Scaling instance refresh (`autoscaling`, awsQuery; the rest is moto's);
//! - EC2 `DescribeImages`, over moto's images and the public images a test publishes
//!   (`images.rs`).
//!
//! Every other request goes to moto unchanged. Requests are routed by the service named in the
//! SigV4 credential scope (grafana and aps share paths such as `/workspaces`), then by
//! `X-Amz-Target` (JSON protocols) or `Action` (query protocols). Tests can make chosen
//! operations throttle, fail, slow down or drop the connection ([`Fault`]).
//!
//! The emulator is test support: it keeps its state in memory, trusts every caller and checks
//! no signature. It must not grow features the operator does not exercise.

mod admin;
mod agent;
mod alertmanager;
mod assume;
mod authorize;
mod consistency;
mod faults;
mod grafana;
mod images;
mod moto;
mod refresh;
mod route;
mod ssm;
mod strict;
mod tokens;
mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

pub use authorize::Enforce;
pub use faults::{Fault, FaultKind};
pub use images::PublicImage;
pub use moto::Backend;
pub use route::Call;

/// What an instance without a sandbox does with a command sent to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Unsandboxed {
    /// Report Success without running anything (what moto does for every command).
    #[default]
    Succeed,
    /// Report Failed, with an explanation on stderr.
    Fail,
}

/// How an instance refresh ends once it has had its `refresh_polls` looks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", deny_unknown_fields)]
pub enum RefreshOutcome {
    /// The group takes the refresh's desired configuration and each instance it had when the
    /// refresh started is replaced from it.
    #[default]
    Successful,
    /// Ends `Failed` with `reason` as its `StatusReason`: no instance replaced, the group's
    /// configuration unchanged.
    Failed { reason: String },
    /// Ends `RollbackSuccessful` with `reason` as its `StatusReason`: the group and its
    /// instances as before the refresh.
    RollbackSuccessful { reason: String },
}

/// Tunables, changeable while running ([`Emulator::configure`], `PUT /_emulator/settings`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How long asynchronous transitions take: a Managed Grafana workspace CREATING, UPDATING or
    /// DELETING, an alertmanager definition CREATING, UPDATING or DELETING.
    #[serde(with = "millis")]
    pub transition_delay: Duration,
    /// How many DescribeInstanceRefreshes calls a refresh takes to end.
    pub refresh_polls: u32,
    /// How the refreshes that end from now on end (`{"status": "Failed", "reason": "..."}`).
    pub refresh_outcome: RefreshOutcome,
    /// When set, every instance without an explicit sandbox gets `<dir>/<instance-id>`.
    pub sandbox_dir: Option<PathBuf>,
    /// When set (and `sandbox_dir` is not), every instance without an explicit sandbox runs in
    /// this one directory: for tests with one host whose id is not known in advance.
    pub shared_sandbox: Option<PathBuf>,
    /// Environment for every command run in a sandbox.
    pub sandbox_env: BTreeMap<String, String>,
    /// What happens to commands sent to an instance without a sandbox.
    pub unsandboxed: Unsandboxed,
    /// Seed of the random numbers that decide which calls a rate-based fault hits.
    pub seed: u64,
    /// How long after `CreateInstanceProfile` RunInstances still refuses the new profile (IAM
    /// is eventually consistent).
    #[serde(with = "millis")]
    pub profile_propagation: Duration,
    /// How long after `CreateRole` or `CreateUser` a trust policy naming the new ARN is
    /// refused with `MalformedPolicyDocument` (IAM is eventually consistent).
    #[serde(with = "millis")]
    pub principal_propagation: Duration,
    /// How long after `RunInstances` SSM does not know the new instance (its agent has not
    /// registered): SendCommand naming it fails with `InvalidInstanceId`.
    #[serde(with = "millis")]
    pub ssm_registration: Duration,
    /// Instances SSM does not manage (no agent, no instance role): SendCommand naming one
    /// fails as a whole with `InvalidInstanceId`, DescribeInstanceInformation leaves them out,
    /// and targets by tag skip them.
    pub unmanaged: BTreeSet<String>,
    /// Instances whose invocations end `Delivery Timed Out` (the agent never picked the
    /// command up): status TimedOut, not counted against MaxErrors.
    pub undelivered: BTreeSet<String>,
    /// How long after `RunInstances` DescribeInstances leaves the new instance out (the EC2
    /// API is eventually consistent).
    #[serde(with = "millis")]
    pub listing_lag: Duration,
    /// How long after `DeleteLoadBalancer` its network interfaces stay in its security
    /// groups: `DeleteSecurityGroup` of one fails with `DependencyViolation` meanwhile.
    #[serde(with = "millis")]
    pub interface_release: Duration,

    /// Holds the calls signed with one access key to an IAM policy, evaluated as IAM does
    /// (`authorize.rs`): what it does not allow is refused with AWS's access-denied error.
    pub enforce: Option<Enforce>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            transition_delay: Duration::from_millis(200),
            refresh_polls: 3,
            refresh_outcome: RefreshOutcome::Successful,
            sandbox_dir: None,
            shared_sandbox: None,
            sandbox_env: BTreeMap::new(),
            unsandboxed: Unsandboxed::Succeed,
            seed: 1,
            profile_propagation: Duration::ZERO,
            principal_propagation: Duration::ZERO,
            ssm_registration: Duration::ZERO,
            unmanaged: BTreeSet::new(),
            undelivered: BTreeSet::new(),
            listing_lag: Duration::ZERO,
            interface_release: Duration::ZERO,
            enforce: None,
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// The directory and environment one emulated instance runs its commands in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sandbox {
    /// Becomes `$STACKWARDEN_ROOT` and the working directory of the commands.
    pub root: PathBuf,
    /// Added to the environment of the commands, over [`Settings::sandbox_env`].
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Shared state of a running emulator.
pub(crate) struct State {
    /// Where the emulator listens: the endpoint the sandboxes' AWS CLI calls.
    endpoint: String,
    /// The directory of the `moto_server` the emulator started, whose virtualenv also holds
    /// the AWS CLI (`aws`) that pushed scripts run in the sandboxes.
    tools: Option<PathBuf>,
    settings: Mutex<Settings>,
    sandboxes: Mutex<BTreeMap<String, Sandbox>>,
    pub(crate) moto: moto::Moto,
    pub(crate) grafana: Mutex<grafana::Store>,
    pub(crate) images: Mutex<images::Store>,
    pub(crate) alertmanager: Mutex<alertmanager::Store>,
    pub(crate) ssm: ssm::RunCommand,
    pub(crate) refresh: Mutex<refresh::Store>,
    pub(crate) strict: Mutex<strict::Store>,
    pub(crate) tokens: Mutex<tokens::Store>,
    pub(crate) consistency: Mutex<consistency::Store>,
    /// Held while a create with a client token is served: a repeat arriving while the first
    /// call is still with moto waits for its answer instead of making a second object.
    pub(crate) token_creates: tokio::sync::Mutex<()>,
    pub(crate) faults: Mutex<faults::Faults>,
    pub(crate) calls: Mutex<Vec<Call>>,
}

/// Locks a mutex, ignoring poisoning: a panic in one request must not wedge the emulator.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    pub(crate) fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    /// The sandbox of an instance: registered, or automatic under `sandbox_dir`.
    pub(crate) fn sandbox(&self, instance: &str) -> Option<Sandbox> {
        let settings = self.settings();
        let explicit = lock(&self.sandboxes).get(instance).cloned();
        let automatic = settings
            .sandbox_dir
            .map(|dir| dir.join(instance))
            .or(settings.shared_sandbox);
        let mut sandbox = explicit.or_else(|| {
            automatic.map(|root| Sandbox {
                root,
                env: BTreeMap::new(),
            })
        })?;
        let mut env = self.instance_env(instance);
        env.append(&mut settings.sandbox_env.clone());
        env.append(&mut sandbox.env);
        sandbox.env = env;
        Some(sandbox)
    }

    /// What an instance's own AWS CLI sees: this emulator as its endpoint, credentials of its
    /// own (as its instance role would give it; [`instance_access_key`]), no instance metadata
    /// and no config files of the machine running the tests ([`NOT_INHERITED`] goes too).
    fn instance_env(&self, instance: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::from([
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), instance_access_key(instance)),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                "instance-role-secret".into(),
            ),
            (
                "AWS_SESSION_TOKEN".into(),
                format!("instance-role-{instance}"),
            ),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
        ]);
        if let Some(tools) = &self.tools {
            let path = std::env::var("PATH").unwrap_or_default();
            env.insert("PATH".into(), format!("{}:{path}", tools.display()));
        }
        env
    }
}

/// Variables of the machine running the tests that a sandboxed command does not inherit: a
/// script names the stack's region, and no profile of this machine is the instance's.
pub(crate) const NOT_INHERITED: &[&str] = &["AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"];

/// The access key id an instance's commands call AWS with (as from its instance role), by
/// which [`Call::caller`] tells the hosts' calls from the operator's.
pub fn instance_access_key(instance: &str) -> String {
    let id: String = instance
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_uppercase();
    format!("ASIA{id}")
}

/// Where the emulator listens and which moto it fronts.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub backend: Backend,
    pub settings: Settings,
}

/// A running emulator, served from its own thread and runtime (so it keeps serving while a test
/// blocks on a child process). Dropping it stops the server and the moto it started.
pub struct Emulator {
    endpoint: String,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _moto: moto::Process,
}

impl Emulator {
    /// Starts moto (or connects to a running one), binds, and serves in the background.
    pub fn start(config: Config) -> anyhow::Result<Emulator> {
        let (moto_process, moto_url) = moto::Process::start(&config.backend)?;
        let listener = std::net::TcpListener::bind(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        listener.set_nonblocking(true)?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let tools = match &config.backend {
            Backend::Spawn(program) => program.parent().map(PathBuf::from),
            Backend::Url(_) => None,
        };
        let state = Arc::new(State {
            endpoint: endpoint.clone(),
            tools,
            settings: Mutex::new(config.settings.clone()),
            sandboxes: Mutex::new(BTreeMap::new()),
            moto: moto::Moto::new(moto_url),
            grafana: Mutex::default(),
            images: Mutex::default(),
            alertmanager: Mutex::default(),
            ssm: ssm::RunCommand::default(),
            refresh: Mutex::default(),
            strict: Mutex::default(),
            tokens: Default::default(),
            consistency: Default::default(),
            token_creates: tokio::sync::Mutex::new(()),
            faults: Mutex::new(faults::Faults::new(config.settings.seed)),
            calls: Mutex::default(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("emulator")
            .build()?;
        let thread = std::thread::Builder::new()
            .name("emulator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("register the listener with the runtime");
                    let app = route::router(served);
                    let shutdown = async {
                        let _ = rx.await;
                    };
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                    {
                        tracing::error!("emulator server failed: {e}");
                    }
                });
                // Commands still running in sandboxes are killed with the runtime.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Emulator {
            endpoint,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
            _moto: moto_process,
        })
    }

    /// The URL to give the operator as `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The moto behind this emulator.
    pub fn moto_endpoint(&self) -> &str {
        self.state.moto.url()
    }

    /// Runs the commands sent to `instance` in `sandbox`.
    pub fn set_sandbox(&self, instance: &str, sandbox: Sandbox) {
        lock(&self.state.sandboxes).insert(instance.to_string(), sandbox);
    }

    /// Publishes a public image (as Canonical publishes Ubuntu's): DescribeImages lists it to
    /// every account of its region. Its id.
    pub fn publish_image(&self, image: PublicImage) -> String {
        lock(&self.state.images).publish(image)
    }

    /// Changes settings while running.
    pub fn configure(&self, change: impl FnOnce(&mut Settings)) {
        let mut settings = lock(&self.state.settings);
        change(&mut settings);
        lock(&self.state.faults).reseed(settings.seed);
    }

    /// Adds a fault; faults are tried in the order they were added.
    pub fn inject(&self, fault: Fault) {
        lock(&self.state.faults).add(fault);
    }

    /// How many calls each fault has hit so far, in the order they were added. A fault decides
    /// as a call arrives, so a test can wait on this for a call a latency fault holds.
    pub fn fault_hits(&self) -> Vec<u32> {
        lock(&self.state.faults).hits()
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        lock(&self.state.faults).clear();
    }

    /// Every request received so far, in order, with how it was answered.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state.calls).clone()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
