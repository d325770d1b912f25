//! When each resource is reconciled next: the daemon's per-resource schedule.
//!
//! Pure bookkeeping over [`Instant`]s, no I/O, so it is tested with paused time. The loop asks
//! [`Schedule::due`] what to reconcile now, runs one batch of it, reports each resource's
//! [`Outcome`], and sleeps until [`Schedule::next_wake`] (or a change of the desired directory).
//!
//! - Drift resync: each kind has its own interval (default 60 s), stretched or shrunk by up to
//!   10% at random each time, so daemons started together do not read AWS in lockstep. Kinds
//!   that are nearly due join the batch of one that is due, so the jitter does not split one
//!   controller's reads into several batches.
//! - A retryable failure (throttling, a 5xx, a resource still converging) backs that resource off
//!   exponentially with jitter, capped; success resets it (controller-runtime's `Forget`).
//! - A terminal failure (a name owned by someone else, a value AWS rejects) parks the resource
//!   until its own desired state changes: retrying cannot help and would only spend API calls.
//! - A new valid desired state makes every resource due at once (a full pass).
//!
//! It never hands out the same resource twice in one batch, and the loop runs one batch at a
//! time, so a resource is never reconciled twice at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use stackwarden_controllers::{DesiredState, ErrorClass, Kind, ResourceId};
use tokio::time::Instant;

/// How often each kind is read again when nothing else happens.
#[derive(Debug, Clone, PartialEq)]
pub struct Resync {
    pub default: Duration,
    pub per_kind: BTreeMap<Kind, Duration>,
}

impl Default for Resync {
    fn default() -> Self {
        Resync {
            default: Duration::from_secs(60),
            per_kind: BTreeMap::new(),
        }
    }
}

impl Resync {
    /// `--resync` values: `DURATION` (every kind) or `KIND=DURATION` (`host=5m`,
    /// `iam.role=10m`), the later winning.
    pub fn parse(values: &[String]) -> Result<Resync, String> {
        let mut r = Resync::default();
        for v in values {
            let duration = |s: &str| {
                let d = stackwarden_controllers::desired::parse_duration(s)
                    .map_err(|e| format!("{v}: {e}"))?;
                if d.is_zero() {
                    return Err(format!("{v}: the interval must be positive"));
                }
                Ok(d)
            };
            match v.split_once('=') {
                None => r.default = duration(v)?,
                Some((kind, d)) => {
                    let k = Kind::from_path(kind.trim()).ok_or_else(|| {
                        let known: Vec<_> = Kind::all().map(|k| k.path()).collect();
                        format!("{v}: unknown kind {kind:?} (one of {})", known.join(", "))
                    })?;
                    r.per_kind.insert(k, duration(d)?);
                }
            }
        }
        Ok(r)
    }

    pub fn of(&self, kind: Kind) -> Duration {
        self.per_kind.get(&kind).copied().unwrap_or(self.default)
    }
}

/// Exponential backoff with jitter for retryable failures.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The wait after the `failures`-th failure in a row (1 = the first): `first`, doubling,
    /// at most `cap`, then scaled by a random factor in [0.5, 1] ("equal jitter": never less
    /// than half, so a throttled account is not hit again at once).
    pub fn delay(&self, failures: u32, random: f64) -> Duration {
        let exp = self
            .first
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)))
            .min(self.cap);
        exp.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
    }
}

/// How one resource's reconcile ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In sync (or changed and confirmed).
    Ok,
    /// Failed in a way that may pass later, or still converging.
    Retry,
    /// Failed in a way only a change of its desired state can fix.
    Terminal,
    /// Still converging, not failing: look again after this long (no backoff).
    Wait(Duration),
}

impl Outcome {
    /// The outcome an error of this class (and, for an object still converging, this wait)
    /// makes.
    pub fn of(class: ErrorClass, retry_after: Option<Duration>) -> Self {
        match class {
            ErrorClass::Terminal => Outcome::Terminal,
            ErrorClass::Waiting => Outcome::Wait(retry_after.unwrap_or(Duration::from_secs(2))),
            ErrorClass::Retryable | ErrorClass::Throttled => Outcome::Retry,
        }
    }
}

#[derive(Debug)]
struct Entry {
    fingerprint: u64,
    failures: u32,
    /// Set while backing off: not reconciled before then, even when its kind resyncs.
    retry_at: Option<Instant>,
    /// Set by a terminal error: not reconciled until `fingerprint` changes.
    parked: bool,
    /// Reconciled in the next batch whatever the timers say (new, changed, first pass).
    now: bool,
}

/// What one batch covers.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Due {
    pub resources: BTreeSet<ResourceId>,
    /// Kinds whose resync this batch is: their removed objects are looked for too.
    pub kinds: BTreeSet<Kind>,
}

