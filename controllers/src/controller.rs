//! The one shape every resource controller has: batched observe, pure diff, apply.
//!
//! The runtime owns *when* a controller runs; a controller owns *what* its kinds look like in AWS.
//! `diff` is a pure function of the desired resource, the observed state and the resolved
//! references, so it is unit-tested without any network and can be recomputed right before
//! applying with values created earlier in the same pass.

use std::any::Any;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::change::Change;
use crate::desired::{DesiredState, Resource};
use crate::error::Result;
use crate::model::{Kind, Outputs, Refs, ResourceId};

/// What a controller needs to talk to AWS. Built once by the runtime and shared.
#[derive(Clone)]
pub struct Context {
    pub iam: aws_sdk_iam::Client,
    pub amp: aws_sdk_amp::Client,
    pub grafana: aws_sdk_grafana::Client,
    pub sts: aws_sdk_sts::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
    pub region: String,
    pub waits: Waits,
    /// The images described so far, kept for the life of the process ([`crate::ami`]).
    pub images: std::sync::Arc<crate::ami::Images>,
    /// The account id, asked of STS the first time an ARN must be built (Managed Grafana
    /// returns none), then kept for the life of the process.
    account: std::sync::Arc<tokio::sync::OnceCell<String>>,
    /// Reads several kinds need within one observation, made once (see [`Context::shared`]).
    reads: std::sync::Arc<SharedReads>,
}

/// One shared read's result, made by whichever kind asks first.
type SharedRead = std::sync::Arc<tokio::sync::OnceCell<std::sync::Arc<dyn Any + Send + Sync>>>;

