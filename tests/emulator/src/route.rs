//! Routing: which service and operation a request is for, whether the emulator serves it or
//! moto does, and the faults and call log every request goes through.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State as Extract;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Uri};
use serde::Serialize;

use crate::wire::{ApiError, Protocol};
use crate::{agent, alertmanager, consistency, faults, grafana, lock, refresh, ssm, tokens, State};

/// Requests larger than this are refused (the largest AWS request the operator sends is far
/// smaller).
const MAX_BODY: usize = 32 << 20;

/// One request as the emulator saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Call {
    /// The signing name from the credential scope (`ec2`, `ssm`, `grafana`, `aps`, ...).
    pub service: String,
    /// The operation, when the emulator can name it (always, but for moto's REST APIs).
    pub operation: String,
    /// The HTTP status answered.
    pub status: u16,
    /// Whether a fault decided the answer.
    pub fault: bool,
    /// Whether the call changes state ([`Incoming::is_write`]).
    pub write: bool,
    /// The access key id it was signed with: the operator's, a test's, or an instance's own
    /// ([`crate::instance_access_key`]) when a pushed script called AWS.
    pub caller: String,
}

/// A request read in full, with what routing needs to know about it.
pub struct Incoming {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The signing name from the SigV4 credential scope; empty when unsigned.
    pub service: String,
    pub region: String,
    pub protocol: Protocol,
    /// The operation named by `X-Amz-Target` or `Action`, or matched from the REST route.
    pub operation: String,
}

impl Incoming {
    /// Whether the call changes state: by its HTTP method for REST APIs (whose operations the
    /// emulator cannot always name), by its operation's verb otherwise.
    pub fn is_write(&self) -> bool {
        match self.protocol {
            Protocol::RestJson => !matches!(self.method, Method::GET | Method::HEAD),
            _ => !["Get", "List", "Describe"]
                .iter()
                .any(|verb| self.operation.starts_with(verb)),
        }
    }

    fn read(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Incoming {
        let scope = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(credential_scope);
        let (region, service) = scope.unwrap_or_default();
        let target = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let form = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
        let (protocol, operation) = if let Some(target) = target {
            let op = target.rsplit('.').next().unwrap_or_default().to_string();
            (Protocol::AwsJson, op)
        } else if form {
            let action = form_urlencoded::parse(&body)
                .find(|(k, _)| k == "Action")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let protocol = if service == "ec2" {
                Protocol::Ec2
            } else {
                Protocol::Query
            };
            (protocol, action)
        } else {
            let op = rest_operation(&service, &method, uri.path()).unwrap_or_default();
            (Protocol::RestJson, op.to_string())
        };
        Incoming {
            method,
            uri,
            headers,
            body,
            service,
            region,
            protocol,
            operation,
        }
    }

    /// The access key id from the SigV4 credential; empty when unsigned.
    pub fn access_key(&self) -> &str {
        self.headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("Credential=").nth(1))
            .and_then(|c| c.split('/').next())
            .unwrap_or("")
    }

    /// A request the emulator sends to moto on behalf of `caller`: same credentials and
    /// region, another service.
    pub fn internal(
        caller: &Incoming,
        service: &str,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Incoming {
        let access_key = match caller.access_key() {
            "" => "testing",
            key => key,
        };
        let date = time::OffsetDateTime::now_utc();
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={access_key}/{:04}{:02}{:02}/{}/{service}/aws4_request, SignedHeaders=host, Signature=0",
            date.year(),
            u8::from(date.month()),
            date.day(),
            caller.region
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&authorization).expect("ASCII"),
        );
        if method == "POST" {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
            );
        }
        Incoming::read(
            method.parse().expect("a valid method"),
            path.parse().expect("a valid path"),
            headers,
            body,
        )
    }

    /// A request to moto as made in another account than `caller`'s (moto's
    /// `x-moto-account-id`): what AWS reads itself, such as the role a caller assumes.
    pub fn internal_in(
        caller: &Incoming,
        account: &str,
        service: &str,
        body: Bytes,
    ) -> Result<Incoming, ApiError> {
        let mut req = Incoming::internal(caller, service, "POST", "/", body);
        let account = HeaderValue::from_str(account)
            .map_err(|_| ApiError::validation(format!("`{account}` is no account id")))?;
        req.headers.insert("x-moto-account-id", account);
        Ok(req)
    }

    /// An awsJson1.1 request to moto on behalf of `caller`: `target` is the `X-Amz-Target`
    /// (`AmazonSSM.DescribeParameters`).
    pub fn internal_json(
        caller: &Incoming,
        service: &str,
        target: &str,
        body: &serde_json::Value,
    ) -> Incoming {
        let mut req = Incoming::internal(caller, service, "GET", "/", Bytes::new());
        req.method = Method::POST;
        req.body = body.to_string().into();
        req.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-amz-json-1.1"),
        );
        req.headers.insert(
            "x-amz-target",
            HeaderValue::from_str(target).expect("an ASCII target"),
        );
        req.protocol = Protocol::AwsJson;
        req.operation = target.rsplit('.').next().unwrap_or(target).to_string();
        req
    }

    /// The form parameters of a query-protocol request.
    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }

    /// The query string parameters.
    pub fn query(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect()
    }

    /// The JSON body (an empty body reads as an empty object).
    pub fn json(&self) -> Result<serde_json::Value, ApiError> {
        if self.body.is_empty() {
            return Ok(serde_json::json!({}));
        }
        serde_json::from_slice(&self.body).map_err(|e| match self.protocol {
            Protocol::AwsJson => ApiError::bad_request("SerializationException", e.to_string()),
            _ => ApiError::validation(format!("the request body is not JSON: {e}")),
        })
    }

    /// The path split into its segments, percent-decoded.
    pub fn segments(&self) -> Vec<String> {
        self.uri
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect()
    }
}

