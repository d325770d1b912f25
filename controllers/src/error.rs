//! Typed errors and the one classifier that decides whether an error is worth retrying.
//!
//! An AWS error retries unless it is known to be permanent: only the codes listed in
//! [`PERMANENT_CODES`] (validation, access denied, a quota reached) and [`NAME_TAKEN_CODES`] park a
//! resource until its desired state changes. Everything else, an error code this version has
//! never heard of included, backs off and retries: parking on an unknown code would turn one
//! odd answer into an outage, while retrying an unfixable call costs a few reads an hour.
//! Throttling is recognised apart (it is counted); AWS's eventual consistency right after a
//! create ([`EVENTUALLY_CONSISTENT`]: an instance profile RunInstances or Auto Scaling does not
//! know yet, a principal a trust policy names) is waited for even though its code is a
//! validation code.

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::model::ResourceId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Try again later: the same call may succeed.
    Retryable,
    /// Throttled by AWS: retryable, counted separately.
    Throttled,
    /// Will fail again until the desired state or the account changes.
    Terminal,
    /// Not a failure: the object is still converging (a workspace CREATING, a definition being
    /// checked); look again after the time the error names.
    Waiting,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An AWS call failed.
    #[error("{service}:{operation} failed: {message}")]
    Aws {
        service: &'static str,
        operation: &'static str,
        code: Option<String>,
        class: ErrorClass,
        message: String,
    },
    /// A resource with the desired name exists but carries no stackwarden ownership tags.
    #[error("{0}")]
    NotOwned(String),
    /// The desired state cannot be applied as written (caught at apply time, e.g. a referenced
    /// value that is not a valid ARN).
    #[error("{0}")]
    Invalid(String),
    /// A resource this one references failed or does not exist yet.
    #[error("waiting for {0}, which it references and which is not ready")]
    Dependency(ResourceId),
    /// Not looked at or not written in this pass (its kind was not observed, the lease was
    /// lost): retried by the next one.
    #[error("{0}")]
    Skipped(String),
    /// AWS reports that a change it was carrying out for this resource ended without success
    /// (an instance refresh that ended `Failed`): nothing is started again by itself. It is
    /// retried with backoff, and a retry only reads the outcome again, so a fix made by hand
    /// (a refresh started again) is seen without a change of the desired state.
    #[error("{0}")]
    Failed(String),
    /// A call AWS refused as it refuses one naming an object it has not propagated yet
    /// ([`EVENTUALLY_CONSISTENT`]): waited for like [`Error::Waiting`], for a bounded time
    /// ([`crate::controller::Waits::propagation`]), since the same refusal also means the object
    /// named does not exist at all.
    #[error("waiting: {what} (a new object AWS is still propagating)")]
    Propagating { what: String },
    /// Still converging, and known to be: look again after `after` (kube-runtime's
    /// `Action::requeue`). Returned instead of polling, so nothing else waits meanwhile.
    #[error("waiting: {what}")]
    Waiting {
        what: String,
        after: std::time::Duration,
    },
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Aws { class, .. } => *class,
            Error::NotOwned(_) | Error::Invalid(_) => ErrorClass::Terminal,
            Error::Dependency(_) | Error::Skipped(_) | Error::Failed(_) => ErrorClass::Retryable,
            Error::Waiting { .. } | Error::Propagating { .. } => ErrorClass::Waiting,
        }
    }

    /// Still converging: look again after this long.
    pub fn waiting(what: impl Into<String>, after: std::time::Duration) -> Error {
        Error::Waiting {
            what: what.into(),
            after,
        }
    }

    /// For [`Error::Waiting`], when to look again.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Waiting { after, .. } => Some(*after),
            Error::Propagating { .. } => Some(PROPAGATION),
            _ => None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class() != ErrorClass::Terminal
    }

    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Aws {
                class: ErrorClass::Throttled,
                ..
            } => "throttled",
            Error::Aws {
                class: ErrorClass::Retryable,
                ..
            } => "aws_retryable",
            Error::Aws { .. } => "aws_terminal",
            Error::NotOwned(_) => "not_owned",
            Error::Invalid(_) => "invalid",
            Error::Dependency(_) => "dependency",
            Error::Skipped(_) => "skipped",
            Error::Failed(_) => "failed",
            Error::Waiting { .. } | Error::Propagating { .. } => "waiting",
        }
    }

    /// The AWS error code, if this is an AWS error.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Aws { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Whether AWS refused a create because an object of the name exists.
    pub fn is_name_taken(&self) -> bool {
        self.code().is_some_and(|c| NAME_TAKEN_CODES.contains(&c))
    }
}

