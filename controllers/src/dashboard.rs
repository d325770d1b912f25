//! Offline checks of a Grafana dashboard file: JSON, a data source variable, every panel and
//! target naming its data source through that variable (so a dashboard works against any
//! Prometheus or AMP data source it is provisioned with), and every query valid PromQL once
//! Grafana's variables are replaced by values of the right kind.

use serde_json::Value;

use crate::diag::{Diagnostics, SourceFile};

/// Grafana's built-in interval variables, replaced by a duration before parsing.
const INTERVALS: [&str; 4] = ["__rate_interval", "__interval", "__range", "__interval_ms"];

/// Checks one dashboard; problems are reported against the file, at the query's position when
/// there is one.
pub fn check_dashboard(file: &SourceFile, diags: &mut Diagnostics) {
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
    let ds_var = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .and_then(|v| v["name"].as_str());
    let Some(ds_var) = ds_var else {
        diags.at(
            file,
            0,
            "the dashboard has no data source variable (templating.list entry of type `datasource`): it would only work with the data source it was made with",
        );
        return;
    };
    let reference = [format!("${{{ds_var}}}"), format!("${ds_var}")];
    let names: Vec<&str> = variables
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let mut panels = Vec::new();
    collect_panels(&doc, &mut panels);
    for p in panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let mut sources = vec![&p["datasource"]];
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        sources.extend(targets.iter().map(|t| &t["datasource"]));
        for ds in sources {
            let uid = match ds {
                Value::Null => continue,
                Value::String(s) => s.as_str(),
                other => other["uid"].as_str().unwrap_or_default(),
            };
            if !reference.iter().any(|r| r == uid) {
                diags.at(
                    file,
                    position(file, uid),
                    format!("panel `{title}` names the data source `{uid}`; use `${{{ds_var}}}`"),
                );
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
                    format!("panel `{title}`: invalid PromQL: {e}"),
                );
            }
        }
    }
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

    fn check(text: &str) -> Vec<String> {
        let f = SourceFile::new("d.json".into(), "d.json".into(), text.into());
        let mut d = Diagnostics::default();
        check_dashboard(&f, &mut d);
        d.into_sorted().iter().map(|d| d.to_string()).collect()
    }

    const GOOD: &str = r#"{
  "templating": {"list": [{"name": "ds", "type": "datasource", "query": "prometheus"},
                          {"name": "job", "type": "query"}]},
  "panels": [{"title": "Rate", "datasource": {"uid": "${ds}"},
              "targets": [{"expr": "sum(rate(http_requests_total{job=~\"$job\"}[$__rate_interval]))"}]}]
}"#;

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
    fn a_hard_coded_data_source_or_no_variable_is_reported() {
        let errs = check(&GOOD.replace("${ds}", "P1809F7CD0C75ACF3"));
        assert!(errs[0].contains("use `${ds}`"), "{errs:?}");
        let errs = check(&GOOD.replace("\"datasource\", \"query\"", "\"custom\", \"query\""));
        assert!(errs[0].contains("no data source variable"), "{errs:?}");
    }
}
