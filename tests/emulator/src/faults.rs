//! Faults injected on chosen operations: throttling and server errors in each protocol's own
//! shape, added latency, and dropped connections. Rate-based faults draw from a seeded
//! generator so a failing test can be replayed.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::wire::ApiError;

/// One fault rule: which calls it hits and what they get.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Signing name (`ec2`, `ssm`, `grafana`, ...); none: every service.
    #[serde(default)]
    pub service: Option<String>,
    /// Operation name (`SendCommand`, `DescribeInstances`, ...); none: every operation.
    #[serde(default)]
    pub operation: Option<String>,
    pub kind: FaultKind,
    /// The share of matching calls hit, from 0 to 1.
    #[serde(default = "always")]
    pub rate: f64,
    /// Hit at most this many calls, then stop.
    #[serde(default)]
    pub count: Option<u32>,
    /// Only calls that change state (not Get, List or Describe; for REST APIs, not GET).
    #[serde(default)]
    pub writes_only: bool,
    /// Let this many matching calls through untouched before hitting any.
    #[serde(default)]
    pub skip: u32,
}

fn always() -> f64 {
    1.0
}

impl Fault {
    /// Every matching call fails with `kind`.
    pub fn on(service: &str, operation: &str, kind: FaultKind) -> Fault {
        Fault {
            service: Some(service.into()),
            operation: Some(operation.into()),
            kind,
            rate: 1.0,
            count: None,
            writes_only: false,
            skip: 0,
        }
    }

    /// Every call of every service fails with `kind`.
    pub fn everywhere(kind: FaultKind) -> Fault {
        Fault {
            service: None,
            operation: None,
            ..Fault::on("", "", kind)
        }
    }

    /// Every write call (of any service) after the first `skip` gets `kind`.
    pub fn writes_after(skip: u32, kind: FaultKind) -> Fault {
        Fault {
            writes_only: true,
            skip,
            ..Fault::everywhere(kind)
        }
    }

    pub fn times(mut self, count: u32) -> Fault {
        self.count = Some(count);
        self
    }

