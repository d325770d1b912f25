//! IAM policy documents compared as policies, not as strings.
//!
//! IAM hands documents back URL-encoded, reorders nothing but accepts many spellings of the same
//! policy (a single statement or a list, `"Action": "x"` or `["x"]`, actions in any case). Two
//! documents are equal here when IAM would evaluate them the same way for those spellings, so a
//! reformatted file or IAM's own re-encoding never shows as drift.

use serde_json::{Map, Value};

/// Decodes a document as IAM returns it (URL-encoded JSON, or plain JSON from some emulators).
pub fn decode(raw: &str) -> Result<Value, String> {
    let text = if raw.trim_start().starts_with('{') {
        std::borrow::Cow::Borrowed(raw)
    } else {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|e| format!("policy document is not UTF-8: {e}"))?
    };
    serde_json::from_str(&text).map_err(|e| format!("policy document is not JSON: {e}"))
}

const SET_KEYS: &[&str] = &["Action", "NotAction", "Resource", "NotResource"];

/// The canonical form of a policy document.
pub fn normalize(doc: &Value) -> Value {
    let Value::Object(top) = doc else {
        return doc.clone();
    };
    let mut out = Map::new();
    for (k, v) in top {
        if k == "Statement" {
            let mut statements: Vec<Value> = match v {
                Value::Array(a) => a.iter().map(normalize_statement).collect(),
                other => vec![normalize_statement(other)],
            };
            statements.sort_by_key(|s| s.to_string());
            out.insert(k.clone(), Value::Array(statements));
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

fn normalize_statement(s: &Value) -> Value {
    let Value::Object(map) = s else {
        return s.clone();
    };
    let mut out = Map::new();
    for (k, v) in map {
        let v = match k.as_str() {
            "Action" | "NotAction" => string_set(v, true),
            key if SET_KEYS.contains(&key) => string_set(v, false),
            "Principal" | "NotPrincipal" => match v {
                Value::Object(p) => Value::Object(
                    p.iter()
                        .map(|(pk, pv)| (pk.clone(), string_set(pv, false)))
                        .collect(),
                ),
                other => other.clone(),
            },
            "Condition" => match v {
                Value::Object(ops) => Value::Object(
                    ops.iter()
                        .map(|(op, kv)| {
                            let kv = match kv {
                                Value::Object(m) => Value::Object(
                                    m.iter()
                                        .map(|(ck, cv)| (ck.clone(), string_set(cv, false)))
                                        .collect(),
                                ),
                                other => other.clone(),
                            };
                            (op.clone(), kv)
                        })
                        .collect(),
                ),
                other => other.clone(),
            },
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    Value::Object(out)
}

/// A string or list of strings as a sorted, de-duplicated list.
fn string_set(v: &Value, lowercase: bool) -> Value {
    let mut items: Vec<Value> = match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    };
    if lowercase {
        for i in &mut items {
            if let Value::String(s) = i {
                *s = s.to_ascii_lowercase();
            }
        }
    }
    items.sort_by_key(|i| i.to_string());
    items.dedup();
    Value::Array(items)
}

pub fn equivalent(a: &Value, b: &Value) -> bool {
    normalize(a) == normalize(b)
}

/// Structural checks of a policy document written by the user, beyond being JSON. Returns the
/// problems found as messages.
pub fn check(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Value::Object(top) = doc else {
        return vec!["a policy document is a JSON object".into()];
    };
    for k in top.keys() {
        if !["Version", "Id", "Statement"].contains(&k.as_str()) {
            problems.push(format!(
                "unknown policy element `{k}` (expected Version, Id, Statement)"
            ));
        }
    }
    if let Some(v) = top.get("Version") {
        if v != "2012-10-17" && v != "2008-10-17" {
            problems.push(format!(
                "Version {v} is not a policy language version (use \"2012-10-17\")"
            ));
        }
    }
    let statements = match top.get("Statement") {
        Some(Value::Array(a)) if !a.is_empty() => a.iter().collect::<Vec<_>>(),
        Some(s @ Value::Object(_)) => vec![s],
        _ => {
            problems.push("a policy needs a non-empty `Statement`".into());
            return problems;
        }
    };
    for (i, s) in statements.iter().enumerate() {
        let n = i + 1;
        let Value::Object(st) = s else {
            problems.push(format!("statement {n} is not an object"));
            continue;
        };
        match st.get("Effect").and_then(Value::as_str) {
            Some("Allow" | "Deny") => {}
            _ => problems.push(format!(
                "statement {n}: `Effect` must be \"Allow\" or \"Deny\""
            )),
        }
        if st.contains_key("Action") == st.contains_key("NotAction") {
            problems.push(format!(
                "statement {n}: exactly one of `Action` or `NotAction` is required"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spellings_of_the_same_policy_are_equivalent() {
        let a = json!({"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"aps:RemoteWrite","Resource":"arn:x"}});
        let b = json!({"Version":"2012-10-17","Statement":[{"Resource":["arn:x"],"Action":["APS:RemoteWrite"],"Effect":"Allow"}]});
        assert!(equivalent(&a, &b));
    }

    #[test]
    fn statement_order_and_duplicate_actions_do_not_matter() {
        let a = json!({"Statement":[{"Effect":"Allow","Action":["a:x","a:y"],"Resource":"*"},{"Effect":"Deny","Action":"b:z","Resource":"*"}]});
        let b = json!({"Statement":[{"Effect":"Deny","Action":"b:z","Resource":"*"},{"Effect":"Allow","Action":["a:y","a:x","a:x"],"Resource":"*"}]});
        assert!(equivalent(&a, &b));
    }

    #[test]
    fn a_different_resource_is_a_different_policy() {
        let a = json!({"Statement":[{"Effect":"Allow","Action":"a:x","Resource":"arn:1"}]});
        let b = json!({"Statement":[{"Effect":"Allow","Action":"a:x","Resource":"arn:2"}]});
        assert!(!equivalent(&a, &b));
    }

    #[test]
    fn decodes_url_encoded_documents() {
        let v = decode("%7B%22Version%22%3A%222012-10-17%22%7D").unwrap();
        assert_eq!(v, json!({"Version":"2012-10-17"}));
        assert_eq!(decode("{\"a\":1}").unwrap(), json!({"a":1}));
    }

    #[test]
    fn checks_effect_and_action() {
        assert!(
            check(&json!({"Statement":[{"Effect":"Allow","Action":"a","Resource":"*"}]}))
                .is_empty()
        );
        assert_eq!(
            check(&json!({"Statement":[{"Effect":"allow","Resource":"*"}]})).len(),
            2
        );
        assert_eq!(check(&json!({"Statement":[]})).len(), 1);
    }
}
