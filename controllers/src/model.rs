//! Resource identity and references between resources.
//!
//! A resource is addressed as `<kind>.<name>` (`iam.role.prometheus`, `host.prometheus`). Some
//! tables the user writes are composites that expand into several AWS objects, each a node of
//! its own addressed below the table: `amp.workspace.main.rule_groups.node`,
//! `amp.workspace.main.alertmanager`, `host.prometheus.security_group`,
//! `grafana.main.ingress.alb`. A reference to one of its attributes is written
//! `${iam.role.prometheus.arn}` in any string of the desired state or of a file it points at; a
//! table's attribute that belongs to one of its parts (`${host.prometheus.security_group_id}`)
//! names that part, so what uses it waits for the part alone. References are resolved from *observed* state at
//! plan time, never from memory, so a resource recreated out of band updates everything that
//! names it in the same pass.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use crate::kind::Kind;

/// The address of one node of the desired state: a table the user wrote, or a part of one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId {
    pub kind: Kind,
    /// The name of the table (for a part, of its composite).
    pub name: String,
    /// For a keyed part (a rule groups namespace), its key.
    pub key: Option<String>,
}

impl ResourceId {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        ResourceId {
            kind,
            name: name.into(),
            key: None,
        }
    }

    /// A part of the composite `name`: `part(crate::amp::RULE_GROUPS, "main", Some("node"))` is
    /// `amp.workspace.main.rule_groups.node`.
    pub fn part(kind: Kind, name: impl Into<String>, key: Option<String>) -> Self {
        ResourceId {
            kind,
            name: name.into(),
            key,
        }
    }

    /// The table the user wrote that this node comes from (itself, for a table).
    pub fn composite(&self) -> ResourceId {
        match self.kind.part_of() {
            Some((table, _, _)) => ResourceId::new(table, self.name.clone()),
            None => self.clone(),
        }
    }

    /// Parses `iam.role.prometheus` or `amp.workspace.main.rule_groups.node`.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some((kind, name)) = s.rsplit_once('.') {
            if let Some(kind) = Kind::from_path(kind).filter(|k| k.is_table()) {
                return Some(ResourceId::new(kind, name));
            }
        }
        Kind::all().find_map(|kind| {
            let (table, word, keyed) = kind.part_of()?;
            let rest = s.strip_prefix(table.path())?.strip_prefix('.')?;
            let (name, tail) = rest.split_once('.')?;
            let key = if keyed {
                let key = tail.strip_prefix(word)?.strip_prefix('.')?;
                (!key.is_empty()).then(|| key.to_string())?.into()
            } else {
                (tail == word).then_some(None)?
            };
            (!name.is_empty()).then(|| ResourceId::part(kind, name, key))
        })
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind.part_of() {
            None => write!(f, "{}.{}", self.kind.path(), self.name),
            Some((table, word, _)) => {
                write!(f, "{}.{}.{word}", table.path(), self.name)?;
                match &self.key {
                    Some(key) => write!(f, ".{key}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl serde::Serialize for ResourceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a `${...}` names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `${stack.name}`, `${stack.region}`.
    Stack(String),
    /// `${iam.role.prometheus.arn}`.
    Resource(ResourceId, String),
}

/// One `${...}` occurrence in a string: byte range of the whole `${...}` and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUse {
    pub range: std::ops::Range<usize>,
    pub target: Result<Target, String>,
}

impl RefUse {
    /// Whether this `${...}` of `text` is meant as a reference: it parses as one, or it begins
    /// with `stack.` or the first word of a kind (`iam.`, `amp.`, `host.`, ...). Files pushed
    /// to hosts use `${...}` for their own variables (Grafana's `${datasource}`, environment
    /// expansion in promtail or the ADOT collector): those are left as written.
    pub fn is_meant(&self, text: &str) -> bool {
        let inner = text[self.range.clone()]
            .trim_start_matches("${")
            .trim_start();
        self.target.is_ok()
            || std::iter::once("stack")
                .chain(Kind::all().map(|k| k.path().split('.').next().unwrap_or_default()))
                .any(|word| {
                    inner
                        .strip_prefix(word)
                        .is_some_and(|rest| rest.starts_with('.'))
                })
    }
}

pub const STACK_ATTRIBUTES: &[&str] = &["name", "region"];

/// Finds every `${...}` in `text`. `$${` is an escaped literal `${`.
pub fn scan_refs(text: &str) -> Vec<RefUse> {
    let mut out = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    while let Some(pos) = text[i..].find("${") {
        let start = i + pos;
        if start > 0 && bytes[start - 1] == b'$' {
            i = start + 2;
            continue;
        }
        let Some(len) = text[start + 2..].find('}') else {
            out.push(RefUse {
                range: start..text.len(),
                target: Err("unterminated `${`: a reference ends with `}`".into()),
            });
            break;
        };
        let inner = &text[start + 2..start + 2 + len];
        out.push(RefUse {
            range: start..start + 3 + len,
            target: parse_target(inner),
        });
        i = start + 3 + len;
    }
    out
}

fn parse_target(inner: &str) -> Result<Target, String> {
    let inner = inner.trim();
    let Some((path, attr)) = inner.rsplit_once('.') else {
        return Err(format!(
            "`${{{inner}}}` is not a reference: write `${{<kind>.<name>.<attribute>}}`, e.g. `${{amp.workspace.main.arn}}`; `$${{` writes a literal `${{`"
        ));
    };
    if path == "stack" {
        return if STACK_ATTRIBUTES.contains(&attr) {
            Ok(Target::Stack(attr.to_string()))
        } else {
            Err(format!(
                "`stack` has no attribute `{attr}` (known: {})",
                STACK_ATTRIBUTES.join(", ")
            ))
        };
    }
    let Some(id) = ResourceId::parse(path) else {
        let kinds: Vec<_> = Kind::all()
            .filter(|k| k.is_table())
            .map(|k| k.path())
            .collect();
        return Err(format!(
            "`${{{inner}}}` names no resource kind (known kinds: {})",
            kinds.join(", ")
        ));
    };
    if !id.kind.attributes().contains(&attr) {
        return Err(format!(
            "{} has no attribute `{attr}` (known: {})",
            id.kind,
            id.kind.attributes().join(", ")
        ));
    }
    Ok(match id.kind.attribute_part(attr) {
        Some((kind, key, attr)) => Target::Resource(
            ResourceId::part(kind, id.name, key.map(String::from)),
            attr.to_string(),
        ),
        None => Target::Resource(id, attr.to_string()),
    })
}

/// The resources a string references.
pub fn references_in(s: &str) -> BTreeSet<ResourceId> {
    scan_refs(s)
        .into_iter()
        .filter_map(|r| match r.target {
            Ok(Target::Resource(id, _)) => Some(id),
            _ => None,
        })
        .collect()
}

/// Attribute values of one existing resource.
pub type Outputs = BTreeMap<String, String>;

/// Shown wherever a value depends on a resource that does not exist yet.
pub const KNOWN_AFTER_APPLY: &str = "(known after apply)";

/// The values references resolve to in one pass: the stack's own attributes and the outputs of
/// every resource that exists (observed, or created earlier in this pass).
#[derive(Debug, Clone, Default)]
pub struct Refs {
    pub stack: BTreeMap<String, String>,
    pub outputs: BTreeMap<ResourceId, Outputs>,
}

/// A string with its references substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub value: String,
    /// Resources whose attributes were not known (they do not exist yet).
    pub unknown: BTreeSet<ResourceId>,
}

impl Rendered {
    pub fn is_known(&self) -> bool {
        self.unknown.is_empty()
    }
}

impl Refs {
    pub fn lookup(&self, target: &Target) -> Option<&str> {
        match target {
            Target::Stack(attr) => self.stack.get(attr).map(String::as_str),
            Target::Resource(id, attr) => self.outputs.get(id)?.get(attr).map(String::as_str),
        }
    }

    /// Substitutes every reference; unknown ones become [`KNOWN_AFTER_APPLY`]. References were
    /// checked by validation, so a malformed one here is left as written.
    pub fn render(&self, text: &str) -> Rendered {
        let mut value = String::with_capacity(text.len());
        let mut unknown = BTreeSet::new();
        let mut last = 0;
        for r in scan_refs(text) {
            value.push_str(&text[last..r.range.start]);
            match &r.target {
                Ok(t) => match self.lookup(t) {
                    Some(v) => value.push_str(v),
                    None => {
                        if let Target::Resource(id, _) = t {
                            unknown.insert(id.clone());
                        }
                        value.push_str(KNOWN_AFTER_APPLY);
                    }
                },
                Err(_) => value.push_str(&text[r.range.clone()]),
            }
            last = r.range.end;
        }
        value.push_str(&text[last..]);
        Rendered {
            value: value.replace("$${", "${"),
            unknown,
        }
    }

    /// Renders every string inside a JSON document.
    pub fn render_json(
        &self,
        doc: &serde_json::Value,
    ) -> (serde_json::Value, BTreeSet<ResourceId>) {
        let mut unknown = BTreeSet::new();
        let value = self.render_json_inner(doc, &mut unknown);
        (value, unknown)
    }

    fn render_json_inner(
        &self,
        doc: &serde_json::Value,
        unknown: &mut BTreeSet<ResourceId>,
    ) -> serde_json::Value {
        use serde_json::Value;
        match doc {
            Value::String(s) => {
                let r = self.render(s);
                unknown.extend(r.unknown);
                Value::String(r.value)
            }
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|v| self.render_json_inner(v, unknown))
                    .collect(),
            ),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.clone(), self.render_json_inner(v, unknown)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_references_with_their_ranges() {
        let refs = scan_refs("a ${amp.workspace.main.arn} b ${stack.name}");
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].range, 2..27);
        assert_eq!(
            refs[0].target,
            Ok(Target::Resource(
                ResourceId::new(crate::amp::WORKSPACE, "main"),
                "arn".into()
            ))
        );
        assert_eq!(refs[1].target, Ok(Target::Stack("name".into())));
    }

    #[test]
    fn rejects_unknown_kinds_attributes_and_unterminated_references() {
        assert!(scan_refs("${amp.wrkspace.main.arn}")[0].target.is_err());
        assert!(scan_refs("${amp.workspace.main.nope}")[0].target.is_err());
        assert!(scan_refs("${iam.role.x.arn")[0].target.is_err());
        assert!(scan_refs("${oops}")[0].target.is_err());
    }

    #[test]
    fn only_references_meant_as_ours_count_in_host_files() {
        let text =
            "${datasource} ${env:HOME} ${amp.workspace.main.arn} ${host.app.colour} ${stack.name}";
        let meant: Vec<&str> = scan_refs(text)
            .iter()
            .filter(|r| r.is_meant(text))
            .map(|r| &text[r.range.clone()])
            .collect();
        assert_eq!(
            meant,
            [
                "${amp.workspace.main.arn}",
                "${host.app.colour}",
                "${stack.name}"
            ]
        );
    }

    #[test]
    fn part_addresses_print_and_parse_back() {
        for (id, text) in [
            (
                ResourceId::part(crate::amp::RULE_GROUPS, "main", Some("node.v2".into())),
                "amp.workspace.main.rule_groups.node.v2",
            ),
            (
                ResourceId::part(crate::amp::ALERTMANAGER, "main", None),
                "amp.workspace.main.alertmanager",
            ),
            (
                ResourceId::new(crate::amp::WORKSPACE, "rule_groups"),
                "amp.workspace.rule_groups",
            ),
            (ResourceId::new(crate::iam::ROLE, "x"), "iam.role.x"),
        ] {
            assert_eq!(id.to_string(), text);
            assert_eq!(ResourceId::parse(text), Some(id.clone()), "{text}");
        }
        assert_eq!(
            ResourceId::part(crate::amp::LOGGING, "main", None).composite(),
            ResourceId::new(crate::amp::WORKSPACE, "main")
        );
        assert_eq!(ResourceId::parse("amp.workspace.main.nothing"), None);
        assert_eq!(ResourceId::parse("amp.workspace.rule_groups.x"), None);
    }

    #[test]
    fn escaped_dollar_is_literal() {
        assert!(scan_refs("$${aws:username}").is_empty());
        let refs = Refs::default();
        assert_eq!(refs.render("$${aws:username}").value, "${aws:username}");
    }

    #[test]
    fn renders_known_values_and_marks_unknown_ones() {
        let mut refs = Refs::default();
        let ws = ResourceId::new(crate::amp::WORKSPACE, "main");
        refs.outputs
            .insert(ws.clone(), [("arn".into(), "arn:ws".into())].into());
        let r = refs.render("x ${amp.workspace.main.arn} y");
        assert_eq!(r.value, "x arn:ws y");
        assert!(r.is_known());
        let r = refs.render("${iam.role.a.arn}");
        assert_eq!(r.value, KNOWN_AFTER_APPLY);
        assert!(r.unknown.contains(&ResourceId::new(crate::iam::ROLE, "a")));
    }
}
