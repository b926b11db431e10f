//! The control plane's core: the store, the snapshot every Envoy converges to, the
//! node registry, and the one way to change the map.
//!
//! A change goes: validate (every problem at once) → plan (`shardmap::diff`) → refuse
//! what needs a rollout → append a version to the store (one transaction, refused if
//! someone else changed the map since) → publish the new snapshot, which every ADS
//! stream sees at once. [`ControlPlane::publish`] and [`Registry::wait_converged`] are
//! the two primitives a rollout is made of.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use shardmap::{Fence, Plan, Problems, RouterConfig, ShardMap, diff};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::nodes::{Convergence, Registry};
use crate::resources::{ResourceType, Snapshot};
use crate::store::{Currency, NewVersion, Store, StoreError, Version, VersionKind};

/// How long a change waits for a finishing rollout to release the change lock.
pub const FINISHING_GRACE: Duration = Duration::from_millis(200);

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("initial map {path}: {message}")]
    InitialMap { path: String, message: String },
    #[error(
        "the stored active map (version {version}) no longer fits this configuration: {problems}"
    )]
    ActiveMap { version: u64, problems: Problems },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// Why a proposed map was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The map is invalid: every problem.
    #[error("the map is invalid")]
    Invalid(Problems),
    /// Another change is running.
    #[error("another change is in progress")]
    Busy,
    /// The map changed since the proposer looked.
    #[error("the active version is {active}, not {expected}: someone else changed the map")]
    Conflict { expected: u64, active: u64 },
    /// The map moves bases: that needs a rollout.
    #[error("this map moves bases; moving bases needs a rollout (fence, restart, activate)")]
    MovesBases(Box<Plan>),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ProposeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { expected, active } => {
                ProposeError::Conflict { expected, active }
            }
            e => ProposeError::Store(e),
        }
    }
}

/// A proposed map change.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub map: ShardMap,
    /// The version the proposer planned against: refused with a conflict if no longer active.
    pub base_version: Option<u64>,
    pub author: String,
    pub comment: String,
    /// Only plan: change nothing.
    pub dry_run: bool,
}

impl Proposal {
    /// A conflict if the proposer planned against another version than `active`.
    pub(crate) fn check_base(&self, active: u64) -> Result<(), ProposeError> {
        match self.base_version {
            Some(expected) if expected != active => {
                Err(ProposeError::Conflict { expected, active })
            }
            _ => Ok(()),
        }
    }
}

/// What a proposal did (or, dry, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The active version the plan was made against.
    pub from_version: u64,
    /// The new active version (`from_version` when nothing was applied).
    pub version: u64,
    pub applied: bool,
    pub dry_run: bool,
    /// Nothing differs from the active map.
    pub unchanged: bool,
    /// The map moves bases: it needs a rollout.
    pub needs_rollout: bool,
    pub plan: Plan,
}

/// Whether this replica may hand an Envoy a map now (see ARCHITECTURE, "A map
/// version never goes back").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// It serves the newest version the store held at its last check.
    Current,
    /// The store holds a newer version than it serves yet (it is adopting it):
    /// it sends no map meanwhile.
    Behind { served: u64, active: u64 },
    /// It cannot show it is current (no etcd session, no answer in time): its
    /// streams end and REST polls get `503`, so Envoys go to another replica.
    NotCurrent { reason: String },
}

/// The running control plane's shared state.
pub struct ControlPlane {
    config: Config,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The version the snapshot was built from (what this replica serves, known
    /// even while the store cannot be read).
    served: std::sync::Mutex<Arc<Version>>,
    /// Held by whoever changes the map: a second change meanwhile gets `Busy`.
    change: Arc<Mutex<()>>,
    metrics: Metrics,
    /// Abort requests and manual confirmations for the running rollout.
    signals: crate::signals::Signals,
    /// Whether the store shows this replica current.
    currency: watch::Receiver<Currency>,
}

impl ControlPlane {
    /// Opens the store, seeds the first version if it holds none, and rebuilds the
    /// snapshot of the active version: a restarted control plane serves what it served.
    pub fn open(config: Config) -> Result<Arc<ControlPlane>, StartError> {
        let store = crate::store::open(&config)?;
        ControlPlane::with_store(config, store)
    }