/// Results of reads shared by the kinds observed together, by name.
#[derive(Default)]
struct SharedReads(std::sync::Mutex<std::collections::HashMap<&'static str, SharedRead>>);

impl Context {
    /// Clients for every service, built from one SDK configuration, each with the given
    /// interceptors (the runtime's call counter).
    pub fn new(
        sdk: &aws_config::SdkConfig,
        interceptors: Vec<aws_smithy_runtime_api::client::interceptors::SharedInterceptor>,
        waits: Waits,
    ) -> Self {
        let mut iam = aws_sdk_iam::config::Builder::from(sdk);
        let mut amp = aws_sdk_amp::config::Builder::from(sdk);
        let mut grafana = aws_sdk_grafana::config::Builder::from(sdk);
        let mut sts = aws_sdk_sts::config::Builder::from(sdk);
        let mut ec2 = aws_sdk_ec2::config::Builder::from(sdk);
        let mut ssm = aws_sdk_ssm::config::Builder::from(sdk);
        let mut autoscaling = aws_sdk_autoscaling::config::Builder::from(sdk);
        let mut elb = aws_sdk_elasticloadbalancingv2::config::Builder::from(sdk);
        let mut secrets = aws_sdk_secretsmanager::config::Builder::from(sdk);
        for i in interceptors {
            iam.push_interceptor(i.clone());
            amp.push_interceptor(i.clone());
            grafana.push_interceptor(i.clone());
            sts.push_interceptor(i.clone());
            ec2.push_interceptor(i.clone());
            ssm.push_interceptor(i.clone());
            autoscaling.push_interceptor(i.clone());
            elb.push_interceptor(i.clone());
            secrets.push_interceptor(i);
        }
        Context {
            iam: aws_sdk_iam::Client::from_conf(iam.build()),
            amp: aws_sdk_amp::Client::from_conf(amp.build()),
            grafana: aws_sdk_grafana::Client::from_conf(grafana.build()),
            sts: aws_sdk_sts::Client::from_conf(sts.build()),
            ec2: aws_sdk_ec2::Client::from_conf(ec2.build()),
            ssm: aws_sdk_ssm::Client::from_conf(ssm.build()),
            autoscaling: aws_sdk_autoscaling::Client::from_conf(autoscaling.build()),
            elb: aws_sdk_elasticloadbalancingv2::Client::from_conf(elb.build()),
            secrets: aws_sdk_secretsmanager::Client::from_conf(secrets.build()),
            region: sdk.region().map(|r| r.to_string()).unwrap_or_default(),
            waits,
            images: crate::ami::Images::new(),
            account: Default::default(),
            reads: Default::default(),
        }
    }

    /// The same clients with a fresh set of shared reads: one observation's.
    pub fn for_observation(&self) -> Context {
        Context {
            reads: Default::default(),
            ..self.clone()
        }
    }

    /// The result of `read`, made once per observation whichever kinds ask for it (the AMP
    /// workspace list serves the workspaces, their namespaces, definitions and logging). A
    /// failed read is not kept: the next caller reads again.
    pub async fn shared<T, F, Fut>(&self, name: &'static str, read: F) -> Result<std::sync::Arc<T>>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let cell = self
            .reads
            .0
            .lock()
            .expect("shared reads lock")
            .entry(name)
            .or_default()
            .clone();
        let value = cell
            .get_or_try_init(|| async {
                Ok::<_, crate::error::Error>(
                    std::sync::Arc::new(read().await?) as std::sync::Arc<dyn Any + Send + Sync>
                )
            })
            .await?
            .clone();
        Ok(value
            .downcast::<T>()
            .expect("every reader of a shared read names one type"))
    }

    /// Records the account the credentials belong to, when the runtime has asked already (it
    /// checks an assumed role's credentials before a pass).
    pub fn knows_account(&self, account: String) {
        let _ = self.account.set(account);
    }

    /// The account the credentials belong to.
    pub async fn account(&self) -> crate::error::Result<String> {
        self.account
            .get_or_try_init(|| async {
                let me = self
                    .sts
                    .get_caller_identity()
                    .send()
                    .await
                    .map_err(crate::error::aws_error("sts", "GetCallerIdentity"))?;
                Ok(me.account().unwrap_or_default().to_string())
            })
            .await
            .cloned()
    }
}

/// How long a one-shot run (`reconcile --once`, its `--verify`) waits for objects still
/// converging, and the longest pause between its looks. Controllers never wait: they answer
/// [`crate::Error::Waiting`]; only the command that must finish before it exits waits.
#[derive(Debug, Clone, Copy)]
pub struct Waits {
    /// The longest pause between two looks (`STACKWARDEN_POLL_INTERVAL`).
    pub poll: Duration,
    /// How long to keep looking (`STACKWARDEN_WAIT_TIMEOUT`).
    pub timeout: Duration,
    /// How long a refusal AWS also answers while a new object propagates
    /// ([`crate::Error::Propagating`]) is waited for, in every mode: past it, it is an error,
    /// retried with backoff (`STACKWARDEN_PROPAGATION_TIMEOUT`).
    pub propagation: Duration,
}

impl Default for Waits {
    fn default() -> Self {
        Waits {
            poll: Duration::from_secs(2),
            timeout: Duration::from_secs(600),
            propagation: Duration::from_secs(300),
        }
    }
}

/// A resource controller.
#[async_trait]
pub trait Controller: Send + Sync + 'static {
    /// Everything `observe` read, for all resources of the controller's kinds.
    type Observed: Send + Sync + 'static;
    /// One AWS write, self-contained (every reference already resolved).
    type Op: fmt::Debug + Send + Sync + 'static;

    fn kind(&self) -> Kind;

    /// Batched reads: the objects the desired state names or adopts, and every object that carries
    /// this stack's ownership tag (so removed resources are found).
    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<Self::Observed>;

    /// Attribute values of every desired resource that exists.
    fn outputs(
        &self,
        desired: &DesiredState,
        observed: &Self::Observed,
    ) -> Vec<(ResourceId, Outputs)>;

    /// Pure: the change that takes one resource from observed to desired, `None` when in sync.
    /// An error means the resource cannot be reconciled as is (e.g. its name is taken by an
    /// object stackwarden does not own).
    fn diff(
        &self,
        desired: &DesiredState,
        resource: &Resource,
        observed: &Self::Observed,
        refs: &Refs,
    ) -> Result<Option<Change<Self::Op>>>;

    /// Pure: owned objects that the desired state no longer names, orphaned or (when `prune`)
    /// deleted.
    fn removed(
        &self,
        desired: &DesiredState,
        observed: &Self::Observed,
        prune: bool,
    ) -> Vec<Change<Self::Op>>;

    /// Executes one operation. Returns attribute values it created (a new ARN), if any.
    async fn apply(&self, ctx: &Context, op: &Self::Op) -> Result<Option<Outputs>>;

    /// The bundles of files this kind pushes to instances for the desired state, as they are
    /// recorded there: what the verify of the files on hosts looks at. None for most kinds.
    fn pushes(&self, _desired: &DesiredState) -> Vec<Pushed> {
        Vec::new()
    }
}

