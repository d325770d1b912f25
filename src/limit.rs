//! Client-side rate limits: a token bucket per AWS service in front of the SDK's HTTP client, so
//! the operator never becomes the reason an account is throttled. Requests are told apart by the
//! service in their SigV4 credential scope, which is there whether they go to AWS or to an
//! emulator behind one endpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use tokio::time::Instant;

/// Requests per second by SigV4 service name (`ec2`, `iam`, `aps`, ...), `*` for the others.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits(pub BTreeMap<String, f64>);

impl Limits {
    /// Parses `--rate-limit` values: `ec2=10`, `*=20`.
    pub fn parse(entries: &[String]) -> Result<Limits, String> {
        let mut limits = BTreeMap::from([("*".to_string(), DEFAULT_RPS)]);
        for e in entries {
            let (service, rps) = e
                .split_once('=')
                .ok_or_else(|| format!("`{e}`: write SERVICE=REQUESTS_PER_SECOND, e.g. ec2=10"))?;
            let rps: f64 = rps
                .parse()
                .ok()
                .filter(|r: &f64| *r > 0.0 && r.is_finite())
                .ok_or_else(|| format!("`{e}`: the rate must be a positive number"))?;
            limits.insert(service.to_string(), rps);
        }
        Ok(Limits(limits))
    }

    fn rate(&self, service: &str) -> f64 {
        self.0
            .get(service)
            .or_else(|| self.0.get("*"))
            .copied()
            .unwrap_or(DEFAULT_RPS)
    }
}

/// Per service, unless `--rate-limit` says otherwise: well under AWS's own per-API limits.
pub const DEFAULT_RPS: f64 = 20.0;

/// One bucket: `rate` tokens a second, holding at most one second's worth.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// The buckets of every service, shared by all clients.
#[derive(Debug, Clone)]
pub struct Buckets {
    limits: Limits,
    buckets: Arc<Mutex<BTreeMap<String, Bucket>>>,
}

impl Buckets {
    pub fn new(limits: Limits) -> Buckets {
        Buckets {
            limits,
            buckets: Default::default(),
        }
    }

    /// Waits until `service` may send one more request.
    pub async fn acquire(&self, service: &str) {
        loop {
            let wait = {
                let mut all = self.buckets.lock().expect("bucket lock");
                let rate = self.limits.rate(service);
                let now = Instant::now();
                all.entry(service.to_string())
                    .or_insert_with(|| Bucket {
                        rate,
                        tokens: rate.max(1.0),
                        last: now,
                    })
                    .take(now)
            };
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

/// The SigV4 service of a signed request (`Credential=AKID/date/region/SERVICE/aws4_request`).
fn service_of(request: &HttpRequest) -> String {
    request
        .headers()
        .get("authorization")
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').nth(3))
        .unwrap_or("unsigned")
        .to_string()
}

/// The SDK's default HTTPS client (hyper with rustls and aws-lc, proxies from the environment),
/// built here because the shared configuration does not carry it: each service client makes
/// its own when none is set, and this one must wrap it.
pub fn default_https_client() -> SharedHttpClient {
    use aws_smithy_http_client::proxy::ProxyConfig;
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    use aws_smithy_http_client::{Builder, ConnectorBuilder};
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut conn =
            ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc));
        conn.set_connector_settings(settings.cloned());
        if let Some(c) = components {
            conn.set_sleep_impl(c.sleep_impl());
        }
        conn.set_proxy_config(Some(ProxyConfig::from_env()));
        conn.build()
    })
}

/// An HTTP client that takes a token from the request's service bucket before sending it.
#[derive(Debug, Clone)]
pub struct Limited {
    inner: SharedHttpClient,
    buckets: Buckets,
}

impl Limited {
    pub fn wrap(inner: SharedHttpClient, buckets: Buckets) -> SharedHttpClient {
        SharedHttpClient::new(Limited { inner, buckets })
    }
}

impl HttpClient for Limited {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(LimitedConnector {
            inner: self.inner.http_connector(settings, components),
            buckets: self.buckets.clone(),
        })
    }
}

#[derive(Debug)]
struct LimitedConnector {
    inner: SharedHttpConnector,
    buckets: Buckets,
}

impl HttpConnector for LimitedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let inner = self.inner.clone();
        let buckets = self.buckets.clone();
        HttpConnectorFuture::new(async move {
            buckets.acquire(&service_of(&request)).await;
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_service_gets_its_rate_after_a_one_second_burst() {
        let limits = Limits::parse(&["ec2=2".into(), "*=5".into()]).unwrap();
        let buckets = Buckets::new(limits);
        let start = Instant::now();
        // EC2: a burst of 2, then one every 500 ms.
        for _ in 0..6 {
            buckets.acquire("ec2").await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Another service has its own bucket, full: no wait.
        let before = Instant::now();
        for _ in 0..5 {
            buckets.acquire("iam").await;
        }
        assert_eq!(before.elapsed(), Duration::ZERO);
        buckets.acquire("iam").await;
        assert_eq!(before.elapsed(), Duration::from_millis(200));
    }

    #[test]
    fn limits_parse_and_refuse_nonsense() {
        let l = Limits::parse(&["ec2=10".into()]).unwrap();
        assert_eq!(l.rate("ec2"), 10.0);
        assert_eq!(l.rate("iam"), DEFAULT_RPS);
        for bad in ["ec2", "ec2=0", "ec2=-1", "ec2=x"] {
            assert!(Limits::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