    /// As [`ControlPlane::open`], with a store already open (tests: in memory).
    pub fn with_store(
        config: Config,
        store: Arc<dyn Store>,
    ) -> Result<Arc<ControlPlane>, StartError> {
        let active = match store.active()? {
            Some(v) => v,
            None => {
                let map = initial_map(&config)?;
                store.append_version(
                    0,
                    &NewVersion::unfenced(
                        VersionKind::Initial,
                        &map,
                        "seactl serve",
                        "initial map",
                    ),
                )?;
                store
                    .active()?
                    .ok_or_else(|| StoreError::Corrupt("the initial version vanished".into()))?
            }
        };
        let plane_problems = check_against(&config, &active.map, &active.fence);
        if !plane_problems.is_empty() {
            return Err(StartError::ActiveMap {
                version: active.version,
                problems: plane_problems,
            });
        }
        let registry = Arc::new(Registry::new(store.load_nodes()?, &config.filter.name));
        let snapshot = build_snapshot(&config, &active);
        let served = std::sync::Mutex::new(Arc::new(active.clone()));
        tracing::info!(
            version = active.version,
            ecds = %snapshot.ecds.version,
            cds = %snapshot.cds.version,
            "serving"
        );
        let currency = store.currency();
        Ok(Arc::new(ControlPlane {
            currency,
            config,
            store,
            registry,
            snapshot: watch::channel(snapshot).0,
            served,
            change: Arc::new(Mutex::new(())),
            metrics: Metrics::default(),
            signals: crate::signals::Signals::default(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This replica's leader term, while it leads (SQLite: always, term 0).
    pub fn leader_term(&self) -> Option<i64> {
        match &*self.store.leadership().borrow() {
            crate::store::Leadership::Leader { term } => Some(*term),
            _ => None,
        }
    }

    /// Serves version `n` when it is newer than what is served: another replica
    /// (the leader) published it. Returns whether it did.
    pub fn adopt(&self, n: u64) -> Result<bool, StoreError> {
        if n <= self.snapshot().map_version {
            return Ok(false);
        }
        let version = self
            .store
            .version(n)?
            .ok_or_else(|| StoreError::Corrupt(format!("version {n} is announced but missing")))?;
        let snapshot = build_snapshot(&self.config, &version);
        let ecds = snapshot.ecds.version.clone();
        let adopted = self.serve(version, snapshot);
        if adopted {
            tracing::info!(version = n, %ecds, "serving the leader's version");
        }
        Ok(adopted)
    }

    /// Whether this replica may hand an Envoy a map now.
    pub fn standing(&self) -> Standing {
        match &*self.currency.borrow() {
            Currency::Unknown { reason } => Standing::NotCurrent {
                reason: reason.clone(),
            },
            Currency::Current { active } => {
                let served = self.snapshot().map_version;
                if served < *active {
                    Standing::Behind {
                        served,
                        active: *active,
                    }
                } else {
                    Standing::Current
                }
            }
        }
    }

    /// A receiver that sees every change of the store's [`Currency`].
    pub fn watch_currency(&self) -> watch::Receiver<Currency> {
        self.currency.clone()
    }

    /// What the API and the running rollout share in memory.
    pub fn rollout_signals(&self) -> &crate::signals::Signals {
        &self.signals
    }

    /// What every Envoy must converge to now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The version served now (from memory: known while the store is unavailable).
    pub fn served(&self) -> Arc<Version> {
        self.served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves `version` as `snapshot`, unless a newer one is served already.
    fn serve(&self, version: Version, snapshot: Arc<Snapshot>) -> bool {
        let mut served = self
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if served.version >= version.version {
            return false;
        }
        *served = Arc::new(version);
        self.snapshot.send_replace(snapshot);
        true
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// The active version.
    pub fn active(&self) -> Result<Version, StoreError> {
        self.store
            .active()?
            .ok_or_else(|| StoreError::Corrupt("the store holds no version".into()))
    }

    /// Every problem of `map` here: invalid, or naming a server the inventory lacks.
    pub fn check_map(&self, map: &ShardMap) -> Result<(), Problems> {
        let problems = check_against(&self.config, map, &Fence::default());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Takes the change lock (held for a whole rollout), or `Busy` when another
    /// change holds it.
    ///
    /// A rollout that just stored its end releases the lock a moment later: when the
    /// store holds no unfinished rollout, this waits for the lock up to
    /// [`FINISHING_GRACE`] (blocking: call it off the async workers).
    pub fn try_begin_change(&self) -> Result<OwnedMutexGuard<()>, ProposeError> {
        let deadline = std::time::Instant::now() + FINISHING_GRACE;
        loop {
            match self.change.clone().try_lock_owned() {
                Ok(g) => return Ok(g),
                Err(_) => {
                    let finishing = self.store.unfinished_rollout()?.is_none();
                    if !finishing || std::time::Instant::now() >= deadline {
                        return Err(ProposeError::Busy);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Validates, plans and (unless dry, and if no base moves) applies a map.
    pub fn propose(&self, p: &Proposal) -> Result<Outcome, ProposeError> {
        self.check_map(&p.map).map_err(ProposeError::Invalid)?;
        let _guard = if p.dry_run {
            None
        } else {
            Some(self.try_begin_change()?)
        };
        let active = self.active()?;
        p.check_base(active.version)?;
        if !active.fence.is_empty() && !p.dry_run {
            // A rollout left its fence up: only the rollout may lift it.
            return Err(ProposeError::Busy);
        }
        let plan = diff(&active.map, &p.map).map_err(ProposeError::Invalid)?;
        let unchanged = plan.is_empty() && active.map == p.map && active.fence.is_empty();
        let mut outcome = Outcome {
            from_version: active.version,
            version: active.version,
            applied: false,
            dry_run: p.dry_run,
            unchanged,
            needs_rollout: plan.moves_bases(),
            plan,
        };
        if p.dry_run || unchanged {
            return Ok(outcome);
        }
        if outcome.needs_rollout {
            return Err(ProposeError::MovesBases(Box::new(outcome.plan)));
        }
        let version = self.publish(
            active.version,
            &NewVersion::unfenced(VersionKind::Map, &p.map, &p.author, &p.comment),
        )?;
        outcome.version = version.version;
        outcome.applied = true;
        Ok(outcome)
    }

    /// Appends a version (if `expected` is still the active one) and makes it what
    /// every Envoy is sent. The caller holds the change lock. The map and its fence
    /// are checked first: nothing an Envoy would refuse is ever stored or sent.
    pub fn publish(&self, expected: u64, new: &NewVersion<'_>) -> Result<Version, ProposeError> {
        let problems = check_against(&self.config, new.map, new.fence);
        if !problems.is_empty() {
            return Err(ProposeError::Invalid(problems));
        }
        let n = self.store.append_version(expected, new)?;
        let version = self
            .store
            .version(n)?
            .ok_or_else(|| StoreError::Corrupt(format!("version {n} vanished")))?;
        let snapshot = build_snapshot(&self.config, &version);
        tracing::info!(
            version = n,
            kind = ?new.kind,
            author = new.author,
            ecds = %snapshot.ecds.version,
            "publishing"
        );
        self.metrics.pushed();
        // Never back: a watch may have delivered this version already.
        self.serve(version.clone(), snapshot);
        Ok(version)
    }

    /// Waits until every connected Envoy ACKed the current filter configuration, one
    /// NACKed it, or `timeout` passed.
    pub async fn wait_ecds_converged(&self, timeout: Duration) -> Convergence {
        let version = self.snapshot().ecds.version.clone();
        self.registry
            .wait_converged(ResourceType::Ecds, &version, timeout)
            .await
    }

    /// Writes changed nodes to the store.
    pub fn flush_nodes(&self) -> Result<usize, StoreError> {
        let (dirty, removed) = self.registry.take_dirty();
        if !removed.is_empty() {
            self.store.delete_nodes(&removed)?;
        }
        if !dirty.is_empty() {
            self.store.save_nodes(&dirty)?;
        }
        Ok(dirty.len())
    }
}

/// The snapshot of a stored version under this configuration.
pub fn build_snapshot(config: &Config, version: &Version) -> Arc<Snapshot> {
    let rc: RouterConfig = version.router_config(&config.filter);
    Snapshot::build(&rc, &config.filter, &config.servers)
}

/// Every problem of a map and fence under `config`.
fn check_against(config: &Config, map: &ShardMap, fence: &Fence) -> Problems {
    let rc = RouterConfig {
        fence: fence.clone(),
        header: config.filter.header.clone(),
        retry_after: config.filter.retry_after,
        ..RouterConfig::new(1, map.clone())
    };
    let mut problems = rc.compile().err().unwrap_or_default();
    let unknown: Vec<&str> = map
        .servers()
        .into_iter()
        .filter(|s| config.server(s).is_none())
        .collect();
    if !unknown.is_empty() {
        let known: Vec<&str> = config.servers.iter().map(|s| s.name.as_str()).collect();
        let mut extra = Problems::default();
        for s in unknown {
            extra.0.push(shardmap::Problem {
                at: "servers".into(),
                message: format!(
                    "`{s}` is not a server of this control plane (known: {})",
                    known.join(", ")
                ),
            });
        }
        problems.0.extend(extra.0);
    }
    problems
}

fn initial_map(config: &Config) -> Result<ShardMap, StartError> {
    let Some(path) = &config.initial_map else {
        return Ok(config.fallback_map());
    };
    let err = |message: String| StartError::InitialMap {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    ShardMap::from_json(&text).map_err(|p| err(p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{plugin_configuration, testing};
    use crate::store::SqliteStore;

    fn plane() -> Arc<ControlPlane> {
        let config = testing::config("/a.wasm", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        ControlPlane::with_store(config, Arc::new(SqliteStore::open_in_memory().unwrap())).unwrap()
    }

    fn map(json: &str) -> ShardMap {
        ShardMap::from_json(json).unwrap()
    }

    fn slots_fence(range: &str) -> Fence {
        Fence {
            slots: vec![range.into()],
            pins: vec![],
        }
    }

    #[test]
    fn a_fence_is_published_as_a_new_version_and_blocks_proposals() {
        let p = plane();
        let active = p.active().unwrap();
        assert_eq!((active.version, active.kind), (1, VersionKind::Initial));
        let fence = slots_fence("8-f");
        let v = p
            .publish(
                1,
                &NewVersion {
                    kind: VersionKind::Fence,
                    map: &active.map,
                    fence: &fence,
                    author: "rollout",
                    comment: "",
                },
            )
            .unwrap();
        assert_eq!(v.version, 2);
        let snap = p.snapshot();
        assert_eq!(
            crate::resources::ecds_map_version(&snap.ecds.version),
            Some(2)
        );
        let json = plugin_configuration(&snap.ecds.resources[0].any).unwrap();
        assert_eq!(RouterConfig::from_json(&json).unwrap().fence, fence);
        let proposal = Proposal {
            map: map(r#"{"default": "a", "paths": [{"prefix": "/x/", "server": "b"}]}"#),
            base_version: None,
            author: "t".into(),
            comment: String::new(),
            dry_run: false,
        };
        assert!(matches!(p.propose(&proposal), Err(ProposeError::Busy)));
        // A dry run still plans.
        let dry = p
            .propose(&Proposal {
                dry_run: true,
                ..proposal
            })
            .unwrap();
        assert!(dry.plan.paths_changed && !dry.applied);
    }

    #[test]
    fn publish_refuses_what_an_envoy_would_refuse() {
        let p = plane();
        let active = p.active().unwrap();
        let bad_fence = slots_fence("zz");
        let r = p.publish(
            1,
            &NewVersion {
                kind: VersionKind::Fence,
                map: &active.map,
                fence: &bad_fence,
                author: "rollout",
                comment: "",
            },
        );
        assert!(matches!(r, Err(ProposeError::Invalid(_))));
        let unknown = map(r#"{"default": "c"}"#);
        let r = p.publish(
            1,
            &NewVersion::unfenced(VersionKind::Map, &unknown, "t", ""),
        );
        let Err(ProposeError::Invalid(problems)) = r else {
            panic!("published a map naming an unknown server")
        };
        assert!(problems.to_string().contains("`c` is not a server"));
        assert_eq!(p.active().unwrap().version, 1);
    }

    #[test]
    fn fence_and_rollback_maps_are_new_higher_versions() {
        let p = plane();
        let active = p.active().unwrap();
        let fence = slots_fence("8-f");
        let mut seen = vec![(active.version, p.snapshot().ecds.version.clone())];
        for (kind, fence) in [
            (VersionKind::Fence, &fence),
            (VersionKind::Rollback, &Fence::default()),
            (VersionKind::Fence, &fence),
            (VersionKind::Map, &Fence::default()),
        ] {
            let expected = seen.last().unwrap().0;
            let v = p
                .publish(
                    expected,
                    &NewVersion {
                        kind,
                        map: &active.map,
                        fence,
                        author: "rollout",
                        comment: "",
                    },
                )
                .unwrap();
            seen.push((v.version, p.snapshot().ecds.version.clone()));
        }
        // Each a new version, higher than every one before, as numbers and as the
        // ECDS version strings Envoys report.
        assert!(
            seen.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
            "{seen:?}"
        );
        // Publishing against an older version is refused: nothing goes back.
        let r = p.publish(
            seen[1].0,
            &NewVersion::unfenced(VersionKind::Rollback, &active.map, "rollout", ""),
        );
        assert!(matches!(r, Err(ProposeError::Conflict { .. })), "{r:?}");
        assert_eq!(p.snapshot().map_version, seen.last().unwrap().0);
    }

    #[test]
    fn the_change_lock_is_exclusive() {
        let p = plane();
        let guard = p.try_begin_change().unwrap();
        assert!(matches!(p.try_begin_change(), Err(ProposeError::Busy)));
        drop(guard);
        assert!(p.try_begin_change().is_ok());
    }
}
