//! The desired state: what the user's directory says, validated and with every referenced file
//! read. Built only by the loader, and only when every check passed, so controllers never see
//! half-valid input and never touch the filesystem.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::diag::{Diagnostics, Origin, SourceFile};
use crate::model::{scan_refs, Kind, ResourceId, Target};

/// Files larger than this are rejected: a desired-state file is configuration, not data.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Reads the file `rel` of the desired directory `dir`, which is a boundary: the path resolved
/// (symbolic links included) must lie inside the directory, and be a regular file of at most
/// [`MAX_FILE_BYTES`]. Anything else (a named pipe, a device, a socket, a directory) is refused
/// without being opened, so nothing can hang the loader or read the machine's other files.
/// The error says why, naming `rel` as written.
pub fn read_inside(dir: &Path, rel: &Path) -> std::result::Result<String, String> {
    use std::io::Read;
    let shown = rel.display();
    let root = dir
        .canonicalize()
        .map_err(|e| format!("cannot read the desired directory: {e}"))?;
    let resolved = dir
        .join(rel)
        .canonicalize()
        .map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if !resolved.starts_with(&root) {
        return Err(format!(
            "`{shown}` leads outside the desired directory (to {}, through a symbolic link); files must be inside it",
            resolved.display()
        ));
    }
    let meta = std::fs::metadata(&resolved).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "`{shown}` is {}, not a regular file",
            file_kind(&meta.file_type())
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "`{shown}` is {} bytes; desired-state files are limited to {MAX_FILE_BYTES} bytes",
            meta.len()
        ));
    }
    let file = std::fs::File::open(&resolved).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    // Bounded even if the file grows between the check and the read.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "`{shown}` is over {MAX_FILE_BYTES} bytes; desired-state files are limited to that"
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("`{shown}` is not UTF-8 text"))
}

/// What a file that is not a regular file is, for errors.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Ownership tag: the stack that created the resource.
pub const TAG_STACK: &str = "stackwarden:stack";
/// Ownership tag: the resource's address in the desired state (`iam.role.prometheus`).
pub const TAG_ID: &str = "stackwarden:id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionPolicy {
    /// Resources removed from the desired state are left in AWS and reported (`!` in plan).
    #[default]
    Orphan,
    /// Resources removed from the desired state are deleted (`-` in plan).
    Delete,
}

/// `[stack]`: once, in any file of the directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackSpec {
    pub name: Spanned<String>,
    /// AWS region; `--region` and the standard AWS settings win over it.
    pub region: Option<String>,
    /// Tags put on every resource the stack creates.
    pub tags: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// The role the stack acts as (`arn:aws:iam::<account>:role/<name>`): every AWS call of
    /// the stack is made with its credentials, assumed with the process's own.
    pub assume_role: Option<Spanned<String>>,
    /// The `sts:ExternalId` the role's trust policy asks for.
    pub external_id: Option<Spanned<String>>,
}

/// The specification of one resource: the spec type its kind declares ([`KindSpec`]), shared
/// once loaded. A controller reads its own kind's with [`Spec::get`].
#[derive(Debug, Clone)]
pub struct Spec(Arc<dyn KindSpec>);

/// What every kind's spec can do besides holding its values. The defaults suit a table that is
/// one object with nothing to check beyond its schema, and a part (made by expanding a table).
pub trait KindSpec: std::any::Any + std::fmt::Debug + Send + Sync {
    /// Checks what the schema alone cannot: referenced files, their syntax, value ranges.
    fn validate(&mut self, _v: &mut Validator<'_>) {}

    /// The nodes a composite table expands into besides its own (an AMP workspace's rule
    /// groups namespaces, alertmanager definition and logging; a host's security group and its
    /// rules), and what the table's own node references then. `None` for a table that is one
    /// object.
    fn parts(&self, _table: &Resource) -> Option<(Vec<Resource>, BTreeSet<ResourceId>)> {
        None
    }

    /// What is valid but deserves the user's attention (HTTP only), shown by validate, plan and
    /// reconcile.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// The tag keys by which the resource selects instances it does not own (a host_config's
    /// targets): the one instance read of an observation includes instances carrying any.
    fn instance_tag_keys(&self) -> Vec<&str> {
        Vec::new()
    }

    /// Whether the resource's `adopt` names an EC2 instance (a host's): read by id until it
    /// carries the stack's tags.
    fn adopts_an_instance(&self) -> bool {
        false
    }

    /// The tags of the most tagged AWS object the table makes, for the checks of
    /// [`check_tagging`]; `None` for a part (its table answers for it) or an untagged kind.
    fn tagging(&self, _desired: &DesiredState, _id: &ResourceId) -> Option<Tagging<'_>> {
        None
    }
}