impl Due {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.kinds.is_empty()
    }
}

pub struct Schedule {
    resync: Resync,
    backoff: Backoff,
    /// When each kind is resynced next.
    kinds: BTreeMap<Kind, Instant>,
    resources: BTreeMap<ResourceId, Entry>,
    random: Box<dyn FnMut() -> f64 + Send>,
}

impl Schedule {
    /// A schedule where every resource of `desired` is due now.
    pub fn new(resync: Resync, backoff: Backoff, desired: &DesiredState, now: Instant) -> Self {
        let mut s = Schedule {
            resync,
            backoff,
            kinds: Kind::all().map(|k| (k, now)).collect(),
            resources: BTreeMap::new(),
            random: Box::new(fastrand::f64),
        };
        s.reload(desired, now);
        s
    }

    /// Replaces the source of randomness (tests pin it).
    #[cfg(test)]
    fn with_random(mut self, random: impl FnMut() -> f64 + Send + 'static) -> Self {
        self.random = Box::new(random);
        self
    }

    /// A new valid desired state: every resource is due now, except those parked whose own
    /// desired state did not change; resources no longer desired are forgotten.
    pub fn reload(&mut self, desired: &DesiredState, now: Instant) {
        self.resources
            .retain(|id, _| desired.resources.contains_key(id));
        // The stack's tags go on every resource: changing them is a change of each.
        let stack = desired.stack.fingerprint();
        for (id, r) in &desired.resources {
            let fingerprint = r.fingerprint() ^ stack;
            match self.resources.get_mut(id) {
                Some(e) if e.fingerprint == fingerprint => e.now = !e.parked,
                _ => {
                    self.resources.insert(
                        id.clone(),
                        Entry {
                            fingerprint,
                            failures: 0,
                            retry_at: None,
                            parked: false,
                            now: true,
                        },
                    );
                }
            }
        }
        // Removals are looked for across every kind.
        for at in self.kinds.values_mut() {
            *at = now;
        }
    }

    /// What is due at `now`. When any kind's resync is due, kinds due within the next fifth of
    /// their own interval come along: one controller observes several kinds (IAM policies,
    /// roles and profiles), so resyncing them together reads AWS once instead of thrice.
    pub fn due(&self, now: Instant) -> Due {
        let any = self.kinds.values().any(|at| *at <= now);
        let kinds: BTreeSet<Kind> = self
            .kinds
            .iter()
            .filter(|(k, at)| any && **at <= now + self.resync.of(**k) / 5)
            .map(|(k, _)| *k)
            .collect();
        let resources = self
            .resources
            .iter()
            .filter(|(id, e)| {
                !e.parked
                    && match e.retry_at {
                        Some(at) => at <= now,
                        None => e.now || kinds.contains(&id.kind),
                    }
            })
            .map(|(id, _)| id.clone())
            .collect();
        Due { resources, kinds }
    }

    /// The earliest moment something becomes due.
    pub fn next_wake(&self) -> Option<Instant> {
        let retries = self
            .resources
            .values()
            .filter(|e| !e.parked)
            .filter_map(|e| e.retry_at);
        self.kinds.values().copied().chain(retries).min()
    }

    /// A batch covering `due` finished at `now` with these outcomes (resources of `due` that
    /// are missing from `outcomes` count as [`Outcome::Ok`]).
    pub fn record(&mut self, due: &Due, outcomes: &BTreeMap<ResourceId, Outcome>, now: Instant) {
        for kind in &due.kinds {
            let interval = self.resync.of(*kind);
            // ±10%: a uniform factor in [0.9, 1.1].
            let jittered = interval.mul_f64(0.9 + 0.2 * (self.random)());
            self.kinds.insert(*kind, now + jittered);
        }
        for id in &due.resources {
            let Some(e) = self.resources.get_mut(id) else {
                continue;
            };
            e.now = false;
            match outcomes.get(id).copied().unwrap_or(Outcome::Ok) {
                Outcome::Ok => {
                    e.failures = 0;
                    e.retry_at = None;
                }
                Outcome::Retry => {
                    e.failures = e.failures.saturating_add(1);
                    e.retry_at = Some(now + self.backoff.delay(e.failures, (self.random)()));
                }
                Outcome::Terminal => {
                    e.parked = true;
                    e.retry_at = None;
                }
                Outcome::Wait(after) => {
                    e.failures = 0;
                    e.retry_at = Some(now + after);
                }
            }
        }
    }

    /// Makes every resource of `kinds` due in the next batch (a verify found files changed on
    /// hosts they push to); parked ones stay parked.
    pub fn wake(&mut self, kinds: &BTreeSet<Kind>) {
        for (id, e) in &mut self.resources {
            if kinds.contains(&id.kind) && !e.parked {
                e.now = true;
            }
        }
    }

