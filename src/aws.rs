//! AWS plumbing: the SDK configuration (standard credential chain, region, endpoint override,
//! the stack's assumed role) and the interceptor that counts every API call by service and operation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_config::meta::region::RegionProviderChain;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sts::config::SharedCredentialsProvider;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::{Intercept, SharedInterceptor};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use stackwarden_controllers::desired::StackSpec;

/// Where and as whom to call AWS. Unset fields fall back to the standard AWS settings
/// (`AWS_REGION`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_<SERVICE>`, the shared
/// config files, instance metadata).
#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
    /// Client-side rate limits; none: the defaults.
    pub limits: Option<crate::limit::Limits>,
}

/// The region a stack acts in: its own `[stack] region` when it names one, whatever the
/// environment or the profile says; `--region` may repeat it but never contradict it. `None`:
/// the stack names none, so `--region`, then the standard chain decide.
pub fn stack_region(flag: Option<&str>, stack: Option<&str>) -> anyhow::Result<Option<String>> {
    match (flag, stack) {
        (Some(flag), Some(stack)) if flag != stack => anyhow::bail!(
            "--region {flag} contradicts the stack's region {stack} ([stack] region): a stack acts in its own region only; drop --region, or change the stack's region"
        ),
        (_, Some(stack)) => Ok(Some(stack.to_string())),
        (flag, None) => Ok(flag.map(str::to_string)),
    }
}

/// Loads the SDK configuration. The region is the stack's when it names one (see
/// [`stack_region`]); otherwise `--region`, then the standard chain (`AWS_REGION`, the profile,
/// instance metadata).
pub async fn sdk_config(
    opts: &AwsOptions,
    stack_region_setting: Option<&str>,
) -> anyhow::Result<SdkConfig> {
    let mut chain = match stack_region(opts.region.as_deref(), stack_region_setting)? {
        Some(region) => RegionProviderChain::first_try(Region::new(region)),
        None => RegionProviderChain::first_try(
            aws_config::environment::EnvironmentVariableRegionProvider::new(),
        ),
    };
    let mut profile = aws_config::profile::ProfileFileRegionProvider::builder();
    if let Some(p) = &opts.profile {
        profile = profile.profile_name(p);
    }
    chain = chain.or_else(profile.build());
    let chain = chain.or_default_provider();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(chain);
    if let Some(p) = &opts.profile {
        loader = loader.profile_name(p);
    }
    if let Some(url) = &opts.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let config = loader.load().await;
    if config.region().is_none() {
        anyhow::bail!("no AWS region: pass --region, set AWS_REGION, or set `region` in [stack]");
    }
    // Every request waits for a token of its service (our own pacing); a throttled call is
    // retried by the SDK's standard mode, with jittered exponential backoff from RETRY_BACKOFF.
    // Not the adaptive mode: its client-side rate limiter brakes the whole client toward its
    // floor whenever a share of calls is throttled, on top of our buckets. Measured with 30% of
    // calls throttled and 5% answered 500: a cold pass of the default stack took 49 times as
    // long in adaptive mode.
    let limits = opts
        .limits
        .clone()
        .unwrap_or_else(|| crate::limit::Limits::parse(&[]).expect("the defaults parse"));
    let http = config
        .http_client()
        .unwrap_or_else(crate::limit::default_https_client);
    let config = config
        .to_builder()
        .http_client(crate::limit::Limited::wrap(
            http,
            crate::limit::Buckets::new(limits),
        ))
        .retry_config(
            aws_config::retry::RetryConfig::standard()
                .with_max_attempts(max_attempts())
                .with_initial_backoff(RETRY_BACKOFF),
        )
        .build();
    Ok(config)
}

