//! Loading the desired-state directory: every `*.toml` file at its top level, plus the files
//! their values point at. All-or-nothing: either every check passes and a [`DesiredState`]
//! comes back, or every problem found comes back as `path:line:column: message`.
//!
//! Offline by construction: nothing here touches the network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::IntoDeserializer;
use sha2::{Digest, Sha256};
use stackwarden_controllers::desired::{read_inside, StackSpec, Validator, MAX_FILE_BYTES};
use stackwarden_controllers::diag::{Diagnostic, Diagnostics, Loc, Origin, SourceFile};
use stackwarden_controllers::model::{scan_refs, Kind, ResourceId, Target};
use stackwarden_controllers::{DesiredState, Resource, Spec};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Keys every resource table may have, whatever its kind.
const COMMON_KEYS: &[&str] = &["adopt", "observe_only"];

/// A resource as parsed, before its files are validated.
struct Parsed {
    id: ResourceId,
    origin: Origin,
    adopt: Option<String>,
    observe_only: bool,
    spec: Spec,
    /// References written in the TOML, with where.
    refs: Vec<(Origin, Target)>,
}

/// Loads and validates a desired-state directory.
pub fn load(dir: &Path) -> Result<DesiredState, Vec<Diagnostic>> {
    let mut diags = Diagnostics::default();
    let files = match toml_files(dir) {
        Ok(f) => f,
        Err(msg) => {
            diags.error(
                Loc {
                    file: dir.display().to_string(),
                    line: 1,
                    column: 1,
                },
                msg,
            );
            return Err(diags.into_sorted());
        }
    };
    let mut stack: Option<(StackSpec, Origin)> = None;
    let mut stack_seen = false;
    let mut parsed: Vec<Parsed> = Vec::new();
    for path in &files {
        let Some(file) = read_source(dir, path, &mut diags) else {
            continue;
        };
        let (root, errors) = DeTable::parse_recoverable(&file.text);
        for e in &errors {
            diags.at(
                &file,
                e.span().map(|s| s.start).unwrap_or(0),
                format!("invalid TOML: {}", e.message().trim()),
            );
        }
        if !errors.is_empty() {
            continue;
        }
        parse_file(
            &file,
            root.into_inner(),
            &mut stack,
            &mut stack_seen,
            &mut parsed,
            &mut diags,
        );
    }
    let Some((stack, stack_origin)) = stack else {
        if stack_seen {
            // A `[stack]` that failed to parse has its own error: no second one for it.
            return Err(diags.into_sorted());
        }
        let file = files
            .first()
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| dir.display().to_string());
        diags.error(
            Loc {
                file,
                line: 1,
                column: 1,
            },
            "no `[stack]` table: one file must name the stack (`[stack] name = \"...\"`)",
        );
        return Err(diags.into_sorted());
    };
    check_stack(&stack, &stack_origin, &mut diags);

    // Duplicates across files.
    let mut resources: BTreeMap<ResourceId, Resource> = BTreeMap::new();
    let mut toml_refs: BTreeMap<ResourceId, Vec<(Origin, Target)>> = BTreeMap::new();
    for p in parsed {
        if let Some(first) = resources.get(&p.id) {
            diags.at_origin(
                &p.origin,
                format!(
                    "{} is defined twice (first at {})",
                    p.id,
                    first.origin.loc()
                ),
            );
            continue;
        }
        toml_refs.insert(p.id.clone(), p.refs);
        resources.insert(
            p.id.clone(),
            Resource {
                id: p.id,
                origin: p.origin,
                adopt: p.adopt,
                observe_only: p.observe_only,
                spec: p.spec,
                depends_on: BTreeSet::new(),
            },
        );
    }

    // Each kind's own checks (files, PromQL, policy JSON), then every reference.
    let ids: BTreeSet<ResourceId> = resources.keys().cloned().collect();
    for r in resources.values_mut() {
        let file = r.origin.file.clone();
        let mut v = Validator {
            dir,
            file: &file,
            diags: &mut diags,
            span: r.origin.span.clone(),
            refs: Vec::new(),
        };
        r.spec.validate(&mut v);
        let file_refs = std::mem::take(&mut v.refs);
        for (origin, target) in toml_refs
            .remove(&r.id)
            .unwrap_or_default()
            .into_iter()
            .chain(file_refs)
        {
            let Target::Resource(dep, attr) = &target else {
                continue;
            };
            if dep == &r.id {
                diags.at_origin(
                    &origin,
                    format!("{} references itself (`${{{dep}.{attr}}}`)", r.id),
                );
            } else if !ids.contains(&dep.composite()) {
                let table = dep.composite();
                diags.at_origin(
                    &origin,
                    format!("`${{{dep}.{attr}}}` names {table}, which the desired state does not define{}", suggest(&table.to_string(), ids.iter().map(|i| i.to_string()))),
                );
            } else {
                r.depends_on.insert(dep.clone());
            }
        }
    }
    expand_composites(&mut resources);
    let mut desired = DesiredState {
        dir: dir.to_path_buf(),
        stack,
        stack_file: Some(stack_origin.file.clone()),
        resources,
        content_hash: content_hash(dir),
    };
    for kind in Kind::all() {
        kind.check_whole(&mut desired, &mut diags);
    }
    // After every kind's links: a host's tag count includes the host_configs targeting it.
    stackwarden_controllers::desired::check_tagging(&desired, &mut diags);
    check_cycles(&desired.resources, &mut diags);
    if diags.is_empty() {
        Ok(desired)
    } else {
        Err(diags.into_sorted())
    }
}

