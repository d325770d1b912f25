//! Ownership tags and tag diffs, shared by every controller.
//!
//! An object belongs to a desired resource when it carries both `stackwarden:stack = <stack>` and
//! `stackwarden:id = <address>`. Tags under `aws:` are AWS's own and never touched. Other
//! `stackwarden:` tags are the controllers' bookkeeping (the hash of what was pushed or put),
//! written by the controller that owns them and never removed as drift.

use std::collections::BTreeMap;

use crate::desired::{TAG_ID, TAG_STACK};
use crate::model::ResourceId;

pub type Tags = BTreeMap<String, String>;

/// Whether an object carries this resource's ownership tags.
pub fn owned_by(tags: &Tags, stack: &str, id: &ResourceId) -> bool {
    tags.get(TAG_STACK).map(String::as_str) == Some(stack)
        && tags.get(TAG_ID) == Some(&id.to_string())
}

/// The address an object's ownership tags give it, when it belongs to `stack`.
pub fn owner_id(tags: &Tags, stack: &str) -> Option<ResourceId> {
    if tags.get(TAG_STACK).map(String::as_str) != Some(stack) {
        return None;
    }
    ResourceId::parse(tags.get(TAG_ID)?)
}

/// The other stack an object belongs to, when its `stackwarden:stack` tag names one: such an
/// object is never adopted, changed or deleted by this stack, whatever the desired state says.
pub fn other_stack<'t>(tags: &'t Tags, stack: &str) -> Option<&'t str> {
    tags.get(TAG_STACK)
        .map(String::as_str)
        .filter(|owner| *owner != stack)
}

/// The error for adopting an object another stack owns.
pub fn owned_elsewhere(what: &str, id: &str, owner: &str) -> crate::error::Error {
    crate::error::Error::NotOwned(format!(
        "{what} `{id}` belongs to the stack `{owner}` (its `{TAG_STACK}` tag): a stack never takes over another stack's objects; remove `adopt`, or remove the object from `{owner}` first"
    ))
}

/// Whether a tag is a controller's bookkeeping rather than part of the desired tags.
fn is_bookkeeping(key: &str) -> bool {
    key.starts_with("stackwarden:") && key != TAG_STACK && key != TAG_ID
}

/// What to set and which keys to remove to take `observed` to `desired`. AWS's own tags and
/// the controllers' bookkeeping tags are never removed.
pub fn diff(observed: &Tags, desired: &Tags) -> (Tags, Vec<String>) {
    let set = desired
        .iter()
        .filter(|(k, v)| observed.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let remove = observed
        .keys()
        .filter(|k| !desired.contains_key(*k) && !k.starts_with("aws:") && !is_bookkeeping(k))
        .cloned()
        .collect();
    (set, remove)
}

/// Whether a plan leaves the tag out: stackwarden's own (ownership and bookkeeping), which
/// every object it makes carries and no reviewer chose.
pub fn is_stackwardens(key: &str) -> bool {
    key.starts_with("stackwarden:")
}

/// The tags a plan shows: the desired ones, stackwarden's own left out.
pub fn chosen(t: &Tags) -> Tags {
    t.iter()
        .filter(|(k, _)| !is_stackwardens(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `{k=v, ...}` for plans.
pub fn show(t: &Tags) -> String {
    let parts: Vec<String> = t.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sets_missing_and_changed_removes_extra_keeps_aws_tags() {
        let observed = Tags::from([
            ("a".into(), "1".into()),
            ("b".into(), "old".into()),
            ("aws:x".into(), "y".into()),
            ("c".into(), "3".into()),
        ]);
        let desired = Tags::from([
            ("a".into(), "1".into()),
            ("b".into(), "new".into()),
            ("d".into(), "4".into()),
        ]);
        let (set, remove) = diff(&observed, &desired);
        assert_eq!(
            set,
            Tags::from([("b".into(), "new".into()), ("d".into(), "4".into())])
        );
        assert_eq!(remove, vec!["c".to_string()]);
    }

    #[test]
    fn bookkeeping_tags_stay_and_ownership_tags_are_diffed() {
        let observed = Tags::from([
            ("stackwarden:prometheus".into(), "abc".into()),
            (TAG_ID.into(), "host.old".into()),
        ]);
        let (set, remove) = diff(&observed, &Tags::from([("a".into(), "1".into())]));
        assert_eq!(set.len(), 1);
        assert_eq!(remove, vec![TAG_ID.to_string()]);
    }
}