const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// Codes that mean "this call will fail again until the desired state or the account changes".
/// The only errors that park a resource; the README lists them for users.
pub const PERMANENT_CODES: &[&str] = &[
    // The request is invalid as written.
    "ValidationError",
    "ValidationException",
    "InvalidParameterValue",
    "InvalidParameterValueException",
    "InvalidParameterCombination",
    "InvalidParameter",
    "InvalidParameterException",
    "InvalidInput",
    "InvalidRequest",
    "InvalidRequestException",
    "MissingParameter",
    // A Run Command over the 64 KB a document may have.
    "MaxDocumentSizeExceeded",
    "MalformedPolicyDocument",
    "MalformedPolicyDocumentException",
    "InvalidAMIID.Malformed",
    "InvalidSubnetID.NotFound",
    "InvalidKeyPair.NotFound",
    // A security group rule naming a managed prefix list that does not exist.
    "InvalidPrefixListID.NotFound",
    "UnsupportedOperation",
    "ValidationErrorException",
    // Not allowed.
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "NotAuthorized",
    "AuthFailure",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "OptInRequired",
    // A quota is reached.
    "LimitExceeded",
    "ServiceQuotaExceededException",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "VolumeLimitExceeded",
    "ResourceLimitExceeded",
    "TooManyLoadBalancers",
    "TooManyTargetGroups",
    "RulesPerSecurityGroupLimitExceeded",
    "SecurityGroupLimitExceeded",
];

/// Codes of a create refused because an object of the name exists: permanent when the
/// object is someone else's. Discovery by tags runs before every create, so stackwarden's own
/// objects are never created twice; one made by an earlier run that is not yet listed (the
/// run was killed before it saw the answer) is told apart by its tags ([`Error::is_name_taken`]
/// and the managed-object layer's look at the named object).
pub const NAME_TAKEN_CODES: &[&str] = &[
    "EntityAlreadyExists",
    "AlreadyExists",
    "AlreadyExistsFault",
    "DuplicateLoadBalancerName",
    "DuplicateTargetGroupName",
    "DuplicateListener",
    "InvalidGroup.Duplicate",
    "InvalidLaunchTemplateName.AlreadyExistsException",
    "ResourceAlreadyExistsException",
];

/// Errors whose code is a validation code but that AWS answers for a few seconds after a
/// create, while the new object propagates: `(code, words in the message)`. They retry.
pub const EVENTUALLY_CONSISTENT: &[(&str, &str)] = &[
    // RunInstances with an instance profile created seconds ago ("Value (NAME) for parameter
    // iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name", or "... ARN").
    ("InvalidParameterValue", "Invalid IAM Instance Profile"),
    // CreateAutoScalingGroup and UpdateAutoScalingGroup with a launch template naming such a
    // profile: "You must use a valid fully-formed launch template. Value (NAME) for parameter
    // iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name".
    ("ValidationError", "Invalid IAM Instance Profile"),
    // A trust policy (CreateRole, UpdateAssumeRolePolicy) naming a role or user created
    // seconds ago: "Invalid principal in policy: \"AWS\":\"arn:aws:iam::...\"".
    ("MalformedPolicyDocument", "Invalid principal in policy"),
    // A new role not yet assumable by the service that is to assume it.
    ("InvalidParameterValue", "cannot be assumed"),
    ("ValidationError", "cannot be assumed"),
    ("InvalidParameterValueException", "cannot be assumed"),
    ("ValidationException", "cannot be assumed"),
];

/// How long to wait before trying again a call that met AWS's eventual consistency.
pub const PROPAGATION: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether an error is AWS's eventual consistency right after a create.
fn propagating(code: &str, message: &str) -> bool {
    EVENTUALLY_CONSISTENT
        .iter()
        .any(|(c, words)| *c == code && message.contains(words))
}

/// Pure classification of a service error by its code and HTTP status.
pub fn classify_service_error(code: Option<&str>, status: Option<u16>) -> ErrorClass {
    classify_service_message(code, status, "")
}

/// [`classify_service_error`], with the message for the errors AWS answers while a new object
/// propagates.
pub fn classify_service_message(
    code: Option<&str>,
    status: Option<u16>,
    message: &str,
) -> ErrorClass {
    if status == Some(429) {
        return ErrorClass::Throttled;
    }
    let Some(code) = code else {
        return ErrorClass::Retryable;
    };
    if THROTTLING_CODES.contains(&code) {
        return ErrorClass::Throttled;
    }
    let permanent = PERMANENT_CODES.contains(&code) || NAME_TAKEN_CODES.contains(&code);
    if permanent && !propagating(code, message) {
        ErrorClass::Terminal
    } else {
        ErrorClass::Retryable
    }
}

/// Classifies any SDK error: transport problems retry, construction problems never do.
pub fn classify<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> ErrorClass
where
    R: HttpStatus,
{
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => ErrorClass::Retryable,
        // A response that could not be parsed is most likely a truncated or proxied reply.
        SdkError::ResponseError(e) => classify_service_error(None, Some(e.raw().status())),
        SdkError::ServiceError(e) => classify_service_message(
            e.err().code(),
            Some(e.raw().status()),
            e.err().message().unwrap_or_default(),
        ),
        SdkError::ConstructionFailure(_) => ErrorClass::Terminal,
        _ => ErrorClass::Retryable,
    }
}