/// Replaces each composite table by its nodes: the table's own object keeps its address and
/// what its own values reference; each part (an AMP workspace's rule groups namespaces,
/// alertmanager definition, logging) becomes a node depending on it.
fn expand_composites(resources: &mut BTreeMap<ResourceId, Resource>) {
    let mut parts = Vec::new();
    for r in resources.values_mut() {
        if let Some((own_parts, own_refs)) = r.spec.parts(r) {
            r.depends_on = own_refs;
            parts.extend(own_parts);
        }
    }
    resources.extend(parts.into_iter().map(|p| (p.id.clone(), p)));
}

/// The directory's `.toml` files (whatever they are: one that is a symbolic link leading
/// outside, a named pipe or a directory is refused when read, not skipped).
fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the desired-state directory: {e}"))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err("the desired-state directory has no .toml file".into());
    }
    Ok(files)
}

/// One `.toml` file of the directory, read inside its boundary ([`read_inside`]).
fn read_source(dir: &Path, path: &Path, diags: &mut Diagnostics) -> Option<Arc<SourceFile>> {
    let display = path.display().to_string();
    let rel = path.strip_prefix(dir).unwrap_or(path);
    match read_inside(dir, rel) {
        Ok(text) => Some(SourceFile::new(path.to_path_buf(), display, text)),
        Err(message) => {
            diags.error(
                Loc {
                    file: display,
                    line: 1,
                    column: 1,
                },
                message,
            );
            None
        }
    }
}

fn origin(file: &Arc<SourceFile>, span: std::ops::Range<usize>) -> Origin {
    Origin {
        file: file.clone(),
        span,
    }
}

fn parse_file(
    file: &Arc<SourceFile>,
    root: DeTable<'_>,
    stack: &mut Option<(StackSpec, Origin)>,
    stack_seen: &mut bool,
    parsed: &mut Vec<Parsed>,
    diags: &mut Diagnostics,
) {
    for (key, value) in root {
        let section = key.get_ref().as_ref();
        let sections = Kind::sections();
        if section != "stack" && !sections.contains(&section) {
            let known = std::iter::once("stack").chain(sections).map(String::from);
            diags.at(
                file,
                key.span().start,
                format!("unknown section `{section}`{}", suggest(section, known)),
            );
            continue;
        }
        if section == "stack" {
            *stack_seen = true;
            let o = origin(file, key.span());
            if let Some((_, first)) = stack {
                diags.at_origin(
                    &o,
                    format!("`[stack]` is defined twice (first at {})", first.loc()),
                );
                continue;
            }
            let span = value.span();
            match serde::Deserialize::deserialize(
                Spanned::new(span, value.into_inner()).into_deserializer(),
            ) {
                Ok(s) => *stack = Some((s, o)),
                Err(e) => report_de(file, &e, key.span().start, diags),
            }
            continue;
        }
        let Some(table) = as_table(file, &key, value, diags) else {
            continue;
        };
        // A section is one kind (`host`) or groups several (`iam.role`, `iam.policy`).
        if let Some(kind) = Kind::from_path(section) {
            parse_resources(file, kind, table, parsed, diags);
            continue;
        }
        let kinds: Vec<Kind> = Kind::all()
            .filter(|k| k.is_table())
            .filter(|k| k.path().split_once('.').is_some_and(|(s, _)| s == section))
            .collect();
        for (sub, value) in table {
            let name = sub.get_ref().as_ref();
            let path = format!("{section}.{name}");
            let Some(kind) = kinds.iter().copied().find(|k| k.path() == path) else {
                let known = kinds.iter().map(|k| k.path().to_string());
                diags.at(
                    file,
                    sub.span().start,
                    format!(
                        "unknown kind `{section}.{name}`{}",
                        suggest(&format!("{section}.{name}"), known)
                    ),
                );
                continue;
            };
            if let Some(t) = as_table(file, &sub, value, diags) {
                parse_resources(file, kind, t, parsed, diags);
            }
        }
    }
}