/// (region, service) from `Credential=AKID/DATE/REGION/SERVICE/aws4_request`.
fn credential_scope(authorization: &str) -> Option<(String, String)> {
    let credential = authorization.split("Credential=").nth(1)?;
    let credential = credential.split([',', ' ']).next()?;
    let mut parts = credential.split('/').skip(2);
    let region = parts.next()?.to_string();
    let service = parts.next()?.to_string();
    Some((region, service))
}

/// Operation names of the REST routes the emulator serves or watches.
fn rest_operation(service: &str, method: &Method, path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let m = method.as_str();
    match service {
        "grafana" => grafana::operation(m, &segments),
        "aps" => alertmanager::operation(m, &segments),
        _ => None,
    }
}

pub fn router(state: Arc<State>) -> Router {
    crate::admin::routes().fallback(handle).with_state(state)
}

async fn handle(Extract(state): Extract<Arc<State>>, req: http::Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::bad_request("RequestTooLarge", e.to_string())
                .render(Protocol::RestJson)
        }
    };
    let req = Incoming::read(parts.method, parts.uri, parts.headers, body);
    let fault = lock(&state.faults).pick(&req.service, &req.operation, req.is_write());
    let (response, faulted) = match fault {
        Some(faults::Outcome::Answer(error)) => (error.render(req.protocol), true),
        Some(faults::Outcome::Reset) => (faults::reset(), true),
        Some(faults::Outcome::Delay(d)) => {
            tokio::time::sleep(d).await;
            (dispatch(&state, &req).await, false)
        }
        None => (dispatch(&state, &req).await, false),
    };
    tracing::debug!(
        service = %req.service,
        operation = %req.operation,
        status = response.status().as_u16(),
        "request"
    );
    lock(&state.calls).push(Call {
        service: req.service.clone(),
        operation: req.operation.clone(),
        status: response.status().as_u16(),
        fault: faulted,
        write: req.is_write(),
        caller: req.access_key().to_string(),
    });
    response
}

async fn dispatch(state: &Arc<State>, req: &Incoming) -> Response {
    if let Err(e) = crate::authorize::check(state, req).await {
        return e.render(req.protocol);
    }
    if let Err(e) = crate::strict::check(state, req).await {
        return e.render(req.protocol);
    }
    let served = match (req.service.as_str(), req.operation.as_str()) {
        ("grafana", _) => Some(grafana::handle(state, req).await),
        ("aps", op) if alertmanager::serves(op) => Some(alertmanager::handle(state, req).await),
        ("ssm", op) if ssm::serves(op) => Some(ssm::handle(state, req).await),
        ("ssm", op) if agent::serves(op) => Some(agent::handle(state, req).await),
        ("autoscaling", op) if refresh::serves(op) => Some(refresh::handle(state, req).await),
        _ if tokens::serves(req) => Some(tokens::handle(state, req).await),
        ("ec2", "DescribeInstances") => consistency::describe_instances(state, req).await,
        ("elasticloadbalancing", "CreateLoadBalancer") => {
            crate::strict::create_load_balancer(state, req).await
        }
        ("elasticloadbalancing", "DescribeLoadBalancerAttributes") => {
            Some(crate::strict::load_balancer_attributes(state, req).await)
        }
        ("ec2", "DescribeImages") => Some(crate::images::describe_images(state, req).await),
        ("ec2", "DescribeLaunchTemplates") => {
            Some(crate::strict::describe_launch_templates(state, req).await)
        }
        ("iam", "GetAccountAuthorizationDetails") => {
            Some(crate::strict::authorization_details(state, req).await)
        }
        _ => None,
    };
    let result = match served {
        Some(result) => result,
        None => match crate::strict::rewrite(req) {
            Some(stored) => forward(state, &stored).await,
            None => forward(state, req).await,
        },
    };
    result.unwrap_or_else(|e| e.render(req.protocol))
}

async fn forward(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let response = state.moto.forward(req).await?;
    if response.status().is_success() {
        crate::strict::record(state, req, response.body());
    }
    // A deleted AMP workspace takes its alertmanager definition with it.
    if req.service == "aps" && req.operation == "DeleteWorkspace" && response.status().is_success()
    {
        if let Some(id) = req.segments().get(1) {
            lock(&state.alertmanager).forget(&req.region, id);
        }
    }
    Ok(response.map(Body::from).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_region_and_service() {
        let auth = "AWS4-HMAC-SHA256 Credential=AKID/20261121/eu-west-1/grafana/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc";
        assert_eq!(
            credential_scope(auth),
            Some(("eu-west-1".into(), "grafana".into()))
        );
    }

    #[test]
    fn grafana_and_aps_share_a_path_but_not_a_service() {
        let get = Method::GET;
        assert_eq!(
            rest_operation("grafana", &get, "/workspaces/g-1"),
            Some("DescribeWorkspace")
        );
        assert_eq!(
            rest_operation("aps", &get, "/workspaces/ws-1"),
            Some("DescribeWorkspace")
        );
        assert_eq!(
            rest_operation("aps", &get, "/workspaces/ws-1/alertmanager/definition"),
            Some("DescribeAlertManagerDefinition")
        );
    }
}