/// The configuration the stack's own calls use: `base` itself, or, when `[stack] assume_role`
/// names a role, `base` with that role's credentials, assumed (`sts:AssumeRole`, session
/// `stackwarden-<stack>`, the stack's `external_id`) with `base`'s credentials: the process's
/// own, from the standard chain or `--profile`. Every client built from it shares `base`'s
/// identity cache, so the role is assumed once and again only shortly before its credentials
/// expire. What is not the stack's (the `--lease` table) keeps using `base`.
pub async fn stack_config(base: &SdkConfig, stack: &StackSpec) -> SdkConfig {
    let Some(role) = &stack.assume_role else {
        return base.clone();
    };
    let mut provider = aws_config::sts::AssumeRoleProvider::builder(role.get_ref())
        .session_name(format!("stackwarden-{}", stack.name.get_ref()))
        .configure(base);
    if let Some(id) = &stack.external_id {
        provider = provider.external_id(id.get_ref());
    }
    let provider = provider.build().await;
    base.to_builder()
        .credentials_provider(SharedCredentialsProvider::new(provider))
        .build()
}

/// Who the stack's calls act as (one call, made once before anything is observed): the
/// account, or one message saying why AWS cannot be called: no credentials, an endpoint that
/// does not answer, a role that cannot be assumed (AWS's own words: `AccessDenied: User: ...
/// is not authorized to perform: sts:AssumeRole ...`), rather than the same failure for every
/// resource of the pass.
pub async fn caller_account(
    sts: &aws_sdk_sts::Client,
    stack: &StackSpec,
) -> anyhow::Result<String> {
    match sts.get_caller_identity().send().await {
        Ok(me) => Ok(me.account().unwrap_or_default().to_string()),
        Err(e) => {
            let why = assume_role_refusal(&e)
                .unwrap_or_else(|| stackwarden_controllers::error::chain(&e));
            match &stack.assume_role {
                Some(role) => anyhow::bail!(
                    "cannot assume role {} for stack {}: {why}",
                    role.get_ref(),
                    stack.name.get_ref()
                ),
                None => anyhow::bail!("cannot call AWS for stack {}: {why}", stack.name.get_ref()),
            }
        }
    }
}

/// STS's answer to the AssumeRole behind a failed call (`CODE: MESSAGE`), found in the error's
/// sources: the credentials provider keeps it there.
fn assume_role_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    type Refused = aws_sdk_sts::error::SdkError<
        aws_sdk_sts::operation::assume_role::AssumeRoleError,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >;
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            use aws_sdk_sts::error::ProvideErrorMetadata as _;
            return Some(match (refused.code(), refused.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                _ => stackwarden_controllers::error::chain(refused),
            });
        }
        source = e.source();
    }
    None
}

/// The first retry of a call waits up to this long (a random share of it), each next one up to
/// twice as long (the SDK caps it at 20 s). Short, because the rate limit already paces us:
/// a throttled call is one of many in flight, not a sign to slow everything down.
const RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(250);

/// Attempts per call: `AWS_MAX_ATTEMPTS` as every AWS tool reads it, else 5. The SDK's default of
/// 3 leaves a call that is throttled a third of the time failing once in 40; one pass makes
/// dozens of calls, and one failed read fails every resource of its controller for that pass.
fn max_attempts() -> u32 {
    std::env::var("AWS_MAX_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(5)
}

/// Counts API calls (each attempt that reaches the wire) by service and operation, and their
/// outcomes (`ok`, `error`, `throttled`).
#[derive(Debug, Default)]
pub struct CallCounter {
    counts: Mutex<BTreeMap<(String, String), u64>>,
    outcomes: Mutex<BTreeMap<(String, String, String), u64>>,
}

impl CallCounter {
    pub fn new() -> Arc<Self> {
        Arc::new(CallCounter::default())
    }

    pub fn interceptor(self: &Arc<Self>) -> SharedInterceptor {
        SharedInterceptor::new(Counting(self.clone()))
    }

    /// (service, operation) → calls.
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.counts.lock().expect("counter lock").clone()
    }

    /// (service, operation, outcome) → calls.
    pub fn outcomes(&self) -> BTreeMap<(String, String, String), u64> {
        self.outcomes.lock().expect("counter lock").clone()
    }
}