impl Spec {
    pub fn new(spec: impl KindSpec) -> Spec {
        Spec(Arc::new(spec))
    }

    /// The spec as its kind's type, `None` for another kind's.
    pub fn get<T: KindSpec>(&self) -> Option<&T> {
        (self.0.as_ref() as &dyn std::any::Any).downcast_ref()
    }

    /// The spec of a node of a kind whose spec type is `T`: every node carries its kind's.
    pub fn expect<T: KindSpec>(&self) -> &T {
        self.get().unwrap_or_else(|| {
            panic!(
                "a node carries its kind's spec, not {}",
                std::any::type_name::<T>()
            )
        })
    }

    /// Validates the spec in place: only while loading, before anything shares it.
    pub fn validate(&mut self, v: &mut Validator<'_>) {
        Arc::get_mut(&mut self.0)
            .expect("a spec is validated before it is shared")
            .validate(v);
    }

    pub fn parts(&self, table: &Resource) -> Option<(Vec<Resource>, BTreeSet<ResourceId>)> {
        self.0.parts(table)
    }

    pub fn warnings(&self) -> Vec<String> {
        self.0.warnings()
    }

    pub fn instance_tag_keys(&self) -> Vec<&str> {
        self.0.instance_tag_keys()
    }

    pub fn adopts_an_instance(&self) -> bool {
        self.0.adopts_an_instance()
    }

    pub fn tagging(&self, desired: &DesiredState, id: &ResourceId) -> Option<Tagging<'_>> {
        self.0.tagging(desired, id)
    }
}

/// One resource of the desired state.
#[derive(Debug, Clone)]
pub struct Resource {
    pub id: ResourceId,
    /// Where its table starts.
    pub origin: Origin,
    /// Take over an existing AWS object by its name or id instead of creating one.
    pub adopt: Option<String>,
    /// Show drift in plan, never write.
    pub observe_only: bool,
    pub spec: Spec,
    /// Resources this one references, directly (its strings and its files).
    pub depends_on: BTreeSet<ResourceId>,
}

impl Resource {
    /// Changes whenever what the user wrote for this resource changes (its table, the files it
    /// reads, its position in its file), within one process: the daemon un-parks a resource a
    /// terminal error stopped when this changes.
    pub fn fingerprint(&self) -> u64 {
        debug_hash(&(&self.spec, &self.adopt, self.observe_only))
    }
}

impl StackSpec {
    /// Changes whenever the `[stack]` table does (its tags go on every resource).
    pub fn fingerprint(&self) -> u64 {
        debug_hash(self)
    }
}

/// A hash of a value's Debug form: stable within one process, which is all a fingerprint
/// needs here.
fn debug_hash(value: &impl std::fmt::Debug) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{value:?}").hash(&mut h);
    h.finish()
}

/// A validated desired-state directory.
#[derive(Debug, Clone)]
pub struct DesiredState {
    pub dir: PathBuf,
    pub stack: StackSpec,
    /// The file `[stack]` is written in, for errors at its values (the stack name, its tags).
    pub stack_file: Option<Arc<SourceFile>>,
    pub resources: BTreeMap<ResourceId, Resource>,
    /// Content hash of every file read (the GitOps generation when the directory is no checkout).
    pub content_hash: String,
}

impl StackSpec {
    /// The account of the role the stack acts as, when it names one.
    pub fn role_account(&self) -> Option<&str> {
        let arn = self.assume_role.as_ref()?.get_ref();
        arn.split(':').nth(4)
    }

    /// The tags put on every resource (none when not given).
    pub fn tags(&self) -> BTreeMap<String, String> {
        self.tags
            .as_ref()
            .map(|t| t.get_ref().clone())
            .unwrap_or_default()
    }
}

