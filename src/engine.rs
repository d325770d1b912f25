//! One pass: observe (every controller, concurrently, batched) → plan (pure) → apply (resources
//! concurrently, bounded, each after everything it references) → observe again to confirm.
//!
//! A pass covers a [`Scope`]: everything (the CLI, the daemon's first pass and every new desired
//! state), or the resources the daemon's schedule says are due. Only the controllers of those
//! resources, and of what they reference, are observed.
//!
//! References are resolved from observed state. During apply, each resource's diff is computed
//! again right before it is applied, with the values created earlier in the same pass, so a
//! workspace recreated out of band updates the policy that names its ARN in that same pass.
//! A failing resource stops only itself and what references it.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{FuturesUnordered, StreamExt};

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
    /// At most this many resources are applied at once.
    concurrency: usize,
    /// Asked right before every write: a daemon that lost its lease stops writing there.
    may_write: Option<WriteGate>,
    /// Since when each resource has been refused as AWS refuses a call naming an object it has
    /// not propagated yet ([`Error::Propagating`]), pass after pass.
    propagating: std::sync::Mutex<BTreeMap<ResourceId, std::time::Instant>>,
}

pub type WriteGate = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// What a pass covers.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The resources reconciled.
    pub resources: BTreeSet<ResourceId>,
    /// Kinds whose owned objects no longer desired are looked for (orphaned or deleted).
    pub removals: BTreeSet<Kind>,
}

impl Scope {
    /// Every resource, every kind.
    pub fn everything(desired: &DesiredState) -> Scope {
        Scope {
            resources: desired.resources.keys().cloned().collect(),
            removals: Kind::all().collect(),
        }
    }
}

/// What one observe read.
pub struct Observation {
    /// By controller; `None` for a controller outside the scope.
    observed: Vec<Option<Result<AnyObserved, Error>>>,
    pub refs: Refs,
    scope: Scope,
}

/// A resource that could not be planned or applied, or is still converging
/// ([`ErrorClass::Waiting`], with when to look again).
#[derive(Debug, Clone, Serialize)]
pub struct ResourceError {
    pub resource: ResourceId,
    pub class: ErrorClass,
    pub error: String,
    #[serde(skip)]
    pub retry_after: Option<std::time::Duration>,
    /// A wait for AWS to propagate a new object ([`Error::Propagating`]), with what was
    /// refused: bounded.
    #[serde(skip)]
    pub propagating: Option<String>,
}

impl ResourceError {
    fn new(resource: ResourceId, e: &Error) -> Self {
        ResourceError {
            resource,
            class: e.class(),
            error: e.to_string(),
            retry_after: e.retry_after(),
            propagating: match e {
                Error::Propagating { what } => Some(what.clone()),
                _ => None,
            },
        }
    }

    pub fn is_waiting(&self) -> bool {
        self.class == ErrorClass::Waiting
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
    /// Whether `reconcile` would write anything, or objects are still converging.
    pub fn has_pending(&self) -> bool {
        self.writes().next().is_some()
            || self.removed.iter().any(|(_, c)| c.action == Action::Delete)
            || self.errors.iter().any(ResourceError::is_waiting)
    }

    /// The changes `reconcile` would apply: not observe-only, and writing something (a change
    /// that only notes something, such as instances left to another stack, is in sync).
    pub fn writes(&self) -> impl Iterator<Item = &Change<AnyOp>> {
        self.changes
            .iter()
            .map(|(_, c)| c)
            .filter(|c| !c.observe_only && !c.is_empty())
    }

    /// Changes that write nothing and only say something.
    pub fn notes_only(&self) -> usize {
        self.changes.iter().filter(|(_, c)| c.is_empty()).count()
    }

    /// Errors other than objects still converging.
    pub fn failures(&self) -> impl Iterator<Item = &ResourceError> {
        self.errors.iter().filter(|e| !e.is_waiting())
    }
}

/// What one pass did and what the check after it found.
pub struct Pass {
    pub applied: Applied,
    pub check: Plan,
}

impl Pass {
    pub fn converged(&self) -> bool {
        self.applied.errors.is_empty() && self.check.errors.is_empty() && !self.check.has_pending()
    }