/// The HTTP status of a raw response, whatever the response type.
pub trait HttpStatus {
    fn status(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Converts an SDK error into an [`Error`] naming the call that failed.
/// An error and its sources as one line, `dispatch failure: io error: ...: Connection refused
/// (os error 111)`: each message once, never the `Debug` dump the SDK's own display appends.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let message = s.to_string();
        if !parts.iter().any(|p| p.contains(&message)) {
            parts.push(message);
        }
        source = s.source();
    }
    parts.join(": ")
}

pub fn aws_error<E, R>(
    service: &'static str,
    operation: &'static str,
) -> impl FnOnce(SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: HttpStatus + std::fmt::Debug,
{
    move |err| {
        let class = classify(&err);
        let code = err.code().map(str::to_string);
        let message = match (&err, err.message()) {
            (SdkError::ServiceError(_), Some(m)) => {
                format!("{}: {m}", code.as_deref().unwrap_or("error"))
            }
            _ => chain(&err),
        };
        // A new object AWS has not propagated yet: the object is converging, not failing.
        if let (Some(c), Some(m)) = (err.code(), err.message()) {
            if propagating(c, m) {
                return Error::Propagating {
                    what: format!("{service}:{operation}: {message}"),
                };
            }
        }
        Error::Aws {
            service,
            operation,
            code,
            class,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_codes_are_throttled_in_every_protocol() {
        for code in ["Throttling", "ThrottlingException", "RequestLimitExceeded"] {
            assert_eq!(
                classify_service_error(Some(code), Some(400)),
                ErrorClass::Throttled
            );
        }
        assert_eq!(
            classify_service_error(None, Some(429)),
            ErrorClass::Throttled
        );
    }

    #[test]
    fn unknown_codes_retry_and_only_known_permanent_ones_park() {
        for code in ["SomethingNewException", "NoSuchEntity", "InvalidInstanceId"] {
            assert_eq!(
                classify_service_error(Some(code), Some(400)),
                ErrorClass::Retryable,
                "{code}"
            );
        }
        for code in [
            "EntityAlreadyExists",
            "AlreadyExists",
            "LimitExceeded",
            "UnauthorizedOperation",
        ] {
            assert_eq!(
                classify_service_error(Some(code), Some(400)),
                ErrorClass::Terminal,
                "{code}"
            );
        }
    }

    #[test]
    fn a_new_instance_profile_not_yet_known_to_ec2_retries() {
        assert_eq!(
            classify_service_message(
                Some("InvalidParameterValue"),
                Some(400),
                "Value (demo-prometheus) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"
            ),
            ErrorClass::Retryable
        );
        assert_eq!(
            classify_service_message(Some("InvalidParameterValue"), Some(400), "bad type"),
            ErrorClass::Terminal
        );
    }

    #[test]
    fn a_new_instance_profile_not_yet_known_to_auto_scaling_retries_in_both_forms() {
        for message in [
            "You must use a valid fully-formed launch template. Value (demo-grafana) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name",
            "You must use a valid fully-formed launch template. Value (arn:aws:iam::123456789012:instance-profile/demo-grafana) for parameter iamInstanceProfile.arn is invalid. Invalid IAM Instance Profile ARN",
        ] {
            assert_eq!(
                classify_service_message(Some("ValidationError"), Some(400), message),
                ErrorClass::Retryable,
                "{message}"
            );
        }
        assert_eq!(
            classify_service_message(
                Some("ValidationError"),
                Some(400),
                "Max bound, 1, must be greater than or equal to min bound, 2"
            ),
            ErrorClass::Terminal
        );
    }

    #[test]
    fn a_trust_policy_naming_a_new_principal_retries_other_malformed_policies_park() {
        assert_eq!(
            classify_service_message(
                Some("MalformedPolicyDocument"),
                Some(400),
                "Invalid principal in policy: \"AWS\":\"arn:aws:iam::123456789012:role/demo-reader\""
            ),
            ErrorClass::Retryable
        );
        assert_eq!(
            classify_service_message(
                Some("MalformedPolicyDocument"),
                Some(400),
                "Syntax errors in policy."
            ),
            ErrorClass::Terminal
        );
    }

    #[test]
    fn server_errors_retry_and_client_errors_do_not() {
        assert_eq!(
            classify_service_error(Some("InternalFailure"), Some(500)),
            ErrorClass::Retryable
        );
        assert_eq!(
            classify_service_error(None, Some(503)),
            ErrorClass::Retryable
        );
        for code in [
            "ValidationException",
            "AccessDenied",
            "AccessDeniedException",
            "MalformedPolicyDocument",
        ] {
            assert_eq!(
                classify_service_error(Some(code), Some(400)),
                ErrorClass::Terminal,
                "{code}"
            );
        }
    }

    #[test]
    fn not_owned_and_invalid_are_terminal_dependency_waits() {
        assert!(!Error::NotOwned("x".into()).is_retryable());
        assert!(!Error::Invalid("x".into()).is_retryable());
        assert!(Error::Skipped("x".into()).is_retryable());
    }
}
