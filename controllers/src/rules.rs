//! Offline checks of Prometheus rule files, the way `promtool check rules` reads them: YAML with
//! `groups`, each rule an alert or a recording rule, every `expr` valid PromQL, durations valid.
//! Errors point at the line and column of the offending value in the rule file.

use std::collections::{BTreeMap, BTreeSet};

use marked_yaml::Spanned;
use serde::Deserialize;

use crate::diag::{Diagnostics, SourceFile};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    name: Spanned<String>,
    interval: Option<Spanned<String>>,
    query_offset: Option<Spanned<String>>,
    limit: Option<u64>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: Option<Spanned<String>>,
    record: Option<Spanned<String>>,
    /// Optional here only so that a missing one is reported at its rule, not at the file.
    expr: Option<Spanned<String>>,
    #[serde(rename = "for")]
    for_: Option<Spanned<String>>,
    keep_firing_for: Option<Spanned<String>>,
    labels: Option<std::collections::HashMap<Spanned<String>, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

/// Line and column of a marked-yaml position, for a diagnostic.
fn report(diags: &mut Diagnostics, file: &SourceFile, span: &marked_yaml::Span, msg: String) {
    let (line, col) = span
        .start()
        .map(|m| (m.line(), m.column()))
        .unwrap_or((1, 1));
    diags.at(file, file.offset_of(line, col), msg);
}

fn load_error_mark(e: &marked_yaml::LoadError) -> (usize, usize) {
    use marked_yaml::LoadError::*;
    let m = match e {
        TopLevelMustBeMapping(m)
        | TopLevelMustBeSequence(m)
        | UnexpectedAnchor(m)
        | MappingKeyMustBeScalar(m)
        | UnexpectedTag(m)
        | ScanError(m, _) => Some(*m),
        DuplicateKey(inner) => inner.key.span().start().copied(),
    };
    m.map(|m| (m.line(), m.column())).unwrap_or((1, 1))
}

/// Parses YAML with positions; reports a syntax or shape error and returns `None`.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &SourceFile,
    diags: &mut Diagnostics,
    what: &str,
) -> Option<T> {
    let opts = marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true);
    match marked_yaml::from_yaml_with_options(0, &file.text, opts) {
        Ok(v) => Some(v),
        Err(marked_yaml::FromYamlError::ParseYaml(e)) => {
            let (line, col) = load_error_mark(&e);
            diags.at(
                file,
                file.offset_of(line, col),
                format!("{what}: invalid YAML: {e}"),
            );
            None
        }
        Err(marked_yaml::FromYamlError::FromNode(e)) => {
            let (line, col) = e
                .start_mark()
                .map(|m| (m.line(), m.column()))
                .unwrap_or((1, 1));
            diags.at(file, file.offset_of(line, col), format!("{what}: {e}"));
            None
        }
    }
}