impl DesiredState {
    pub fn stack_name(&self) -> &str {
        self.stack.name.get_ref()
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Resource> {
        self.resources.values().filter(move |r| r.id.kind == kind)
    }

    /// The resources of a kind with their specs, `T` being the spec type the kind declares.
    pub fn specs<T: KindSpec>(&self, kind: Kind) -> impl Iterator<Item = (&Resource, &T)> {
        self.of_kind(kind)
            .filter_map(|r| r.spec.get::<T>().map(|s| (r, s)))
    }

    /// Reports a problem at a value of `[stack]` (its span in the stack's file), or at `r`
    /// when the stack's file is unknown (a desired state built in memory).
    pub fn error_at_stack(
        &self,
        diags: &mut Diagnostics,
        span: std::ops::Range<usize>,
        r: &Resource,
        message: impl Into<String>,
    ) {
        match &self.stack_file {
            Some(file) => diags.at(file, span.start, message),
            None => diags.at_origin(&r.origin, message),
        }
    }

    /// The AWS name of a resource that has no explicit name: `<stack>-<name>`.
    pub fn default_name(&self, id: &ResourceId) -> String {
        format!("{}-{}", self.stack_name(), id.name)
    }

    /// Resources in an order where everything comes after what it references (validation
    /// rejected cycles); ties broken by kind order, then by name.
    pub fn apply_order(&self) -> Vec<&ResourceId> {
        let mut done: BTreeSet<&ResourceId> = BTreeSet::new();
        let mut order = Vec::with_capacity(self.resources.len());
        let mut ids: Vec<&ResourceId> = self.resources.keys().collect();
        ids.sort_by_key(|id| (id.kind, &id.name));
        while order.len() < ids.len() {
            let before = order.len();
            for id in &ids {
                if done.contains(id) {
                    continue;
                }
                let ready = self.resources[*id]
                    .depends_on
                    .iter()
                    .all(|d| done.contains(d) || !self.resources.contains_key(d));
                if ready {
                    done.insert(id);
                    order.push(*id);
                }
            }
            if order.len() == before {
                // A cycle: validation rejects these, but never loop forever.
                order.extend(ids.iter().filter(|id| !done.contains(*id)));
                break;
            }
        }
        order
    }

    /// Every resource's warnings, as `warning: <address>: <message>` lines.
    pub fn warnings(&self) -> Vec<String> {
        self.resources
            .values()
            .flat_map(|r| {
                r.spec
                    .warnings()
                    .into_iter()
                    .map(move |w| format!("warning: {}: {w}", r.id))
            })
            .collect()
    }

    /// Ownership and common tags for a resource stackwarden creates.
    pub fn tags_for(
        &self,
        id: &ResourceId,
        own: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut tags = self.stack.tags();
        tags.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        tags.insert(TAG_STACK.into(), self.stack_name().to_string());
        tags.insert(TAG_ID.into(), id.to_string());
        tags
    }
}

/// A file a TOML value points at, read and kept with where it was named.
#[derive(Debug, Clone)]
pub struct FileRef {
    /// The path as written, relative to the desired directory.
    pub path: String,
    /// Where the path was written.
    pub named_at: Origin,
    pub file: Arc<SourceFile>,
}

impl FileRef {
    pub fn text(&self) -> &str {
        &self.file.text
    }
}

/// What a spec's `validate` needs: where to read files, where to report, and where to record the
/// references it finds inside files.
pub struct Validator<'a> {
    pub dir: &'a Path,
    /// The TOML file the resource is written in.
    pub file: &'a Arc<SourceFile>,
    pub diags: &'a mut Diagnostics,
    /// Where the resource's table is, for errors about the resource as a whole.
    pub span: std::ops::Range<usize>,
    /// References found in files, with where they are.
    pub refs: Vec<(Origin, Target)>,
}

impl<'a> Validator<'a> {
    pub fn error(&mut self, span: &std::ops::Range<usize>, message: impl Into<String>) {
        self.diags.at(self.file, span.start, message);
    }

    /// Reports a problem with the resource as a whole, at its table.
    pub fn here(&mut self, message: impl Into<String>) {
        let span = self.span.clone();
        self.error(&span, message);
    }

    pub fn error_in(&mut self, file: &SourceFile, offset: usize, message: impl Into<String>) {
        self.diags.at(file, offset, message);
    }

    fn origin(&self, span: &std::ops::Range<usize>) -> Origin {
        Origin {
            file: self.file.clone(),
            span: span.clone(),
        }
    }