    /// Resources parked by a terminal error.
    pub fn parked(&self) -> impl Iterator<Item = &ResourceId> {
        self.resources
            .iter()
            .filter(|(_, e)| e.parked)
            .map(|(id, _)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_ROLES: &str = r#"
[stack]
name = "demo"

[iam.role.a]
trust = { services = ["ec2.amazonaws.com"] }

[iam.role.b]
trust = { services = ["ec2.amazonaws.com"] }

[amp.workspace.main]
alias = "main"
"#;

    /// The desired state of one `stack.toml`, through the real loader.
    fn desired_from(toml: &str) -> DesiredState {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stack.toml"), toml).unwrap();
        crate::load::load(dir.path()).unwrap_or_else(|d| panic!("{d:?}"))
    }

    fn id(s: &str) -> ResourceId {
        let (kind, name) = s.rsplit_once('.').unwrap();
        ResourceId::new(Kind::from_path(kind).unwrap(), name)
    }

    fn schedule(desired: &DesiredState) -> Schedule {
        let resync = Resync::parse(&["60s".into(), "amp.workspace=5m".into()]).unwrap();
        // The middle of every random range: exact figures, no jitter.
        Schedule::new(resync, Backoff::default(), desired, Instant::now()).with_random(|| 0.5)
    }

    fn ok(due: &Due) -> BTreeMap<ResourceId, Outcome> {
        due.resources
            .iter()
            .map(|i| (i.clone(), Outcome::Ok))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn everything_is_due_first_then_each_kind_at_its_own_resync() {
        let desired = desired_from(TWO_ROLES);
        let mut s = schedule(&desired);
        let first = s.due(Instant::now());
        assert_eq!(first.resources.len(), 3);
        assert_eq!(first.kinds.len(), Kind::all().count());
        s.record(&first, &ok(&first), Instant::now());
        assert!(s.due(Instant::now()).is_empty());
        assert_eq!(
            s.next_wake(),
            Some(Instant::now() + Duration::from_secs(60))
        );

        tokio::time::advance(Duration::from_secs(60)).await;
        let resync = s.due(Instant::now());
        assert_eq!(
            resync.resources,
            BTreeSet::from([id("iam.role.a"), id("iam.role.b")])
        );
        assert!(resync.kinds.contains(&stackwarden_controllers::iam::ROLE));
        assert!(!resync
            .kinds
            .contains(&stackwarden_controllers::amp::WORKSPACE));
        s.record(&resync, &ok(&resync), Instant::now());

        tokio::time::advance(Duration::from_secs(240)).await;
        let later = s.due(Instant::now());
        assert!(later.resources.contains(&id("amp.workspace.main")));
        assert!(later
            .kinds
            .contains(&stackwarden_controllers::amp::WORKSPACE));
    }

    #[tokio::test(start_paused = true)]
    async fn kinds_nearly_due_join_the_batch_of_one_that_is_due() {
        let desired = desired_from(TWO_ROLES);
        let mut s = schedule(&desired);
        let first = s.due(Instant::now());
        s.record(&first, &ok(&first), Instant::now());
        let roles = Due {
            resources: BTreeSet::from([id("iam.role.a"), id("iam.role.b")]),
            kinds: BTreeSet::from([stackwarden_controllers::iam::ROLE]),
        };
        tokio::time::advance(Duration::from_secs(5)).await;
        s.record(&roles, &ok(&roles), Instant::now());
        // Policies are due at 60 s, roles at 65 s: within a fifth of 60 s, so one batch.
        tokio::time::advance(Duration::from_secs(55)).await;
        let due = s.due(Instant::now());
        assert!(due.kinds.contains(&stackwarden_controllers::iam::POLICY));
        assert!(due.kinds.contains(&stackwarden_controllers::iam::ROLE));
        assert!(due.resources.contains(&id("iam.role.a")));
        // The workspace resyncs every 5 minutes: not pulled in a minute early.
        assert!(!due.kinds.contains(&stackwarden_controllers::amp::WORKSPACE));
        assert!(!due.resources.contains(&id("amp.workspace.main")));
    }

    #[tokio::test(start_paused = true)]
    async fn resync_is_jittered_by_at_most_ten_percent() {
        let desired = desired_from(TWO_ROLES);
        for (random, secs) in [(0.0, 54.0), (1.0, 66.0)] {
            let mut s = schedule(&desired).with_random(move || random);
            let first = s.due(Instant::now());
            s.record(&first, &ok(&first), Instant::now());
            let wake = s.next_wake().unwrap() - Instant::now();
            assert_eq!(wake, Duration::from_secs_f64(secs));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_back_off_exponentially_up_to_the_cap_and_reset_on_success() {
        let desired = desired_from(TWO_ROLES);
        let mut s = schedule(&desired);
        let a = id("iam.role.a");
        let failing = BTreeMap::from([(a.clone(), Outcome::Retry)]);
        let mut waits = Vec::new();
        let mut due = s.due(Instant::now());
        for _ in 0..10 {
            s.record(&due, &failing, Instant::now());
            // Only the failing resource comes back before the resync.
            let retry_at = s.resources[&a].retry_at.unwrap();
            waits.push((retry_at - Instant::now()).as_secs_f64());
            tokio::time::advance(retry_at - Instant::now()).await;
            due = s.due(Instant::now());
            assert!(due.resources.contains(&a));
            due.resources.retain(|i| *i == a);
            due.kinds.clear();
        }
        // 2 s doubling, capped at 300 s, each times 0.75 (the jitter's middle).
        assert_eq!(
            waits,
            vec![1.5, 3.0, 6.0, 12.0, 24.0, 48.0, 96.0, 192.0, 225.0, 225.0]
        );
        s.record(&due, &ok(&due), Instant::now());
        assert_eq!(s.resources[&a].failures, 0);
        assert_eq!(s.resources[&a].retry_at, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resource_backing_off_skips_its_kinds_resync() {
        let desired = desired_from(TWO_ROLES);
        let mut s = schedule(&desired);
        let a = id("iam.role.a");
        let first = s.due(Instant::now());
        for _ in 0..6 {
            let due = Due {
                resources: BTreeSet::from([a.clone()]),
                kinds: BTreeSet::new(),
            };
            s.record(
                &due,
                &BTreeMap::from([(a.clone(), Outcome::Retry)]),
                Instant::now(),
            );
        }
        let mut rest = first.clone();
        rest.resources.remove(&a);
        s.record(&rest, &ok(&rest), Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
        // The sixth failure waits 48 s: retried before the resync, then at its own pace.
        let due = s.due(Instant::now());
        assert!(due.resources.contains(&a));
        s.record(
            &due,
            &BTreeMap::from([(a.clone(), Outcome::Retry)]),
            Instant::now(),
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        let due = s.due(Instant::now());
        assert!(due.kinds.contains(&stackwarden_controllers::iam::ROLE));
        assert!(!due.resources.contains(&a), "{due:?}");
        assert!(due.resources.contains(&id("iam.role.b")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_terminal_error_parks_the_resource_until_its_desired_state_changes() {
        let desired = desired_from(TWO_ROLES);
        let mut s = schedule(&desired);
        let a = id("iam.role.a");
        let first = s.due(Instant::now());
        s.record(
            &first,
            &BTreeMap::from([(a.clone(), Outcome::Terminal)]),
            Instant::now(),
        );
        assert_eq!(s.parked().collect::<Vec<_>>(), vec![&a]);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!s.due(Instant::now()).resources.contains(&a));

        // Another resource changed: a full pass, still without the parked one.
        let other = TWO_ROLES.replace("alias = \"main\"", "alias = \"other\"");
        s.reload(&desired_from(&other), Instant::now());
        let due = s.due(Instant::now());
        assert!(due.resources.contains(&id("amp.workspace.main")));
        assert!(!due.resources.contains(&a));

        // Its own desired state changed: due at once.
        let fixed = other.replace(
            "[iam.role.a]\n",
            "[iam.role.a]\nmax_session_duration = \"2h\"\n",
        );
        s.reload(&desired_from(&fixed), Instant::now());
        assert!(s.due(Instant::now()).resources.contains(&a));
        assert_eq!(s.parked().count(), 0);
    }

    #[test]
    fn resync_flags_name_a_default_and_kinds() {
        let r = Resync::parse(&["2m".into(), "host=5m".into(), "iam.role=1h".into()]).unwrap();
        assert_eq!(
            r.of(stackwarden_controllers::iam::POLICY),
            Duration::from_secs(120)
        );
        assert_eq!(
            r.of(stackwarden_controllers::host::HOST),
            Duration::from_secs(300)
        );
        assert_eq!(
            r.of(stackwarden_controllers::iam::ROLE),
            Duration::from_secs(3600)
        );
        // A part's kind is set apart by its path too.
        let r = Resync::parse(&["grafana.target_group=2h".into()]).unwrap();
        assert_eq!(
            r.of(stackwarden_controllers::grafana::TARGET_GROUP),
            Duration::from_secs(7200)
        );
        assert_eq!(
            r.of(stackwarden_controllers::grafana::GRAFANA),
            Duration::from_secs(60)
        );
        let e = Resync::parse(&["hots=5m".into()]).unwrap_err();
        assert!(e.contains("unknown kind \"hots\""), "{e}");
        assert!(Resync::parse(&["0s".into()]).is_err());
    }
}
