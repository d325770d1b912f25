//! STS `AssumeRole` as AWS answers it. moto hands out credentials for any role ARN, whether
//! the role exists or not and whatever its trust policy says ("the role does not need to
//! exist"); AWS answers `AccessDenied` (403, "User: CALLER is not authorized to perform:
//! sts:AssumeRole on resource: ROLE") unless
//! - the role exists, in the account its ARN names, at the path its ARN names;
//! - its trust policy has a statement allowing `sts:AssumeRole` to a principal that is the
//!   caller: `*`, the caller's account (its id or `arn:aws:iam::ACCOUNT:root`), the caller's
//!   user, or the role whose session the caller is (`arn:aws:iam::ACCOUNT:role/NAME`, or the
//!   session's own `arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION`), with its conditions
//!   holding (`sts:ExternalId` is the request's `ExternalId`, absent when not sent;
//!   `aws:PrincipalArn` and `aws:PrincipalAccount` the caller's), and no statement denies it.
//!
//! What it does not model: that the caller's own identity policy must allow `sts:AssumeRole`
//! too when the role trusts the caller's whole account (the `enforce` setting holds one
//! principal to its policy, `sts:AssumeRole` on the role's ARN included); role chaining's
//! one-hour limit; session policies.
//!
//! Once allowed, moto makes the credentials, and calls signed with them act in the role's
//! account (moto finds the account of an access key it issued).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::Value;

use crate::authorize::{conditions_hold, strings, wildcard};
use crate::moto::{child_text, xml};
use crate::route::Incoming;
use crate::wire::ApiError;
use crate::State;

/// Who signed a call, as STS GetCallerIdentity names them.
struct Caller {
    account: String,
    arn: String,
}

/// Refuses an AssumeRole AWS would refuse.
pub async fn check(state: &Arc<State>, req: &Incoming) -> Result<(), ApiError> {
    let form = req.form();
    let param = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let role = param("RoleArn").unwrap_or_default();
    let external_id = param("ExternalId");
    let caller = caller(state, req).await?;
    let denied = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            format!(
                "User: {} is not authorized to perform: sts:AssumeRole on resource: {role}",
                caller.arn
            ),
        )
    };
    let Some(trust) = trust_policy(state, req, &role).await? else {
        return Err(denied());
    };
    if admits(&trust, &caller, external_id.as_deref()) {
        Ok(())
    } else {
        Err(denied())
    }
}

/// The caller's account and ARN, from moto (which knows the accounts of the keys it issued).
async fn caller(state: &Arc<State>, req: &Incoming) -> Result<Caller, ApiError> {
    let params = [("Action", "GetCallerIdentity"), ("Version", "2011-06-15")]
        .map(|(k, v)| (k.to_string(), v.to_string()));
    let text = state.moto.query(req, "sts", &params).await?;
    let doc = xml(&text)?;
    let result = doc
        .root()
        .descendants()
        .find(|n| n.has_tag_name("GetCallerIdentityResult"))
        .ok_or_else(|| ApiError::internal("moto's GetCallerIdentity names nobody"))?;
    Ok(Caller {
        account: child_text(result, "Account").unwrap_or_default(),
        arn: child_text(result, "Arn").unwrap_or_default(),
    })
}

/// The trust policy of the role `arn` names, read in the role's own account; `None` when there
/// is no such role (a name of that account at another path is not it).
async fn trust_policy(
    state: &Arc<State>,
    req: &Incoming,
    arn: &str,
) -> Result<Option<Value>, ApiError> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let (Some(account), Some(resource)) = (parts.get(4), parts.get(5)) else {
        return Ok(None);
    };
    let Some(name) = resource
        .strip_prefix("role/")
        .map(|r| r.rsplit('/').next().unwrap_or(r))
    else {
        return Ok(None);
    };
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Ok(None);
    }
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("Action", "GetRole"),
            ("Version", "2010-05-08"),
            ("RoleName", name),
        ])
        .finish();
    let request = Incoming::internal_in(req, account, "iam", body.into())?;
    let response = state.moto.forward(&request).await?;
    if !response.status().is_success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(response.body()).into_owned();
    let doc = xml(&text)?;
    let Some(role) = doc.root().descendants().find(|n| n.has_tag_name("Role")) else {
        return Ok(None);
    };
    if child_text(role, "Arn").as_deref() != Some(arn) {
        return Ok(None);
    }
    let document = child_text(role, "AssumeRolePolicyDocument").unwrap_or_default();
    let decoded = if document.trim_start().starts_with('{') {
        document
    } else {
        percent_encoding::percent_decode_str(&document)
            .decode_utf8_lossy()
            .into_owned()
    };
    serde_json::from_str(&decoded)
        .map(Some)
        .map_err(|e| ApiError::internal(format!("the role's trust policy is not JSON: {e}")))
}