    /// Reads a file named by a TOML value, relative to the desired directory ([`read_inside`]).
    /// Reports a missing, unreadable, enormous, escaping or special path at the value naming it
    /// and returns `None`.
    pub fn read(&mut self, path: &Spanned<String>) -> Option<FileRef> {
        let span = path.span();
        let rel = Path::new(path.get_ref());
        if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
            self.error(
                &span,
                format!(
                    "`{}`: files must be inside the desired directory (a relative path without `..`)",
                    path.get_ref()
                ),
            );
            return None;
        }
        match read_inside(self.dir, rel) {
            Ok(text) => {
                let full = self.dir.join(rel);
                let display = full.display().to_string();
                Some(FileRef {
                    path: path.get_ref().clone(),
                    named_at: self.origin(&span),
                    file: SourceFile::new(full, display, text),
                })
            }
            Err(message) => {
                self.error(&span, message);
                None
            }
        }
    }

    /// Records the references written in a file's text (checked against the desired state
    /// later, like those written in TOML). Every `${` must be one (or be written `$${`).
    pub fn scan_file_refs(&mut self, file: &FileRef) {
        self.scan_refs_in(file, |_| true);
    }

    /// Records the references in a file pushed to hosts: only `${...}` meant as references
    /// ([`crate::model::RefUse::is_meant`]); the host's own `${...}` variables stay as written.
    pub fn scan_host_file_refs(&mut self, file: &FileRef) {
        self.scan_refs_in(file, |r| r.is_meant(&file.file.text));
    }

    fn scan_refs_in(&mut self, file: &FileRef, keep: impl Fn(&crate::model::RefUse) -> bool) {
        for r in scan_refs(&file.file.text).into_iter().filter(|r| keep(r)) {
            let origin = Origin {
                file: file.file.clone(),
                span: r.range.clone(),
            };
            match r.target {
                Ok(t) => self.refs.push((origin, t)),
                Err(msg) => self.diags.at_origin(&origin, msg),
            }
        }
    }
}

/// Parses a duration as Prometheus does (`15s`, `5m`, `1h30m`): the one duration syntax of
/// stackwarden, in the desired state and on the command line.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    promql_parser::util::parse_duration(s)
}

/// Checks a TOML duration string the way Prometheus parses durations (`15s`, `5m`, `1h30m`).
pub fn check_duration(
    v: &mut Validator<'_>,
    d: &Spanned<String>,
    what: &str,
) -> Option<std::time::Duration> {
    match promql_parser::util::parse_duration(d.get_ref()) {
        Ok(dur) => Some(dur),
        Err(e) => {
            v.error(
                &d.span(),
                format!(
                    "{what}: `{}` is not a duration ({e}); write e.g. `30s`, `5m`, `1h`",
                    d.get_ref()
                ),
            );
            None
        }
    }
}

/// Checks AWS tag limits ([`tag_problems`]).
pub fn check_tags(v: &mut Validator<'_>, tags: &Spanned<BTreeMap<String, String>>) {
    for problem in tag_problems(tags.get_ref()) {
        v.error(&tags.span(), problem);
    }
}

/// Tags one AWS object carries at most, `aws:` tags apart ("Tagging AWS resources": 50 user
/// tags per resource; the same in the EC2, IAM, ELB, AMP and Managed Grafana references).
/// The ownership and bookkeeping tags stackwarden adds count: to AWS they are user tags.
pub const MAX_TAGS: usize = 50;

/// Tag keys on EC2 objects (instances, volumes, security groups, launch templates): the EC2 API
/// reference's `Tag` takes keys of at most 127 Unicode characters, one fewer than the 128 of
/// IAM, ELB, AMP and Managed Grafana.
pub const MAX_EC2_TAG_KEY: usize = 127;

/// Whether AWS takes a character in a tag key or value: the pattern of the IAM, ELB and AMP
/// references, `[\p{L}\p{Z}\p{N}_.:/=+\-@]` (letters, separators such as spaces, and numbers
/// of any script, and `_ . : / = + - @`). EC2 alone takes any character, but the stack's tags
/// go on every object, so one set holds for all.
fn is_tag_char(c: char) -> bool {
    c.is_alphanumeric() || is_separator(c) || "_.:/=+-@".contains(c)
}

