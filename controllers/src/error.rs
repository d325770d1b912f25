//! Typed errors and the one classifier that decides whether an error is worth retrying.
//!
//! Retryable: throttling, 5xx, timeouts, dispatch failures. Terminal: everything that will fail
//! again until somebody changes the desired state or the account (validation, access denied, a
//! name taken by a resource stackwarden does not own). The runtime backs off on the first kind
//! and parks the resource on the second.

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
    /// Still converging (e.g. a workspace still CREATING); retry later.
    #[error("{0}")]
    Pending(String),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Aws { class, .. } => *class,
            Error::NotOwned(_) | Error::Invalid(_) => ErrorClass::Terminal,
            Error::Dependency(_) | Error::Pending(_) => ErrorClass::Retryable,
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
            Error::Pending(_) => "pending",
        }
    }

    /// The AWS error code, if this is an AWS error.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Aws { code, .. } => code.as_deref(),
            _ => None,
        }
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
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

const TRANSIENT_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "InternalServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "ServiceFailure",
    "ConcurrentModification",
    "ConcurrentModificationException",
    "ConflictException",
    "IDPCommunicationError",
];

/// Pure classification of a service error by its code and HTTP status.
pub fn classify_service_error(code: Option<&str>, status: Option<u16>) -> ErrorClass {
    if let Some(code) = code {
        if THROTTLING_CODES.contains(&code) {
            return ErrorClass::Throttled;
        }
        if TRANSIENT_CODES.contains(&code) {
            return ErrorClass::Retryable;
        }
    }
    match status {
        Some(429) => ErrorClass::Throttled,
        Some(s) if s >= 500 => ErrorClass::Retryable,
        _ => ErrorClass::Terminal,
    }
}

/// Classifies any SDK error: transport problems retry, construction problems never do.
pub fn classify<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> ErrorClass
where
    R: HttpStatus,
{
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => ErrorClass::Retryable,
        SdkError::ResponseError(e) => {
            classify_service_error(None, Some(e.raw().status())).max_retryable()
        }
        SdkError::ServiceError(e) => classify_service_error(e.err().code(), Some(e.raw().status())),
        SdkError::ConstructionFailure(_) => ErrorClass::Terminal,
        _ => ErrorClass::Terminal,
    }
}

impl ErrorClass {
    /// A response that could not be parsed is most likely a truncated or proxied reply: retry.
    fn max_retryable(self) -> ErrorClass {
        match self {
            ErrorClass::Terminal => ErrorClass::Retryable,
            other => other,
        }
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
            _ => aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
        };
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
            "NoSuchEntity",
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
        assert!(Error::Pending("x".into()).is_retryable());
    }
}