fn as_table<'i>(
    file: &SourceFile,
    key: &Spanned<std::borrow::Cow<'i, str>>,
    value: Spanned<DeValue<'i>>,
    diags: &mut Diagnostics,
) -> Option<DeTable<'i>> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Table(t) => Some(t),
        other => {
            diags.at(
                file,
                span.start,
                format!(
                    "`{}` must be a table, found {}",
                    key.get_ref(),
                    type_name(&other)
                ),
            );
            None
        }
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn valid_resource_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_resources(
    file: &Arc<SourceFile>,
    kind: Kind,
    table: DeTable<'_>,
    parsed: &mut Vec<Parsed>,
    diags: &mut Diagnostics,
) {
    for (key, value) in table {
        let name = key.get_ref().to_string();
        let id = ResourceId::new(kind, name.clone());
        if !valid_resource_name(&name) {
            diags.at(
                file,
                key.span().start,
                format!("`{id}`: resource names are 1 to 64 letters, digits, `_` or `-`"),
            );
            continue;
        }
        let span = value.span();
        let DeValue::Table(t) = value.into_inner() else {
            diags.at(file, span.start, format!("{id} must be a table"));
            continue;
        };
        let mut refs = Vec::new();
        collect_refs(file, &t, &mut refs, diags);

        // The keys every kind has are taken out before the kind's own schema sees the table.
        let mut adopt = None;
        let mut observe_only = false;
        let mut rest = DeTable::new();
        for (k, v) in t {
            match k.get_ref().as_ref() {
                "adopt" => match v.get_ref() {
                    DeValue::String(s) if !s.is_empty() => adopt = Some(s.to_string()),
                    other => diags.at(
                        file,
                        v.span().start,
                        format!(
                            "`adopt` is the name or id of the object to adopt (a string), found {}",
                            type_name(other)
                        ),
                    ),
                },
                "observe_only" => match v.get_ref() {
                    DeValue::Boolean(b) => observe_only = *b,
                    other => diags.at(
                        file,
                        v.span().start,
                        format!(
                            "`observe_only` is true or false, found {}",
                            type_name(other)
                        ),
                    ),
                },
                _ => {
                    rest.insert(k, v);
                }
            }
        }
        let value = Spanned::new(span.clone(), DeValue::Table(rest));
        let schema = kind.schema().expect("sections hold table kinds only");
        match schema(value) {
            Ok(spec) => parsed.push(Parsed {
                id,
                origin: origin(file, key.span().start..span.end),
                adopt,
                observe_only,
                spec,
                refs,
            }),
            Err(e) => report_de(file, &e, key.span().start, diags),
        }
    }
}

/// A schema error, at the span the deserializer reports (or the resource's key).
fn report_de(file: &SourceFile, e: &toml::de::Error, fallback: usize, diags: &mut Diagnostics) {
    let at = e.span().map(|s| s.start).unwrap_or(fallback);
    let mut msg = e.message().trim().to_string();
    if let Some(rest) = msg.strip_prefix("unexpected keys in table: ") {
        msg = format!(
            "unknown key: {}",
            rest.replace(", available keys:", "; the keys here are:")
        );
        msg.push_str(&format!(" (plus {})", COMMON_KEYS.join(", ")));
    }
    diags.at(file, at, msg);
}