/// Unicode's separators (`\p{Z}`: space separators, U+2028 and U+2029). Tabs and newlines
/// are control characters, not separators, and AWS refuses them.
fn is_separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// What is wrong with a set of tags, by the limits every service stackwarden tags shares
/// (keys 1 to 128 characters, values at most 256, AWS's characters only, `aws:` reserved in
/// any case) and the keys stackwarden reserves (`stackwarden:`).
pub fn tag_problems(tags: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (k, val) in tags {
        if k.is_empty() || k.chars().count() > 128 {
            problems.push(format!("tag key `{k}` must be 1 to 128 characters"));
        }
        if val.chars().count() > 256 {
            problems.push(format!("tag `{k}`: values are at most 256 characters"));
        }
        if k.to_ascii_lowercase().starts_with("aws:") || k.starts_with("stackwarden:") {
            problems.push(format!("tag key `{k}` is reserved"));
        }
        for (what, text) in [("key", k), ("value", val)] {
            if let Some(c) = text.chars().find(|c| !is_tag_char(*c)) {
                problems.push(format!(
                    "tag `{k}`: its {what} holds {c:?}, and AWS takes only letters, digits, spaces and `_ . : / = + - @` in tags"
                ));
            }
        }
    }
    problems
}

/// The tags of a table's most tagged AWS object, as [`KindSpec::tagging`] describes them.
pub struct Tagging<'a> {
    /// The table's own `tags`.
    pub own: Option<&'a Spanned<BTreeMap<String, String>>>,
    /// The keys stackwarden adds besides the ownership tags (`Name`, a pushed bundle's hash).
    pub added: Vec<String>,
    /// Whether the tags go on EC2 objects, which take shorter keys ([`MAX_EC2_TAG_KEY`]).
    pub ec2: bool,
}

/// Checks what only the whole desired state tells: that no object would carry more than
/// [`MAX_TAGS`] tags (the stack's, the table's own, and what stackwarden adds), and that the
/// tags going on EC2 objects have keys EC2 takes. Reported at the table's `tags` (or the
/// stack's, when the table has none).
pub fn check_tagging(desired: &DesiredState, diags: &mut Diagnostics) {
    let stack_tags = desired.stack.tags();
    let stack_at =
        |diags: &mut Diagnostics, r: &Resource, message: String| match &desired.stack.tags {
            Some(t) => desired.error_at_stack(diags, t.span(), r, message),
            None => diags.at_origin(&r.origin, message),
        };
    for r in desired.resources.values() {
        let Some(t) = r.spec.tagging(desired, &r.id) else {
            continue;
        };
        let own = t.own.map(|o| o.get_ref().clone()).unwrap_or_default();
        let mut keys: BTreeSet<&str> = stack_tags.keys().map(String::as_str).collect();
        keys.extend(own.keys().map(String::as_str));
        let users = keys.len();
        keys.extend(t.added.iter().map(String::as_str));
        keys.extend([TAG_STACK, TAG_ID]);
        if keys.len() > MAX_TAGS {
            let added: Vec<String> = t
                .added
                .iter()
                .map(String::as_str)
                .chain([TAG_STACK, TAG_ID])
                .filter(|k| !own.contains_key(*k) && !stack_tags.contains_key(*k))
                .map(|k| format!("`{k}`"))
                .collect();
            let message = format!(
                "{}: its objects would carry {} tags, {users} of the stack and the table and {} that stackwarden adds ({}); AWS allows at most {MAX_TAGS} per resource",
                r.id,
                keys.len(),
                added.len(),
                added.join(", ")
            );
            match t.own {
                Some(o) => diags.at(&r.origin.file, o.span().start, message),
                None => stack_at(diags, r, message),
            }
        }
        if !t.ec2 {
            continue;
        }
        let long = |k: &String| k.chars().count() > MAX_EC2_TAG_KEY && k.chars().count() <= 128;
        let message = |k: &str| {
            format!(
                "tag key `{k}` is {} characters, and EC2 takes at most {MAX_EC2_TAG_KEY} (its instances, volumes, security groups and launch templates carry these tags)",
                k.chars().count()
            )
        };
        for k in own.keys().filter(|k| long(k)) {
            let at = t.own.map_or(r.origin.span.start, |o| o.span().start);
            diags.at(&r.origin.file, at, message(k));
        }
        for k in stack_tags.keys().filter(|k| long(k)) {
            stack_at(diags, r, message(k));
        }
    }
}

