//! Offline checks of a Grafana dashboard file: JSON, every data source it names one Grafana
//! would find once the stack's provisioning is installed, and every query valid PromQL once
//! Grafana's variables are replaced by values of the right kind.
//!
//! A data source is found the way Grafana finds it: by name or by uid, in the string form
//! (`"datasource": "Prometheus"`) or the object form (`{"type": "prometheus", "uid": "..."}`);
//! through a `datasource` template variable (`${ds}`, `$ds`); one of Grafana's built-ins
//! (`-- Grafana --`, `-- Mixed --`, `-- Dashboard --`); or none (absent, `null`, `"default"`),
//! which is the default data source. A data source variable makes a dashboard portable, but
//! it is advice, not a rule: this module refuses only what Grafana could not load.

use serde_json::Value;

use crate::diag::{Diagnostics, SourceFile};
use crate::grafana::provisioning::DataSource;

/// Grafana's built-in interval variables, replaced by a duration before parsing.
const INTERVALS: [&str; 4] = ["__rate_interval", "__interval", "__range", "__interval_ms"];

/// Grafana's built-in data sources, by name and by uid (`grafana` is `-- Grafana --`'s uid).
const BUILT_IN: [&str; 4] = ["-- Grafana --", "grafana", "-- Mixed --", "-- Dashboard --"];

/// Checks one dashboard against the data sources the provisioning defines (`sources`, the
/// default first); problems are reported against the file, at the offending text when there
/// is one.
pub fn check_dashboard(file: &SourceFile, sources: &[DataSource], diags: &mut Diagnostics) {
    let doc: Value = match serde_json::from_str(&file.text) {
        Ok(v) => v,
        Err(e) => {
            let at = file.offset_of(e.line(), e.column());
            diags.at(file, at, format!("invalid dashboard JSON: {e}"));
            return;
        }
    };
    let variables: Vec<&Value> = doc
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .map(|l| l.iter().collect())
        .unwrap_or_default();
    let names: Vec<&str> = variables
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let check = Check {
        file,
        sources,
        ds_variables: variables
            .iter()
            .filter(|v| v["type"] == "datasource")
            .filter_map(|v| v["name"].as_str())
            .collect(),
    };
    for v in &variables {
        let name = v["name"].as_str().unwrap_or("(unnamed)");
        match v["type"].as_str() {
            Some("datasource") => check.variable_kind(name, &v["query"], diags),
            Some("query") => check.source(&format!("variable `{name}`"), &v["datasource"], diags),
            _ => {}
        }
    }
    for a in doc
        .pointer("/annotations/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = a["name"].as_str().unwrap_or("(unnamed)");
        check.source(&format!("annotation `{name}`"), &a["datasource"], diags);
    }
    let mut panels = Vec::new();
    collect_panels(&doc, &mut panels);
    for p in panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let what = format!("panel `{title}`");
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        // A target without a data source queries its panel's; a panel without one (and no
        // targets to infer it from) queries nothing, so only a query makes the default matter.
        if !targets.is_empty() || !p["datasource"].is_null() {
            check.source(&what, &p["datasource"], diags);
        }
        for t in targets {
            if !t["datasource"].is_null() {
                check.source(&what, &t["datasource"], diags);
            }
        }
        for t in targets {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            if let Err(e) = promql_parser::parser::parse(&substitute(expr, &names)) {
                diags.at(
                    file,
                    position(file, expr),
                    format!("{what}: invalid PromQL: {e}"),
                );
            }
        }
    }
}

/// What a dashboard's data source references are checked against.
struct Check<'a> {
    file: &'a SourceFile,
    sources: &'a [DataSource],
    /// The names of the dashboard's `datasource` template variables.
    ds_variables: Vec<&'a str>,
}