/// Every `${...}` written in the strings of a table.
fn collect_refs(
    file: &Arc<SourceFile>,
    t: &DeTable<'_>,
    out: &mut Vec<(Origin, Target)>,
    diags: &mut Diagnostics,
) {
    fn walk(
        file: &Arc<SourceFile>,
        v: &Spanned<DeValue<'_>>,
        out: &mut Vec<(Origin, Target)>,
        diags: &mut Diagnostics,
    ) {
        match v.get_ref() {
            DeValue::String(s) => {
                // Positions inside the string: exact for strings without escapes.
                let base = v.span().start + 1;
                for r in scan_refs(s) {
                    let o = origin(file, base + r.range.start..base + r.range.end);
                    match r.target {
                        Ok(t) => out.push((o, t)),
                        Err(msg) => diags.at_origin(&o, msg),
                    }
                }
            }
            DeValue::Array(a) => a.iter().for_each(|i| walk(file, i, out, diags)),
            DeValue::Table(t) => t.values().for_each(|i| walk(file, i, out, diags)),
            _ => {}
        }
    }
    for v in t.values() {
        walk(file, v, out, diags);
    }
}

fn check_stack(stack: &StackSpec, at: &Origin, diags: &mut Diagnostics) {
    let name = stack.name.get_ref();
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if !ok {
        diags.at(&at.file, stack.name.span().start, format!("stack name `{name}` must be 1 to 32 letters, digits or `-`, starting with a letter"));
    }
    if let Some(region) = &stack.region {
        let ok = region.split('-').count() >= 3
            && region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            diags.at_origin(
                at,
                format!("`{region}` is not an AWS region name (e.g. us-east-1)"),
            );
        }
    }
    if let Some(tags) = &stack.tags {
        for problem in stackwarden_controllers::desired::tag_problems(tags.get_ref()) {
            diags.at(&at.file, tags.span().start, problem);
        }
    }
    if let Some(role) = &stack.assume_role {
        if let Some(problem) = role_arn_problem(role.get_ref()) {
            diags.at(&at.file, role.span().start, problem);
        }
    }
    if let Some(id) = &stack.external_id {
        if let Some(problem) = external_id_problem(id.get_ref()) {
            diags.at(&at.file, id.span().start, problem);
        } else if stack.assume_role.is_none() {
            diags.at(
                &at.file,
                id.span().start,
                "external_id is sent when assuming a role: it needs assume_role".to_string(),
            );
        }
    }
}

/// What is wrong with an `assume_role`: it must be an IAM role's ARN,
/// `arn:<partition>:iam::<12 digits>:role/<path/><name>`, as STS AssumeRole takes it (a name of
/// 1 to 64 of `A-Z a-z 0-9 _ + = , . @ -`; a path of printable ASCII between slashes).
fn role_arn_problem(arn: &str) -> Option<String> {
    let wanted =
        "assume_role must be an IAM role's ARN, `arn:aws:iam::<12-digit account id>:role/<name>`";
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return Some(format!("`{arn}`: {wanted}"));
    };
    let partition_ok = partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        });
    if prefix != "arn" || !partition_ok || service != "iam" || !region.is_empty() {
        return Some(format!("`{arn}`: {wanted}"));
    }
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Some(format!(
            "`{arn}`: the account id `{account}` must be 12 digits; {wanted}"
        ));
    }
    let Some(path_name) = resource.strip_prefix("role/") else {
        return Some(format!("`{arn}`: names no role; {wanted}"));
    };
    let (path, name) = path_name.rsplit_once('/').unwrap_or(("", path_name));
    let name_ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
    let path_ok = path.len() < 512
        && path.chars().all(|c| c.is_ascii_graphic())
        && !path_name.starts_with('/')
        && (path.is_empty() || path.split('/').all(|p| !p.is_empty()));
    if !name_ok || !path_ok {
        return Some(format!(
            "`{arn}`: the role name `{name}` must be 1 to 64 letters, digits or `_+=,.@-` (after an optional path); {wanted}"
        ));
    }
    None
}