    pub fn rate(mut self, rate: f64) -> Fault {
        self.rate = rate;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum FaultKind {
    /// The protocol's throttling error: EC2 `RequestLimitExceeded` (503), query `Throttling`
    /// (400), JSON `ThrottlingException` (400), REST `ThrottlingException` (429).
    Throttle,
    /// A server error with this status (500 or 503), in the protocol's shape.
    ServerError { status: u16 },
    /// The call is answered normally after this delay.
    Latency { millis: u64 },
    /// The connection is dropped before an answer.
    Reset,
}

/// What a fault does to one call.
pub(crate) enum Outcome {
    Answer(ApiError),
    Delay(Duration),
    Reset,
}

pub(crate) struct Faults {
    /// Each rule with the matching calls it let through (`skip`) and the calls it hit.
    rules: Vec<(Fault, u32, u32)>,
    rng: fastrand::Rng,
}

impl Faults {
    pub fn new(seed: u64) -> Faults {
        Faults {
            rules: Vec::new(),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub fn reseed(&mut self, seed: u64) {
        self.rng = fastrand::Rng::with_seed(seed);
    }

    pub fn add(&mut self, fault: Fault) {
        self.rules.push((fault, 0, 0));
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn list(&self) -> Vec<Fault> {
        self.rules.iter().map(|(f, _, _)| f.clone()).collect()
    }

    /// How many calls each fault has hit, in the order they were added.
    pub fn hits(&self) -> Vec<u32> {
        self.rules.iter().map(|(_, _, hits)| *hits).collect()
    }

    /// The fault, if any, for one call: the first rule that matches and fires.
    pub fn pick(&mut self, service: &str, operation: &str, write: bool) -> Option<Outcome> {
        for (fault, skipped, hits) in &mut self.rules {
            let matches = fault.service.as_deref().is_none_or(|s| s == service)
                && fault.operation.as_deref().is_none_or(|o| o == operation)
                && (write || !fault.writes_only);
            if !matches || fault.count.is_some_and(|c| *hits >= c) {
                continue;
            }
            if *skipped < fault.skip {
                *skipped += 1;
                continue;
            }
            if fault.rate < 1.0 && self.rng.f64() >= fault.rate {
                continue;
            }
            *hits += 1;
            return Some(match &fault.kind {
                FaultKind::Throttle => Outcome::Answer(throttle(service)),
                FaultKind::ServerError { status } => {
                    Outcome::Answer(server_error(service, *status))
                }
                FaultKind::Latency { millis } => Outcome::Delay(Duration::from_millis(*millis)),
                FaultKind::Reset => Outcome::Reset,
            });
        }
        None
    }
}

/// Throttling as each service reports it (the status and code; the protocol decides where they
/// go).
fn throttle(service: &str) -> ApiError {
    match service {
        "ec2" => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ),
        "iam" | "autoscaling" | "elasticloadbalancing" | "sts" => {
            ApiError::bad_request("Throttling", "Rate exceeded")
        }
        "grafana" | "aps" => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "Rate exceeded",
        ),
        _ => ApiError::bad_request("ThrottlingException", "Rate exceeded"),
    }
}

fn server_error(service: &str, status: u16) -> ApiError {
    let unavailable = status == 503;
    let code = match (service, unavailable) {
        ("ec2", true) => "Unavailable",
        ("ec2", false) => "InternalError",
        ("ssm", false) => "InternalServerError",
        ("grafana" | "aps", false) => "InternalServerException",
        (_, true) => "ServiceUnavailable",
        (_, false) => "InternalFailure",
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    ApiError::new(status, code, "injected server error")
}

/// An answer whose body fails after the headers: the server drops the connection, and the
/// client sees it cut in the middle of the response.
pub(crate) fn reset() -> Response {
    let cut = futures::stream::once(async {
        Err::<bytes::Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected connection reset",
        ))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_LENGTH, "1024")
        .body(Body::from_stream(cut))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_fault_stops_after_its_count() {
        let mut faults = Faults::new(1);
        faults.add(Fault::on("ssm", "SendCommand", FaultKind::Throttle).times(2));
        assert!(faults.pick("ssm", "SendCommand", true).is_some());
        assert!(faults.pick("ssm", "ListCommands", false).is_none());
        assert!(faults.pick("ssm", "SendCommand", true).is_some());
        assert!(faults.pick("ssm", "SendCommand", true).is_none());
    }

    #[test]
    fn a_write_fault_lets_its_skip_through_then_hits_writes_only() {
        let mut faults = Faults::new(1);
        faults.add(Fault::writes_after(2, FaultKind::Reset));
        assert!(faults.pick("iam", "CreateRole", true).is_none());
        assert!(faults.pick("iam", "GetRole", false).is_none());
        assert!(faults.pick("aps", "", true).is_none());
        assert!(faults.pick("ec2", "DescribeInstances", false).is_none());
        assert!(faults.pick("ec2", "RunInstances", true).is_some());
        assert!(faults.pick("iam", "TagRole", true).is_some());
    }

    #[test]
    fn a_rate_hits_about_that_share_and_replays_with_the_seed() {
        let run = |seed| {
            let mut faults = Faults::new(seed);
            faults.add(Fault::on("ec2", "RunInstances", FaultKind::Throttle).rate(0.3));
            (0..1000)
                .map(|_| faults.pick("ec2", "RunInstances", true).is_some())
                .collect::<Vec<_>>()
        };
        let hits = run(7).iter().filter(|h| **h).count();
        assert!(
            (200..400).contains(&hits),
            "{hits} hits of 1000 at rate 0.3"
        );
        assert_eq!(run(7), run(7));
    }

    #[test]
    fn throttling_takes_each_services_shape() {
        assert_eq!(throttle("ec2").code, "RequestLimitExceeded");
        assert_eq!(throttle("ec2").status, 503);
        assert_eq!(throttle("autoscaling").code, "Throttling");
        assert_eq!(throttle("ssm").code, "ThrottlingException");
        assert_eq!(throttle("grafana").status, 429);
    }
}