impl Check<'_> {
    /// One `datasource` field of `what` (a panel, target, annotation or query variable).
    fn source(&self, what: &str, ds: &Value, diags: &mut Diagnostics) {
        let named = match ds {
            Value::Null => None,
            Value::String(s) => Some(s.as_str()),
            Value::Object(o) => match o.get("uid") {
                None | Some(Value::Null) => None,
                Some(Value::String(uid)) => Some(uid.as_str()),
                Some(other) => {
                    diags.at(
                        self.file,
                        0,
                        format!("{what}: a data source uid must be a string, not `{other}`"),
                    );
                    return;
                }
            },
            other => {
                // A number is the data source id of dashboards from before Grafana 8.3,
                // which ids of the provisioned data sources cannot be known to match.
                diags.at(
                    self.file,
                    0,
                    format!("{what}: `\"datasource\": {other}` is not a data source name or uid"),
                );
                return;
            }
        };
        match named {
            None | Some("default") | Some("") => {
                if self.sources.is_empty() {
                    diags.at(
                        self.file,
                        position(self.file, what_text(what)),
                        format!(
                            "{what} queries the default data source, and the provisioning defines no data source (`prometheus_url`, `amp_url` or `cloudwatch`)"
                        ),
                    );
                }
            }
            Some(s) if BUILT_IN.contains(&s) => {}
            Some(s) => match variable(s) {
                Some(v) if self.ds_variables.contains(&v) => {}
                Some(v) => diags.at(
                    self.file,
                    position(self.file, s),
                    format!(
                        "{what} names the data source `{s}`, and the dashboard has no data source variable `{v}` (provisioning does not fill in an exported dashboard's `__inputs`): add a templating entry of type `datasource` named `{v}`, or name a data source the provisioning defines{}",
                        self.defined()
                    ),
                ),
                None if self.sources.iter().any(|d| d.name == s || d.uid == s) => {}
                None => diags.at(
                    self.file,
                    position(self.file, s),
                    format!(
                        "{what} names the data source `{s}`, which the provisioning does not define{}",
                        self.defined()
                    ),
                ),
            },
        }
    }

    /// A `datasource` template variable lists the data sources of one type (its `query`);
    /// with none of that type provisioned it would be empty.
    fn variable_kind(&self, name: &str, query: &Value, diags: &mut Diagnostics) {
        let Some(kind) = query.as_str() else {
            return;
        };
        if !self.sources.iter().any(|d| d.kind == kind) {
            diags.at(
                self.file,
                position(self.file, kind),
                format!(
                    "data source variable `{name}` lists `{kind}` data sources, and the provisioning defines none{}",
                    self.defined()
                ),
            );
        }
    }

    /// What the provisioning defines, for a message.
    fn defined(&self) -> String {
        if self.sources.is_empty() {
            return " (it defines none: set `prometheus_url`, `amp_url` or `cloudwatch`)".into();
        }
        let list: Vec<String> = self
            .sources
            .iter()
            .map(|d| format!("`{}` (uid `{}`)", d.name, d.uid))
            .collect();
        format!(" (it defines {})", list.join(", "))
    }
}

/// The variable a reference names: `$ds`, `${ds}`, `${ds:raw}` or `[[ds]]`.
fn variable(s: &str) -> Option<&str> {
    let name = if let Some(r) = s.strip_prefix("${") {
        r.strip_suffix('}')?.split(':').next()?
    } else if let Some(r) = s.strip_prefix("[[") {
        r.strip_suffix("]]")?
    } else {
        s.strip_prefix('$')?
    };
    Some(name)
}

/// The quoted name in `what` (a panel's title), to find it in the file.
fn what_text(what: &str) -> &str {
    what.split('`').nth(1).unwrap_or_default()
}

/// Panels, with those inside collapsed rows.
fn collect_panels<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        collect_panels(p, out);
    }
}

/// Replaces Grafana variables with values PromQL accepts where they stand: intervals with a
/// duration, other variables with a label value (they sit in label matchers).
fn substitute(expr: &str, variables: &[&str]) -> String {
    let mut out = expr.to_string();
    for v in INTERVALS {
        out = out
            .replace(&format!("${{{v}}}"), "5m")
            .replace(&format!("${v}"), "5m");
    }
    let mut longest_first: Vec<&&str> = variables.iter().collect();
    longest_first.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in longest_first {
        out = out
            .replace(&format!("${{{v}}}"), "x")
            .replace(&format!("${v}"), "x");
    }
    out
}

