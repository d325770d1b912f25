//! The daemon's own observability: what every resource's last pass found, as JSON (`/status`,
//! `stackwarden status`), Prometheus metrics (`/metrics`), liveness (`/healthz`) and readiness
//! (`/readyz`: after the first complete pass), served on a loopback address by default.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use stackwarden_controllers::verify::{Drift, Verified};

use crate::aws::CallCounter;
use crate::engine::{Applied, Plan};

/// One resource as the last pass left it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResourceStatus {
    /// `in_sync`, `changed` (the pass applied a change), `pending` (still converging), `error`
    /// (retried with backoff) or `parked` (a terminal error: retried when its desired state
    /// changes).
    pub state: String,
    pub last_error: Option<String>,
    /// The generation of the desired state the resource last converged to.
    pub generation: Option<String>,
    /// When `state` last changed (seconds since the epoch).
    pub last_transition: u64,
}

/// Everything `/status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub generation: String,
    /// A desired state that failed to load, when the last reload failed.
    pub invalid: Option<String>,
    pub passes: u64,
    pub last_success: Option<u64>,
    pub resources: BTreeMap<String, ResourceStatus>,
    /// The last verify of the files on hosts, once one ran.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
}

/// What the last verify of pushed files found (`--verify-interval`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// When it ran (seconds since the epoch).
    pub at: u64,
    pub instances: usize,
    /// Files changed on hosts since their push, pushed again by the pass after the verify.
    pub drifted: Vec<Drift>,
    /// Instances whose verify did not run, with why; or the verify's own error.
    pub unverified: Vec<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenerationLabels {
    generation: String,
}

