//! The four AWS wire protocols the emulator speaks, as the aws-sdk-rust clients parse them:
//! answers, errors (status, type and message where each protocol puts them), timestamps and
//! pagination tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http::{header, StatusCode};
use serde_json::{json, Map, Value};

/// The protocol of a request, which decides the shape of every answer to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// restJson1 (grafana, aps): status code, `x-amzn-ErrorType` header, JSON body.
    RestJson,
    /// awsJson1.0 / 1.1 (ssm, dynamodb): `X-Amz-Target`, errors as `__type` in a 400 body.
    AwsJson,
    /// awsQuery (iam, autoscaling, elbv2): form-encoded `Action`, XML answers.
    Query,
    /// ec2Query: like awsQuery with EC2's own error document.
    Ec2,
}

/// An error answer in any protocol.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    /// Extra members of a JSON error body (`resourceId`, `reason`, ...).
    pub members: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            members: Map::new(),
        }
    }

    /// A request the caller got wrong, in the code the service uses for it.
    pub fn bad_request(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// restJson1 `ValidationException` with its required `reason`.
    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::bad_request("ValidationException", message).with("reason", "OTHER")
    }

    /// restJson1 `ResourceNotFoundException`.
    pub fn not_found(kind: &str, id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("{kind} {id} not found"),
        )
        .with("resourceId", id)
        .with("resourceType", kind)
    }

    /// restJson1 `ConflictException`.
    pub fn conflict(kind: &str, id: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "ConflictException", message)
            .with("resourceId", id)
            .with("resourceType", kind)
    }

    /// A failure of the emulator or of moto behind it.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
            message,
        )
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.members.insert(key.to_string(), value.into());
        self
    }

    pub fn render(&self, protocol: Protocol) -> Response {
        let request_id = uuid::Uuid::new_v4().to_string();
        match protocol {
            Protocol::RestJson => {
                let mut body = self.members.clone();
                body.insert("message".into(), self.message.clone().into());
                let mut response = (
                    self.status,
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (
                            header::HeaderName::from_static("x-amzn-errortype"),
                            &self.code,
                        ),
                        (
                            header::HeaderName::from_static("x-amzn-requestid"),
                            &request_id,
                        ),
                    ],
                    Value::Object(body).to_string(),
                )
                    .into_response();
                if self.code == "ThrottlingException" {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                response
            }
            Protocol::AwsJson => (
                self.status,
                [
                    (header::CONTENT_TYPE, "application/x-amz-json-1.1"),
                    (
                        header::HeaderName::from_static("x-amzn-requestid"),
                        &request_id,
                    ),
                ],
                json!({"__type": self.code, "message": self.message}).to_string(),
            )
                .into_response(),
            Protocol::Query => {
                let fault = if self.status.is_server_error() {
                    "Receiver"
                } else {
                    "Sender"
                };
                let body = format!(
                    "<ErrorResponse><Error><Type>{fault}</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>",
                    escape(&self.code),
                    escape(&self.message)
                );
                (self.status, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
            }
            Protocol::Ec2 => {
                let body = format!(
                    "<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>",
                    escape(&self.code),
                    escape(&self.message)
                );
                (self.status, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
            }
        }
    }
}

/// A restJson1 answer.
pub fn rest_json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// An awsJson1.1 answer.
pub fn aws_json(body: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-amz-json-1.1")],
        body.to_string(),
    )
        .into_response()
}

/// An awsQuery answer: `result` is the inner XML of `<{action}Result>`.
pub fn query(action: &str, xmlns: &str, result: &str) -> Response {
    let body = format!(
        "<{action}Response xmlns=\"{xmlns}\"><{action}Result>{result}</{action}Result><ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata></{action}Response>",
        uuid::Uuid::new_v4()
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

/// Escapes text for an XML element or attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the epoch, the default timestamp format of the JSON protocols.
pub fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// ISO 8601 with milliseconds, the timestamp format of the query protocols (and of the string
/// timestamps in SSM's GetCommandInvocation).
pub fn iso8601(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .expect("a fixed format always formats")
}

/// Pagination over a listing: opaque tokens that encode the position of the next page.
pub struct Page<'a, T> {
    pub items: &'a [T],
    pub next_token: Option<String>,
}

/// Why a token was refused.
pub struct BadToken;

pub fn paginate<'a, T>(
    items: &'a [T],
    max: usize,
    token: Option<&str>,
) -> Result<Page<'a, T>, BadToken> {
    let start = match token {
        None => 0,
        Some(t) => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("page:").and_then(|n| n.parse().ok()))
            .filter(|n: &usize| *n <= items.len())
            .ok_or(BadToken)?,
    };
    let end = (start + max.max(1)).min(items.len());
    let next_token = (end < items.len())
        .then(|| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("page:{end}")));
    Ok(Page {
        items: &items[start..end],
        next_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_every_item_once() {
        let items: Vec<u32> = (0..7).collect();
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let page = paginate(&items, 3, token.as_deref()).ok().unwrap();
            seen.extend_from_slice(page.items);
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, items);
    }

    #[test]
    fn a_forged_token_is_refused() {
        let items = [1, 2];
        assert!(paginate(&items, 1, Some("bm9wZQ")).is_err());
        assert!(paginate(&items, 1, Some("%%%")).is_err());
    }

    #[test]
    fn query_timestamps_have_milliseconds() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(iso8601(t), "2023-11-14T22:13:20.123Z");
    }
}