/// How an attempt ended, from its HTTP response: throttling errors look different in each AWS
/// protocol (EC2 `RequestLimitExceeded`, query `Throttling`, JSON `ThrottlingException`, S3-style
/// `SlowDown`, HTTP 429), so the error body is read for them.
fn outcome(status: Option<u16>, body: Option<&[u8]>) -> &'static str {
    match status {
        Some(s) if (200..300).contains(&s) => "ok",
        Some(429) => "throttled",
        Some(_) => {
            let text = String::from_utf8_lossy(body.unwrap_or_default());
            if [
                "Throttl",
                "RequestLimitExceeded",
                "TooManyRequests",
                "SlowDown",
            ]
            .iter()
            .any(|w| text.contains(w))
            {
                "throttled"
            } else {
                "error"
            }
        }
        None => "error",
    }
}

/// Whether an operation writes (everything that is not a Get, List or Describe).
pub fn is_write(operation: &str) -> bool {
    !["Get", "List", "Describe"]
        .iter()
        .any(|p| operation.starts_with(p))
}

#[derive(Debug)]
struct Counting(Arc<CallCounter>);

impl Intercept for Counting {
    fn name(&self) -> &'static str {
        "stackwarden.CallCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(m) = cfg.load::<Metadata>() {
            let key = (m.service().to_string(), m.name().to_string());
            *self
                .0
                .counts
                .lock()
                .expect("counter lock")
                .entry(key)
                .or_default() += 1;
        }
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(m) = cfg.load::<Metadata>() {
            let response = context.response();
            let outcome = outcome(
                response.map(|r| r.status().as_u16()),
                response.and_then(|r| r.body().bytes()),
            );
            let key = (
                m.service().to_string(),
                m.name().to_string(),
                outcome.to_string(),
            );
            *self
                .0
                .outcomes
                .lock()
                .expect("counter lock")
                .entry(key)
                .or_default() += 1;
        }
        Ok(())
    }
}

/// The `--stats` report.
pub fn render_stats(counter: &CallCounter) -> String {
    let snapshot = counter.snapshot();
    let total: u64 = snapshot.values().sum();
    let writes: u64 = snapshot
        .iter()
        .filter(|((_, op), _)| is_write(op))
        .map(|(_, n)| n)
        .sum();
    let mut out = format!(
        "AWS API calls: {total} ({} reads, {writes} writes)\n",
        total - writes
    );
    for ((service, op), n) in &snapshot {
        out.push_str(&format!("  {n:>5}  {service} {op}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{outcome, stack_region};

    #[test]
    fn throttling_is_recognised_in_every_protocols_shape() {
        let ec2 = b"<Response><Errors><Error><Code>RequestLimitExceeded</Code></Error></Errors></Response>";
        let query = b"<ErrorResponse><Error><Code>Throttling</Code></Error></ErrorResponse>";
        let json = br#"{"__type":"ThrottlingException","message":"slow down"}"#;
        for body in [&ec2[..], &query[..], &json[..]] {
            assert_eq!(outcome(Some(400), Some(body)), "throttled");
        }
        assert_eq!(outcome(Some(503), Some(&ec2[..])), "throttled");
        assert_eq!(outcome(Some(429), None), "throttled");
        assert_eq!(
            outcome(Some(400), Some(br#"{"__type":"ValidationException"}"#)),
            "error"
        );
        assert_eq!(outcome(Some(200), None), "ok");
        assert_eq!(outcome(None, None), "error");
    }

    #[test]
    fn the_stacks_region_is_authoritative() {
        assert_eq!(
            stack_region(None, Some("us-east-1")).unwrap().as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            stack_region(Some("us-east-1"), Some("us-east-1"))
                .unwrap()
                .as_deref(),
            Some("us-east-1")
        );
        let e = stack_region(Some("eu-west-1"), Some("us-east-1")).unwrap_err();
        assert!(e.to_string().contains("eu-west-1") && e.to_string().contains("us-east-1"));
        assert_eq!(
            stack_region(Some("eu-west-1"), None).unwrap().as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(stack_region(None, None).unwrap(), None);
    }
}
