//! What the user reads: the plan as text (`+ ~ - !`) or JSON, and the summary of a reconcile.

use std::fmt::Write as _;

use serde::Serialize;
use stackwarden_controllers::change::Action;
use stackwarden_controllers::controller::AnyOp;
use stackwarden_controllers::{Change, DesiredState, ResourceId};

use crate::engine::{Plan, ResourceError};

#[derive(Serialize)]
struct Counts {
    create: usize,
    update: usize,
    delete: usize,
    orphaned: usize,
    in_sync: usize,
    waiting: usize,
    errors: usize,
}

fn counts(plan: &Plan) -> Counts {
    let active = || plan.writes();
    Counts {
        create: active().filter(|c| c.action == Action::Create).count(),
        update: active().filter(|c| c.action == Action::Update).count(),
        delete: plan
            .removed
            .iter()
            .filter(|(_, c)| c.action == Action::Delete)
            .count(),
        orphaned: plan
            .removed
            .iter()
            .filter(|(_, c)| c.action == Action::Orphan)
            .count(),
        in_sync: plan.in_sync.len() + plan.notes_only(),
        waiting: plan.errors.iter().filter(|e| e.is_waiting()).count(),
        errors: plan.errors.iter().filter(|e| !e.is_waiting()).count(),
    }
}

fn write_change(out: &mut String, c: &Change<AnyOp>) {
    let _ = write!(out, "{c}");
    if c.action == Action::Orphan {
        let _ = writeln!(out, "    note: no longer in the desired state; left as it is (deletion_policy = \"delete\" or --prune deletes it)");
    }
}

fn write_errors<'e>(out: &mut String, errors: impl IntoIterator<Item = &'e ResourceError>) {
    for e in errors {
        if e.is_waiting() {
            // The error's text says "waiting: ...".
            let _ = writeln!(out, "{}: {}", e.resource, e.error);
        } else {
            let _ = writeln!(out, "error: {}: {}", e.resource, e.error);
        }
    }
}

pub fn unsupported_warning(ids: &[ResourceId]) -> Option<String> {
    if ids.is_empty() {
        return None;
    }
    let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
    Some(format!(
        "warning: no controller in this version for {}: validated, not reconciled",
        names.join(", ")
    ))
}

/// The role a stack acts as (`[stack] assume_role`) and the account it is in.
#[derive(Clone, Copy, Serialize)]
pub struct ActingAs<'a> {
    pub role: &'a str,
    pub account: &'a str,
}

pub fn plan_text(
    desired: &DesiredState,
    region: &str,
    acting_as: Option<ActingAs<'_>>,
    plan: &Plan,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stack {} ({region}), desired state {}",
        desired.stack_name(),
        desired.content_hash
    );
    if let Some(a) = acting_as {
        let _ = writeln!(out, "acting as {} (account {})", a.role, a.account);
    }
    let _ = writeln!(out);
    for (_, c) in &plan.changes {
        write_change(&mut out, c);
    }
    for (_, c) in &plan.removed {
        write_change(&mut out, c);
    }
    let n = counts(plan);
    if !plan.changes.is_empty() || !plan.removed.is_empty() {
        let _ = writeln!(out);
    }
    if plan.has_pending() {
        let _ = writeln!(
            out,
            "Plan: {} to create, {} to update, {} to delete, {} orphaned; {} still converging; {} in sync.",
            n.create, n.update, n.delete, n.orphaned, n.waiting, n.in_sync
        );
    } else {
        let _ = writeln!(
            out,
            "No changes: {} resources in sync, {} orphaned.",
            n.in_sync, n.orphaned
        );
    }
    write_errors(&mut out, &plan.errors);
    out
}

/// The version of `plan --json`'s document: raised when a field changes meaning or goes.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize)]
struct PlanJson<'a> {
    format_version: u32,
    stack: &'a str,
    region: &'a str,
    /// `{role, account}` for a stack with `assume_role`.
    #[serde(skip_serializing_if = "Option::is_none")]
    acting_as: Option<ActingAs<'a>>,
    generation: &'a str,
    pending: bool,
    summary: Counts,
    changes: Vec<&'a Change<AnyOp>>,
    removed: Vec<&'a Change<AnyOp>>,
    errors: &'a [ResourceError],
    unsupported: &'a [ResourceId],
}

pub fn plan_json(
    desired: &DesiredState,
    region: &str,
    acting_as: Option<ActingAs<'_>>,
    plan: &Plan,
) -> String {
    let doc = PlanJson {
        format_version: FORMAT_VERSION,
        stack: desired.stack_name(),
        region,
        acting_as,
        generation: &desired.content_hash,
        pending: plan.has_pending(),
        summary: counts(plan),
        changes: plan.changes.iter().map(|(_, c)| c).collect(),
        removed: plan.removed.iter().map(|(_, c)| c).collect(),
        errors: &plan.errors,
        unsupported: &plan.unsupported,
    };
    serde_json::to_string_pretty(&doc).expect("plan serializes")
}

/// After `reconcile --once`: what was applied, what failed, and whether the re-observed state
/// matches.
/// What a verify of the files on hosts found, for stderr.
pub fn verify_text(v: &stackwarden_controllers::verify::Verified) -> String {
    let mut out = format!(
        "verify: {} instances, {} with files changed since their push{}\n",
        v.instances,
        v.drifted
            .iter()
            .map(|d| &d.instance)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        if v.drifted.is_empty() {
            ""
        } else {
            " (pushed again by this pass)"
        }
    );
    for d in &v.drifted {
        out.push_str(&format!("  changed: {d}\n"));
    }
    for u in &v.unverified {
        out.push_str(&format!("  not verified: {u}\n"));
    }
    out
}

pub fn reconcile_text(applied: &[Change<AnyOp>], errors: &[ResourceError], after: &Plan) -> String {
    let mut out = String::new();
    if applied.is_empty() {
        let _ = writeln!(out, "Nothing to apply.");
    } else {
        let _ = writeln!(out, "Applied:");
        for c in applied {
            let _ = write!(out, "{c}");
        }
    }
    // What the check after the writes found about a resource that was waiting is newer (a
    // push sent, then failed on the hosts by the time of the check): it is the one shown.
    let mut all_errors: Vec<&ResourceError> = errors
        .iter()
        .filter(|e| !(e.is_waiting() && after.errors.iter().any(|x| x.resource == e.resource)))
        .collect();
    for e in &after.errors {
        if !all_errors.iter().any(|x| x.resource == e.resource) {
            all_errors.push(e);
        }
    }
    for (_, c) in after
        .removed
        .iter()
        .filter(|(_, c)| c.action == Action::Orphan)
    {
        let _ = writeln!(out, "orphaned: {} ({})", c.id, c.object);
    }
    for (_, c) in after
        .changes
        .iter()
        .filter(|(_, c)| c.observe_only && !c.is_empty())
    {
        let _ = writeln!(
            out,
            "drift (observe only, not applied): {} ({})",
            c.id, c.object
        );
    }
    let pending: Vec<&Change<AnyOp>> = after.writes().collect();
    for c in &pending {
        if !all_errors.iter().any(|e| e.resource == c.id) {
            let _ = writeln!(out, "not converged: {} still differs after apply:", c.id);
            let _ = write!(out, "{c}");
        }
    }
    write_errors(&mut out, all_errors.iter().copied());
    if all_errors.is_empty() && !after.has_pending() {
        let _ = writeln!(out, "Converged: {} resources in sync.", after.in_sync.len());
    } else {
        let _ = writeln!(
            out,
            "Not converged: {} resources failed, {} still differ.",
            all_errors.len(),
            pending.len()
        );
    }
    out
}
