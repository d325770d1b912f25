//! One pass: observe (every controller, concurrently, batched) → plan (pure) → apply (resource by
//! resource in dependency order) → observe again to confirm.
//!
//! References are resolved from observed state. During apply, each resource's diff is computed
//! again right before it is applied, with the values created earlier in the same pass, so a
//! workspace recreated out of band updates the policy that names its ARN in that same pass.
//! A failing resource stops only itself and what references it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use stackwarden_controllers::change::Action;
use stackwarden_controllers::controller::{AnyObserved, AnyOp};
use stackwarden_controllers::desired::DeletionPolicy;
use stackwarden_controllers::model::Refs;
use stackwarden_controllers::{
    Change, Context, DesiredState, DynController, Error, ErrorClass, Kind, ResourceId,
};
use tracing::Instrument;

pub struct Engine {
    controllers: Vec<Box<dyn DynController>>,
    pub ctx: Context,
}

/// What one observe read.
pub struct Observation {
    observed: Vec<Result<AnyObserved, Error>>,
    pub refs: Refs,
}

/// A resource that could not be planned or applied.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceError {
    pub resource: ResourceId,
    pub class: ErrorClass,
    pub error: String,
}

impl ResourceError {
    fn new(resource: ResourceId, e: &Error) -> Self {
        ResourceError {
            resource,
            class: e.class(),
            error: e.to_string(),
        }
    }
}

/// The changes that would take AWS to the desired state.
pub struct Plan {
    pub changes: Vec<(usize, Change<AnyOp>)>,
    /// Owned objects no longer in the desired state (orphaned or deleted).
    pub removed: Vec<(usize, Change<AnyOp>)>,
    pub errors: Vec<ResourceError>,
    /// Resources whose kind has no controller in this version.
    pub unsupported: Vec<ResourceId>,
    pub in_sync: Vec<ResourceId>,
}

impl Plan {
    /// Whether `reconcile` would write anything.
    pub fn has_pending(&self) -> bool {
        self.changes.iter().any(|(_, c)| !c.observe_only)
            || self.removed.iter().any(|(_, c)| c.action == Action::Delete)
    }
}

/// What an apply did.
#[derive(Default)]
pub struct Applied {
    pub changes: Vec<Change<AnyOp>>,
    pub errors: Vec<ResourceError>,
}

impl Engine {
    pub fn new(ctx: Context) -> Self {
        Engine {
            controllers: stackwarden_controllers::controllers(),
            ctx,
        }
    }

    fn controller_for(&self, kind: Kind) -> Option<usize> {
        self.controllers
            .iter()
            .position(|c| c.kinds().contains(&kind))
    }

    /// Reads everything, all controllers at once.
    pub async fn observe(&self, desired: &DesiredState) -> Observation {
        let reads = self
            .controllers
            .iter()
            .map(|c| c.observe(&self.ctx, desired));
        let observed = futures::future::join_all(reads).await;
        let mut refs = Refs {
            stack: BTreeMap::from([
                ("name".to_string(), desired.stack_name().to_string()),
                ("region".to_string(), self.ctx.region.clone()),
            ]),
            outputs: BTreeMap::new(),
        };
        for (c, o) in self.controllers.iter().zip(&observed) {
            match o {
                Ok(o) => refs.outputs.extend(c.outputs(desired, o)),
                Err(e) => tracing::warn!(error = %e, kinds = ?c.kinds(), "observe failed"),
            }
        }
        Observation { observed, refs }
    }