/// Whether a trust policy lets `caller` assume the role, sending `external_id`.
fn admits(trust: &Value, caller: &Caller, external_id: Option<&str>) -> bool {
    let mut context = BTreeMap::from([
        ("aws:PrincipalArn".to_string(), vec![principal_arn(caller)]),
        (
            "aws:PrincipalAccount".to_string(),
            vec![caller.account.clone()],
        ),
    ]);
    if let Some(id) = external_id {
        context.insert("sts:ExternalId".into(), vec![id.to_string()]);
    }
    let statements = match &trust["Statement"] {
        Value::Array(list) => list.clone(),
        one @ Value::Object(_) => vec![one.clone()],
        _ => Vec::new(),
    };
    let matching = |effect: &str| {
        statements
            .iter()
            .filter(|s| s["Effect"] == effect)
            .any(|s| {
                strings(&s["Action"])
                    .iter()
                    .any(|a| wildcard(a, "sts:AssumeRole", true))
                    && names(&s["Principal"], caller)
                    && conditions_hold(&s["Condition"], &context)
            })
    };
    matching("Allow") && !matching("Deny")
}

/// The IAM principal behind the caller: a session's role (`arn:aws:iam::A:role/NAME`), or the
/// caller's own ARN.
fn principal_arn(caller: &Caller) -> String {
    match caller
        .arn
        .split_once(":assumed-role/")
        .and_then(|(_, rest)| rest.split('/').next())
    {
        Some(role) => format!("arn:aws:iam::{}:role/{role}", caller.account),
        None => caller.arn.clone(),
    }
}

/// Whether a statement's `Principal` names the caller.
fn names(principal: &Value, caller: &Caller) -> bool {
    if principal == "*" {
        return true;
    }
    let own = principal_arn(caller);
    let own_name = own.rsplit('/').next().unwrap_or_default();
    let root = format!("arn:aws:iam::{}:root", caller.account);
    strings(&principal["AWS"]).iter().any(|p| {
        p == "*"
            || *p == caller.account
            || *p == root
            || *p == caller.arn
            || *p == own
            // A role named with its path: the session's ARN carries only its name.
            || (own.contains(":role/")
                && p.starts_with(&format!("arn:aws:iam::{}:role/", caller.account))
                && p.rsplit('/').next() == Some(own_name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Caller {
        Caller {
            account: "123456789012".into(),
            arn: "arn:aws:iam::123456789012:user/operator".into(),
        }
    }

    fn trusting(principal: Value, condition: Value) -> Value {
        json!({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRole",
            "Principal": principal, "Condition": condition,
        }]})
    }

    #[test]
    fn the_account_root_its_id_and_the_user_itself_admit_the_caller() {
        for p in [
            json!({"AWS": "arn:aws:iam::123456789012:root"}),
            json!({"AWS": "123456789012"}),
            json!({"AWS": ["arn:aws:iam::999999999999:root", "arn:aws:iam::123456789012:user/operator"]}),
            json!("*"),
        ] {
            assert!(
                admits(&trusting(p.clone(), Value::Null), &base(), None),
                "{p}"
            );
        }
        for p in [
            json!({"AWS": "arn:aws:iam::999999999999:root"}),
            json!({"AWS": "arn:aws:iam::123456789012:user/someone-else"}),
            json!({"Service": "ec2.amazonaws.com"}),
        ] {
            assert!(
                !admits(&trusting(p.clone(), Value::Null), &base(), None),
                "{p}"
            );
        }
    }

    #[test]
    fn a_role_session_is_admitted_by_its_role_with_or_without_path() {
        let session = Caller {
            account: "123456789012".into(),
            arn: "arn:aws:sts::123456789012:assumed-role/management/i-0abc".into(),
        };
        for p in [
            "arn:aws:iam::123456789012:role/management",
            "arn:aws:iam::123456789012:role/ops/management",
        ] {
            assert!(
                admits(&trusting(json!({"AWS": p}), Value::Null), &session, None),
                "{p}"
            );
        }
        let other = json!({"AWS": "arn:aws:iam::123456789012:role/other"});
        assert!(!admits(&trusting(other, Value::Null), &session, None));
    }

    #[test]
    fn an_external_id_condition_needs_that_external_id() {
        let trust = trusting(
            json!({"AWS": "arn:aws:iam::123456789012:root"}),
            json!({"StringEquals": {"sts:ExternalId": "stackwarden-prod"}}),
        );
        assert!(admits(&trust, &base(), Some("stackwarden-prod")));
        assert!(!admits(&trust, &base(), Some("stackwarden-dev")));
        assert!(!admits(&trust, &base(), None));
    }

    #[test]
    fn a_deny_wins_and_another_action_does_not_admit() {
        let mut trust = trusting(json!({"AWS": "123456789012"}), Value::Null);
        trust["Statement"]
            .as_array_mut()
            .unwrap()
            .push(json!({"Effect": "Deny", "Action": "sts:*", "Principal": "*"}));
        assert!(!admits(&trust, &base(), None));
        let web = json!({"Statement": {"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity", "Principal": "*"}});
        assert!(!admits(&web, &base(), None));
    }
}