fn check_duration(diags: &mut Diagnostics, file: &SourceFile, d: &Spanned<String>, field: &str) {
    if let Err(e) = promql_parser::util::parse_duration(d.as_str()) {
        report(
            diags,
            file,
            d.span(),
            format!("`{field}: {}` is not a duration ({e})", d.as_str()),
        );
    }
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks one rule file, reporting every problem found. Returns the number of rules when the
/// file could be read at all.
pub fn check_rule_file(file: &SourceFile, diags: &mut Diagnostics) -> Option<usize> {
    let parsed: RuleFile = parse_yaml(file, diags, "rule file")?;
    let mut names = BTreeSet::new();
    let mut count = 0;
    if parsed.groups.is_empty() {
        diags.at(file, 0, "rule file has no groups");
    }
    for g in &parsed.groups {
        if g.name.is_empty() {
            report(diags, file, g.name.span(), "group name is empty".into());
        } else if !names.insert(g.name.as_str().to_string()) {
            report(
                diags,
                file,
                g.name.span(),
                format!("group `{}` is defined twice", g.name.as_str()),
            );
        }
        if let Some(i) = &g.interval {
            check_duration(diags, file, i, "interval");
        }
        if let Some(o) = &g.query_offset {
            check_duration(diags, file, o, "query_offset");
        }
        let _ = (&g.limit, &g.labels);
        for r in &g.rules {
            count += 1;
            check_rule(file, diags, g.name.span(), r);
        }
    }
    Some(count)
}

fn check_rule(file: &SourceFile, diags: &mut Diagnostics, group: &marked_yaml::Span, r: &Rule) {
    let Some(expr) = &r.expr else {
        let (at, what) = match (&r.alert, &r.record) {
            (Some(a), _) => (a.span(), format!("alerting rule `{}`", a.as_str())),
            (_, Some(rec)) => (rec.span(), format!("recording rule `{}`", rec.as_str())),
            (None, None) => (group, "a rule".to_string()),
        };
        report(diags, file, at, format!("{what} has no `expr`"));
        return;
    };
    match (&r.alert, &r.record) {
        (Some(_), Some(rec)) => report(
            diags,
            file,
            rec.span(),
            "a rule is either `alert` or `record`, not both".into(),
        ),
        (None, None) => report(
            diags,
            file,
            expr.span(),
            "rule has neither `alert` nor `record`".into(),
        ),
        (Some(a), None) if a.is_empty() => {
            report(diags, file, a.span(), "alert name is empty".into())
        }
        (None, Some(rec)) => {
            if !valid_metric_name(rec.as_str()) {
                report(
                    diags,
                    file,
                    rec.span(),
                    format!(
                        "`{}` is not a valid metric name for a recording rule",
                        rec.as_str()
                    ),
                );
            }
            for (field, v) in [("for", &r.for_), ("keep_firing_for", &r.keep_firing_for)] {
                if let Some(v) = v {
                    report(
                        diags,
                        file,
                        v.span(),
                        format!("`{field}` applies to alerting rules only"),
                    );
                }
            }
            if r.annotations.is_some() {
                report(
                    diags,
                    file,
                    expr.span(),
                    "`annotations` apply to alerting rules only".into(),
                );
            }
        }
        _ => {}
    }
    if let Some(f) = &r.for_ {
        check_duration(diags, file, f, "for");
    }
    if let Some(k) = &r.keep_firing_for {
        check_duration(diags, file, k, "keep_firing_for");
    }
    for label in r.labels.iter().flat_map(|l| l.keys()) {
        if !valid_label_name(label.as_str()) {
            report(
                diags,
                file,
                label.span(),
                format!("`{}` is not a valid label name", label.as_str()),
            );
        }
    }
    if let Err(e) = promql_parser::parser::parse(expr.as_str()) {
        let e = e.trim().replace('\n', "; ");
        report(
            diags,
            file,
            expr.span(),
            format!("invalid PromQL in `expr`: {e}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<String> {
        let f = SourceFile::new("r.yml".into(), "r.yml".into(), text.into());
        let mut d = Diagnostics::default();
        check_rule_file(&f, &mut d);
        d.into_sorted().iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn accepts_alerts_and_recording_rules() {
        let errs = check(
            "groups:\n- name: g\n  rules:\n  - alert: Up\n    expr: up == 0\n    for: 5m\n    labels: {severity: critical}\n  - record: job:up:sum\n    expr: sum by (job) (up)\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn reports_invalid_promql_at_the_expr() {
        let errs = check("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: sum(rate(x[5m])\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("r.yml:5:11: invalid PromQL"),
            "{errs:?}"
        );
    }

    #[test]
    fn reports_bad_durations_unknown_keys_and_duplicate_groups() {
        let errs = check("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    for: 5 minutes\n- name: g\n  rules: []\n");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].contains("r.yml:6:10") && errs[0].contains("not a duration"),
            "{errs:?}"
        );
        assert!(errs[1].contains("defined twice"), "{errs:?}");
        let errs = check("groups:\n- name: g\n  rulez: []\n");
        assert!(errs[0].contains("rulez"), "{errs:?}");
    }

    #[test]
    fn reports_yaml_syntax_errors_with_position() {
        let errs = check("groups:\n  - name: [unclosed\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("r.yml:"), "{errs:?}");
        assert!(errs[0].contains("invalid YAML"), "{errs:?}");
    }
}
