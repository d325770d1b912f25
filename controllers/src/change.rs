//! What a pass wants to do: one [`Change`] per resource, with the field-level diff a person reads
//! and the operations the controller executes.

use std::fmt;

use serde::Serialize;

use crate::desired::{DesiredState, Resource};
use crate::model::{Kind, Outputs, ResourceId};
use crate::tags::{owner_id, Tags};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `+`: the resource does not exist and will be created.
    Create,
    /// `~`: the resource exists and some fields differ.
    Update,
    /// `-`: an owned resource no longer in the desired state, deleted under
    /// `deletion_policy = "delete"` or `--prune`.
    Delete,
    /// `!`: an owned resource no longer in the desired state, left as it is.
    Orphan,
}

impl Action {
    pub fn symbol(self) -> char {
        match self {
            Action::Create => '+',
            Action::Update => '~',
            Action::Delete => '-',
            Action::Orphan => '!',
        }
    }
}

/// One field that differs. `None` means absent. Sensitive values are never stored here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    pub before: Option<String>,
    pub after: Option<String>,
    /// For a document (rules, a policy, user data): a unified diff of its lines, the whole
    /// document for a create; `before` and `after` are then its digests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl FieldChange {
    pub fn new(field: impl Into<String>, before: Option<String>, after: Option<String>) -> Self {
        FieldChange {
            field: field.into(),
            before,
            after,
            diff: None,
        }
    }

    /// A document's change: its digests as `before` and `after`, and the diff of its lines.
    pub fn document(field: impl Into<String>, before: Option<&str>, after: Option<&str>) -> Self {
        FieldChange {
            field: field.into(),
            before: before.map(digest),
            after: after.map(digest),
            diff: Some(line_diff(before.unwrap_or(""), after.unwrap_or(""))),
        }
    }
}

/// `sha256:` and the first 12 hex digits of the text's SHA-256: how a plan names a document.
pub fn digest(text: &str) -> String {
    format!("sha256:{}", short_digest(text))
}

/// The first 12 hex digits of the text's SHA-256 (where a tag records a document).
pub fn short_digest(text: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..6])
}