/// What is wrong with an `external_id`: STS AssumeRole takes 2 to 1224 of `A-Z a-z 0-9` and
/// `_ + = , . @ : / -` (the API reference's `[\w+=,.@:\/-]*`).
fn external_id_problem(id: &str) -> Option<String> {
    if !(2..=1224).contains(&id.len()) {
        return Some(format!(
            "external_id must be 2 to 1224 characters (STS AssumeRole), not {}",
            id.chars().count()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(*c)))
    {
        return Some(format!(
            "external_id may hold only letters, digits and `_+=,.@:/-` (STS AssumeRole), not {c:?}"
        ));
    }
    None
}

/// Reference cycles make an order impossible: report each resource on one.
fn check_cycles(resources: &BTreeMap<ResourceId, Resource>, diags: &mut Diagnostics) {
    fn reaches(
        resources: &BTreeMap<ResourceId, Resource>,
        from: &ResourceId,
        to: &ResourceId,
        seen: &mut BTreeSet<ResourceId>,
    ) -> bool {
        let Some(r) = resources.get(from) else {
            return false;
        };
        r.depends_on
            .iter()
            .any(|d| d == to || (seen.insert(d.clone()) && reaches(resources, d, to, seen)))
    }
    for (id, r) in resources {
        if reaches(resources, id, id, &mut BTreeSet::new()) {
            diags.at_origin(
                &r.origin,
                format!("{id} is part of a reference cycle; references must form no loop"),
            );
        }
    }
}

/// `; did you mean ...?` when a known word is close.
fn suggest(word: &str, known: impl Iterator<Item = String>) -> String {
    let best = known.map(|k| (edit_distance(word, &k), k)).min();
    match best {
        Some((d, k)) if d <= 3 && d < word.len() => format!("; did you mean `{k}`?"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Hash of every file under the directory (names and contents), `.git` excluded: the
/// generation of a desired state that is not a git checkout. Nothing is followed out of the
/// directory or opened that could block: a symbolic link counts by where it points, a named
/// pipe or device by its name, and a regular file by at most its first [`MAX_FILE_BYTES`] + 1.
fn content_hash(dir: &Path) -> String {
    use std::io::Read;
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf, std::fs::FileType)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let (p, Ok(kind)) = (e.path(), e.file_type()) else {
                continue;
            };
            if p.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            if kind.is_dir() {
                walk(&p, root, out);
            } else {
                let name = p.strip_prefix(root).unwrap_or(&p).display().to_string();
                out.push((name, p, kind));
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, path, kind) in files {
        h.update(name.as_bytes());
        h.update([0]);
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).unwrap_or_default();
            h.update(b"-> ");
            h.update(target.as_os_str().as_encoded_bytes());
        } else if kind.is_file() {
            let mut bytes = Vec::new();
            if let Ok(f) = std::fs::File::open(&path) {
                let _ = f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes);
            }
            h.update(bytes);
        }
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assume_role_takes_role_arns_only() {
        for ok in [
            "arn:aws:iam::111122223333:role/stackwarden",
            "arn:aws:iam::111122223333:role/ops/monitoring/stackwarden-dev",
            "arn:aws-us-gov:iam::111122223333:role/a+b=c,d.e@f-g_h",
            "arn:aws-cn:iam::111122223333:role/r",
        ] {
            assert_eq!(role_arn_problem(ok), None, "{ok}");
        }
        for bad in [
            "stackwarden",
            "arn:aws:iam::1111222233:role/short-account",
            "arn:aws:iam::11112222333a:role/letter",
            "arn:aws:iam::111122223333:user/stackwarden",
            "arn:aws:sts::111122223333:role/stackwarden",
            "arn:aws:iam:us-east-1:111122223333:role/regional",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::111122223333:role/has space",
            "arn:AWS:iam::111122223333:role/upper-partition",
            "arn:aws:iam::111122223333:role//empty-path-part",
        ] {
            assert!(role_arn_problem(bad).is_some(), "{bad}");
        }
        let long = format!("arn:aws:iam::111122223333:role/{}", "n".repeat(65));
        assert!(role_arn_problem(&long).is_some());
    }

    #[test]
    fn external_ids_are_checked_as_sts_checks_them() {
        assert_eq!(external_id_problem("stackwarden-dev"), None);
        assert_eq!(external_id_problem("a_+=,.@:/-Z9"), None);
        assert_eq!(external_id_problem(&"x".repeat(1224)), None);
        assert!(external_id_problem("x").is_some());
        assert!(external_id_problem(&"x".repeat(1225)).is_some());
        assert!(external_id_problem("has space").is_some());
        assert!(external_id_problem("émoji").is_some());
    }

    #[test]
    fn suggests_close_words_only() {
        assert_eq!(
            suggest("iamm", ["iam".to_string(), "host".to_string()].into_iter()),
            "; did you mean `iam`?"
        );
        assert_eq!(suggest("zzzzzz", ["iam".to_string()].into_iter()), "");
    }

    /// A host_config depends on what its files reference and on the hosts its targets select
    /// (their own tags, the stack's, `Name`), so it is applied after them.
    #[test]
    fn host_configs_depend_on_their_files_references_and_their_targeted_hosts() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ec2-prometheus-loki-grafana");
        let desired = load(&dir).unwrap();
        let deps = |name: &str| -> Vec<String> {
            desired.resources
                [&ResourceId::new(stackwarden_controllers::host_config::HOST_CONFIG, name)]
                .depends_on
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(deps("promtail"), ["host.app", "host.loki"]);
        assert_eq!(deps("loki"), ["host.loki"]);
        assert_eq!(
            deps("grafana"),
            ["host.grafana", "host.loki", "host.prometheus"]
        );
        let order: Vec<String> = desired
            .apply_order()
            .iter()
            .map(|i| i.to_string())
            .collect();
        let at = |id: &str| order.iter().position(|o| o == id).unwrap();
        assert!(at("host.loki") < at("host_config.promtail"));
    }

    /// A host's instance carries the record tag of each host_config targeting it: with the
    /// stack's 47 tags, `Name` and the ownership tags it is at AWS's 50, and one host_config
    /// more is one tag too many, reported at the stack's tags (the host has none of its own).
    #[test]
    fn host_configs_targeting_a_host_count_towards_its_fifty_tags() {
        let tags: Vec<String> = (0..47).map(|i| format!("t{i:02} = \"x\"")).collect();
        let stack = format!(
            "[stack]\nname = \"s\"\ntags = {{ {} }}\n\n[host.p]\nami = \"ami-1\"\ninstance_type = \"t3.small\"\n",
            tags.join(", ")
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stack.toml"), &stack).unwrap();
        assert!(load(dir.path()).is_ok());
        std::fs::write(dir.path().join("a.conf"), "x").unwrap();
        std::fs::write(
            dir.path().join("configs.toml"),
            "[host_config.agent]\ntargets = { Name = \"s-p\" }\nfiles = [{ path = \"/etc/a.conf\", source = \"a.conf\" }]\n",
        )
        .unwrap();
        let errors: Vec<String> = load(dir.path())
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("stack.toml:3:8: host.p: its objects would carry 51 tags, 47 of the stack and the table and 4 that stackwarden adds (`Name`, `stackwarden:s:host_config.agent`, `stackwarden:stack`, `stackwarden:id`)"), "{errors:?}");
    }

    /// Copies a directory tree.
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let target = to.join(e.file_name());
            if e.path().is_dir() {
                copy(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).unwrap();
            }
        }
    }

    /// Every file of a directory tree, relative to it.
    fn files_under(root: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    files.push(e.path().strip_prefix(root).unwrap().to_path_buf());
                }
            }
        }
        files.sort();
        files
    }

    /// The loader never panics: the default desired state or one of the examples, with one
    /// file damaged at random (bytes deleted, duplicated, replaced by TOML and YAML
    /// punctuation, or a line cut), is either loaded or rejected with diagnostics that name a
    /// file. Seeded and bounded.
    #[test]
    fn damaged_input_is_rejected_never_panics() {
        const PUNCTUATION: &[u8] = b"[]{}=\"'#:-\n $\t.,";
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut sources = vec![repo.join("desired")];
        let mut examples: Vec<PathBuf> = std::fs::read_dir(repo.join("examples"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        examples.sort();
        sources.extend(examples);
        let files: Vec<Vec<PathBuf>> = sources.iter().map(|s| files_under(s)).collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut loaded, mut rejected) = (0, 0);
        for _ in 0..400 {
            let source = rng.usize(..sources.len());
            let tmp = tempfile::tempdir().unwrap();
            copy(&sources[source], tmp.path());
            let names = &files[source];
            let victim = tmp.path().join(&names[rng.usize(..names.len())]);
            let mut bytes = std::fs::read(&victim).unwrap();
            for _ in 0..rng.usize(1..4) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.usize(..bytes.len());
                match rng.u8(..4) {
                    0 => {
                        let end = (at + rng.usize(1..16)).min(bytes.len());
                        bytes.drain(at..end);
                    }
                    1 => {
                        let end = (at + rng.usize(1..16)).min(bytes.len());
                        let copy: Vec<u8> = bytes[at..end].to_vec();
                        bytes.splice(at..at, copy);
                    }
                    2 => bytes[at] = PUNCTUATION[rng.usize(..PUNCTUATION.len())],
                    _ => bytes.truncate(at),
                }
            }
            std::fs::write(&victim, &bytes).unwrap();
            match load(tmp.path()) {
                Ok(_) => loaded += 1,
                Err(diags) => {
                    assert!(!diags.is_empty());
                    rejected += 1;
                }
            }
        }
        assert!(
            rejected > 100,
            "damage should mostly be caught: {rejected} rejected, {loaded} loaded"
        );
    }
}