/// From a quick in-sync check to a workspace creation waited on.
const SECONDS_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    pass_seconds: Histogram,
    reconcile_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    resources: Family<StateLabels, Gauge>,
    drift: Family<KindLabel, Counter>,
    calls: Family<CallLabels, Counter>,
    throttled: Family<ServiceLabel, Counter>,
    generation: Family<GenerationLabels, Gauge>,
    last_success: Gauge,
    invalid: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("stackwarden");
        let m = Metrics {
            reconciles: Family::default(),
            pass_seconds: Histogram::new(SECONDS_BUCKETS),
            reconcile_seconds: Family::new_with_constructor(|| Histogram::new(SECONDS_BUCKETS)),
            resources: Family::default(),
            drift: Family::default(),
            calls: Family::default(),
            throttled: Family::default(),
            generation: Family::default(),
            last_success: Gauge::default(),
            invalid: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "Resources reconciled, by kind and outcome (ok, waiting, error)",
            m.reconciles.clone(),
        );
        registry.register(
            "pass_duration_seconds",
            "Duration of a full pass (observe, apply, observe again)",
            m.pass_seconds.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one resource's reconcile (diff and writes; observing is per pass), by kind",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "resources",
            "Resources by the state their last pass left them in",
            m.resources.clone(),
        );
        registry.register(
            "drift_corrections",
            "Changes applied to resources that existed already, by kind",
            m.drift.clone(),
        );
        registry.register(
            "aws_calls",
            "AWS API calls by service, operation and outcome (ok, error, throttled)",
            m.calls.clone(),
        );
        registry.register(
            "aws_throttled_calls",
            "AWS API calls that were throttled, by service",
            m.throttled.clone(),
        );
        registry.register(
            "desired_generation",
            "The generation of the desired state being enforced (git commit or content hash)",
            m.generation.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "When a pass last converged every resource",
            m.last_success.clone(),
        );
        registry.register(
            "desired_state_invalid",
            "1 while the desired directory fails to load (the last valid state is enforced)",
            m.invalid.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// The daemon's status, shared between the loop that writes it and the server that reads it.
#[derive(Clone)]
pub struct Status {
    report: Arc<Mutex<Report>>,
    metrics: Arc<Metrics>,
    counter: Arc<CallCounter>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Status {
    pub fn new(counter: Arc<CallCounter>) -> Status {
        Status {
            report: Default::default(),
            metrics: Arc::new(Metrics::new()),
            counter,
        }
    }

    pub fn report(&self) -> Report {
        self.report.lock().expect("status lock").clone()
    }

    /// Forgets resources that are no longer desired.
    pub fn retain(&self, desired: &stackwarden_controllers::DesiredState) {
        let mut r = self.report.lock().expect("status lock");
        r.resources
            .retain(|id, _| desired.resources.keys().any(|k| k.to_string() == *id));
        self.count_states(&r);
    }

    fn count_states(&self, r: &Report) {
        let m = &self.metrics;
        m.resources.clear();
        for s in r.resources.values() {
            m.resources
                .get_or_create(&StateLabels {
                    state: s.state.clone(),
                })
                .inc();
        }
    }

    /// Records a verify of the files on hosts.
    pub fn verified(&self, v: &Verified) {
        self.report.lock().expect("status lock").verify = Some(VerifyStatus {
            at: now(),
            instances: v.instances,
            drifted: v.drifted.clone(),
            unverified: v.unverified.clone(),
        });
    }

    /// Records a reload that failed: the previous generation stays enforced.
    pub fn invalid(&self, generation: Option<String>) {
        self.metrics.invalid.set(i64::from(generation.is_some()));
        self.report.lock().expect("status lock").invalid = generation;
    }

    /// Records one pass: what it applied, what the check after it found, how long it took.
    pub fn pass(&self, generation: &str, applied: &Applied, check: &Plan, seconds: f64) {
        let m = &self.metrics;
        m.pass_seconds.observe(seconds);
        for (kind, s) in &applied.durations {
            m.reconcile_seconds
                .get_or_create(&KindLabel {
                    kind: kind.to_string(),
                })
                .observe(*s);
        }
        let mut r = self.report.lock().expect("status lock");
        if r.generation != generation {
            m.generation.clear();
            r.generation = generation.to_string();
        }
        m.generation
            .get_or_create(&GenerationLabels {
                generation: generation.to_string(),
            })
            .set(1);
        r.passes += 1;
        let mut states: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
        for id in &check.in_sync {
            states.insert(id.to_string(), ("in_sync".into(), None));
        }
        for (_, c) in &check.changes {
            let state = if c.is_empty() { "in_sync" } else { "pending" };
            states.insert(c.id.to_string(), (state.into(), None));
        }
        for c in &applied.changes {
            let kind = c.id.kind.to_string();
            if c.action == stackwarden_controllers::Action::Update {
                m.drift.get_or_create(&KindLabel { kind }).inc();
            }
            if states
                .get(&c.id.to_string())
                .is_some_and(|(s, _)| s == "in_sync")
            {
                states.insert(c.id.to_string(), ("changed".into(), None));
            }
        }
        for e in applied.errors.iter().chain(&check.errors) {
            // A terminal error parks the resource until its desired state changes; an object
            // still converging is pending, not failing.
            let state = match e.class {
                stackwarden_controllers::ErrorClass::Terminal => "parked",
                stackwarden_controllers::ErrorClass::Waiting => "pending",
                _ => "error",
            };
            states.insert(
                e.resource.to_string(),
                (state.into(), Some(e.error.clone())),
            );
        }
        let at = now();
        for (id, (state, error)) in states {
            let kind = stackwarden_controllers::ResourceId::parse(&id)
                .map_or_else(|| id.clone(), |i| i.kind.to_string());
            let outcome = match state.as_str() {
                "error" | "parked" => "error",
                "pending" => "waiting",
                _ => "ok",
            };
            m.reconciles
                .get_or_create(&KindLabels {
                    kind,
                    outcome: outcome.into(),
                })
                .inc();
            let previous = r.resources.get(&id).cloned();
            let converged = matches!(state.as_str(), "in_sync" | "changed");
            let entry = ResourceStatus {
                last_transition: match &previous {
                    Some(p) if p.state == state => p.last_transition,
                    _ => at,
                },
                generation: if converged {
                    Some(generation.to_string())
                } else {
                    previous.and_then(|p| p.generation)
                },
                state,
                last_error: error,
            };
            r.resources.insert(id, entry);
        }
        self.count_states(&r);
        if r.resources
            .values()
            .all(|s| matches!(s.state.as_str(), "in_sync" | "changed"))
        {
            r.last_success = Some(at);
            m.last_success.set(at as i64);
        }
    }

    fn metrics_text(&self) -> String {
        let m = &self.metrics;
        // The call counter has the totals; counters only go up, so each is brought to its total.
        let mut throttled: BTreeMap<String, u64> = BTreeMap::new();
        for ((service, operation, outcome), n) in self.counter.outcomes() {
            if outcome == "throttled" {
                *throttled.entry(service.clone()).or_default() += n;
            }
            let c = m.calls.get_or_create(&CallLabels {
                service,
                operation,
                outcome,
            });
            c.inc_by(n.saturating_sub(c.get()));
        }
        for (service, n) in throttled {
            let t = m.throttled.get_or_create(&ServiceLabel { service });
            t.inc_by(n.saturating_sub(t.get()));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry)
            .expect("metrics encode to a string");
        to_text_format(&out)
    }
}

/// The Prometheus text format (0.0.4) from OpenMetrics, which `promtool check metrics` and
/// every Prometheus read: a counter's HELP and TYPE name its `_total` samples, no `# EOF`.
fn to_text_format(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(&name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The HTTP endpoint.
pub fn router(status: Status) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Status>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    s.metrics_text(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<Status>| async move {
                if s.report().passes > 0 {
                    (StatusCode::OK, "ready\n").into_response()
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the first pass is not done\n",
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/status",
            get(|State(s): State<Status>| async move { Json(s.report()) }),
        )
        .with_state(status)
}

/// `stackwarden status`: the report as a table.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "generation {}  passes {}  last success {}\n",
        r.generation,
        r.passes,
        r.last_success
            .map_or("never".to_string(), |t| format!("{t} (unix)"))
    );
    if let Some(g) = &r.invalid {
        out.push_str(&format!(
            "the desired state at {g} is invalid; still enforcing {}\n",
            r.generation
        ));
    }
    let width = r
        .resources
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(8)
        .max(8);
    out.push_str(&format!(
        "\n{:<width$}  {:<8}  {:<12}  ERROR\n",
        "RESOURCE", "STATE", "GENERATION"
    ));
    for (id, s) in &r.resources {
        let generation = s.generation.as_deref().unwrap_or("-");
        out.push_str(&format!(
            "{id:<width$}  {:<8}  {:<12}  {}\n",
            s.state,
            &generation[..generation.len().min(12)],
            s.last_error.as_deref().unwrap_or("")
        ));
    }
    if let Some(v) = &r.verify {
        out.push_str(&format!(
            "\nverify at {} (unix): {} instances, {} bundles changed on the host\n",
            v.at,
            v.instances,
            v.drifted.len()
        ));
        for d in &v.drifted {
            out.push_str(&format!("  changed: {d}\n"));
        }
        for u in &v.unverified {
            out.push_str(&format!("  not verified: {u}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_total_samples_and_eof_dropped() {
        let om = "# HELP x_calls Calls.\n# TYPE x_calls counter\nx_calls_total{a=\"1\"} 2\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP x_calls_total Calls.\n# TYPE x_calls_total counter\nx_calls_total{a=\"1\"} 2\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