/// A unified diff of two texts' lines with three lines of context, without file headers.
pub fn line_diff(before: &str, after: &str) -> String {
    let diff = similar::TextDiff::from_lines(before, after);
    let mut out = String::new();
    for hunk in diff.unified_diff().context_radius(3).iter_hunks() {
        out.push_str(&hunk.to_string());
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// The change a pass makes to one resource.
#[derive(Debug, Clone, Serialize)]
pub struct Change<Op> {
    pub id: ResourceId,
    pub action: Action,
    /// The AWS object, e.g. `role demo-prometheus` or `workspace ws-1234`.
    pub object: String,
    pub fields: Vec<FieldChange>,
    /// Things a person should know (immutable fields, adoption).
    pub notes: Vec<String>,
    /// Shown, never applied.
    pub observe_only: bool,
    /// Attributes the change gives new values, as far as they are known before it is made (a
    /// launch template's next version): a plan shows what references them with these values,
    /// as apply will, where it would otherwise show the current ones.
    #[serde(skip)]
    pub outputs: Outputs,
    #[serde(skip)]
    pub ops: Vec<Op>,
}

impl<Op> Change<Op> {
    pub fn new(id: ResourceId, action: Action, object: impl Into<String>) -> Self {
        Change {
            id,
            action,
            object: object.into(),
            fields: Vec::new(),
            notes: Vec::new(),
            observe_only: false,
            outputs: Outputs::new(),
            ops: Vec::new(),
        }
    }

    pub fn field(
        &mut self,
        field: impl Into<String>,
        before: Option<String>,
        after: Option<String>,
    ) {
        self.fields.push(FieldChange::new(field, before, after));
    }

    pub fn op(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// The tag part of a change: a `tags.<key>` line for each tag that differs, and the
    /// operations (`set`, `remove`) for the keys to set and to remove. stackwarden's own tags
    /// are set without a line of their own; when they are all that differs, a note says so.
    pub fn tags(
        &mut self,
        observed: &Tags,
        desired: &Tags,
        set: impl FnOnce(Tags) -> Op,
        remove: impl FnOnce(Vec<String>) -> Op,
    ) {
        let (to_set, to_remove) = crate::tags::diff(observed, desired);
        if to_set.is_empty() && to_remove.is_empty() {
            return;
        }
        let keys: std::collections::BTreeSet<&String> =
            to_set.keys().chain(to_remove.iter()).collect();
        let (own, chosen): (Vec<&String>, Vec<&String>) = keys
            .into_iter()
            .partition(|k| crate::tags::is_stackwardens(k));
        for key in &chosen {
            self.field(
                format!("tags.{key}"),
                observed.get(*key).cloned(),
                desired.get(*key).cloned(),
            );
        }
        if chosen.is_empty() {
            let own: Vec<&str> = own.iter().map(|k| k.as_str()).collect();
            self.notes.push(format!(
                "stackwarden's own tags are set: {}",
                own.join(", ")
            ));
        }
        if !to_set.is_empty() {
            self.op(set(to_set));
        }
        if !to_remove.is_empty() {
            self.op(remove(to_remove));
        }
    }

    /// Sets the desired tags an object lacks (or has other values of), removing none: how the
    /// tags of an adopted object are kept, its previous owner's staying. `label` names the
    /// object in the plan line.
    pub fn tags_added(
        &mut self,
        label: &str,
        observed: &Tags,
        desired: &Tags,
        set: impl FnOnce(Tags) -> Op,
    ) {
        let (missing, _) = crate::tags::diff(observed, desired);
        if missing.is_empty() {
            return;
        }
        let chosen = crate::tags::chosen(&missing);
        if !chosen.is_empty() {
            self.field(
                format!("tags of {label}"),
                None,
                Some(crate::tags::show(&chosen)),
            );
        }
        self.op(set(missing));
    }

    /// Whether applying it would write anything.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.fields.is_empty() && self.action == Action::Update
    }

    pub fn map_ops<T>(self, f: impl FnMut(Op) -> T) -> Change<T> {
        Change {
            id: self.id,
            action: self.action,
            object: self.object,
            fields: self.fields,
            notes: self.notes,
            observe_only: self.observe_only,
            outputs: self.outputs,
            ops: self.ops.into_iter().map(f).collect(),
        }
    }
}

impl<Op> fmt::Display for Change<Op> {
    /// The plan's text form: the resource line, then each field `before → after`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.action.symbol(), self.id, self.object)?;
        if self.observe_only {
            f.write_str(" [observe only: not applied]")?;
        }
        writeln!(f)?;
        for c in &self.fields {
            let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
            match (&c.before, &c.after) {
                (None, Some(a)) if self.action == Action::Create => {
                    writeln!(f, "    {}: {}", c.field, a)?
                }
                _ => writeln!(
                    f,
                    "    {}: {} → {}",
                    c.field,
                    show(&c.before),
                    show(&c.after)
                )?,
            }
            for line in c.diff.iter().flat_map(|d| d.lines()) {
                writeln!(f, "      {line}")?;
            }
        }
        for n in &self.notes {
            writeln!(f, "    note: {n}")?;
        }
        Ok(())
    }
}

/// Compares two optional display values and records a field change when they differ.
pub fn diff_field<Op>(
    change: &mut Change<Op>,
    field: &str,
    before: Option<String>,
    after: Option<String>,
) -> bool {
    if before != after {
        change.field(field, before, after);
        true
    } else {
        false
    }
}

/// The change for an object the stack owns (by its tags) that no desired resource of `kind`
/// manages any more: orphaned, or deleted with the operations `delete` makes under `prune`.
/// None when the object is not the stack's, or some desired resource manages or adopts it
/// (`manages`).
pub fn removal<Op>(
    desired: &DesiredState,
    kind: Kind,
    tags: &Tags,
    manages: impl Fn(&Resource) -> bool,
    label: String,
    prune: bool,
    delete: impl FnOnce() -> Vec<Op>,
) -> Option<Change<Op>> {
    let id = owner_id(tags, desired.stack_name())?;
    // Objects of other kinds carry the stack's tags too (a Grafana group's instances).
    if id.kind != kind || desired.of_kind(kind).any(manages) {
        return None;
    }
    let action = if prune {
        Action::Delete
    } else {
        Action::Orphan
    };
    let mut c = Change::new(id, action, label);
    if prune {
        c.ops = delete();
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change<&'static str> {
        Change::new(
            ResourceId::parse("iam.role.prometheus").unwrap(),
            Action::Update,
            "role s-prometheus",
        )
    }

    #[test]
    fn a_document_shows_its_digests_and_the_lines_that_differ() {
        let before = "groups:\n- name: node\n  rules:\n  - alert: HighCpu\n    expr: cpu > 80\n";
        let after = "groups:\n- name: node\n  rules:\n  - alert: HighCpu\n    expr: cpu > 90\n";
        let mut c = change();
        c.fields
            .push(FieldChange::document("data", Some(before), Some(after)));
        let text = c.to_string();
        assert!(
            text.contains(&format!(
                "    data: {} → {}\n",
                digest(before),
                digest(after)
            )),
            "{text}"
        );
        assert!(text.contains("      -    expr: cpu > 80\n"), "{text}");
        assert!(text.contains("      +    expr: cpu > 90\n"), "{text}");
        assert!(
            text.contains("       - alert: HighCpu\n"),
            "context kept: {text}"
        );
        assert!(text.contains("      @@ -2,4 +2,4 @@"), "{text}");
    }

    #[test]
    fn a_created_document_is_shown_whole() {
        let f = FieldChange::document("trust", None, Some("{\n  \"a\": 1\n}\n"));
        assert_eq!(f.before, None);
        assert_eq!(
            f.diff.as_deref(),
            Some("@@ -0,0 +1,3 @@\n+{\n+  \"a\": 1\n+}\n")
        );
    }

    #[test]
    fn tags_are_one_line_each_and_stackwardens_own_only_a_note() {
        let observed = Tags::from([("team".into(), "sre".into()), ("old".into(), "x".into())]);
        let mut desired = Tags::from([
            ("team".into(), "obs".into()),
            ("stackwarden:id".into(), "iam.role.prometheus".into()),
        ]);
        let mut c = change();
        c.tags(&observed, &desired, |_| "set", |_| "remove");
        let fields: Vec<(&str, Option<&str>, Option<&str>)> = c
            .fields
            .iter()
            .map(|f| (f.field.as_str(), f.before.as_deref(), f.after.as_deref()))
            .collect();
        assert_eq!(
            fields,
            [
                ("tags.old", Some("x"), None),
                ("tags.team", Some("sre"), Some("obs"))
            ]
        );
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        assert_eq!(c.ops, ["set", "remove"]);

        // Only stackwarden's own tag differs: no tag line, a note, and the tag still set.
        desired.insert("old".into(), "x".into());
        desired.insert("team".into(), "sre".into());
        let mut c = change();
        c.tags(&observed, &desired, |_| "set", |_| "remove");
        assert!(c.fields.is_empty(), "{:?}", c.fields);
        assert_eq!(c.notes, ["stackwarden's own tags are set: stackwarden:id"]);
        assert_eq!(c.ops, ["set"]);
    }
}