    /// When nothing failed and objects are still converging (so what waits on them may still
    /// differ): how long until the soonest wants a look again.
    pub fn only_waiting(&self) -> Option<std::time::Duration> {
        let errors = || self.applied.errors.iter().chain(&self.check.errors);
        if errors().any(|e| !e.is_waiting()) {
            return None;
        }
        errors().filter_map(|e| e.retry_after).min()
    }
}

/// What an apply did.
#[derive(Default)]
pub struct Applied {
    pub changes: Vec<Change<AnyOp>>,
    pub errors: Vec<ResourceError>,
    /// How long each resource's reconcile (diff and writes) took, in seconds.
    pub durations: Vec<(Kind, f64)>,
}

impl Engine {
    pub fn new(ctx: Context, concurrency: usize) -> Self {
        Engine {
            controllers: Kind::all().map(Kind::controller).collect(),
            ctx,
            concurrency: concurrency.max(1),
            may_write: None,
            propagating: Default::default(),
        }
    }

    /// Makes every write ask `gate` first; when it says no, the resource is skipped.
    pub fn gated(mut self, gate: WriteGate) -> Self {
        self.may_write = Some(gate);
        self
    }

    /// One operation, if writes are allowed now.
    async fn write(
        &self,
        ctrl: &dyn DynController,
        op: &AnyOp,
    ) -> Result<Option<stackwarden_controllers::model::Outputs>, Error> {
        if self.may_write.as_ref().is_some_and(|may| !may()) {
            return Err(Error::Skipped(
                "the lease was lost: another daemon writes now".into(),
            ));
        }
        ctrl.apply(&self.ctx, op).await
    }

    fn controller_for(&self, kind: Kind) -> Option<usize> {
        self.controllers.iter().position(|c| c.kind() == kind)
    }

    /// One pass over `scope`: observe; apply when `write` (a daemon without the lease only
    /// observes); confirm with a second observation only when something was written, so a
    /// converged pass is reads only.
    pub async fn pass(
        &self,
        desired: &DesiredState,
        scope: Scope,
        prune: bool,
        write: bool,
    ) -> Pass {
        let obs = self.observe(desired, scope.clone()).await;
        if !write {
            let check = self.plan(desired, &obs, prune);
            return Pass {
                applied: Applied::default(),
                check,
            };
        }
        let mut applied = self.apply(desired, &obs, prune).await;
        let mut check = if applied.changes.is_empty() {
            self.plan(desired, &obs, prune)
        } else {
            let after = self.observe(desired, scope.clone()).await;
            self.plan(desired, &after, prune)
        };
        self.bound_propagation(&scope, &mut applied.errors, &mut check.errors);
        Pass { applied, check }
    }

    /// A propagation wait is bounded ([`stackwarden_controllers::controller::Waits::propagation`]):
    /// AWS answers the same refusal for an object that does not exist at all (an instance
    /// profile misspelt), which no wait mends. Refused for longer, it becomes an error, retried
    /// with backoff, saying so.
    fn bound_propagation(
        &self,
        scope: &Scope,
        applied: &mut [ResourceError],
        check: &mut [ResourceError],
    ) {
        let limit = self.ctx.waits.propagation;
        let now = std::time::Instant::now();
        let mut since = self.propagating.lock().unwrap_or_else(|e| e.into_inner());
        let still: BTreeSet<ResourceId> = applied
            .iter()
            .chain(check.iter())
            .filter(|e| e.propagating.is_some())
            .map(|e| e.resource.clone())
            .collect();
        since.retain(|id, _| still.contains(id) || !scope.resources.contains(id));
        for e in applied.iter_mut().chain(check.iter_mut()) {
            let Some(what) = &e.propagating else {
                continue;
            };
            let first = *since.entry(e.resource.clone()).or_insert(now);
            if now.duration_since(first) < limit {
                continue;
            }
            e.error = format!(
                "{what}: refused for {}s, longer than AWS takes to propagate a new object: check that what it names exists",
                now.duration_since(first).as_secs()
            );
            e.class = ErrorClass::Retryable;
            e.retry_after = None;
            e.propagating = None;
        }
    }

