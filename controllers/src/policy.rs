//! IAM policy documents compared as policies, not as strings.
//!
//! IAM hands documents back URL-encoded and accepts many spellings of the same policy (a single
//! statement or a list, `"Action": "x"` or `["x"]`, actions in any case, `"Principal": "*"` or
//! `{"AWS": "*"}`, condition values as strings, booleans or numbers); and it stores some in its
//! own form: an account id given as a principal comes back as the account's root ARN. Two
//! documents are equal here when IAM would evaluate them the same way for those spellings, so a
//! reformatted file or IAM's own rewriting never shows as drift.

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
            "Principal" | "NotPrincipal" => principals(v),
            "Condition" => match v {
                Value::Object(ops) => Value::Object(
                    ops.iter()
                        .map(|(op, kv)| {
                            let kv = match kv {
                                Value::Object(m) => Value::Object(
                                    m.iter()
                                        .map(|(ck, cv)| (ck.clone(), condition_values(cv)))
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

/// Principals as IAM evaluates them: `"*"` is `{"AWS": "*"}`, and an account id and its root
/// ARN (`arn:aws:iam::123456789012:root`, which IAM stores for either) are one principal.
fn principals(v: &Value) -> Value {
    let map = match v {
        Value::String(s) if s == "*" => {
            return Value::Object(Map::from_iter([(
                "AWS".to_string(),
                Value::Array(vec![Value::String("*".into())]),
            )]))
        }
        Value::Object(map) => map,
        other => return other.clone(),
    };
    Value::Object(
        map.iter()
            .map(|(kind, values)| {
                let mut set = string_set(values, false);
                if kind == "AWS" {
                    if let Value::Array(items) = &mut set {
                        for item in items.iter_mut() {
                            if let Some(id) = item.as_str().and_then(account_of_root) {
                                *item = Value::String(id);
                            }
                        }
                        items.sort_by_key(|i| i.to_string());
                        items.dedup();
                    }
                }
                (kind.clone(), set)
            })
            .collect(),
    )
}

/// The account id of `arn:<partition>:iam::<id>:root`, or of a bare account id.
fn account_of_root(principal: &str) -> Option<String> {
    let id = match principal.strip_prefix("arn:") {
        Some(rest) => {
            let (_partition, rest) = rest.split_once(':')?;
            rest.strip_prefix("iam::")?.strip_suffix(":root")?
        }
        None => principal,
    };
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_string())
}

/// Condition values: IAM compares them as strings, whatever JSON type they were written in.
fn condition_values(v: &Value) -> Value {
    let as_text = |v: &Value| match v {
        Value::Bool(b) => Value::String(b.to_string()),
        Value::Number(n) => Value::String(n.to_string()),
        other => other.clone(),
    };
    let stringified = match v {
        Value::Array(items) => Value::Array(items.iter().map(as_text).collect()),
        other => as_text(other),
    };
    string_set(&stringified, false)
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

/// What stands for a principal IAM replaced by its unique id.
const DELETED: &str = "(a deleted principal)";

/// The principals of `desired` that `stored` names by a unique id (`AROA...` for a role,
/// `AIDA...` for a user) instead: IAM does that when the role or user a policy names is
/// deleted, and refuses the ARN back until it exists again. `Some` only when that is the whole
/// difference between the two documents.
pub fn deleted_principals(stored: &Value, desired: &Value) -> Option<Vec<String>> {
    let stored = normalize(stored);
    let desired = normalize(desired);
    let mut named = Vec::new();
    walk_principals(&stored, &mut |p| named.push(p.to_string()));
    let mut replaced = Vec::new();
    let desired = map_principals(&desired, &mut |p| {
        let gone = (p.contains(":role/") || p.contains(":user/")) && !named.iter().any(|n| n == p);
        if gone {
            replaced.push(p.to_string());
            DELETED.to_string()
        } else {
            p.to_string()
        }
    });
    let stored = map_principals(&stored, &mut |p| {
        if is_unique_id(p) {
            DELETED.to_string()
        } else {
            p.to_string()
        }
    });
    (!replaced.is_empty() && normalize(&stored) == normalize(&desired)).then_some(replaced)
}

/// `AROA...`, `AIDA...`: the unique ids IAM shows for roles and users it no longer has.
fn is_unique_id(p: &str) -> bool {
    p.len() >= 16
        && (p.starts_with("AROA") || p.starts_with("AIDA"))
        && p.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn walk_principals(doc: &Value, f: &mut impl FnMut(&str)) {
    map_principals(doc, &mut |p| {
        f(p);
        p.to_string()
    });
}

/// The document with every `AWS` principal passed through `f`.
fn map_principals(doc: &Value, f: &mut impl FnMut(&str) -> String) -> Value {
    let mut doc = doc.clone();
    if let Some(Value::Array(statements)) = doc.get_mut("Statement") {
        for st in statements {
            for key in ["Principal", "NotPrincipal"] {
                if let Some(Value::Array(items)) = st.get_mut(key).and_then(|p| p.get_mut("AWS")) {
                    for item in items.iter_mut() {
                        if let Value::String(p) = item {
                            *p = f(p);
                        }
                    }
                }
            }
        }
    }
    doc
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
    fn an_account_id_and_its_root_arn_are_one_principal() {
        let written = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":"123456789012"}}]});
        let stored = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":["arn:aws:iam::123456789012:root"]}}]});
        assert!(equivalent(&written, &stored));
        let gov = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":"arn:aws-us-gov:iam::123456789012:root"}}]});
        assert!(equivalent(&written, &gov));
        let other = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":"210987654321"}}]});
        assert!(!equivalent(&written, &other));
        let a_role = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":"arn:aws:iam::123456789012:role/x"}}]});
        assert!(!equivalent(&written, &a_role), "a role is not the account");
    }

    #[test]
    fn everyone_is_one_principal_however_written() {
        let star =
            json!({"Statement":[{"Effect":"Allow","Action":"s3:GetObject","Principal":"*"}]});
        let aws_star = json!({"Statement":[{"Effect":"Allow","Action":"s3:GetObject","Principal":{"AWS":["*"]}}]});
        assert!(equivalent(&star, &aws_star));
        let service = json!({"Statement":[{"Effect":"Allow","Action":"s3:GetObject","Principal":{"Service":"ec2.amazonaws.com"}}]});
        assert!(!equivalent(&star, &service));
    }

    #[test]
    fn condition_values_compare_as_strings() {
        let typed = json!({"Statement":[{"Effect":"Deny","Action":"s3:*","Resource":"*","Condition":{"Bool":{"aws:SecureTransport":false},"NumericLessThan":{"s3:max-keys":10}}}]});
        let strings = json!({"Statement":[{"Effect":"Deny","Action":"s3:*","Resource":"*","Condition":{"Bool":{"aws:SecureTransport":["false"]},"NumericLessThan":{"s3:max-keys":"10"}}}]});
        assert!(equivalent(&typed, &strings));
        let other = json!({"Statement":[{"Effect":"Deny","Action":"s3:*","Resource":"*","Condition":{"Bool":{"aws:SecureTransport":"true"},"NumericLessThan":{"s3:max-keys":"10"}}}]});
        assert!(!equivalent(&typed, &other));
    }

    #[test]
    fn a_principal_iam_replaced_by_its_unique_id_is_told_apart_from_drift() {
        let desired = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":["arn:aws:iam::123456789012:role/ci","arn:aws:iam::123456789012:role/ops"]}}]});
        let stored = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":["AROAEXAMPLEID1234567","arn:aws:iam::123456789012:role/ops"]}}]});
        assert!(!equivalent(&desired, &stored));
        assert_eq!(
            deleted_principals(&stored, &desired),
            Some(vec!["arn:aws:iam::123456789012:role/ci".to_string()])
        );
        // Anything else that differs is drift as usual.
        let edited = json!({"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"AWS":["AROAEXAMPLEID1234567","arn:aws:iam::123456789012:role/dev"]}}]});
        assert_eq!(deleted_principals(&edited, &desired), None);
        assert_eq!(deleted_principals(&desired, &desired), None);
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