    /// Pure: the plan for a desired state against an observation.
    pub fn plan(&self, desired: &DesiredState, obs: &Observation, prune: bool) -> Plan {
        let mut plan = Plan {
            changes: Vec::new(),
            removed: Vec::new(),
            errors: Vec::new(),
            unsupported: Vec::new(),
            in_sync: Vec::new(),
        };
        let mut failed: BTreeSet<ResourceId> = BTreeSet::new();
        for id in desired.apply_order() {
            let r = &desired.resources[id];
            let Some(ci) = self.controller_for(id.kind) else {
                plan.unsupported.push(id.clone());
                continue;
            };
            let result = match &obs.observed[ci] {
                Err(e) => Err(e.clone()),
                Ok(_) if r.depends_on.iter().any(|d| failed.contains(d)) => {
                    let dep = r
                        .depends_on
                        .iter()
                        .find(|d| failed.contains(*d))
                        .expect("found above");
                    Err(Error::Dependency(dep.clone()))
                }
                Ok(o) => self.controllers[ci].diff(desired, r, o, &obs.refs),
            };
            match result {
                Ok(Some(mut c)) => {
                    c.observe_only = r.observe_only;
                    plan.changes.push((ci, c));
                }
                Ok(None) => plan.in_sync.push(id.clone()),
                Err(e) => {
                    failed.insert(id.clone());
                    plan.errors.push(ResourceError::new(id.clone(), &e));
                }
            }
        }
        let delete = prune || desired.stack.deletion_policy == DeletionPolicy::Delete;
        for (ci, (c, o)) in self.controllers.iter().zip(&obs.observed).enumerate().rev() {
            if let Ok(o) = o {
                plan.removed
                    .extend(c.removed(desired, o, delete).into_iter().map(|ch| (ci, ch)));
            }
        }
        plan
    }

    /// Applies the desired state: every resource in dependency order, its diff recomputed with
    /// the values known at that moment; then the removals.
    pub async fn apply(&self, desired: &DesiredState, obs: &Observation, prune: bool) -> Applied {
        let mut refs = obs.refs.clone();
        let mut applied = Applied::default();
        let mut failed: BTreeSet<ResourceId> = BTreeSet::new();
        for id in desired.apply_order() {
            let r = &desired.resources[id];
            let Some(ci) = self.controller_for(id.kind) else {
                continue;
            };
            let ctrl = &self.controllers[ci];
            let span = tracing::info_span!("reconcile", resource = %id);
            let result = async {
                let o = obs.observed[ci].as_ref().map_err(Clone::clone)?;
                // Everything referenced must exist now (created earlier in this pass, or before).
                if let Some(dep) = r
                    .depends_on
                    .iter()
                    .find(|d| failed.contains(*d) || !refs.outputs.contains_key(*d))
                {
                    return Err(Error::Dependency(dep.clone()));
                }
                let Some(change) = ctrl.diff(desired, r, o, &refs)? else {
                    return Ok(None);
                };
                if r.observe_only {
                    tracing::info!("drift on an observe-only resource: not applied");
                    return Ok(None);
                }
                tracing::info!(action = ?change.action, ops = change.ops.len(), "applying");
                for op in &change.ops {
                    if let Some(out) = ctrl.apply(&self.ctx, op).await? {
                        refs.outputs.entry(id.clone()).or_default().extend(out);
                    }
                }
                Ok(Some(change))
            }
            .instrument(span)
            .await;
            match result {
                Ok(Some(c)) => applied.changes.push(c),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(resource = %id, error = %e, "reconcile failed");
                    failed.insert(id.clone());
                    applied.errors.push(ResourceError::new(id.clone(), &e));
                }
            }
        }
        let delete = prune || desired.stack.deletion_policy == DeletionPolicy::Delete;
        for (ci, (c, o)) in self.controllers.iter().zip(&obs.observed).enumerate().rev() {
            let Ok(o) = o else { continue };
            for change in c.removed(desired, o, delete) {
                if change.action != Action::Delete {
                    continue;
                }
                let id = change.id.clone();
                let mut result = Ok(());
                for op in &change.ops {
                    if let Err(e) = self.controllers[ci].apply(&self.ctx, op).await {
                        result = Err(e);
                        break;
                    }
                }
                match result {
                    Ok(()) => applied.changes.push(change),
                    Err(e) => applied.errors.push(ResourceError::new(id, &e)),
                }
            }
        }
        applied
    }
}