/// The byte offset of a JSON string's text in the file (its first occurrence), or 0.
fn position(file: &SourceFile, text: &str) -> usize {
    let encoded = serde_json::to_string(text).unwrap_or_default();
    file.text.find(&encoded).map(|i| i + 1).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grafana::provisioning::{AMP, CLOUDWATCH, PROMETHEUS};

    fn check_with(text: &str, sources: &[DataSource]) -> Vec<String> {
        let f = SourceFile::new("d.json".into(), "d.json".into(), text.into());
        let mut d = Diagnostics::default();
        check_dashboard(&f, sources, &mut d);
        d.into_sorted().iter().map(|d| d.to_string()).collect()
    }

    fn check(text: &str) -> Vec<String> {
        check_with(text, &[PROMETHEUS, CLOUDWATCH])
    }

    const GOOD: &str = r#"{
  "templating": {"list": [{"name": "ds", "type": "datasource", "query": "prometheus"},
                          {"name": "job", "type": "query"}]},
  "panels": [{"title": "Rate", "datasource": {"uid": "${ds}"},
              "targets": [{"expr": "sum(rate(http_requests_total{job=~\"$job\"}[$__rate_interval]))"}]}]
}"#;

    /// A panel querying `up` through `datasource`, given as JSON text.
    fn panel(datasource: &str) -> String {
        format!(
            r#"{{
  "panels": [{{"title": "Up", "datasource": {datasource},
              "targets": [{{"expr": "up"}}]}}]
}}"#
        )
    }

    #[test]
    fn a_portable_dashboard_with_valid_queries_passes() {
        assert!(check(GOOD).is_empty(), "{:?}", check(GOOD));
    }

    #[test]
    fn invalid_promql_is_reported_at_the_query() {
        let errs = check(&GOOD.replace("sum(rate(", "sum(rate(("));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("d.json:5:"), "{errs:?}");
        assert!(errs[0].contains("panel `Rate`: invalid PromQL"), "{errs:?}");
    }

    #[test]
    fn a_provisioned_data_source_by_name_or_uid_in_either_form_passes() {
        for ds in [
            r#""Prometheus""#,
            r#""prometheus""#,
            r#"{"type": "prometheus", "uid": "prometheus"}"#,
            r#"{"uid": "cloudwatch"}"#,
            r#"{"type": "prometheus"}"#,
            "null",
            r#""default""#,
            r#""-- Mixed --""#,
            r#"{"type": "datasource", "uid": "-- Dashboard --"}"#,
        ] {
            let errs = check(&panel(ds));
            assert!(errs.is_empty(), "{ds}: {errs:?}");
        }
        let no_field = r#"{"panels": [{"title": "Up", "targets": [{"expr": "up"}]}]}"#;
        assert!(check(no_field).is_empty(), "{:?}", check(no_field));
    }

    #[test]
    fn a_data_source_the_provisioning_does_not_define_is_reported_where_it_is_named() {
        let errs = check(&panel(r#""Loki""#));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("d.json:2:"), "{errs:?}");
        assert!(
            errs[0].contains("names the data source `Loki`, which the provisioning does not define (it defines `Prometheus` (uid `prometheus`), `CloudWatch` (uid `cloudwatch`))"),
            "{errs:?}"
        );
        let errs = check(&panel(
            r#"{"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}"#,
        ));
        assert!(
            errs[0].contains("`P1809F7CD0C75ACF3`, which the provisioning does not define"),
            "{errs:?}"
        );
        // AMP is defined only when `amp_url` is set.
        let errs = check(&panel(r#""Amazon Managed Prometheus""#));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            check_with(&panel(r#""Amazon Managed Prometheus""#), &[PROMETHEUS, AMP]).is_empty()
        );
    }

    #[test]
    fn a_variable_that_is_no_data_source_variable_is_reported() {
        let errs = check(&panel(r#""${DS_PROMETHEUS}""#));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("no data source variable `DS_PROMETHEUS`"),
            "{errs:?}"
        );
        let errs = check(&GOOD.replace("\"datasource\", \"query\"", "\"custom\", \"query\""));
        assert!(errs[0].contains("no data source variable `ds`"), "{errs:?}");
    }

    #[test]
    fn the_default_or_a_variable_needs_a_provisioned_data_source_of_its_type() {
        let errs = check_with(&panel("null"), &[]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("panel `Up` queries the default data source, and the provisioning defines no data source"), "{errs:?}");
        let errs = check_with(GOOD, &[CLOUDWATCH]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("d.json:2:"), "{errs:?}");
        assert!(
            errs[0].contains(
                "variable `ds` lists `prometheus` data sources, and the provisioning defines none"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn annotations_and_query_variables_name_data_sources_too() {
        let text = r#"{
  "annotations": {"list": [{"name": "Annotations & Alerts", "datasource": "-- Grafana --"},
                           {"name": "Deploys", "datasource": "Loki"}]},
  "templating": {"list": [{"name": "job", "type": "query", "datasource": "Elasticsearch"}]}
}"#;
        let errs = check(text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("d.json:3:") && errs[0].contains("annotation `Deploys`"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("d.json:4:") && errs[1].contains("variable `job`"),
            "{errs:?}"
        );
    }

    #[test]
    fn the_seed_repositorys_dashboards_pass_with_the_provisioned_prometheus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/seed-dashboards");
        for name in [
            "aws-infrastructure.json",
            "ec2_monitoring.json",
            "github_monitoring.json",
        ] {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let errs = check_with(&text, &[PROMETHEUS]);
            assert!(errs.is_empty(), "{name}: {errs:?}");
            // With no data source provisioned none of them would load.
            assert!(!check_with(&text, &[]).is_empty(), "{name}");
        }
    }
}
