//! What a kind of resource is: its address, its attributes, its schema and offline checks, and
//! its controller, all in one [`KindDef`] that the kind's own module declares. The crate's
//! [`KINDS`](crate::KINDS) lists them, one line each; the loader, the desired-state model and
//! the engine know kinds only through it.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::IntoDeserializer;
use toml::de::DeValue;
use toml::Spanned;

use crate::controller::DynController;
use crate::desired::{DesiredState, KindSpec, Spec};
use crate::diag::Diagnostics;

/// A kind of resource: a handle on its [`KindDef`]. Kinds compare by identity and order by
/// their place in [`KINDS`](crate::KINDS), which is the order a pass applies them when no
/// reference says otherwise (removals run in reverse).
#[derive(Clone, Copy)]
pub struct Kind(&'static KindDef);

/// Everything about one kind, declared by its module as a `static` and named by a `const`
/// [`Kind`]: `static DEF: KindDef = ...; pub const ROLE: Kind = Kind::new(&DEF);`.
pub struct KindDef {
    /// The dotted path of the kind in TOML, in addresses and in references (`iam.role`,
    /// `host`; a part's is its table's followed by its word: `host.volume`).
    pub path: &'static str,
    /// Attributes a reference may name, and that the controller reports once the object exists.
    pub attributes: &'static [&'static str],
    /// A table users write, or a part a table expands into.
    pub form: Form,
    /// Attributes of a table that belong to one of its parts: `(attribute, part kind, part
    /// key, the part's attribute)`. `${host.x.security_group_id}` names the host's security
    /// group node, so what references it waits for the group only.
    pub attribute_parts: &'static [(&'static str, Kind, Option<&'static str>, &'static str)],
    /// Checks and links that need the whole desired state (two resources naming one AWS
    /// object; the hosts a config targets), run once all tables are expanded.
    pub whole: Option<fn(Kind, &mut DesiredState, &mut Diagnostics)>,
    /// The kind's controller.
    pub controller: fn() -> Box<dyn DynController>,
}

/// How a kind appears in the desired state.
pub enum Form {
    /// A table users write; its schema deserializes one resource's TOML table (the common
    /// keys `adopt` and `observe_only` already taken out).
    Table { schema: Schema },
    /// A part of a composite table, made by expanding it: the table's kind, the part's word in
    /// the address, and whether several parts of the kind exist, told apart by a key.
    Part {
        of: Kind,
        word: &'static str,
        keyed: bool,
    },
}

/// Deserializes one resource's table into its kind's spec.
pub type Schema = for<'a> fn(Spanned<DeValue<'a>>) -> Result<Spec, toml::de::Error>;

/// The [`Schema`] of a table whose spec is `T`.
pub fn schema<T>(value: Spanned<DeValue<'_>>) -> Result<Spec, toml::de::Error>
where
    T: KindSpec + serde::de::DeserializeOwned,
{
    Ok(Spec::new(T::deserialize(value.into_deserializer())?))
}

impl Kind {
    pub const fn new(def: &'static KindDef) -> Kind {
        Kind(def)
    }

    /// Every kind, in order.
    pub fn all() -> impl Iterator<Item = Kind> {
        crate::KINDS.iter().copied()
    }

    pub fn path(self) -> &'static str {
        self.0.path
    }

    pub fn from_path(path: &str) -> Option<Kind> {
        Kind::all().find(|k| k.path() == path)
    }

    pub fn attributes(self) -> &'static [&'static str] {
        self.0.attributes
    }

    /// For a part: the table's kind, the part's word in the address, and whether it is keyed.
    pub fn part_of(self) -> Option<(Kind, &'static str, bool)> {
        match self.0.form {
            Form::Part { of, word, keyed } => Some((of, word, keyed)),
            Form::Table { .. } => None,
        }
    }

    /// Whether users write this kind as a table of its own (parts come from their composite).
    pub fn is_table(self) -> bool {
        matches!(self.0.form, Form::Table { .. })
    }

    /// The schema of a table kind.
    pub fn schema(self) -> Option<Schema> {
        match self.0.form {
            Form::Table { schema } => Some(schema),
            Form::Part { .. } => None,
        }
    }

    /// An attribute of a table that belongs to one of its parts: `(part kind, part key, the
    /// part's attribute)`.
    pub fn attribute_part(self, attr: &str) -> Option<(Kind, Option<&'static str>, &'static str)> {
        self.0
            .attribute_parts
            .iter()
            .find(|(a, ..)| *a == attr)
            .map(|(_, kind, key, attr)| (*kind, *key, *attr))
    }

    /// Runs the kind's whole-state checks and links, if it has any.
    pub fn check_whole(self, desired: &mut DesiredState, diags: &mut Diagnostics) {
        if let Some(whole) = self.0.whole {
            whole(self, desired, diags);
        }
    }

    pub fn controller(self) -> Box<dyn DynController> {
        (self.0.controller)()
    }

    /// The kind's place in [`KINDS`](crate::KINDS).
    fn rank(self) -> usize {
        crate::KINDS
            .iter()
            .position(|k| *k == self)
            .expect("every kind is registered in KINDS")
    }

    /// The first words of every table kind's path (`iam`, `amp`, `host`, ...): the TOML
    /// sections, in order, without repeats.
    pub fn sections() -> Vec<&'static str> {
        let mut seen = BTreeSet::new();
        Kind::all()
            .filter(|k| k.is_table())
            .map(|k| k.path().split('.').next().unwrap_or_default())
            .filter(|s| seen.insert(*s))
            .collect()
    }
}

impl PartialEq for Kind {
    fn eq(&self, other: &Kind) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Kind {}

impl PartialOrd for Kind {
    fn partial_cmp(&self, other: &Kind) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Kind {
    fn cmp(&self, other: &Kind) -> std::cmp::Ordering {
        if self == other {
            std::cmp::Ordering::Equal
        } else {
            self.rank().cmp(&other.rank())
        }
    }
}

impl std::hash::Hash for Kind {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.path.hash(state);
    }
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

impl serde::Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths are unique, a part's path is its table's followed by its word, a part's table is
    /// registered before it, and every attribute a table hands to a part is one the part has.
    #[test]
    fn the_registered_kinds_are_consistent() {
        let all: Vec<Kind> = Kind::all().collect();
        assert_eq!(all.len(), crate::KINDS.len());
        let paths: BTreeSet<&str> = all.iter().map(|k| k.path()).collect();
        assert_eq!(paths.len(), all.len(), "two kinds share a path");
        for k in &all {
            assert_eq!(Kind::from_path(k.path()), Some(*k));
            if let Some((table, word, _)) = k.part_of() {
                assert!(table.is_table(), "{k}: a part of a part");
                assert_eq!(k.path(), format!("{}.{word}", table.path()));
            } else {
                assert!(k.schema().is_some());
            }
            for (attr, part, _, part_attr) in k.0.attribute_parts {
                assert!(k.attributes().contains(attr), "{k}: {attr}");
                assert_eq!(part.part_of().map(|p| p.0), Some(*k), "{k}: {attr}");
                assert!(part.attributes().contains(part_attr), "{k}: {attr}");
            }
        }
        assert_eq!(
            Kind::sections(),
            ["iam", "amp", "amg", "host", "grafana", "host_config"]
        );
    }
}