/// `a.b.c.d/n` with each part in range.
pub fn is_ipv4_cidr(s: &str) -> bool {
    let Some((ip, bits)) = s.split_once('/') else {
        return false;
    };
    ip.parse::<std::net::Ipv4Addr>().is_ok() && bits.parse::<u8>().is_ok_and(|b| b <= 32)
}

/// An IPv6 CIDR in the form EC2 keeps it: the address as RFC 5952 writes it (lower case, the
/// longest run of two or more zero fields shortened to `::`), so `::0/0` is `::/0`. Refuses
/// what is not a CIDR, and an address with bits set past the prefix (naming the network meant),
/// as terraform-provider-aws does (`ValidateIPv6CIDRBlock`): EC2 keeps a rule's network, so the
/// rule read back would never be the one written.
pub fn ipv6_network(s: &str) -> Result<String, String> {
    let not_a_cidr = || format!("`{s}` is not an IPv6 CIDR such as 2001:db8::/32 or ::/0");
    let (ip, bits) = s.split_once('/').ok_or_else(not_a_cidr)?;
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| not_a_cidr())?;
    let bits: u32 = match bits.parse() {
        Ok(b) if b <= 128 && !bits.starts_with('+') => b,
        _ => return Err(not_a_cidr()),
    };
    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
    let network = std::net::Ipv6Addr::from(u128::from(ip) & mask);
    if network != ip {
        return Err(format!(
            "`{s}` has bits set past its /{bits} prefix: the network is {network}/{bits}"
        ));
    }
    Ok(format!("{network}/{bits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_cidrs_are_written_as_ec2_keeps_them_and_host_bits_are_refused() {
        assert_eq!(ipv6_network("::0/0").unwrap(), "::/0");
        assert_eq!(ipv6_network("2001:DB8::/32").unwrap(), "2001:db8::/32");
        // One zero field is written out, not shortened (RFC 5952 section 4.2.2).
        assert_eq!(
            ipv6_network("2001:aaaa:bbbb::cccc:dddd:fe2b:7e9f/128").unwrap(),
            "2001:aaaa:bbbb:0:cccc:dddd:fe2b:7e9f/128"
        );
        assert_eq!(
            ipv6_network("2001:db8::1/32").unwrap_err(),
            "`2001:db8::1/32` has bits set past its /32 prefix: the network is 2001:db8::/32"
        );
        for bad in [
            "10.0.0.0/8",
            "::/129",
            "::/+1",
            "2001:db8::",
            "zz::/0",
            "::/",
        ] {
            assert!(
                ipv6_network(bad)
                    .unwrap_err()
                    .contains("is not an IPv6 CIDR"),
                "{bad}"
            );
        }
    }

    #[test]
    fn tags_take_the_characters_aws_takes_in_any_script() {
        let ok = BTreeMap::from([
            ("team".to_string(), "sre".to_string()),
            ("cost center".into(), "a_b.c:d/e=f+g-h@i".into()),
            ("équipe".into(), "運用 2".into()),
            ("empty".into(), String::new()),
        ]);
        assert_eq!(tag_problems(&ok), Vec::<String>::new());
        for (k, v, bad) in [
            ("team!", "sre", "key holds '!'"),
            ("team", "a,b", "value holds ','"),
            ("team", "tab\there", "value holds '\\t'"),
            ("team", "line\n", "value holds '\\n'"),
        ] {
            let problems = tag_problems(&BTreeMap::from([(k.to_string(), v.to_string())]));
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(bad), "{problems:?}");
            assert!(problems[0].contains("`_ . : / = + - @`"), "{problems:?}");
        }
        let reserved = tag_problems(&BTreeMap::from([("AWS:team".into(), "x".into())]));
        assert_eq!(reserved, ["tag key `AWS:team` is reserved"]);
    }

    #[test]
    fn a_device_inside_the_directory_is_refused_without_being_opened() {
        // /dev is the "desired directory" here: its null device lies inside it.
        let e = read_inside(Path::new("/dev"), Path::new("null")).unwrap_err();
        assert_eq!(e, "`null` is a device, not a regular file");
        let e = read_inside(Path::new("/"), Path::new("dev")).unwrap_err();
        assert_eq!(e, "`dev` is a directory, not a regular file");
    }
}
