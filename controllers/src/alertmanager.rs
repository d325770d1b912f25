//! Offline checks of an AMP alertmanager definition: a YAML document with an
//! `alertmanager_config` string (Alertmanager's own configuration) and optional `template_files`.
//! Checks the structure, that every receiver a route names exists, and the grouping durations.

use std::collections::{BTreeMap, BTreeSet};

use marked_yaml::Spanned;
use serde::Deserialize;

use crate::diag::{Diagnostics, SourceFile};
use crate::rules::parse_yaml;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Definition {
    alertmanager_config: Spanned<String>,
    #[serde(default)]
    template_files: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Config {
    route: Option<Route>,
    #[serde(default)]
    receivers: Vec<Receiver>,
}

#[derive(Deserialize)]
struct Route {
    receiver: Option<Spanned<String>>,
    group_wait: Option<Spanned<String>>,
    group_interval: Option<Spanned<String>>,
    repeat_interval: Option<Spanned<String>>,
    #[serde(default)]
    routes: Vec<Route>,
}

#[derive(Deserialize)]
struct Receiver {
    name: Spanned<String>,
    /// `sns_configs`, `slack_configs`, ...: AMP delivers only to SNS.
    #[serde(flatten)]
    integrations: BTreeMap<String, serde::de::IgnoredAny>,
}

/// Checks a definition file; every problem is reported against the definition file. Positions
/// inside the embedded configuration are counted from the line `alertmanager_config` starts on.
pub fn check_definition(file: &SourceFile, diags: &mut Diagnostics) {
    let Some(def): Option<Definition> = parse_yaml(file, diags, "alertmanager definition") else {
        return;
    };
    let _ = def.template_files;
    // The block scalar's span starts on its first content line; its content is de-indented.
    let start_line = def
        .alertmanager_config
        .span()
        .start()
        .map(|m| m.line())
        .unwrap_or(1);
    let indent = file
        .text
        .lines()
        .nth(start_line - 1)
        .map(|l| l.len() - l.trim_start().len())
        .unwrap_or(0);
    let to_file = |line: usize, column: usize| crate::diag::Loc {
        file: file.display.clone(),
        line: start_line + line - 1,
        column: column + indent,
    };
    let inner = SourceFile::new(
        file.path.clone(),
        file.display.clone(),
        def.alertmanager_config.as_str().to_string(),
    );
    let mut inner_diags = Diagnostics::default();
    let parsed: Option<Config> = parse_yaml(&inner, &mut inner_diags, "alertmanager_config");
    for d in inner_diags.into_sorted() {
        diags.error(to_file(d.loc.line, d.loc.column), d.message);
    }
    let Some(config) = parsed else { return };
    let at = |s: &marked_yaml::Span| {
        let (line, column) = s.start().map(|m| (m.line(), m.column())).unwrap_or((1, 1));
        to_file(line, column)
    };
    let names: BTreeSet<&str> = config.receivers.iter().map(|r| r.name.as_str()).collect();
    for r in &config.receivers {
        for key in r.integrations.keys().filter(|k| *k != "sns_configs") {
            diags.error(
                at(r.name.span()),
                format!(
                    "receiver `{}`: `{key}` is not supported by Amazon Managed Service for Prometheus, which delivers only to SNS (`sns_configs`); reach Slack or email through SNS topics",
                    r.name.as_str()
                ),
            );
        }
    }
    let Some(route) = &config.route else {
        diags.at(file, 0, "alertmanager_config has no `route`");
        return;
    };
    if route.receiver.is_none() {
        diags.at(file, 0, "the top-level route needs a `receiver`");
    }
    let mut stack = vec![route];
    while let Some(r) = stack.pop() {
        if let Some(recv) = &r.receiver {
            if !names.contains(recv.as_str()) {
                diags.error(
                    at(recv.span()),
                    format!(
                        "route names receiver `{}`, which is not defined",
                        recv.as_str()
                    ),
                );
            }
        }
        for d in [&r.group_wait, &r.group_interval, &r.repeat_interval]
            .into_iter()
            .flatten()
        {
            if let Err(e) = parse_duration(d.as_str()) {
                diags.error(
                    at(d.span()),
                    format!("`{}` is not a duration ({e})", d.as_str()),
                );
            }
        }
        stack.extend(r.routes.iter());
    }
}

/// A Prometheus duration as Alertmanager reads it, where zero (`0s`) is allowed.
fn parse_duration(text: &str) -> Result<(), String> {
    let zero = text
        .strip_prefix('0')
        .is_some_and(|unit| ["", "ms", "s", "m", "h", "d", "w", "y"].contains(&unit));
    if zero {
        return Ok(());
    }
    promql_parser::util::parse_duration(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<String> {
        let f = SourceFile::new("am.yml".into(), "am.yml".into(), text.into());
        let mut d = Diagnostics::default();
        check_definition(&f, &mut d);
        d.into_sorted().iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn accepts_routes_to_defined_receivers() {
        let errs = check("alertmanager_config: |\n  route:\n    receiver: a\n    routes:\n      - receiver: b\n        group_wait: 30s\n  receivers:\n    - name: a\n    - name: b\n");
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn reports_undefined_receivers_where_they_are_named() {
        let errs = check("alertmanager_config: |\n  route:\n    receiver: a\n    routes:\n      - receiver: nope\n  receivers:\n    - name: a\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("am.yml:5:19:"), "{errs:?}");
        assert!(errs[0].contains("`nope`"), "{errs:?}");
    }

    #[test]
    fn zero_durations_are_durations() {
        assert!(parse_duration("0s").is_ok());
        assert!(parse_duration("0").is_ok());
        assert!(parse_duration("0x").is_err());
        assert!(parse_duration("1h30m").is_ok());
    }

    #[test]
    fn refuses_receivers_amp_cannot_deliver_to() {
        let errs = check("alertmanager_config: |\n  route:\n    receiver: a\n  receivers:\n    - name: a\n      slack_configs:\n        - channel: '#ops'\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("am.yml:5:13:"), "{errs:?}");
        assert!(
            errs[0].contains("`slack_configs` is not supported"),
            "{errs:?}"
        );
    }
}