    /// Reads what `scope` needs, all controllers at once: the controllers of its resources, of
    /// what they reference, and of the kinds whose removals it looks for.
    pub async fn observe(&self, desired: &DesiredState, scope: Scope) -> Observation {
        let mut kinds: BTreeSet<Kind> = scope.removals.clone();
        for id in &scope.resources {
            kinds.insert(id.kind);
            if let Some(r) = desired.resources.get(id) {
                kinds.extend(r.depends_on.iter().map(|d| d.kind));
            }
        }
        // One observation's shared reads (a list several kinds need is made once).
        let ctx = self.ctx.for_observation();
        let reads = self.controllers.iter().map(|c| {
            let needed = kinds.contains(&c.kind());
            let ctx = &ctx;
            async move {
                if needed {
                    Some(c.observe(ctx, desired).await)
                } else {
                    None
                }
            }
        });
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
                Some(Ok(o)) => refs.outputs.extend(c.outputs(desired, o)),
                Some(Err(e)) => tracing::warn!(error = %e, kind = %c.kind(), "observe failed"),
                None => {}
            }
        }
        Observation {
            observed,
            refs,
            scope,
        }
    }

    /// The observed state of one controller; an error when its observe failed.
    fn observed<'o>(&self, obs: &'o Observation, ci: usize) -> Result<&'o AnyObserved, Error> {
        match &obs.observed[ci] {
            Some(Ok(o)) => Ok(o),
            Some(Err(e)) => Err(e.clone()),
            None => Err(Error::Skipped(format!(
                "{} was not observed in this pass",
                self.controllers[ci].kind()
            ))),
        }
    }

    /// Controllers whose removed objects the observation's scope looks for.
    fn removals<'o>(
        &self,
        obs: &'o Observation,
    ) -> impl Iterator<Item = (usize, &dyn DynController, &'o AnyObserved)> + use<'_, 'o> {
        self.controllers
            .iter()
            .zip(&obs.observed)
            .enumerate()
            .rev()
            .filter_map(move |(ci, (c, o))| match o {
                Some(Ok(o)) if obs.scope.removals.contains(&c.kind()) => Some((ci, c.as_ref(), o)),
                _ => None,
            })
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
        // The observed values, and those a planned change gives its object's attributes
        // (a template's next version): what references them is planned as apply will make it.
        let mut refs = std::borrow::Cow::Borrowed(&obs.refs);
        for id in desired.apply_order() {
            if !obs.scope.resources.contains(id) {
                continue;
            }
            let r = &desired.resources[id];
            let Some(ci) = self.controller_for(id.kind) else {
                plan.unsupported.push(id.clone());
                continue;
            };
            let result = match self.observed(obs, ci) {
                Err(e) => Err(e),
                Ok(_) if r.depends_on.iter().any(|d| failed.contains(d)) => {
                    let dep = r
                        .depends_on
                        .iter()
                        .find(|d| failed.contains(*d))
                        .expect("found above");
                    Err(Error::Dependency(dep.clone()))
                }
                Ok(o) => self.controllers[ci].diff(desired, r, o, &refs),
            };
            match result {
                Ok(Some(mut c)) => {
                    c.observe_only = r.observe_only;
                    if !c.outputs.is_empty() && !r.observe_only {
                        let outputs = refs.to_mut().outputs.entry(id.clone()).or_default();
                        outputs.extend(c.outputs.clone());
                    }
                    plan.changes.push((ci, c));
                }
                Ok(None) => plan.in_sync.push(id.clone()),
                Err(e) => {
                    // An object still converging exists: what references it goes on.
                    if e.class() != ErrorClass::Waiting {
                        failed.insert(id.clone());
                    }
                    plan.errors.push(ResourceError::new(id.clone(), &e));
                }
            }
        }
        let delete = prune || desired.stack.deletion_policy == DeletionPolicy::Delete;
        for (ci, c, o) in self.removals(obs) {
            plan.removed
                .extend(c.removed(desired, o, delete).into_iter().map(|ch| (ci, ch)));
        }
        plan
    }

    /// Applies the scope: its resources concurrently (at most `concurrency` at once), each
    /// started only when everything it references in the scope is done, its diff recomputed
    /// with the values known at that moment; then the removals, one at a time.
    pub async fn apply(&self, desired: &DesiredState, obs: &Observation, prune: bool) -> Applied {
        let order: Vec<&ResourceId> = desired
            .apply_order()
            .into_iter()
            .filter(|id| obs.scope.resources.contains(*id))
            .collect();
        let position: BTreeMap<&ResourceId, usize> =
            order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        struct Progress {
            refs: Refs,
            failed: BTreeSet<ResourceId>,
            /// Still converging: what needs their attributes waits with them.
            waiting: BTreeSet<ResourceId>,
            changes: Vec<(usize, Change<AnyOp>)>,
            errors: Vec<(usize, ResourceError)>,
            durations: Vec<(Kind, f64)>,
        }
        let mut progress = Progress {
            refs: obs.refs.clone(),
            failed: BTreeSet::new(),
            waiting: BTreeSet::new(),
            changes: Vec::new(),
            errors: Vec::new(),
            durations: Vec::new(),
        };
        in_dependency_order(
            &order,
            |id| &desired.resources[id].depends_on,
            self.concurrency,
            &mut progress,
            |p, id| {
                // What it needs of the others (what it references), as known when it starts:
                // copying only that keeps a large batch linear.
                let deps = &desired.resources[id].depends_on;
                let refs = Refs {
                    stack: p.refs.stack.clone(),
                    outputs: deps
                        .iter()
                        .chain([id])
                        .filter_map(|d| Some((d.clone(), p.refs.outputs.get(d)?.clone())))
                        .collect(),
                };
                let failed: BTreeSet<ResourceId> = deps
                    .iter()
                    .filter(|d| p.failed.contains(*d))
                    .cloned()
                    .collect();
                let waiting: BTreeSet<ResourceId> = deps
                    .iter()
                    .filter(|d| p.waiting.contains(*d))
                    .cloned()
                    .collect();
                async move {
                    let started = std::time::Instant::now();
                    let result = self
                        .reconcile(desired, obs, id, &refs, &failed, &waiting)
                        .instrument(tracing::info_span!("reconcile", resource = %id))
                        .await;
                    (result, started.elapsed().as_secs_f64())
                }
            },
            |p, id, (result, seconds)| {
                p.durations.push((id.kind, seconds));
                match result {
                    Ok(Some((change, outputs))) => {
                        if !outputs.is_empty() {
                            p.refs
                                .outputs
                                .entry(id.clone())
                                .or_default()
                                .extend(outputs);
                        }
                        p.changes.push((position[id], change));
                    }
                    Ok(None) => {}
                    Err(e) if e.class() == ErrorClass::Waiting => {
                        tracing::info!(resource = %id, "{e}");
                        p.waiting.insert(id.clone());
                        p.errors
                            .push((position[id], ResourceError::new(id.clone(), &e)));
                    }
                    Err(e) => {
                        tracing::warn!(resource = %id, error = %e, "reconcile failed");
                        // A change AWS reports ended without success (an instance refresh
                        // that failed) leaves the object as observed, with its attributes:
                        // what references it goes on (a group's provisioning still reaches
                        // the instances the failed refresh left).
                        if !matches!(e, Error::Failed(_)) {
                            p.failed.insert(id.clone());
                        }
                        p.errors
                            .push((position[id], ResourceError::new(id.clone(), &e)));
                    }
                }
            },
        )
        .await;
        let Progress {
            mut changes,
            mut errors,
            durations,
            ..
        } = progress;
        // Reported in dependency order, whatever order they finished in.
        changes.sort_by_key(|(i, _)| *i);
        errors.sort_by_key(|(i, _)| *i);
        let mut applied = Applied {
            changes: changes.into_iter().map(|(_, c)| c).collect(),
            errors: errors.into_iter().map(|(_, e)| e).collect(),
            durations,
        };
        let delete = prune || desired.stack.deletion_policy == DeletionPolicy::Delete;
        for (_, c, o) in self.removals(obs) {
            for change in c.removed(desired, o, delete) {
                if change.action != Action::Delete {
                    continue;
                }
                let id = change.id.clone();
                let mut result = Ok(());
                for op in &change.ops {
                    if let Err(e) = self.write(c, op).await {
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

    /// Reconciles one resource: its diff against the observation and the references known
    /// now, then its operations. Returns the change applied and the values it created.
    async fn reconcile(
        &self,
        desired: &DesiredState,
        obs: &Observation,
        id: &ResourceId,
        refs: &Refs,
        failed: &BTreeSet<ResourceId>,
        waiting: &BTreeSet<ResourceId>,
    ) -> Result<Option<(Change<AnyOp>, stackwarden_controllers::model::Outputs)>, Error> {
        let r = &desired.resources[id];
        let Some(ci) = self.controller_for(id.kind) else {
            return Ok(None);
        };
        let ctrl = &self.controllers[ci];
        let o = self.observed(obs, ci)?;
        // Everything referenced must exist now (created earlier in this pass, or before); what
        // references an object still converging that has no attributes yet waits with it.
        if let Some(dep) = r
            .depends_on
            .iter()
            .find(|d| waiting.contains(*d) && !refs.outputs.contains_key(*d))
        {
            return Err(Error::waiting(
                format!("{dep}, which it references, is still converging"),
                stackwarden_controllers::managed::LOOK_AGAIN,
            ));
        }
        if let Some(dep) = r
            .depends_on
            .iter()
            .find(|d| failed.contains(*d) || !refs.outputs.contains_key(*d))
        {
            return Err(Error::Dependency(dep.clone()));
        }
        let Some(change) = ctrl.diff(desired, r, o, refs)? else {
            return Ok(None);
        };
        if r.observe_only {
            tracing::info!("drift on an observe-only resource: not applied");
            return Ok(None);
        }
        tracing::info!(action = ?change.action, ops = change.ops.len(), "applying");
        let mut outputs = stackwarden_controllers::model::Outputs::default();
        for op in &change.ops {
            if let Some(out) = self.write(ctrl.as_ref(), op).await? {
                outputs.extend(out);
            }
        }
        Ok(Some((change, outputs)))
    }
}

/// Runs `start(state, id)` for every id of `order` (a dependency order), at most `limit` at
/// once, each only once everything it depends on within `order` has finished; `done(state, id,
/// result)` records each as it finishes, so the work started after it sees its effects.
/// Dependencies outside `order` count as finished. Each id runs exactly once.
async fn in_dependency_order<'a, S, T, Fut>(
    order: &[&'a ResourceId],
    deps: impl Fn(&ResourceId) -> &'a BTreeSet<ResourceId>,
    limit: usize,
    state: &mut S,
    mut start: impl FnMut(&mut S, &'a ResourceId) -> Fut,
    mut done: impl FnMut(&mut S, &'a ResourceId, T),
) where
    Fut: std::future::Future<Output = T>,
{
    let mut waiting: Vec<&ResourceId> = order.to_vec();
    let mut unfinished: BTreeSet<&ResourceId> = order.iter().copied().collect();
    let mut running = FuturesUnordered::new();
    loop {
        let mut i = 0;
        while running.len() < limit.max(1) && i < waiting.len() {
            let id = waiting[i];
            if deps(id).iter().any(|d| unfinished.contains(d)) {
                i += 1;
                continue;
            }
            waiting.remove(i);
            let work = start(state, id);
            running.push(async move { (id, work.await) });
        }
        let Some((id, result)) = running.next().await else {
            break;
        };
        unfinished.remove(id);
        done(state, id, result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    fn id(name: &str) -> ResourceId {
        ResourceId::new(stackwarden_controllers::iam::ROLE, name)
    }

    #[tokio::test(start_paused = true)]
    async fn independent_work_runs_concurrently_up_to_the_limit_and_dependents_wait() {
        // a, b, c, d independent (1 s each); e depends on a and d.
        let ids: Vec<ResourceId> = ["a", "b", "c", "d", "e"].into_iter().map(id).collect();
        let order: Vec<&ResourceId> = ids.iter().collect();
        let none = BTreeSet::new();
        let e_deps = BTreeSet::from([id("a"), id("d")]);
        let t0 = Instant::now();
        // (running now, most at once, (id, started, finished) for each)
        let mut state = (0usize, 0usize, Vec::<(String, u64, u64)>::new());
        let started = std::sync::Mutex::new(BTreeMap::new());
        in_dependency_order(
            &order,
            |i| if i.name == "e" { &e_deps } else { &none },
            2,
            &mut state,
            |s, i| {
                s.0 += 1;
                s.1 = s.1.max(s.0);
                started
                    .lock()
                    .unwrap()
                    .insert(i.name.clone(), t0.elapsed().as_secs());
                async { tokio::time::sleep(Duration::from_secs(1)).await }
            },
            |s, i, ()| {
                s.0 -= 1;
                let at = started.lock().unwrap()[&i.name];
                s.2.push((i.name.clone(), at, t0.elapsed().as_secs()));
            },
        )
        .await;
        let (_, most, mut runs) = state;
        assert_eq!(most, 2, "never more than the limit at once");
        runs.sort();
        assert_eq!(
            runs,
            vec![
                ("a".into(), 0, 1),
                ("b".into(), 0, 1),
                ("c".into(), 1, 2),
                ("d".into(), 1, 2),
                ("e".into(), 2, 3),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dependency_outside_the_batch_does_not_block() {
        let ids = [id("x")];
        let order: Vec<&ResourceId> = ids.iter().collect();
        let deps = BTreeSet::from([id("not-in-this-batch")]);
        let mut ran = Vec::new();
        in_dependency_order(
            &order,
            |_| &deps,
            4,
            &mut ran,
            |_, i| async move { i.name.clone() },
            |ran, _, name| ran.push(name),
        )
        .await;
        assert_eq!(ran, vec!["x".to_string()]);
    }
}