/// A bundle of files a kind pushes to instances, and how the instances record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The instance tag holding the installed hash.
    pub tag: String,
    /// The bundle's name on the host (its manifest is `<bundle>.files`).
    pub bundle: String,
    /// The tag is named per stack (`host_config`); otherwise (`prometheus`, `grafana`) the
    /// instance must carry this stack's `stackwarden:stack` tag to be this stack's.
    pub per_stack: bool,
}

/// An operation of any controller; only the controller that made it can apply it.
pub struct AnyOp(Box<dyn Any + Send + Sync>, String);

impl fmt::Debug for AnyOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.1)
    }
}

/// Observed state of any controller.
pub type AnyObserved = Box<dyn Any + Send + Sync>;

/// [`Controller`] with its types erased, so the runtime can hold every kind in one list.
#[async_trait]
pub trait DynController: Send + Sync {
    fn kind(&self) -> Kind;
    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<AnyObserved>;
    fn outputs(&self, desired: &DesiredState, observed: &AnyObserved)
        -> Vec<(ResourceId, Outputs)>;
    fn diff(
        &self,
        desired: &DesiredState,
        resource: &Resource,
        observed: &AnyObserved,
        refs: &Refs,
    ) -> Result<Option<Change<AnyOp>>>;
    fn removed(
        &self,
        desired: &DesiredState,
        observed: &AnyObserved,
        prune: bool,
    ) -> Vec<Change<AnyOp>>;
    async fn apply(&self, ctx: &Context, op: &AnyOp) -> Result<Option<Outputs>>;
    fn pushes(&self, desired: &DesiredState) -> Vec<Pushed>;
}

fn erase<Op: fmt::Debug + Send + Sync + 'static>(op: Op) -> AnyOp {
    let shown = format!("{op:?}");
    AnyOp(Box::new(op), shown)
}

fn typed<C: Controller>(observed: &AnyObserved) -> &C::Observed {
    observed
        .downcast_ref()
        .expect("observed state handed to the controller that produced it")
}

#[async_trait]
impl<C: Controller> DynController for C {
    fn kind(&self) -> Kind {
        Controller::kind(self)
    }

    async fn observe(&self, ctx: &Context, desired: &DesiredState) -> Result<AnyObserved> {
        Ok(Box::new(Controller::observe(self, ctx, desired).await?))
    }

    fn outputs(
        &self,
        desired: &DesiredState,
        observed: &AnyObserved,
    ) -> Vec<(ResourceId, Outputs)> {
        Controller::outputs(self, desired, typed::<C>(observed))
    }

    fn diff(
        &self,
        desired: &DesiredState,
        resource: &Resource,
        observed: &AnyObserved,
        refs: &Refs,
    ) -> Result<Option<Change<AnyOp>>> {
        Ok(
            Controller::diff(self, desired, resource, typed::<C>(observed), refs)?
                .map(|c| c.map_ops(erase)),
        )
    }

    fn removed(
        &self,
        desired: &DesiredState,
        observed: &AnyObserved,
        prune: bool,
    ) -> Vec<Change<AnyOp>> {
        Controller::removed(self, desired, typed::<C>(observed), prune)
            .into_iter()
            .map(|c| c.map_ops(erase))
            .collect()
    }

    async fn apply(&self, ctx: &Context, op: &AnyOp) -> Result<Option<Outputs>> {
        let op =
            op.0.downcast_ref::<C::Op>()
                .expect("operation applied by the controller that planned it");
        Controller::apply(self, ctx, op).await
    }

    fn pushes(&self, desired: &DesiredState) -> Vec<Pushed> {
        Controller::pushes(self, desired)
    }
}
